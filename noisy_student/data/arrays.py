"""Readers of the array data sets: digits, npz files, MNIST-format (IDX) files.

Each returns numpy arrays (x: uint8 [N, H, W] or [N, H, W, C]; y: int
[N] or None); `sources` turns them into an `ImageSource`.
"""

import gzip
import os

import numpy as np
import tensorflow as tf

# scikit-learn's digits split (a fixed seeded permutation): 360 test images,
# the remaining 1,437 for training.
DIGITS_TEST_SIZE = 360
DIGITS_SEED = 0


def digits(split):
    """scikit-learn's handwritten digits (shipped in its wheel).

    Args:
      split: "train" (1,437 images), "test" (360) or "all" (1,797).

    Returns:
      (x uint8 [N, 8, 8], pixels 0..16 stretched to 0..255; y int32 [N]).

    Raises:
      ValueError: for another split.
    """
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    if split not in ("train", "test", "all"):
        raise ValueError("Expected a digits split train, test or all. "
                         f"Received: split={split!r}")
    digits = datasets.load_digits()
    # Pixel values are 0..16; stretch them to the 0..255 range of images.
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    y = digits.target.astype(np.int32)
    if split == "all":
        return x, y
    order = np.random.default_rng(DIGITS_SEED).permutation(len(x))
    rows = order[:DIGITS_TEST_SIZE] if split == "test" else order[
        DIGITS_TEST_SIZE:]
    rows = np.sort(rows)
    return x[rows], y[rows]


def read_npz(path, need_labels):
    """Arrays `x` and (if `need_labels`) `y` of an .npz file (local or gs://).

    Args:
      path: The .npz file.
      need_labels: Whether `y` must be there (labeled sources).

    Returns:
      (x, y or None) as stored.

    Raises:
      FileNotFoundError: for a missing file.
      ValueError: for a file without the arrays asked for.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Expected an .npz file. Received: path={path}")
    with tf.io.gfile.GFile(path, "rb") as f:
        arrays = np.load(f)
        if "x" not in arrays or (need_labels and "y" not in arrays):
            wanted = "x and y" if need_labels else "x"
            raise ValueError(f"Expected arrays {wanted} in {path}. Received: "
                             f"{sorted(arrays.files)}")
        return arrays["x"], arrays["y"] if need_labels else None


def _read_idx_file(path):
    """Reads one MNIST-format (IDX) file, gzipped or not."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"Expected an IDX file of unsigned bytes. "
                         f"Received: path={path}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                  for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"Expected {np.prod(shape)} values in {path}. "
                         f"Received: {body.size} (truncated file?)")
    return body.reshape(shape)


def read_idx(folder, split, need_labels):
    """Images (and labels) of an MNIST-format folder, gzipped or not.

    Args:
      folder: Holds {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
      split: "train" or "test".
      need_labels: Also read the labels.

    Returns:
      (x uint8 [N, H, W], y int32 [N] or None).

    Raises:
      ValueError: for another split or a malformed / truncated file.
      FileNotFoundError: for a missing file.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Expected an idx split train or test. Received: "
                         f"split={split!r}")

    def find(kind):
        for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
            path = os.path.join(folder, name)
            if tf.io.gfile.exists(path):
                return path
        raise FileNotFoundError(
            f"Expected {prefix}-{kind}-ubyte[.gz] in the idx folder. "
            f"Received: path={folder}")

    x = _read_idx_file(find("images-idx3"))
    y = _read_idx_file(find("labels-idx1")).astype(np.int32) if need_labels else None
    return x, y
