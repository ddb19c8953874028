"""Tests of the SavedModel export (noisy_student/serving/export.py)."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.serving import export
from noisy_student.model import loading
from noisy_student.data import preprocess
from noisy_student.evaluation import clean
import weights  # pylint: disable=g-bad-import-order

SIZE = 16
NUM_CLASSES = 10
HERE = pathlib.Path(__file__).resolve().parents[1]  # tests/: the helpers


def _model():
    """A tiny untrained model whose top-1 class varies between images.

    An untrained deep network maps all images to almost the same pooled
    features, so the head is re-drawn to spread the logits of typical
    images over the classes.
    """
    keras.utils.set_random_seed(3)
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=SIZE, small_images=True,
        num_classes=NUM_CLASSES)
    weights.redraw_weights(model, 3)
    features = keras.Model(model.input, model.get_layer("avg_pool").output)
    pooled = features(_images(32, seed=5).astype(np.float32)).numpy()
    rng = np.random.RandomState(0)
    kernel = rng.normal(size=(pooled.shape[1], NUM_CLASSES))
    kernel *= 3.0 / np.sqrt(pooled.shape[1]) / (pooled.std(0)[:, None] + 1e-6)
    head = model.get_layer("predictions")
    head.kernel.assign(kernel.astype(np.float32))
    head.bias.assign((-pooled.mean(0) @ kernel).astype(np.float32))
    return model


def _images(n=6, size=SIZE, seed=0):
    """Smooth random images (JPEG-friendly), uint8 [n, size, size, 3]."""
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3)).astype(np.float32)
    return np.clip(np.round(tf.image.resize(coarse, (size, size)).numpy()),
                   0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """One export for the whole file, the way ns-export runs it.

    From a model_dir holding model.keras, over an existing folder with
    overwrite=True, with the TFLite file.
    """
    root = tmp_path_factory.mktemp("export")
    model.save(str(root / "model.keras"))
    out_dir = root / "saved_model"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("from an earlier export")
    config = export.ExportConfig(model_path=str(root), out_dir=str(out_dir),
                                 overwrite=True, top_k=3, tflite=True)
    assert export.export_from_config(config) == str(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def fresh_outputs(exported, tmp_path_factory):
    """Outputs of every signature computed in a fresh Python process.

    `saved_model_cli show --all` runs at the same time (another fresh
    process); its stdout is returned too (None if it is not installed).
    """
    folder = tmp_path_factory.mktemp("fresh")
    images = _images()
    big = _images(2, size=40, seed=1)
    np.savez(folder / "in.npz", images=images, big=big)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    show = None
    if cli.exists():
        show = subprocess.Popen(
            [str(cli), "show", "--dir", exported, "--all"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    subprocess.run(
        [sys.executable, str(HERE / "export_check.py"), exported,
         str(folder / "in.npz"), str(folder / "out.npz")],
        check=True, cwd=str(folder), env=env, timeout=240)
    out = dict(np.load(folder / "out.npz"))
    shown = None
    if show is not None:
        shown, _ = show.communicate(timeout=240)
        assert show.returncode == 0
    return images, big, out, shown


def _keras_probabilities(model, images):
    logits = model(tf.cast(images, tf.float32), training=False)
    return tf.nn.softmax(logits).numpy()


def test_fresh_process_matches_keras_within_1e5(model, fresh_outputs):
    images, _, out, _ = fresh_outputs
    assert not out["project_imported"]
    expected = _keras_probabilities(model, images)
    # The model is not trivial: images get different top-1 classes.
    assert len(set(expected.argmax(1))) > 1
    for prefix in ("images", "default", "png"):
        np.testing.assert_allclose(out[f"{prefix}_probabilities"], expected,
                                   atol=1e-5, rtol=0)
    scores, classes = tf.math.top_k(expected, k=3)
    np.testing.assert_array_equal(out["images_top_k_classes"], classes)
    np.testing.assert_allclose(out["images_top_k_scores"], scores, atol=1e-5)
    assert out["images_top_k_classes"].dtype == np.int32


def test_jpeg_bytes_give_the_same_top1_as_the_uint8_path(model,
                                                         fresh_outputs):
    """JPEG bytes and the uint8 path agree on the same (decoded) pixels.

    JPEG is lossy (at 16 px, chroma subsampling moves pixels by up to ~50
    grey levels), so the fair uint8 request is the decoded JPEG, not the
    original array; PNG (lossless) is compared with the original arrays in
    test_fresh_process_matches_keras_within_1e5.
    """
    _, _, out, _ = fresh_outputs
    np.testing.assert_array_equal(out["jpeg_top_k_classes"][:, 0],
                                  out["jpegpix_top_k_classes"][:, 0])
    np.testing.assert_allclose(out["jpeg_probabilities"],
                               out["jpegpix_probabilities"], atol=1e-5)
    np.testing.assert_allclose(
        out["jpegpix_probabilities"],
        _keras_probabilities(model, out["jpeg_pixels"]), atol=1e-5)
    assert len(set(out["jpeg_top_k_classes"][:, 0])) > 1


def test_any_size_images_are_resized_inside(model, fresh_outputs):
    """40 px images: small (<= 64 px), resized whole by the eval transform."""
    _, big, out, _ = fresh_outputs
    resized = tf.stack([preprocess.eval_image(image, SIZE) for image in big])
    np.testing.assert_array_equal(
        resized, np.clip(np.round(tf.image.resize(
            big.astype(np.float32), (SIZE, SIZE), antialias=True)), 0, 255))
    np.testing.assert_allclose(out["big_probabilities"],
                               _keras_probabilities(model, resized),
                               atol=1e-5)
    np.testing.assert_allclose(out["big_probabilities"].sum(1), 1.0,
                               atol=1e-5)


def test_saved_model_cli_lists_both_signatures(fresh_outputs):
    _, _, out, shown = fresh_outputs
    assert set(export.SIGNATURES) <= set(out["signatures"].tolist())
    if shown is None:
        pytest.skip("saved_model_cli is not installed beside python")
    for name in export.SIGNATURES:
        assert f"signature_def['{name}']" in shown, name
    assert "image_bytes" in shown and "DT_STRING" in shown
    assert "DT_UINT8" in shown
    for output in ("probabilities", "top_k_classes", "top_k_scores",
                   "valid", "error"):
        assert output in shown


def test_load_model_serves_a_saved_model_like_keras(model, exported):
    loaded = loading.load_model(exported)
    assert isinstance(loaded, loading.SavedModelClassifier)
    assert loaded.image_size == SIZE and loaded.num_classes == NUM_CLASSES
    images = _images(3)
    np.testing.assert_allclose(
        loaded(images, training=False).numpy(),
        model(images.astype(np.float32), training=False).numpy(), atol=1e-5)
    data = tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": np.arange(3, dtype=np.int32)})
    result = clean.evaluate_clean(loaded, data, num_classes=NUM_CLASSES)
    assert result["num_examples"] == 3


def test_existing_dir_without_overwrite_is_a_clear_error(model, tmp_path):
    out_dir = tmp_path / "served"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite .*--out_dir="):
        export.export(model, str(out_dir))
    with pytest.raises(ValueError, match=r"out_dir=.*served"):
        export.export_from_config(
            export.ExportConfig(model_path=str(tmp_path / "m.keras"),
                                out_dir=str(out_dir)))
    assert (out_dir / "keep.txt").read_text() == "precious"
    # Nothing half-written beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_overwrite_replaced_the_folder_atomically(exported):
    root = pathlib.Path(exported).parent
    assert not (root / "saved_model" / "stale.txt").exists()
    assert (root / "saved_model" / "saved_model.pb").exists()
    # No temporary folder left beside it.
    assert sorted(p.name for p in root.iterdir()) == ["model.keras",
                                                      "saved_model"]


def test_tflite_model_gives_the_same_probabilities(model, exported):
    images = _images(2)
    expected = _keras_probabilities(model, images)
    interpreter = tf.lite.Interpreter(
        model_path=os.path.join(exported, export.TFLITE_FILE))
    runner = interpreter.get_signature_runner()
    for i, image in enumerate(images):
        out = runner(images=image[None])
        np.testing.assert_allclose(out["probabilities"][0], expected[i],
                                   atol=1e-4)
        assert out["top_k_classes"].shape == (1, 3)
