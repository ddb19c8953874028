"""One preprocessing for training, ns-eval, ns-predict and serving (issue 18).

Every image a user brings (any size, grey, RGBA, palette, CMYK, EXIF
orientation, 1x1, 1x500) goes through the same eval transform of
noisy_student/data/preprocess.py wherever it is used.
"""

import io

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.evaluation import inference
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import records
from noisy_student.pipeline import stages
from noisy_student.data import streams
from noisy_student.data import preprocess
from noisy_student.data import sources
from image_files import exif_jpeg
from image_files import smooth


def pillow_upright(data):
    """What Pillow shows: decoded and turned by its EXIF orientation."""
    from PIL import ImageOps  # pylint: disable=g-import-not-at-top
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
                      .convert("RGB"))


# Fault 2: the small-image rule follows each image, not the source type.


def _write_folder(root, arrays, labels):
    for i, (array, label) in enumerate(zip(arrays, labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("side", [20, 100])
def test_folder_and_npz_of_the_same_images_give_the_same_eval_pixels(
        tmp_path, side):
    arrays = [smooth(side, side, seed=i) for i in range(6)]
    labels = [0, 0, 0, 1, 1, 1]
    _write_folder(tmp_path / "folder", arrays, labels)
    np.savez(tmp_path / "data.npz", x=np.stack(arrays),
             y=np.asarray(labels, np.int32))
    pixels = {}
    for spec in (f"folder:{tmp_path / 'folder'}",
                 f"npz:{tmp_path / 'data.npz'}"):
        source = sources.load_source(spec, channels=3)
        batch = next(iter(stages.eval_batches(source, 32)))
        pixels[spec.split(":")[0]] = batch["image"].numpy()
    np.testing.assert_array_equal(pixels["folder"], pixels["npz"])


def test_small_image_in_a_folder_is_resized_whole_not_cropped():
    image = smooth(20, 20)
    out = preprocess.eval_image(tf.constant(image), 32).numpy()
    whole = tf.image.resize(image.astype(np.float32), (32, 32),
                            antialias=True).numpy()
    np.testing.assert_array_equal(out, np.clip(np.round(whole), 0, 255))


def test_train_transform_of_a_small_image_never_crops_away_most_of_it():
    """A 20 px image at 32 px: pad-and-crop keeps at least (1-1/4)^2."""
    image = np.zeros((20, 20, 3), np.uint8)
    image[5:15, 5:15] = 255  # a centred white square, 25% of the image
    for i in range(20):
        out = preprocess.train_image(tf.constant(image), 32, flip=False,
                                     seed=tf.constant([1, i], tf.int64))
        # Pad-and-crop moves the square by up to 4 px and keeps it whole;
        # an Inception crop of 8% of the area would often cut it.
        white = (out.numpy()[..., 0] > 127).mean()
        assert 0.2 < white < 0.3, (i, white)


# Fault 5: EXIF orientation.


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(orientation):
    array = np.zeros((20, 30, 3), np.uint8)
    array[:10, :15] = (255, 0, 0)   # distinct quadrants: any turn shows
    array[:10, 15:] = (0, 255, 0)
    array[10:, :15] = (0, 0, 255)
    array[10:, 15:] = (255, 255, 255)
    data = exif_jpeg(array, orientation)
    decoded = preprocess.decode_image(tf.constant(data)).numpy()
    expected = pillow_upright(data)
    assert decoded.shape == expected.shape
    # Two JPEG decoders differ by a few levels; a wrong turn differs by 255.
    assert np.abs(decoded.astype(int) - expected).max() < 40


def test_folder_source_reads_an_exif_rotated_jpeg_upright(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "photo.jpg").write_bytes(
        exif_jpeg(smooth(20, 30), 6))
    source = sources.load_source(f"folder:{tmp_path}", channels=3)
    image = next(iter(source.dataset))["image"]
    assert tuple(image.shape) == (30, 20, 3)


# Fault 6: degenerate images.


@pytest.mark.parametrize("shape", [(1, 1), (1, 500), (500, 1), (2, 300),
                                   (65, 1), (64, 64), (300, 200)])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_shape_goes_through_eval_and_train(shape, channels):
    image = tf.constant(smooth(*shape, channels=channels))
    out = preprocess.eval_image(image, 16)
    assert tuple(out.shape) == (16, 16, channels)
    assert out.dtype == tf.uint8
    out = preprocess.train_image(image, 16, flip=True,
                                 seed=tf.constant([0, 1], tf.int64))
    assert tuple(out.shape) == (16, 16, channels)


def _tiny_model(channels=3, size=16, num_classes=3):
    keras.utils.set_random_seed(0)
    return efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=size, small_images=True,
        num_classes=num_classes, channels=channels)


def test_predict_stage_labels_1x1_and_1x500_images(tmp_path):
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for name, shape in (("a", (1, 1)), ("b", (1, 500)), ("c", (30, 20))):
        Image.fromarray(smooth(*shape)).save(folder / f"{name}.png")
    model_dir = tmp_path / "teacher"
    model_dir.mkdir()
    _tiny_model().save(str(model_dir / "model.keras"))
    data = stages.DataConfig(labeled="digits:train",
                             unlabeled=f"folder:{folder}", channels=3)
    config = prediction.PredictConfig(
        teacher=str(model_dir), out_dir=str(tmp_path / "predict"),
        num_classes=3, batch_size=2, records_per_file=10)
    summary = stages.run_predict(config, data)
    assert summary["images_written"] == 3


@pytest.mark.parametrize("channels", [3, 1])
def test_predict_reads_and_stores_images_with_the_teachers_channels(
        tmp_path, channels):
    colour = np.stack([smooth(12, 10, seed=i) for i in range(4)])
    np.savez(tmp_path / "unlabeled.npz", x=colour)
    model_dir = tmp_path / "teacher"
    model_dir.mkdir()
    _tiny_model(channels=channels).save(str(model_dir / "model.keras"))
    other = stages.DataConfig(unlabeled=f"npz:{tmp_path}/unlabeled.npz",
                              channels=4 - channels)
    config = prediction.PredictConfig(
        teacher=str(model_dir), out_dir=str(tmp_path / "predict"),
        num_classes=3, batch_size=2, records_per_file=10)
    with pytest.raises(ValueError, match=rf"--channels={4 - channels}, but "
                       rf"the model .* takes {channels}-channel"):
        stages.run_predict(config, other)
    # --channels left out: the teacher's, in the records too.
    stages.run_predict(config, other, channels_given=False)
    stored = [r["image"] for r in records.prediction_dataset(
        config.out_dir, decode_image=True).as_numpy_iterator()]
    expected = colour if channels == 3 else tf.image.rgb_to_grayscale(
        colour).numpy()
    np.testing.assert_array_equal(np.stack(stored), expected)


# Fault 7: one eval transform; library defaults are the pipeline's.


def test_library_defaults_use_the_one_eval_transform():
    image = tf.constant(smooth(100, 80))
    expected = tf.cast(preprocess.eval_image(image, 32), tf.float32).numpy()
    np.testing.assert_array_equal(
        prediction.default_preprocess(32)(image).numpy(), expected)
    model = _tiny_model(size=32)
    data = tf.data.Dataset.from_tensor_slices(
        {"image": image[None], "label": [0]})
    logits, _ = inference.predict_logits(model, data)
    np.testing.assert_allclose(
        logits, model(expected[None], training=False).numpy(), atol=1e-6)
    batches = streams.eval_dataset(data, 32, 4)
    np.testing.assert_array_equal(next(iter(batches))["image"][0], expected)


# Channel conversion is one function too.


def test_to_channels_handles_grey_grey_alpha_rgb_rgba():
    rgb = smooth(5, 6)
    grey = tf.image.rgb_to_grayscale(rgb).numpy()
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 7, np.uint8)], -1)
    grey_alpha = np.concatenate([grey, np.full((5, 6, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(preprocess.to_channels(rgba, 3), rgb)
    np.testing.assert_array_equal(preprocess.to_channels(rgba, 1), grey)
    np.testing.assert_array_equal(preprocess.to_channels(grey_alpha, 1), grey)
    np.testing.assert_array_equal(preprocess.to_channels(grey, 3),
                                  np.repeat(grey, 3, -1))
    # With the channel count known only when it runs (serving).
    fn = tf.function(lambda x: preprocess.to_channels(x, 1),
                     input_signature=[tf.TensorSpec([None, None, None],
                                                    tf.uint8)])
    for image in (rgb, rgba, grey, grey_alpha):
        np.testing.assert_array_equal(fn(image), grey)
