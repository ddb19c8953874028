"""Tests of the on-the-fly corruptions (noisy_student/evaluation/corruptions.py)."""

import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from noisy_student.evaluation import corruptions as C

NAMES = C.CORRUPTION_NAMES


def _photos(size):
    """Eight natural-photo crops (scikit-image's sample images) at size px."""
    crops = []
    for image in (skimage.data.astronaut(), skimage.data.chelsea(),
                  skimage.data.coffee(), skimage.data.rocket()):
        h, w = image.shape[:2]
        side = min(h, w)
        for top, left in ((0, 0), (h - side, w - side)):
            crop = image[top:top + side, left:left + side]
            crops.append(tf.image.resize(crop, (size, size),
                                         antialias=True).numpy())
    return np.clip(np.round(np.stack(crops)), 0, 255).astype(np.uint8)


def _digits(size, n=8):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    images = datasets.load_digits().images[:n].astype(np.float32) / 16.0 * 255.0
    images = tf.image.resize(images[..., None], (size, size)).numpy()
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return np.repeat(images, 3, axis=-1)


@pytest.fixture(scope="module")
def photos32():
    return _photos(32)


def test_names_cover_the_required_set():
    required = {"gaussian_noise", "shot_noise", "impulse_noise",
                "defocus_blur", "motion_blur", "brightness", "contrast",
                "pixelate", "jpeg_compression"}
    assert required <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_eager_keeps_shape_dtype_and_changes_image(name, photos32):
    image = photos32[0]
    for severity in C.SEVERITIES:
        out = C.corrupt(image, name, severity, seed=(3, 4))
        assert out.dtype == tf.uint8
        assert out.shape == image.shape
        values = out.numpy()
        assert values.min() >= 0 and values.max() <= 255
    # Severity 5 visibly changes a natural photo.
    diff = np.abs(values.astype(np.int32) - image.astype(np.int32)).mean()
    assert diff > 1.0, (name, diff)


@pytest.mark.parametrize("name", NAMES)
def test_inside_tf_data_matches_eager(name, photos32):
    """Graph mode (tf.data) gives the same image as eager for a fixed seed."""
    images = photos32[:3]
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": np.arange(3, dtype=np.int32)})
    corrupted = C.corrupt_dataset(dataset, name, 3, seed=7)
    assert corrupted.element_spec["image"].shape == (32, 32, 3)
    assert corrupted.element_spec["image"].dtype == tf.uint8
    for i, element in enumerate(corrupted):
        eager = C.corrupt(images[i], name, 3,
                          seed=tf.constant([7, i], tf.int64)).numpy()
        np.testing.assert_array_equal(element["image"].numpy(), eager)
        assert int(element["label"]) == i


def _errors_by_severity(images, name, seed):
    """Mean |corrupted - original| of `images` at severities 1..5.

    Image i gets the stateless seed (seed, i).
    """
    errors = []
    for severity in C.SEVERITIES:
        out = np.stack([
            C.corrupt(image, name, severity, seed=(seed, i)).numpy()
            for i, image in enumerate(images)])
        errors.append(np.abs(out.astype(np.float64) - images).mean())
    return errors


@pytest.mark.parametrize("size", [16, 32])
def test_error_grows_with_severity_on_photos(size):
    """Mean |corrupted - original| strictly increases from severity 1 to 5."""
    images = _photos(size)
    for name in NAMES:
        errors = _errors_by_severity(images, name, seed=1)
        assert all(b > a for a, b in zip(errors, errors[1:])), (
            name, size, np.round(errors, 2))


def test_error_grows_with_severity_on_digits_32px():
    images = _digits(32)
    for name in NAMES:
        errors = _errors_by_severity(images, name, seed=2)
        assert all(b > a for a, b in zip(errors, errors[1:])), (
            name, np.round(errors, 2))


def test_float_and_grayscale_inputs():
    image = _digits(16, 1)[0]
    as_float = C.corrupt(image.astype(np.float32), "contrast", 2)
    np.testing.assert_array_equal(as_float.numpy(),
                                  C.corrupt(image, "contrast", 2).numpy())
    gray = image[..., :1]
    for name in NAMES:
        out = C.corrupt(gray, name, 4, seed=(0, 0))
        assert out.shape == (16, 16, 1) and out.dtype == tf.uint8


def test_seeded_noise_is_reproducible_and_seed_none_is_random(photos32):
    image = photos32[1]
    a = C.corrupt(image, "gaussian_noise", 2, seed=(5, 6)).numpy()
    b = C.corrupt(image, "gaussian_noise", 2, seed=(5, 6)).numpy()
    c = C.corrupt(image, "gaussian_noise", 2, seed=(5, 7)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    d = C.corrupt(image, "gaussian_noise", 2).numpy()
    e = C.corrupt(image, "gaussian_noise", 2).numpy()
    assert np.any(d != e)


def test_kernels_are_normalised():
    kernel = C.defocus_kernel(1.5, 0.6).numpy()
    assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
    assert abs(kernel.sum() - 1.0) < 1e-5
    motion = C.motion_kernel(6.0, 2.0, 0.0).numpy()
    assert abs(motion.sum() - 1.0) < 1e-5
    center = motion.shape[0] // 2
    # Angle 0: the trail lies on the centre row, on one side only.
    assert motion[center, center:].sum() > 0.999
    assert motion[center, :center].sum() == 0


def test_bad_arguments_raise_clear_errors(photos32):
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(photos32[0], "contrast", 6)
    with pytest.raises(ValueError, match="corruption"):
        C.corrupt(photos32[0], "fog", 1)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        C.corrupt(photos32[:2], "contrast", 1)
