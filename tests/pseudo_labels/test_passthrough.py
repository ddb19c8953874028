"""Prediction records keep a folder source's file bytes (no re-encoding)."""

import os

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from noisy_student.model import efficientnet
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import records as pl
from noisy_student.pseudo_labels import selection
from noisy_student.data import sources


def make_folder(folder, count=24):
    """JPEGs and PNGs of several sizes and modes; returns the sorted paths."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    for i in range(count):
        size = (8 + i % 5 * 7, 10 + i % 3 * 9)
        image = Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8))
        if i % 4 == 1:
            image = image.convert("L")
        if i % 4 == 2:
            image = image.convert("RGBA")
        ext = "png" if i % 2 else "jpg"
        if ext == "jpg" and image.mode == "RGBA":
            image = image.convert("RGB")
        image.save(os.path.join(folder, f"img{i:03d}.{ext}"))
    return sorted(os.path.join(folder, n) for n in os.listdir(folder))


def teacher():
    tf.keras.utils.set_random_seed(0)
    return efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=4)


def run_predict(folder, out_dir, model, keep_encoded):
    source = sources.load_source(f"folder:{folder}", labeled=False,
                                 channels=3, keep_encoded=keep_encoded)
    prediction.predict(model, source.dataset, out_dir, 4, batch_size=8,
                        records_per_file=10)
    return source


def records(pred_dir, decode):
    return list(pl.prediction_dataset(pred_dir, decode_image=decode)
                .as_numpy_iterator())


def test_records_hold_the_files_bytes_and_decode_to_the_same_pixels(
        tmp_path):
    files = make_folder(str(tmp_path / "unlabeled"))
    source = run_predict(str(tmp_path / "unlabeled"), str(tmp_path / "pred"),
                         teacher(), keep_encoded=True)
    raw = records(str(tmp_path / "pred"), decode=False)
    assert [r["index"] for r in raw] == list(range(len(files)))
    for record, path in zip(raw, files):
        with open(path, "rb") as f:
            assert record["image"] == f.read()
    decoded = records(str(tmp_path / "pred"), decode=True)
    for record, element in zip(decoded, source.dataset.as_numpy_iterator()):
        np.testing.assert_array_equal(record["image"], element["image"])


def test_selection_over_file_bytes_equals_one_over_reencoded_images(
        tmp_path):
    make_folder(str(tmp_path / "unlabeled"))
    model = teacher()
    selections = []
    for keep in (True, False):
        pred_dir = str(tmp_path / f"pred{keep}")
        run_predict(str(tmp_path / "unlabeled"), pred_dir, model, keep)
        out_dir = str(tmp_path / f"select{keep}")
        selection.select(selection.SelectConfig(
            pred_dir, out_dir, per_class=5, min_confidence=0.0))
        files, _ = pl.selected_files(out_dir)
        parsed = []
        for record in tf.data.TFRecordDataset(files).as_numpy_iterator():
            example = tf.train.Example.FromString(record)
            feature = example.features.feature
            parsed.append((
                feature["index"].int64_list.value[0],
                feature["copy"].int64_list.value[0],
                feature["label"].int64_list.value[0],
                feature["target"].bytes_list.value[0],
                pl.decode(feature["image"].bytes_list.value[0], 3).numpy()
                .tobytes()))
        selections.append(sorted(parsed))
    passthrough, reencoded = selections
    assert len(passthrough) == len(reencoded) > 0
    for a, b in zip(passthrough, reencoded):
        assert a == b  # index, copy, label, target bytes and pixels


class NsPassthroughImages(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS data set made here: JPEG-stored images of several sizes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=(
            tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3),
                                             encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=4)})))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(20):
            image = rng.integers(0, 256, (8 + i % 5 * 7, 10 + i % 3 * 9, 3),
                                 dtype=np.uint8)
            yield i, {"image": image, "label": i % 4}


def test_tfds_records_hold_the_stored_bytes_and_the_teacher_sees_tfds_pixels(
        tmp_path):
    data_dir = str(tmp_path / "tfds")
    NsPassthroughImages(data_dir=data_dir).download_and_prepare()
    spec = "tfds:ns_passthrough_images:train"
    stored = [d["image"] for d in tfds.builder(
        "ns_passthrough_images", data_dir=data_dir).as_dataset(
            split="train", shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()}
        ).as_numpy_iterator()]
    tfds_pixels = [d["image"] for d in tfds.builder(
        "ns_passthrough_images", data_dir=data_dir).as_dataset(
            split="train", shuffle_files=False).as_numpy_iterator()]
    model = teacher()
    probs = {}
    for keep in (True, False):
        source = sources.load_source(spec, labeled=False, channels=3,
                                     data_dir=data_dir, keep_encoded=keep)
        elements = list(source.dataset.as_numpy_iterator())
        # The teacher's input is TFDS's own decoding of the images.
        for element, pixels in zip(elements, tfds_pixels, strict=True):
            np.testing.assert_array_equal(element["image"], pixels)
        pred_dir = str(tmp_path / f"pred{keep}")
        prediction.predict(model, source.dataset, pred_dir, 4, batch_size=8,
                            records_per_file=10)
        raw = records(pred_dir, decode=False)
        assert [r["index"] for r in raw] == list(range(len(stored)))
        if keep:  # The stored JPEG bytes, not a PNG re-encoding.
            assert [r["image"] for r in raw] == stored
        else:
            assert all(r["image"].startswith(b"\x89PNG") for r in raw)
        for record, pixels in zip(records(pred_dir, decode=True),
                                  tfds_pixels, strict=True):
            np.testing.assert_array_equal(record["image"], pixels)
        probs[keep] = np.stack([r["probs"] for r in raw])
    np.testing.assert_array_equal(probs[True], probs[False])
