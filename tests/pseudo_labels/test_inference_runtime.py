"""Tests of the runtimes that run the teacher in the predict stage."""

import gc
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import weakref

import numpy as np
import pytest
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.pseudo_labels import inference_runtime
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import records
from noisy_student.pipeline import stages

import weights

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
NUM_CLASSES = 5
# The OpenVINO tests skip where the [openvino] extra is not installed (CI
# installs it); the others run everywhere.
needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="OpenVINO (the [openvino] extra) is not installed")


def _teacher(image_size, channels, seed=0):
    """A tiny teacher with seeded weights far from uniform outputs."""
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=image_size, small_images=True,
        num_classes=NUM_CLASSES, channels=channels)
    weights.redraw_weights(model, seed)
    # Outputs far from uniform: the drawn weights give nearly the same
    # pooled features for every image, so the head magnifies them.
    head = model.layers[-1]
    head.kernel.assign(head.kernel * 1000.0)
    return model


@needs_openvino
@pytest.mark.parametrize("image_size, channels, batch_size", [
    (17, 3, 5),   # odd side, a batch that does not split evenly
    (20, 1, 8),   # grayscale teacher
    (9, 3, 1),    # one image per call
])
def test_openvino_probabilities_equal_tensorflow_float32(
        image_size, channels, batch_size):
    teacher = _teacher(image_size, channels)
    pixels = np.random.default_rng(0).uniform(
        0, 255, (batch_size, image_size, image_size, channels)).astype(
            np.float32)
    reference = inference_runtime.probabilities_fn(
        teacher, "tensorflow", "float32", batch_size, image_size,
        channels)(tf.constant(pixels))
    fast = inference_runtime.probabilities_fn(
        teacher, "openvino", "float32", batch_size, image_size,
        channels)(tf.constant(pixels))
    assert fast.shape == reference.shape == (batch_size, NUM_CLASSES)
    assert fast.dtype == np.float32
    # Outputs that depend on the image, not near-uniform ones on which any
    # two runtimes would agree.
    assert reference.max() > 0.21
    if batch_size > 1:
        assert np.ptp(reference, axis=0).max() > 0.02
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-4)
    # A short last batch (padded by the predict stage) gives the same rows.
    fast_fn = inference_runtime.probabilities_fn(
        teacher, "openvino", "float32", batch_size, image_size, channels)
    head = np.zeros_like(pixels)
    head[:1] = pixels[:1]
    np.testing.assert_allclose(fast_fn(head)[:1], reference[:1], rtol=0,
                               atol=1e-4)


def _block_files(out_dir):
    return {name: (out_dir / name).read_bytes()
            for name in os.listdir(out_dir)
            if name.endswith((".tfrecord", ".hist.npz"))}


def _labeled_records(out_dir):
    return [(int(r["index"]), r["probs"].numpy(), int(r["label"]),
             r["image"].numpy())
            for r in records.prediction_dataset(out_dir, decode_image=False)]


@pytest.fixture(scope="module")
def folder_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_inputs")
    teacher = _teacher(16, 3, seed=1)
    os.makedirs(root / "teacher")
    teacher.save(str(root / "teacher" / "model.keras"))
    rng = np.random.default_rng(1)
    np.savez(root / "unlabeled.npz",
             x=rng.integers(0, 256, (37, 12, 12, 3), np.uint8),
             y=np.arange(37) % NUM_CLASSES)
    return str(root / "teacher"), f"npz:{root / 'unlabeled.npz'}"


def _run_predict(folder_inputs, out_dir, runtime, precision="float32"):
    teacher, unlabeled = folder_inputs
    config = prediction.PredictConfig(
        teacher=teacher, out_dir=str(out_dir), num_classes=NUM_CLASSES,
        batch_size=8, records_per_file=16, inference_runtime=runtime,
        inference_precision=precision)
    return stages.run_predict(config, stages.DataConfig(unlabeled=unlabeled))


@needs_openvino
def test_predict_stage_on_openvino_writes_the_same_records(folder_inputs,
                                                           tmp_path):
    _run_predict(folder_inputs, tmp_path / "tf", "tensorflow")
    _run_predict(folder_inputs, tmp_path / "ov", "openvino")
    # Another conversion of the same teacher writes the same bytes: a
    # resumed run's blocks match those written before the kill.
    _run_predict(folder_inputs, tmp_path / "ov_again", "openvino")
    blocks = _block_files(tmp_path / "ov")
    assert len(blocks) == 6  # 3 blocks: records and histogram each
    assert blocks == _block_files(tmp_path / "ov_again")
    reference = _labeled_records(tmp_path / "tf")
    fast = _labeled_records(tmp_path / "ov")
    assert len(fast) == len(reference) == 37
    for (i, probs, label, image), (j, ref_probs, ref_label, ref_image) in zip(
            fast, reference):
        assert (i, image) == (j, ref_image)
        # The records keep float16 probabilities: 1e-4 plus a float16 step.
        np.testing.assert_allclose(probs, ref_probs, rtol=0, atol=1e-3)
        if np.sort(ref_probs)[-1] - np.sort(ref_probs)[-2] > 1e-3:
            assert label == ref_label


@needs_openvino
@pytest.mark.parametrize("first, second", [("tensorflow", "openvino"),
                                           ("openvino", "tensorflow")])
def test_folder_labelled_by_one_runtime_refuses_another(
        folder_inputs, tmp_path, first, second):
    out_dir = tmp_path / "predict"
    _run_predict(folder_inputs, out_dir, first)
    before = {name: os.path.getmtime(out_dir / name)
              for name in os.listdir(out_dir)}
    with pytest.raises(ValueError) as refused:
        _run_predict(folder_inputs, out_dir, second)
    # Names what changed, with both values; not the unchanged precision.
    assert f'--inference_runtime="{second}" (was "{first}")' in str(
        refused.value)
    assert "--inference_precision" not in str(refused.value)
    assert before == {name: os.path.getmtime(out_dir / name)
                      for name in os.listdir(out_dir)}
    # The same runtime resumes: every block is already there.
    summary = _run_predict(folder_inputs, out_dir, first)
    assert (summary["images_written"], summary["blocks_skipped"]) == (0, 3)


@needs_openvino
def test_folder_made_before_the_runtime_was_recorded_is_tensorflows(
        folder_inputs, tmp_path):
    out_dir = tmp_path / "predict"
    _run_predict(folder_inputs, out_dir, "tensorflow")
    inputs_path = out_dir / "inputs.json"
    inputs = json.loads(inputs_path.read_text())
    del inputs["--inference_runtime"], inputs["--inference_precision"]
    inputs_path.write_text(json.dumps(inputs))
    summary = _run_predict(folder_inputs, out_dir, "tensorflow")
    assert summary["blocks_skipped"] == 3
    with pytest.raises(ValueError, match='--inference_runtime="openvino" '
                                         r'\(was "tensorflow"\)'):
        _run_predict(folder_inputs, out_dir, "openvino")


@needs_openvino
def test_openvino_run_keeps_the_log_format(folder_inputs, tmp_path):
    """Importing OpenVINO empties the root logger's handlers; the command's
    lines keep absl's format (level, time, file:line)."""
    teacher, unlabeled = folder_inputs
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli.predict",
         f"--teacher={teacher}", f"--unlabeled={unlabeled}",
         f"--out_dir={tmp_path / 'predict'}", f"--num_classes={NUM_CLASSES}",
         "--inference_runtime=openvino"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if "the teacher runs on openvino in float32" in line]
    assert len(lines) == 1 and re.match(r"I\d{4} [\d:.]+ +\d+ prediction\.py:",
                                        lines[0]), result.stderr[-3000:]
    assert "INFO:absl:" not in result.stderr
    assert "'inference_runtime': 'openvino'" in result.stdout


def test_unknown_settings_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--inference_runtime"):
        inference_runtime.check("onnx", "float32")
    with pytest.raises(ValueError, match="--inference_precision"):
        inference_runtime.check("tensorflow", "float16")
    with pytest.raises(ValueError, match="bfloat16 needs "
                       "--inference_runtime=openvino"):
        inference_runtime.check("tensorflow", "bfloat16")
    with pytest.raises(ValueError, match="--inference_runtime"):
        prediction.PredictConfig(teacher="t", out_dir="o", num_classes=2,
                                  inference_runtime="onnx")


def test_bfloat16_refused_on_a_cpu_without_it(monkeypatch):
    class Core:
        def get_property(self, device, name):
            assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
            return ["FP32", "INT8"]

    class FakeOpenVino:
        pass
    FakeOpenVino.Core = Core
    monkeypatch.setattr(inference_runtime, "_openvino", lambda: FakeOpenVino)
    inference_runtime.check("openvino", "float32")
    with pytest.raises(ValueError, match="FP32, INT8"):
        inference_runtime.check("openvino", "bfloat16")


def test_without_openvino_the_flag_fails_before_work(tmp_path):
    # A package that cannot be imported stands in for a missing OpenVINO.
    blocker = tmp_path / "blocker" / "openvino"
    os.makedirs(blocker)
    (blocker / "__init__.py").write_text(
        "raise ImportError('No module named openvino')\n")
    out_dir = tmp_path / "predict"
    env = dict(os.environ, PYTHONPATH=f"{blocker.parent}{os.pathsep}{ROOT}")
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli.predict",
         "--teacher=/nonexistent", f"--out_dir={out_dir}",
         "--unlabeled=digits:test", "--num_classes=10",
         "--inference_runtime=openvino"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines()
              if "openvino" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert "pip install openvino" in errors[0]
    assert "Traceback" not in result.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize("runtime", [
    "tensorflow", pytest.param("openvino", marks=needs_openvino)])
def test_runtime_cache_does_not_keep_teachers_alive(runtime):
    model = _teacher(16, 3)
    fn = inference_runtime.probabilities_fn(model, runtime, "float32", 2, 16,
                                            3)
    fn(tf.zeros([2, 16, 16, 3]))
    alive = weakref.ref(model)
    del model, fn
    gc.collect()
    assert alive() is None


def test_predict_does_not_import_openvino():
    # The runtime module is imported by every predict path; it must not
    # import OpenVINO itself (the base install has none).
    code = ("import sys; from noisy_student.pseudo_labels import prediction; "
            "print('openvino' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, cwd=ROOT, check=True, timeout=300)
    assert result.stdout.strip() == "False"
