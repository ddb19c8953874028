"""The tfrecord: and list: sources read the images a folder: source reads.

One ImageNet-format shard set (JPEG bytes under image/encoded, 1-based
labels under image/class/label, one corrupt record) and one list file name
the same JPEG files as a class-folder tree; all three must give the same
pixels, labels and teacher probabilities, and the prediction records keep
the shards' bytes unchanged.
"""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from noisy_student.data import image_scan
from noisy_student.data import sources
from noisy_student.data import tfrecords
from noisy_student.model import efficientnet
from noisy_student.pipeline import stages
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import records as pl

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 5
SHARD_SIZES = (4, 7, 5)  # 15 images + 1 corrupt record = 16 records.
BAD_AT = 6  # Position of the corrupt record in the whole record stream.


def _jpeg(rng, i):
    size = (9 + i % 4 * 5, 11 + i % 3 * 4)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(
        buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _example(features):
    feature = {}
    for key, value in features.items():
        if isinstance(value, bytes):
            feature[key] = tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[value]))
        else:
            feature[key] = tf.train.Feature(
                int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Example(features=tf.train.Features(
        feature=feature)).SerializeToString()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A class folder, the same JPEGs as ImageNet-format shards, a list."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    folder = root / "folder"
    images = []  # (class, jpeg bytes), in the folder's order.
    for c, name in enumerate(CLASSES):
        os.makedirs(folder / name)
        for k in range(PER_CLASS):
            data = _jpeg(rng, len(images))
            (folder / name / f"{k:02d}.jpg").write_bytes(data)
            images.append((c, data))
    # The folder's corrupt file is the shards' corrupt record.
    (folder / "bee" / "zz.jpg").write_bytes(b"not a jpeg")
    stream = [_example({"image/encoded": data, "image/class/label": c + 1,
                        "image/class/synset": CLASSES[c].encode()})
              for c, data in images]
    stream.insert(BAD_AT, _example({"image/encoded": b"not a jpeg",
                                    "image/class/label": 2}))
    shards = root / "shards"
    os.makedirs(shards)
    start = 0
    for i, size in enumerate(SHARD_SIZES):
        with tf.io.TFRecordWriter(
                str(shards / f"train-{i:05d}-of-{len(SHARD_SIZES):05d}")) as w:
            for record in stream[start:start + size]:
                w.write(record)
        start += size
    assert start == len(stream)
    # Unlabeled shards: the same images, no label feature at all.
    unlabeled = root / "unlabeled"
    os.makedirs(unlabeled)
    with tf.io.TFRecordWriter(str(unlabeled / "u-0")) as w:
        for _, data in images:
            w.write(_example({"image/encoded": data}))
    names = root / "names.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    listing = root / "lists" / "train.csv"
    os.makedirs(listing.parent)
    lines = ["# classes: " + ",".join(CLASSES), "path,label"]
    for c, name in enumerate(CLASSES):
        for k in range(PER_CLASS):
            lines.append(f"../folder/{name}/{k:02d}.jpg,{name}")
    lines.insert(2 + BAD_AT, f"{folder}/bee/zz.jpg,bee")  # absolute
    listing.write_text("\n".join(lines) + "\n")
    return {"root": root, "folder": str(folder), "images": images,
            "shards": f"{shards}/train-*", "unlabeled": f"{unlabeled}/u-*",
            "names": str(names), "list": str(listing)}


def _spec(data, **options):
    options = {"first_label": 1, **options}
    return "tfrecord:" + data["shards"] + "".join(
        f",{k}={v}" for k, v in options.items())


def _elements(source):
    return list(source.dataset.as_numpy_iterator())


@pytest.fixture(scope="module")
def teacher():
    tf.keras.utils.set_random_seed(0)
    return efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=len(CLASSES))


def test_tfrecord_and_list_give_the_folders_pixels_and_labels(data,
                                                               tmp_path):
    folder = sources.load_source(f"folder:{data['folder']}", channels=3)
    shards = sources.load_source(_spec(data, names=data["names"]),
                                 channels=3, scan_dir=str(tmp_path))
    listed = sources.load_source(f"list:{data['list']}", channels=3,
                                 scan_dir=str(tmp_path))
    expected = _elements(folder)
    assert len(expected) == len(data["images"]) == 15
    for source in (shards, listed):
        got = _elements(source)
        assert source.num_examples == 15 and source.num_classes == 3
        assert source.class_names == CLASSES
        assert [int(e["label"]) for e in got] == [c for c, _ in
                                                  data["images"]]
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a["image"], b["image"])
    # The corrupt record is skipped, named and counted, as the file is.
    scan = shards.scan if shards.scan else tfrecords.scan_records(
        data["shards"], tfrecords.RecordFormat(first_label=1), True,
        str(tmp_path))
    assert scan.num_records == 15 and len(scan.skipped) == 1
    (name, reason), = scan.skipped.items()
    assert name == data["shards"].replace("*", "00001-of-00003") + "[2]"
    assert "JPEG" in reason or "image" in reason.lower(), reason
    report = image_scan.read_entry(str(tmp_path),
                                   f"tfrecord:{data['shards']} (labeled)")
    assert report["decoded"] == 15 and name in report["skipped"]
    assert report["counts"] == list(SHARD_SIZES)
    listed_report = image_scan.read_entry(str(tmp_path),
                                          f"list:{data['list']}")
    assert listed_report["decoded"] == 15
    assert list(listed_report["skipped"]) == [f"{data['folder']}/bee/zz.jpg"]


def test_scan_is_cached_and_refused_without_skip_corrupt(data, tmp_path,
                                                         monkeypatch):
    spec = _spec(data)
    sources.load_source(spec, scan_dir=str(tmp_path))

    def fail(*args):
        raise AssertionError("scanned again")
    monkeypatch.setattr(tfrecords, "_scan", fail)
    again = tfrecords.scan_records(data["shards"],
                                   tfrecords.RecordFormat(first_label=1),
                                   True, str(tmp_path))
    assert again.cached and again.num_records == 15
    config = stages.DataConfig(labeled=spec, test="", skip_corrupt=False,
                               scan_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--labeled=tfrecord:.*"
                       r"--noskip_corrupt.*00001-of-00003\[2\]"):
        config.labeled_source()


def test_one_based_labels_need_the_option_and_are_never_guessed(data):
    with pytest.raises(ValueError, match="first_label=1"):
        sources.load_source("tfrecord:" + data["shards"])
    with pytest.raises(ValueError, match="Expected options"):
        sources.load_source(_spec(data, label_offset=1))
    # Unlabeled, the same shards need no option, and shards without a
    # label feature read as well.
    for spec in ("tfrecord:" + data["shards"], "tfrecord:" + data["unlabeled"]):
        source = sources.load_source(spec, labeled=False)
        assert source.num_examples == 15 and source.num_classes is None
        assert set(_elements(source)[0]) == {"image"}


def test_ranges_read_only_their_records_across_shards_and_the_bad_one(
        data, tmp_path):
    for spec in (_spec(data), f"list:{data['list']}"):
        source = sources.load_source(spec, channels=3, keep_encoded=True,
                                     scan_dir=str(tmp_path))
        whole = _elements(source)
        # Across the shards' ends and the corrupt record; the last shard;
        # nothing.
        for start, stop in ((3, 12), (12, 15), (5, 5)):
            part = list(source.range(start, stop).as_numpy_iterator())
            assert [e["encoded"] for e in part] == [
                e["encoded"] for e in whole[start:stop]], (spec, start, stop)
            assert [int(e["label"]) for e in part] == [
                int(e["label"]) for e in whole[start:stop]]


def test_subset_of_a_tfrecord_source_is_the_folders(data):
    subset = sources.Subset("labeled", per_class=2, seed=3)
    rest = sources.Subset("unlabeled", per_class=2, seed=3)
    for part in (subset, rest):
        a = sources.load_source(f"folder:{data['folder']}", subset=part,
                                labeled=part is subset)
        b = sources.load_source(_spec(data), subset=part,
                                labeled=part is subset)
        assert a.num_examples == b.num_examples
        for x, y in zip(_elements(a), _elements(b)):
            np.testing.assert_array_equal(x["image"], y["image"])
            assert x.get("label") == y.get("label")


def test_list_labels_by_id_with_a_names_file_and_bad_lines(data, tmp_path):
    by_id = tmp_path / "ids.txt"
    by_id.write_text(f"{data['folder']}/cat/00.jpg,2\n"
                     f"{data['folder']}/ant/00.jpg,0\n"
                     f"{data['folder']}/bee/00.jpg,1\n")
    source = sources.load_source(f"list:{by_id},names={data['names']}")
    assert source.class_names == CLASSES
    assert [int(e["label"]) for e in _elements(source)] == [2, 0, 1]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{data['folder']}/cat/00.jpg,7\n")
    with pytest.raises(ValueError, match=r"labels in \[0, 3\).*line 1: 7"):
        sources.load_source(f"list:{bad},names={data['names']}")
    bad.write_text(f"{data['folder']}/cat/00.jpg\n")
    with pytest.raises(ValueError, match="path,label on every line"):
        sources.load_source(f"list:{bad}")
    # Unlabeled: paths alone suffice.
    assert sources.load_source(f"list:{bad}", labeled=False).num_examples == 1
    with pytest.raises(FileNotFoundError, match="names=.*no such file"):
        sources.load_source(f"list:{by_id},names={tmp_path}/none.txt")


def test_prediction_records_keep_the_shards_bytes_and_the_folders_probs(
        data, teacher, tmp_path):
    outs = {}
    for kind, spec in (("folder", f"folder:{data['folder']}"),
                       ("tfrecord", "tfrecord:" + data["shards"]),
                       ("list", f"list:{data['list']}")):
        source = sources.load_source(spec, labeled=False, channels=3,
                                     keep_encoded=True)
        outs[kind] = str(tmp_path / kind)
        prediction.predict(teacher, source.dataset, outs[kind], len(CLASSES),
                           batch_size=4, records_per_file=6)
    stored = [d for _, d in data["images"]]
    for kind, out in outs.items():
        records = list(pl.prediction_dataset(out, decode_image=False)
                       .as_numpy_iterator())
        assert [r["image"] for r in records] == stored, kind
    names = sorted(os.listdir(outs["folder"]))
    assert names == sorted(os.listdir(outs["tfrecord"]))
    for name in names:
        if name.endswith((".tfrecord", ".npz")):
            for kind in ("tfrecord", "list"):
                assert (open(f"{outs['folder']}/{name}", "rb").read()
                        == open(f"{outs[kind]}/{name}", "rb").read()), (
                            kind, name)
