"""Data sources: element specs, splits, and clear errors for bad input."""

import gzip
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from noisy_student.data import preprocess
from noisy_student.data import sources

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def first(source):
    return next(iter(source.dataset.as_numpy_iterator()))


def write_npz(path, x, **arrays):
    np.savez(path, x=x, **arrays)
    return f"npz:{path}"


def write_idx(folder, prefix, images, labels):
    def idx_bytes(array):
        header = bytes([0, 0, 8, array.ndim])
        header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        return header + array.astype(np.uint8).tobytes()
    os.makedirs(folder, exist_ok=True)
    with gzip.open(f"{folder}/{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(images))
    with gzip.open(f"{folder}/{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(labels))


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog"]):
        os.makedirs(tmp_path / name)
        for i in range(3):
            pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.{ext}")
    return tmp_path


def test_parse_spec():
    assert sources.parse_spec("tfds:cifar10:train[:4000]") == (
        "tfds", "cifar10", "train[:4000]")
    assert sources.parse_spec("tfds:svhn_cropped") == (
        "tfds", "svhn_cropped", None)
    assert sources.parse_spec("idx:gs://bucket/mnist:test") == (
        "idx", "gs://bucket/mnist", "test")
    assert sources.parse_spec("npz:/a/b.npz") == ("npz", "/a/b.npz", None)
    assert sources.parse_spec("digits:test") == ("digits", "", "test")
    for bad in ("", "cifar10", "npz:", "web:http://x"):
        with pytest.raises(ValueError, match="Received: spec="):
            sources.parse_spec(bad)


def test_digits_splits_have_documented_sizes_and_are_deterministic():
    train = sources.load_source("digits:train", channels=3)
    test = sources.load_source("digits:test")
    assert (train.num_examples, test.num_examples) == (1437, 360)
    assert train.num_classes == 10 and not train.allows_flip
    assert train.image_shape == (8, 8, 3)
    assert train.dataset.element_spec == {
        "image": tf.TensorSpec((8, 8, 3), tf.uint8),
        "label": tf.TensorSpec((), tf.int32)}
    element = first(train)
    again = first(sources.load_source("digits:train", channels=3))
    np.testing.assert_array_equal(element["image"], again["image"])
    assert element["image"].max() > 200  # 0..16 stretched to 0..255
    train_images = {x["image"][..., 0].tobytes()
                    for x in train.dataset.as_numpy_iterator()}
    test_images = [x["image"].tobytes()
                   for x in test.dataset.as_numpy_iterator()]
    assert sum(t in train_images for t in test_images) < 5  # few duplicates


def test_subset_parts_are_balanced_disjoint_and_complete():
    labels = np.repeat(np.arange(4), 25)
    parts = {p: sources.subset_mask(
        labels, sources.Subset(p, per_class=5, validation_size=10, seed=3))
        for p in sources.PARTS}
    assert parts["labeled"].sum() == 20
    np.testing.assert_array_equal(np.bincount(labels[parts["labeled"]]), 5)
    assert parts["validation"].sum() == 10
    assert parts["unlabeled"].sum() == 70
    total = sum(p.astype(int) for p in parts.values())
    np.testing.assert_array_equal(total, 1)
    other_seed = sources.subset_mask(labels, sources.Subset("labeled", 5,
                                                            seed=4))
    assert not np.array_equal(other_seed, parts["labeled"])
    with pytest.raises(ValueError, match="class 0 has 25"):
        sources.subset_mask(labels, sources.Subset("labeled", 30))


def test_unlabeled_source_has_no_labels_and_needs_none(tmp_path):
    x = np.zeros((5, 4, 4, 3), np.uint8)
    spec = write_npz(tmp_path / "u.npz", x)
    source = sources.load_source(spec, labeled=False)
    assert set(source.dataset.element_spec) == {"image"}
    assert source.num_examples == 5 and source.num_classes is None
    with pytest.raises(ValueError, match="Expected arrays x and y"):
        sources.load_source(spec)


def test_npz_grey_images_become_three_channels(tmp_path):
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    spec = write_npz(tmp_path / "g.npz", x, y=np.array([0, 1]))
    element = first(sources.load_source(spec, channels=3))
    assert element["image"].shape == (4, 4, 3)
    np.testing.assert_array_equal(element["image"][..., 2], x[0])


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((3, 4, 4, 3), np.uint8), y=np.arange(2)),
     "3 images, 2 labels"),
    (dict(x=np.zeros((2, 4, 4, 3), np.float32), y=np.arange(2)),
     "dtype=float32"),
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0.0, 1.0])),
     "dtype=float64"),
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 10])),
     r"labels from 0 to 10"),
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([-1, 1])),
     r"labels from -1 to 1"),
    (dict(x=np.zeros((0, 4, 4, 3), np.uint8), y=np.zeros(0, int)),
     "Received: 0"),
])
def test_npz_bad_contents_get_clear_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        sources.load_source(f"npz:{tmp_path}/bad.npz", num_classes=10)


def test_missing_paths_name_the_path(tmp_path):
    for spec in (f"npz:{tmp_path}/none.npz", f"folder:{tmp_path}/none",
                 f"idx:{tmp_path}:train"):
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            sources.load_source(spec)


def test_idx_files_read_as_written(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 7))
    write_idx(tmp_path, "t10k", images, np.array([0, 1, 2, 0, 1, 2]))
    source = sources.load_source(f"idx:{tmp_path}:test", channels=3)
    assert source.num_examples == 6 and source.num_classes == 3
    got = list(source.dataset.as_numpy_iterator())
    np.testing.assert_array_equal(got[3]["image"][..., 0], images[3])
    assert [g["label"] for g in got] == [0, 1, 2, 0, 1, 2]
    # Unlabeled loading never opens the labels file.
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert sources.load_source(f"idx:{tmp_path}:test",
                               labeled=False).num_examples == 6


def test_truncated_idx_file_is_an_error(tmp_path):
    write_idx(tmp_path, "train", np.zeros((4, 3, 3)), np.zeros(4))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())[:-5]
    path.write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match="truncated"):
        sources.load_source(f"idx:{tmp_path}")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    source = sources.load_source(f"idx:{FASHION_MNIST}:test")
    assert (source.num_examples, source.num_classes) == (10000, 10)
    assert source.image_shape == (28, 28, 1)
    labeled = sources.load_source(
        f"idx:{FASHION_MNIST}:train",
        subset=sources.Subset("labeled", per_class=100, seed=0))
    labels = [x["label"] for x in labeled.dataset.as_numpy_iterator()]
    np.testing.assert_array_equal(np.bincount(labels), 100)


def test_folder_source_labels_by_sorted_subfolder(image_folder):
    source = sources.load_source(f"folder:{image_folder}", channels=3)
    assert source.num_classes == 2 and source.num_examples == 6
    got = list(source.dataset.as_numpy_iterator())
    assert [g["label"] for g in got] == [0, 0, 0, 1, 1, 1]
    assert got[1]["image"].shape == (11, 12, 3)
    assert got[1]["image"].dtype == np.uint8
    unlabeled = sources.load_source(f"folder:{image_folder}", labeled=False)
    assert set(unlabeled.dataset.element_spec) == {"image"}
    assert len(list(unlabeled.dataset)) == 6


def test_folder_corrupt_image_skipped_or_error(image_folder):
    (image_folder / "dog" / "broken.png").write_bytes(b"not an image")
    skipped = sources.load_source(f"folder:{image_folder}")
    assert skipped.num_examples == len(list(skipped.dataset)) == 6
    # Refused when loaded, before any reading (more in test_image_scan).
    with pytest.raises(ValueError, match="broken.png: Unknown image"):
        sources.load_source(f"folder:{image_folder}", skip_corrupt=False)


def test_empty_folder_is_an_error(tmp_path):
    os.makedirs(tmp_path / "cat")
    with pytest.raises(ValueError, match="Received: path="):
        sources.load_source(f"folder:{tmp_path}")


def test_tfds_missing_data_fails_fast_with_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="spec=tfds:mnist"):
        sources.load_source("tfds:mnist:train", data_dir=str(tmp_path))


def test_preprocessing_keeps_uint8_and_size():
    """A 50x70 image takes the small path, a 100x140 one the large path."""
    rng = np.random.default_rng(0)
    for shape in ((50, 70, 3), (100, 140, 3)):
        image = tf.constant(rng.integers(0, 256, shape), tf.uint8)
        out = preprocess.train_image(image, 32, flip=True, seed=(1, 2))
        assert out.dtype == tf.uint8 and out.shape == (32, 32, 3)
        out = preprocess.eval_image(image, 32)
        assert out.dtype == tf.uint8 and out.shape == (32, 32, 3)
        # Eval preprocessing is deterministic; training crops are random.
        np.testing.assert_array_equal(preprocess.eval_image(image, 24),
                                      preprocess.eval_image(image, 24))
        crops = {preprocess.train_image(image, 24, flip=False,
                                        seed=(0, i)).numpy().tobytes()
                 for i in range(5)}
        assert len(crops) > 1
        again = preprocess.train_image(image, 24, flip=True, seed=(0, 3))
        np.testing.assert_array_equal(
            again, preprocess.train_image(image, 24, flip=True, seed=(0, 3)))


def test_test_folder_labels_follow_the_models_class_names(tmp_path):
    """A test folder with some of the classes keeps the model's labels."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for name in ("square", "triangle"):
        os.makedirs(tmp_path / name)
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    known = ("circle", "square", "triangle")
    source = sources.load_source(f"folder:{tmp_path}", class_names=known)
    labels = [int(e["label"]) for e in source.dataset.as_numpy_iterator()]
    assert labels == [1, 2]
    assert source.num_classes == 3 and source.class_names == known
    os.makedirs(tmp_path / "hexagon")
    Image.new("RGB", (8, 8)).save(tmp_path / "hexagon" / "a.png")
    with pytest.raises(ValueError, match="hexagon"):
        sources.load_source(f"folder:{tmp_path}", class_names=known)
