"""Tests of noisy_student.data.randaugment on real images (scikit-image, digits).

Pillow tolerance: the eight colour ops are compared with Pillow's
ImageOps / ImageEnhance on the same image at levels 0..27. We require a
maximum absolute difference of 1 grey level and a mean absolute difference
below 0.02. On the sample photos used here the outputs are in fact identical
(difference 0); the 1-level slack covers float32 rounding ties, e.g. Contrast
takes the grey mean from the channel means while Pillow averages the rounded
grey of each pixel (they differ by < 0.5 before both round the mean).
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from noisy_student.data import randaugment as augment

LEVELS = (0.0, 3.0, 5.0, 7.0, 10.0, 27.0)


def _resize(array, width, height):
    return np.asarray(Image.fromarray(array).resize((width, height),
                                                    Image.BILINEAR))


@pytest.fixture(scope="module")
def photos():
    """Two real RGB photos: square 32x32 and non-square 40 (H) x 48 (W)."""
    import skimage.data  # pylint: disable=g-import-not-at-top
    return [_resize(skimage.data.astronaut(), 32, 32),
            _resize(skimage.data.chelsea(), 48, 40)]


@pytest.fixture(scope="module")
def digit():
    """A scikit-learn digit, upscaled to 24x24, one channel."""
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    image = (datasets.load_digits().images[0] * (255.0 / 16.0)).astype(np.uint8)
    return _resize(image, 24, 24)[..., np.newaxis]


# ----------------------------------------------------------------------------
# Every op, eagerly and inside tf.data.


def test_every_op_eager_keeps_dtype_and_shape(photos, digit):
    for image in photos + [digit]:
        for name in augment.OP_NAMES:
            for level in (0.0, 10.0, 27.0):
                out = augment.OPS[name](image, level, seed=3)
                assert out.dtype == tf.uint8, name
                assert out.shape == image.shape, name
                batch = augment.OPS[name](np.stack([image, image]), level,
                                          seed=3)
                assert batch.shape == (2,) + image.shape, name
    assert sorted(augment.OPS) == sorted(augment.OP_NAMES)
    assert len(augment.OP_NAMES) == 16


def test_every_op_inside_tf_data_matches_eager(photos):
    image = photos[1]

    def all_ops(x):
        return {name: augment.OPS[name](x, 7.0, seed=[5, 6])
                for name in augment.OP_NAMES}

    ds = tf.data.Dataset.from_tensors(image).repeat(2).map(
        all_ops, num_parallel_calls=2)
    for name, spec in ds.element_spec.items():
        assert spec.shape == image.shape and spec.dtype == tf.uint8, name
    first = next(iter(ds))
    eager = all_ops(tf.constant(image))
    for name in augment.OP_NAMES:
        np.testing.assert_array_equal(first[name].numpy(),
                                      eager[name].numpy(), err_msg=name)


def test_ops_change_the_image_away_from_identity_levels(photos):
    image = photos[0]
    for name in augment.OP_NAMES:
        level = 2.0 if name == "Solarize" else 10.0
        out = augment.OPS[name](image, level, seed=1).numpy()
        assert not np.array_equal(out, image), name


def test_identity_levels(photos, digit):
    identity_at = {name: 0.0 for name in augment.LEVEL_ZERO_IDENTITY_OPS}
    identity_at.update(Color=5.0, Contrast=5.0, Brightness=5.0,
                       Sharpness=5.0, Posterize=20.0, Solarize=10.0)
    for image in photos + [digit]:
        for name, level in identity_at.items():
            out = augment.OPS[name](image, level, seed=2).numpy()
            np.testing.assert_array_equal(out, image, err_msg=name)
    # AutoContrast leaves a full-range image alone; Invert is an involution.
    full = photos[0].copy()
    full[0, 0] = 0
    full[0, 1] = 255
    np.testing.assert_array_equal(augment.OPS["AutoContrast"](full, 0), full)
    twice = augment.OPS["Invert"](augment.OPS["Invert"](full, 0), 0)
    np.testing.assert_array_equal(twice, full)


# ----------------------------------------------------------------------------
# Agreement with Pillow.


def _pillow(name, image, level):
    pil = Image.fromarray(image)
    factor = level / 10.0 * 1.8 + 0.1
    if name == "Equalize":
        return ImageOps.equalize(pil)
    if name == "AutoContrast":
        return ImageOps.autocontrast(pil)
    if name == "Posterize":
        return ImageOps.posterize(pil, int(min(max(int(level / 10 * 4), 1),
                                               8)))
    if name == "Solarize":
        return ImageOps.solarize(pil, min(int(level / 10 * 256), 256))
    enhancer = {"Color": ImageEnhance.Color,
                "Contrast": ImageEnhance.Contrast,
                "Brightness": ImageEnhance.Brightness,
                "Sharpness": ImageEnhance.Sharpness}[name]
    return enhancer(pil).enhance(factor)


@pytest.mark.parametrize("name", ["Equalize", "AutoContrast", "Posterize",
                                  "Solarize", "Color", "Contrast",
                                  "Brightness", "Sharpness"])
def test_agrees_with_pillow(photos, name):
    for image in photos:
        for level in LEVELS:
            ours = augment.OPS[name](image, level).numpy().astype(int)
            ref = np.asarray(_pillow(name, image, level)).astype(int)
            diff = np.abs(ours - ref)
            assert diff.max() <= 1, (name, level, diff.max())
            assert diff.mean() < 0.02, (name, level, diff.mean())


def test_level_to_argument_mapping():
    levels = tf.constant([0.0, 2.4, 2.5, 5.0, 10.0, 20.0, 27.0])
    np.testing.assert_array_equal(augment.posterize_bits(levels),
                                  [1, 1, 1, 2, 4, 8, 8])
    np.testing.assert_array_equal(augment.solarize_threshold(levels),
                                  [0, 61, 64, 128, 256, 256, 256])
    np.testing.assert_array_equal(augment.solarize_addition(levels),
                                  [0, 26, 27, 55, 110, 220, 255])
    np.testing.assert_allclose(augment.enhance_factor(levels),
                               [0.1, 0.532, 0.55, 1.0, 1.9, 3.7, 4.96],
                               rtol=1e-6)
    assert augment.keras_cv_magnitude(5) == 0.5
    assert augment.keras_cv_magnitude(27) == 1.0


# ----------------------------------------------------------------------------
# Geometry and cutout.


def test_rotate_30_levels_is_a_quarter_turn():
    rng = np.random.default_rng(0)
    for size in (15, 16):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        turns = set()
        for seed in range(6):
            out = augment.OPS["Rotate"](image, 30.0, seed=seed).numpy()
            k = [k for k in (1, -1) if np.array_equal(out, np.rot90(image, k))]
            assert len(k) == 1, (size, seed)
            turns.add(k[0])
        assert turns == {1, -1}  # The random sign flips the direction.


def test_translate_scales_with_image_size_and_fills_128(photos):
    image = photos[1]  # 40 (H) x 48 (W)
    height, width = image.shape[:2]
    # TranslateX by 12 px of 48, TranslateY by 10 px of 40: level = 2.24.
    level = 12 / (augment.TRANSLATE_FRAC * width) * 10
    assert abs(10 / (augment.TRANSLATE_FRAC * height) * 10 - level) < 1e-9
    for name, axis, px in (("TranslateX", 1, 12), ("TranslateY", 0, 10)):
        outs = set()
        for seed in range(6):
            out = augment.OPS[name](image, level, seed=seed).numpy()
            left = np.full_like(image, 128)
            right = np.full_like(image, 128)
            if axis == 1:
                left[:, :-px], right[:, px:] = image[:, px:], image[:, :-px]
            else:
                left[:-px], right[px:] = image[px:], image[:-px]
            match = [np.array_equal(out, left), np.array_equal(out, right)]
            assert sum(match) == 1, (name, seed)
            outs.add(match.index(True))
        assert outs == {0, 1}, name
    # At 224 px, level 10 is the official 100 px.
    wide = np.zeros((4, 224, 3), np.uint8) + 7
    out = augment.OPS["TranslateX"](wide, 10.0, seed=0).numpy()
    assert (out[0, :, 0] == 128).sum() == 100


def test_shear_keeps_the_top_row_and_fills_128(photos):
    image = photos[0]
    out = augment.OPS["ShearX"](image, 10.0, seed=0).numpy()
    np.testing.assert_array_equal(out[0], image[0])
    assert (out == 128).all(axis=-1).sum() > 0
    out = augment.OPS["ShearY"](image, 10.0, seed=0).numpy()
    np.testing.assert_array_equal(out[:, 0], image[:, 0])


def test_cutout_is_a_square_of_fill():
    image = np.full((224, 224, 3), 9, np.uint8)
    for seed in range(4):
        out = augment.OPS["Cutout"](image, 10.0, seed=seed).numpy()
        filled = (out == 128).all(axis=-1)
        rows = np.flatnonzero(filled.any(axis=1))
        cols = np.flatnonzero(filled.any(axis=0))
        # Official pad 40 px at 224: a square of side 80, clipped at edges.
        assert 40 <= len(rows) <= 80 and 40 <= len(cols) <= 80
        assert filled.sum() == len(rows) * len(cols)
        assert (out[~filled] == 9).all()


# ----------------------------------------------------------------------------
# RandAugment.


def test_randaugment_reproducible_and_seed_dependent(photos):
    batch = np.stack([photos[0]] * 8)
    a = augment.randaugment(batch, 2, 10, seed=[1, 2]).numpy()
    b = augment.randaugment(batch, 2, 10, seed=[1, 2]).numpy()
    c = augment.randaugment(batch, 2, 10, seed=[1, 3]).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A single image gives what a batch of one gives.
    single = augment.randaugment(photos[1], 2, 27, seed=4).numpy()
    one = augment.randaugment(photos[1][np.newaxis], 2, 27, seed=4).numpy()
    np.testing.assert_array_equal(single, one[0])
    # The augmenter's own stream: same seed -> same sequence of calls.
    first = augment.make_augmenter(seed=11)
    second = augment.make_augmenter(seed=11)
    for _ in range(2):
        np.testing.assert_array_equal(first(batch), second(batch))


def test_each_image_draws_its_own_ops(photos):
    batch = np.stack([photos[0]] * 32)
    out = augment.randaugment(batch, 1, 10, seed=[7, 7]).numpy()
    distinct = {o.tobytes() for o in out}
    # 16 ops, 5 of them with two signs: a shared draw would give 1.
    assert len(distinct) >= 8


def test_magnitude_zero_leaves_only_the_documented_ops(photos):
    image = photos[1]
    batch = np.stack([image] * 64)
    out = augment.randaugment(batch, 1, 0, seed=[3, 1], cutout=False).numpy()
    active = [n for n in augment.OP_NAMES
              if n not in augment.LEVEL_ZERO_IDENTITY_OPS]
    allowed = {n: augment.OPS[n](image, 0.0).numpy() for n in active}
    unchanged = 0
    for o in out:
        if np.array_equal(o, image):
            unchanged += 1
            continue
        assert any(np.array_equal(o, ref) for ref in allowed.values())
    # 6 of the 15 ops (Cutout excluded) are the identity at level 0.
    assert 10 <= unchanged <= 45, unchanged
    # Restricted to those ops, M = 0 changes nothing, over two layers.
    same = augment.randaugment(batch[:8], 2, 0, seed=5,
                               ops=augment.LEVEL_ZERO_IDENTITY_OPS)
    np.testing.assert_array_equal(same, batch[:8])


def test_augmenter_in_tf_data_batched_and_per_image(photos):
    images = np.stack([photos[0]] * 8)
    aug = augment.make_augmenter("randaugment", 2, 9, seed=0)
    ds = tf.data.Dataset.from_tensor_slices(images)
    per_image = ds.map(aug, num_parallel_calls=2).batch(4)
    batched = ds.batch(4, drop_remainder=True).map(aug)
    for d in (per_image, batched):
        assert d.element_spec.shape[1:] == images.shape[1:]
        assert d.element_spec.dtype == tf.uint8
        out = np.concatenate([x.numpy() for x in d])
        assert out.shape == images.shape
        assert not np.array_equal(out, images)


def test_augment_dataset_is_reproducible_with_parallel_calls(photos):
    images = np.stack([photos[0]] * 12)
    labels = np.arange(12, dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices({"image": images,
                                             "label": labels}).batch(3)
    aug = augment.make_augmenter("randaugment", 2, 10)

    def run():
        out = augment.augment_dataset(ds, aug, seed=42, num_parallel_calls=3,
                                      deterministic=False)
        elems = sorted(list(out.as_numpy_iterator()),
                       key=lambda e: int(e["label"][0]))
        return np.concatenate([e["image"] for e in elems])

    first, second = run(), run()
    np.testing.assert_array_equal(first, second)
    # Element i is augmented with the stateless seed [seed, i].
    expect = aug(images[3:6], seed=tf.constant([42, 1]))
    np.testing.assert_array_equal(first[3:6], expect)


def test_extra_cutout_and_other_kinds(photos):
    image = photos[0]
    aug = augment.make_augmenter("randaugment", 1, 0, ops=["Rotate"],
                                 extra_cutout_frac=0.25)
    out = aug(np.stack([image] * 4), seed=tf.constant([1, 1])).numpy()
    filled = (out == 128).all(axis=-1).sum(axis=(1, 2))
    assert (filled >= 8 * 8).all() and (filled <= 16 * 16).all()

    none = augment.make_augmenter("none")
    np.testing.assert_array_equal(none(image), image)

    kcv = augment.make_augmenter("keras_cv", 2, 10, seed=1)
    batch = np.stack([image] * 4)
    out = kcv(batch)
    assert out.dtype == tf.uint8 and out.shape == batch.shape
    assert not np.array_equal(out.numpy(), batch)
    # keras_cv's layers need AutoGraph inside tf.data: check that path too.
    ds = tf.data.Dataset.from_tensors(batch).map(kcv)
    assert ds.element_spec.shape == batch.shape
    assert next(iter(ds)).dtype == tf.uint8


def test_bad_input_errors(photos):
    with pytest.raises(ValueError, match="kind='autoaugment'"):
        augment.make_augmenter("autoaugment")
    with pytest.raises(ValueError, match="float32"):
        augment.randaugment(photos[0].astype(np.float32), seed=1)
    with pytest.raises(ValueError, match="shape"):
        augment.randaugment(photos[0][..., 0], seed=1)
    with pytest.raises(ValueError, match="Blur"):
        augment.make_augmenter(ops=["Rotate", "Blur"])
    with pytest.raises(ValueError, match="magnitude"):
        augment.make_augmenter(magnitude=-1)
    with pytest.raises(ValueError, match="name='Zoom'"):
        augment.apply_op("Zoom", photos[0], 1.0)
    with pytest.raises(ValueError, match="sharpen"):
        augment.make_augmenter(sharpen=True)
