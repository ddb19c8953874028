"""What ns-eval reports is what the SavedModel serves (issue 18).

The parity test builds a folder of every kind of image a user brings, scores
it with ns-eval's stage, exports the model, and serves the same files in a
fresh process that imports only TensorFlow.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

from absl import flags
import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.evaluation import evaluator
from noisy_student.evaluation import metrics
from noisy_student.serving import export
from noisy_student.pipeline import stages
from noisy_student.training import config as train_config
from noisy_student.training import state
from noisy_student.training import loop
from noisy_student.data import streams
import image_files as tp
from pipeline_runs import TINY

HERE = pathlib.Path(__file__).resolve().parents[1]  # tests/: the helpers
ROOT = HERE.parent
SIZE = 16
CLASSES = ("circle", "square", "triangle")


def tiny_model(channels, size=SIZE, seed=0):
    """An untrained tiny EfficientNet whose outputs differ between images.

    Batch norm of an untrained model keeps its moving statistics at 0 / 1,
    which shrinks the differences between images; a scaled-up head spreads
    the logits so a wrong pixel moves the probabilities by far more than
    1e-5.
    """
    keras.utils.set_random_seed(seed)
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=size, small_images=True,
        num_classes=len(CLASSES), channels=channels, dropout_rate=0.0)
    head = model.get_layer("predictions")
    head.kernel.assign(head.kernel * 50.0)
    return model


def user_folder(root):
    """Mixed sizes and modes, below, at and above the model's 16 px.

    Returns (folder, files in source order, rot90 k per file).
    """
    rgb = lambda h, w, seed: Image.fromarray(tp.smooth(h, w, seed=seed))  # noqa
    items = [
        ("circle", "a_tiny.png", rgb(1, 1, 0), "PNG", {}),
        ("circle", "b_line.png", rgb(1, 40, 1), "PNG", {}),
        ("circle", "c_grey.png", rgb(8, 8, 2).convert("L"), "PNG", {}),
        ("circle", "d_rgba.png", rgb(20, 30, 3).convert("RGBA"), "PNG", {}),
        ("square", "e_equal.png", rgb(16, 16, 4), "PNG", {}),
        ("square", "f_palette.png", rgb(24, 24, 5).convert("P"), "PNG", {}),
        ("square", "g_cmyk.jpg", rgb(40, 40, 6).convert("CMYK"), "JPEG", {}),
        ("square", "h_big.jpg", rgb(100, 70, 7), "JPEG", {}),
        ("triangle", "i_anim.gif", rgb(90, 200, 8), "GIF", {}),
        ("triangle", "j_bitmap.bmp", rgb(50, 50, 9), "BMP", {}),
        ("triangle", "k_grey.jpg", rgb(70, 64, 10).convert("L"), "JPEG", {}),
    ]
    files, turns = [], []
    for label, name, image, fmt, kwargs in items:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, fmt, **kwargs)
        files.append(str(folder / name))
        turns.append(0)
    # Stored 20x30, shown 30x20: EXIF orientation 6 (turn 90 clockwise).
    photo = root / "triangle" / "l_exif.jpg"
    photo.write_bytes(tp.exif_jpeg(tp.smooth(20, 30, seed=11), 6))
    files.append(str(photo))
    turns.append(3)
    return root, files, turns


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """ns-eval and both serving signatures on one folder, 3 and 1 channels."""
    tmp = tmp_path_factory.mktemp("parity")
    folder, files, turns = user_folder(tmp / "images")
    request = {"models": [], "files": files, "rot90": turns}
    evaluated = {"files": files}
    for channels in (3, 1):
        model_dir = tmp / f"model{channels}"
        model_dir.mkdir()
        tiny_model(channels).save(str(model_dir / "model.keras"))
        eval_dir = tmp / f"eval{channels}"
        config = evaluator.EvalConfig(model_path=str(model_dir),
                                     out_dir=str(eval_dir),
                                     num_classes=len(CLASSES))
        data = stages.DataConfig(test=f"folder:{folder}", channels=channels)
        evaluated[f"{channels} results"] = stages.run_eval(config, data)
        evaluated[channels] = dict(np.load(eval_dir / "predictions.npz"))
        # ns-eval without --channels: read with the model's, whatever the
        # data config's default says.
        other = dataclasses.replace(data, channels=4 - channels)
        stages.run_eval(dataclasses.replace(
            config, out_dir=str(eval_dir) + "_default"), other,
            channels_given=False)
        evaluated[f"{channels} by default"] = dict(
            np.load(f"{eval_dir}_default/predictions.npz"))
        with pytest.raises(ValueError, match=rf"--channels={4 - channels}, "
                           rf"but the model .* takes {channels}-channel"):
            stages.run_eval(config, other)
        out_dir = tmp / f"served{channels}"
        export.export_from_config(export.ExportConfig(
            model_path=str(model_dir), out_dir=str(out_dir)))
        request["models"].append({"saved_model": str(out_dir),
                                  "out": str(tmp / f"out{channels}.npz")})
    # The bad-input checks (the `bad_input` fixture) in the same process.
    bad_files, good = _good_and_bad_files(tmp / "bad_files")
    bad_dir = export.export(tiny_model(3), str(tmp / "served_bad"),
                            class_names=CLASSES)
    request["bad_input"] = [{"saved_model": bad_dir, "files": bad_files,
                             "good": good, "out": str(tmp / "bad.npz")}]
    (tmp / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, str(HERE / "serve_check.py"),
                    str(tmp / "request.json")], check=True, env=env,
                   timeout=300)
    served = {c: dict(np.load(tmp / f"out{c}.npz")) for c in (3, 1)}
    served["bad_input"] = (dict(np.load(tmp / "bad.npz")), good,
                           len(bad_files))
    return evaluated, served, len(files)


def test_eval_results_name_the_files(parity):
    evaluated, _, _ = parity
    files = sorted(evaluated["files"])  # the folder's order
    for channels in (3, 1):
        assert list(evaluated[channels]["paths"]) == files
        mistakes = evaluated[f"{channels} results"]["clean"][
            "most_confident_mistakes"]
        assert mistakes, "the untrained model should make some"
        for mistake in mistakes:
            assert mistake["path"] == files[mistake["index"]]


@pytest.mark.parametrize("channels", [3, 1])
def test_eval_reads_images_with_the_models_channels(parity, channels):
    evaluated, _, _ = parity
    np.testing.assert_array_equal(
        evaluated[f"{channels} by default"]["probabilities"],
        evaluated[channels]["probabilities"])


@pytest.mark.parametrize("channels", [3, 1])
def test_eval_probabilities_equal_both_signatures_in_a_fresh_process(
        parity, channels):
    evaluated, served, count = parity
    ours = evaluated[channels]["probabilities"]
    out = served[channels]
    assert not out["project_imported"]
    assert ours.shape == (count, len(CLASSES))
    # The model tells these images apart (by 100x the tolerance and more):
    # serving other pixels would show.
    assert np.ptp(ours, axis=0).max() > 1e-3
    np.testing.assert_allclose(out["bytes_probabilities"], ours, atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(out["images_probabilities"], ours, atol=1e-5,
                               rtol=0)


# Fault 1: serve_bytes of any size.


def test_serve_bytes_takes_any_size_in_one_request(tmp_path):
    model = tiny_model(3)
    out_dir = export.export(model, str(tmp_path / "served"))
    loaded = tf.saved_model.load(out_dir)
    blobs = [tp.encode(Image.fromarray(tp.smooth(20, 30)), "PNG"),
             tp.encode(Image.fromarray(tp.smooth(64, 64, seed=1)), "JPEG"),
             tp.encode(Image.fromarray(tp.smooth(16, 16, seed=2)), "PNG")]
    result = loaded.signatures["serve_bytes"](image_bytes=tf.constant(blobs))
    by_bytes = result["probabilities"].numpy()
    for i, blob in enumerate(blobs):
        pixels = tf.io.decode_image(blob, channels=3)[None]
        by_images = loaded.signatures["serve_images"](images=pixels)
        np.testing.assert_allclose(by_images["probabilities"][0],
                                   by_bytes[i], atol=1e-5)


# Issue 32: one bad image in a serve_bytes request, and empty requests.


def _good_and_bad_files(folder):
    """4 decodable files of 4 sizes and types between 4 that are not.

    Returns (files, indices of the good ones).
    """
    image = lambda h, w, seed: Image.fromarray(tp.smooth(h, w, seed=seed))  # noqa
    jpeg = tp.encode(image(28, 28, 4), "JPEG")
    blobs = [
        ("a.jpg", tp.encode(image(20, 30, 0), "JPEG")),
        ("truncated.jpg", jpeg[:len(jpeg) // 2]),
        ("b.png", tp.encode(image(12, 12, 1).convert("L"), "PNG")),
        ("text.jpg", b"plain text, not an image\n"),
        ("c.gif", tp.encode(image(24, 32, 2), "GIF")),
        ("empty.png", b""),
        ("d.bmp", tp.encode(image(32, 32, 3), "BMP")),
        ("e.tif", tp.encode(image(16, 16, 5), "TIFF")),
    ]
    folder.mkdir()
    for name, blob in blobs:
        (folder / name).write_bytes(blob)
    return [str(folder / name) for name, _ in blobs], [0, 2, 4, 6]


@pytest.fixture(scope="module")
def bad_input(parity):
    """serve_bytes of good and bad files, and empty requests, in a process
    that imports only TensorFlow (tests/serve_check.py, run by `parity`):
    (outputs, indices of the good files, file count)."""
    return parity[1]["bad_input"]


def test_bad_images_are_flagged_and_good_ones_answered_as_alone(bad_input):
    out, good, count = bad_input
    assert not out["project_imported"]
    bad = [i for i in range(count) if i not in good]
    valid = out["mixed_valid"]
    assert valid.dtype == bool and valid.tolist() == [
        i in good for i in range(count)]
    errors = out["mixed_error"]
    assert errors.shape == (count,)
    assert all(errors[i] == "" for i in good)
    assert all(errors[i].startswith("undecodable image: ") or
               errors[i] == "empty input" for i in bad), errors
    # Bit for bit what the good images get in a request of their own.
    for key in ("probabilities", "top_k_classes", "top_k_scores",
                "top_k_names"):
        mixed, alone = out[f"mixed_{key}"], out[f"alone_{key}"]
        assert mixed.shape[0] == count and alone.shape[0] == len(good)
        if key in ("probabilities", "top_k_scores"):
            assert np.abs(mixed[good] - alone).max() == 0.0, key
        else:
            np.testing.assert_array_equal(mixed[good], alone)
    np.testing.assert_allclose(out["alone_probabilities"].sum(1), 1.0,
                               atol=1e-5)
    assert out["alone_valid"].all() and not any(out["alone_error"])
    # Bad rows: defined fill values, in a mixed and an all-bad request.
    for prefix, rows in (("mixed_", bad), ("bad_", slice(None))):
        assert not out[prefix + "valid"][rows].any()
        assert (out[prefix + "probabilities"][rows] == 0).all()
        assert (out[prefix + "top_k_scores"][rows] == 0).all()
        assert (out[prefix + "top_k_classes"][rows] == -1).all()
        assert (out[prefix + "top_k_names"][rows] == "").all()
    np.testing.assert_array_equal(out["bad_error"], errors[bad])
    np.testing.assert_array_equal(out["mixed_class_names"], CLASSES)


def test_each_bad_image_gets_its_reason(bad_input):
    out, _, _ = bad_input
    errors = out["mixed_error"]
    # TensorFlow refuses a truncated JPEG, wherever it is cut.
    assert errors[1] == "undecodable image: corrupt or truncated JPEG"
    assert errors[3].startswith("undecodable image: unknown format")
    assert errors[5] == "empty input"
    assert errors[7].startswith("undecodable image: unknown format")


def test_empty_requests_get_empty_outputs(bad_input):
    out, _, _ = bad_input
    for prefix in ("empty_bytes_", "empty_images_"):
        assert out[prefix + "probabilities"].shape == (0, len(CLASSES))
        assert out[prefix + "probabilities"].dtype == np.float32
        for key in ("top_k_classes", "top_k_scores", "top_k_names"):
            assert out[prefix + key].shape == (0, len(CLASSES)), key
        assert out[prefix + "valid"].shape == (0,)
        assert out[prefix + "error"].shape == (0,)
        np.testing.assert_array_equal(out[prefix + "class_names"], CLASSES)


def test_images_of_no_pixel_are_invalid_rows_not_a_failed_request(
        bad_input):
    out, _, _ = bad_input
    prefix = "no_pixel_images_"
    np.testing.assert_array_equal(out[prefix + "valid"], [False, False])
    np.testing.assert_array_equal(out[prefix + "error"],
                                  ["empty image (0 pixels)"] * 2)
    np.testing.assert_array_equal(out[prefix + "probabilities"],
                                  np.zeros((2, len(CLASSES)), np.float32))
    np.testing.assert_array_equal(out[prefix + "top_k_classes"], -1)


def test_serve_images_refuses_more_than_four_channels(tmp_path):
    loaded = tf.saved_model.load(export.export(tiny_model(3),
                                               str(tmp_path / "served")))
    pixels = tf.zeros([1, 20, 20, 5], tf.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="4 \\(RGBA\\)"):
        loaded.signatures["serve_images"](images=pixels)


# Fault 3: --channels=1 builds a 1-channel model.


def _parse(cli, tmp_path, *extra):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["noisy-student", f"--workdir={tmp_path}",
                 *TINY, *extra])
    return cli.experiment_config()


def test_channels_flag_reaches_the_model(pipeline_flags, tmp_path):
    config = _parse(pipeline_flags, tmp_path, "--channels=1")
    for role in (config.teacher, config.student):
        model = state.build_model(role)
        assert model.input_shape[-1] == 1


def test_one_channel_model_trains_and_evaluates(tmp_path):
    """The crash of the report: eval of a --channels=1 run."""
    config = train_config.TrainConfig.from_fields(
        width=0.25, depth=0.25, num_classes=10, image_size=16,
        small_images=True, channels=1, batch_size=8, train_steps=2,
        warmup_steps=0, lr_schedule="constant", steps_per_loop=1,
        log_every=1, checkpoint_every=0, verbose=False, augment="none")
    data = stages.DataConfig(labeled="digits:train", test="digits:test",
                             labels_per_class=2, channels=1)
    stages.run_train(config, data, str(tmp_path / "m"))
    results = stages.run_eval(
        evaluator.EvalConfig(model_path=str(tmp_path / "m"),
                            num_classes=10), data)
    assert results["clean"]["num_examples"] == 360
    # The recipe ns-eval and ns-export read back from the model_dir.
    assert (tmp_path / "m" / "preprocess.json").exists()


# Fault 4: keras_cv's RandAugment needs RGB.


def test_keras_cv_with_one_channel_is_refused_naming_both_flags(
        pipeline_flags, tmp_path):
    with pytest.raises(ValueError, match="--student_augment=keras_cv") as e:
        _parse(pipeline_flags, tmp_path, "--channels=1",
               "--student_augment=keras_cv")
    assert "--channels=1" in str(e.value)
    assert not os.listdir(tmp_path)


def test_keras_cv_with_one_channel_images_is_refused_by_the_library():
    grey = tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros((4, 8, 8, 1), np.uint8),
         "label": np.zeros(4, np.int32)})
    config = streams.InputConfig(augment="keras_cv")
    with pytest.raises(ValueError, match="augment='keras_cv'.*channels=1"):
        streams.train_dataset_fn(grey, config, image_size=8, batch_size=2)


# The recipe is read from the model, not from flags.


def test_recipe_recorded_in_the_model_dir_is_what_eval_and_serving_use(
        tmp_path):
    from noisy_student.data import preprocess  # pylint: disable=g-import-not-at-top
    images = np.stack([tp.smooth(40, 60, seed=i) for i in range(4)])
    np.savez(tmp_path / "test.npz", x=images, y=np.arange(4) % 3)
    data = stages.DataConfig(test=f"npz:{tmp_path / 'test.npz'}")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_model(3).save(str(model_dir / "model.keras"))
    probabilities = {}
    for name, recipe in (("default", None),
                         ("crop", preprocess.Recipe(small_image_max=8,
                                                    crop_padding=0))):
        if recipe:
            preprocess.write_recipe(model_dir, recipe)
        out = tmp_path / f"eval_{name}"
        stages.run_eval(evaluator.EvalConfig(
            model_path=str(model_dir), out_dir=str(out), num_classes=3),
            data)
        probabilities[name] = np.load(out / "predictions.npz")["probabilities"]
    served = export.export_from_config(export.ExportConfig(
        model_path=str(model_dir), out_dir=str(tmp_path / "served")))
    assert preprocess.read_recipe(served) == preprocess.Recipe(8, 0)
    loaded = tf.saved_model.load(served)
    by_images = loaded.signatures["serve_images"](images=tf.constant(images))
    # 40x60 images: whole (default) vs the central 40x40 (recorded recipe).
    assert np.abs(probabilities["crop"] - probabilities["default"]).max() > 1e-4
    np.testing.assert_allclose(by_images["probabilities"],
                               probabilities["crop"], atol=1e-5)


# Class names: recorded by training, reported by ns-eval and the pipeline,
# served by the SavedModel.


def test_folder_class_names_travel_from_training_to_serving(tmp_path):
    from noisy_student.pipeline import report as pipeline_report  # pylint: disable=g-import-not-at-top
    folder = tmp_path / "images"
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(tp.smooth(12 + i, 14, seed=10 * c + i)).save(
                folder / name / f"{i}.png")
    data = stages.DataConfig(labeled=f"folder:{folder}",
                             test=f"folder:{folder}")
    config = train_config.TrainConfig.from_fields(
        width=0.25, depth=0.25, num_classes=3, image_size=SIZE,
        small_images=True, batch_size=4, train_steps=1, warmup_steps=0,
        lr_schedule="constant", steps_per_loop=1, log_every=1,
        checkpoint_every=0, verbose=False, augment="none")
    model_dir = tmp_path / "train"
    stages.run_train(config, data, str(model_dir))
    assert json.loads((model_dir / "class_names.json").read_text()) == list(
        CLASSES)
    eval_dir = tmp_path / "eval"
    results = stages.run_eval(evaluator.EvalConfig(
        model_path=str(model_dir), out_dir=str(eval_dir), num_classes=3),
        data)
    assert results["class_names"] == list(CLASSES)
    on_disk = json.loads((eval_dir / "results.json").read_text())
    assert on_disk["class_names"] == list(CLASSES)
    mistakes = results["clean"]["most_confident_mistakes"]
    predictions = np.load(eval_dir / "predictions.npz")
    wrong = predictions["predictions"] != predictions["labels"]
    assert len(mistakes) == min(int(wrong.sum()), metrics.NUM_MISTAKES_SHOWN)
    assert mistakes  # a one-step model gets some of 12 images wrong
    assert (eval_dir / "mistakes.png").stat().st_size > 0
    confidences = [m["confidence"] for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    assert all(wrong[m["index"]] for m in mistakes)
    served = export.export_from_config(export.ExportConfig(
        model_path=str(model_dir), out_dir=str(tmp_path / "served"),
        top_k=2))
    loaded = tf.saved_model.load(served)
    blob = tf.io.read_file(str(folder / "square" / "0.png"))
    out = loaded.signatures["serve_bytes"](image_bytes=blob[None])
    assert [n.decode() for n in out["class_names"].numpy()] == list(CLASSES)
    names = [n.decode() for n in out["top_k_names"].numpy()[0]]
    assert names == [CLASSES[c] for c in out["top_k_classes"].numpy()[0]]
    # The pipeline's report names the classes too.
    report = pipeline_report.write_report(str(tmp_path), [], CLASSES)
    assert report["class_names"] == list(CLASSES)
    assert "0 circle, 1 square, 2 triangle" in (
        tmp_path / "report.md").read_text()


def test_run_from_before_the_channels_field_resumes_and_grey_is_refused(
        tmp_path):
    """config.json of an older run is flat (before the model / optimizer /
    loop parts), names base_lr and dropout, and has no "channels": it was
    3."""
    from tests import train_worker  # pylint: disable=g-import-not-at-top
    config = train_config.TrainConfig.from_fields(
        width=0.25, depth=0.25, num_classes=10, image_size=SIZE,
        small_images=True, batch_size=8, train_steps=1, warmup_steps=0,
        lr_schedule="constant", steps_per_loop=1, log_every=1,
        checkpoint_every=1, verbose=False)
    images, labels = train_worker.synthetic_data(
        num_images=32, image_size=SIZE, num_classes=10)
    dataset_fn = train_worker.make_dataset_fn(images, labels, 8, 10, 0, 0)
    model_dir = tmp_path / "run"
    loop.train_and_evaluate(config, str(model_dir), dataset_fn)
    path = model_dir / "config.json"
    saved = json.loads(path.read_text())
    old = {**saved["model"], **saved["optimizer"], **saved["loop"],
           "init_from": None, "freeze_blocks": 0}
    old["base_lr"] = old.pop("base_learning_rate")
    old["dropout"] = old.pop("dropout_rate")
    del old["channels"]
    path.write_text(json.dumps(old))
    more = config.replace(train_steps=2)
    result = loop.train_and_evaluate(more, str(model_dir), dataset_fn)
    assert result["start_step"] == 1 and result["step"] == 2
    with pytest.raises(ValueError, match="channels"):
        loop.train_and_evaluate(more.replace(channels=1, train_steps=3),
                        str(model_dir), dataset_fn)


def test_eval_of_a_test_folder_with_some_classes_keeps_the_models_labels(
        tmp_path):
    """Review finding: a test folder holding only square/ and triangle/ was
    labelled 0 and 1 (circle, square) against a circle/square/triangle
    model."""
    from noisy_student.model import info  # pylint: disable=g-import-not-at-top
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_model(3).save(str(model_dir / "model.keras"))
    info.write_class_names(str(model_dir), CLASSES)
    for name in ("square", "triangle"):
        (tmp_path / "test" / name).mkdir(parents=True)
        Image.fromarray(tp.smooth(20, 20)).save(
            tmp_path / "test" / name / "a.png")
    config = evaluator.EvalConfig(model_path=str(model_dir),
                                 out_dir=str(tmp_path / "eval"),
                                 num_classes=len(CLASSES))
    stages.run_eval(config, stages.DataConfig(test=f"folder:{tmp_path}/test"))
    labels = np.load(tmp_path / "eval" / "predictions.npz")["labels"]
    assert labels.tolist() == [1, 2]
