"""Nothing made from other inputs is silently reused (issue 32, item 2).

A stage that resumes or skips work in its output folder (ns-predict's
finished blocks; the pipeline's finished stages) must refuse a folder made
from another teacher, other images or other settings, naming what differs,
before it writes anything there.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from noisy_student.evaluation import evaluator
from noisy_student.model import efficientnet
from noisy_student.pseudo_labels import prediction
from noisy_student.pipeline import stages
from noisy_student.pseudo_labels import selection
from noisy_student.serving import export

import weights  # pylint: disable=g-bad-import-order

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
NUM_CLASSES = 4


def _teacher(folder, seed):
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=NUM_CLASSES)
    weights.redraw_weights(model, seed)
    os.makedirs(folder)
    model.save(os.path.join(folder, "model.keras"))
    return str(folder)


def _images(path, seed, count=40):
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (count, 12, 12, 3), np.uint8),
             y=np.arange(count) % NUM_CLASSES)
    return f"npz:{path}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {"teacher": _teacher(root / "teacher", 0),
            "other_teacher": _teacher(root / "other_teacher", 1),
            "unlabeled": _images(root / "unlabeled.npz", 0),
            "other_unlabeled": _images(root / "other.npz", 1)}


def _predict(out_dir, teacher, unlabeled, **settings):
    settings.setdefault("records_per_file", 16)
    config = prediction.PredictConfig(
        teacher=teacher, out_dir=str(out_dir), num_classes=NUM_CLASSES,
        batch_size=8, **settings)
    return stages.run_predict(config, stages.DataConfig(unlabeled=unlabeled))


def _records(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {os.path.relpath(os.path.join(root, name), folder):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


@pytest.mark.parametrize("change, named", [
    ({"teacher": "other_teacher"}, "--teacher"),
    ({"unlabeled": "other_unlabeled"}, "--unlabeled"),
    ({"image_size": 12}, "teacher image_size"),
    ({"records_per_file": 8}, "--records_per_file"),
])
def test_predict_refuses_a_folder_made_from_other_inputs(inputs, tmp_path,
                                                         change, named):
    out_dir = tmp_path / "predict"
    first = _predict(out_dir, inputs["teacher"], inputs["unlabeled"])
    assert first["blocks_written"] == 3
    before = _records(out_dir)
    args = {"teacher": inputs["teacher"], "unlabeled": inputs["unlabeled"]}
    settings = {}
    for key, value in change.items():
        if key in args:
            args[key] = inputs[value]
        else:
            settings[key] = value
    with pytest.raises(ValueError, match=f"Received: {named}=") as error:
        _predict(out_dir, args["teacher"], args["unlabeled"], **settings)
    assert "--out_dir" in str(error.value)
    # Nothing rewritten: stage_config.json still names the first teacher.
    assert _records(out_dir) == before


def test_predict_resumes_a_moved_teacher_of_the_same_files(inputs,
                                                           tmp_path):
    out_dir = tmp_path / "predict"
    _predict(out_dir, inputs["teacher"], inputs["unlabeled"])
    moved = shutil.copytree(inputs["teacher"], tmp_path / "moved")
    again = _predict(out_dir, str(moved), inputs["unlabeled"])
    assert again["blocks_skipped"] == 3 and again["blocks_written"] == 0


def test_shards_of_two_teachers_are_not_mixed(inputs, tmp_path):
    out_dir = tmp_path / "predict"
    _predict(out_dir, inputs["teacher"], inputs["unlabeled"], shard_index=0,
             num_shards=2)
    with pytest.raises(ValueError, match="Received: --teacher="):
        _predict(out_dir, inputs["other_teacher"], inputs["unlabeled"],
                 shard_index=1, num_shards=2)
    assert not any(name.startswith("done-1") for name in os.listdir(out_dir))


def test_ns_predict_names_the_teacher_that_differs(inputs, tmp_path):
    out_dir = tmp_path / "predict"
    _predict(out_dir, inputs["teacher"], inputs["unlabeled"])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli.predict",
         f"--teacher={inputs['other_teacher']}", f"--out_dir={out_dir}",
         f"--unlabeled={inputs['unlabeled']}", "--records_per_file=16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert (f"--teacher={inputs['other_teacher']} (was {inputs['teacher']})"
            in result.stderr), result.stderr[-2000:]
    config = json.load(open(out_dir / "stage_config.json"))
    assert config["predict_0"]["teacher"] == inputs["teacher"]


# ------------------------------------------------------------ pipeline ---

TINY = [
    f"--flagfile={ROOT}/flags/digits.cfg", "--teacher_model=w0.25-d0.25",
    "--image_size=16", "--batch_size=16", "--unlabel_ratio=2",
    "--teacher_train_steps=10", "--student_train_steps=10",
    "--warmup_steps=2", "--steps_per_loop=5", "--log_every=10",
    "--checkpoint_every=5", "--predict_batch_size=16",
    "--records_per_file=100", "--min_confidence=0.0",
    # RandAugment's tf.data graph costs a fifth of a tiny run to trace;
    # tests/training/test_noise.py checks it in the student's real stream.
    "--teacher_augment=none", "--student_augment=none", "--iterations=1",
    "--noexport",
]


def _pipeline(workdir, unlabeled, *extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "noisy_student.cli.pipeline",
         f"--workdir={workdir}", *TINY, f"--unlabeled={unlabeled}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _png_folder(folder, count, seed):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
            os.path.join(folder, f"{seed}-{i}.png"))


def test_pipeline_names_the_data_that_changed(tmp_path):
    unlabeled = tmp_path / "unlabeled"
    _png_folder(unlabeled, 30, seed=0)
    workdir = tmp_path / "run"
    first = _pipeline(workdir, f"folder:{unlabeled}")
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = open(workdir / "manifest.json").read()

    # The finished predict stage is not reused for other images: the rerun
    # names the source, its image counts, and no flag (none changed).
    _png_folder(unlabeled, 3, seed=1)
    changed = _pipeline(workdir, f"folder:{unlabeled}")
    assert changed.returncode != 0
    assert (f"--unlabeled=folder:{unlabeled} (33 images), changed since "
            "(was 30 images)") in changed.stderr, changed.stderr[-3000:]
    assert "--overwrite" in changed.stderr
    assert "Flags that differ" not in changed.stderr
    assert open(workdir / "manifest.json").read() == manifest

    # --overwrite redoes what read the unlabeled images, not the teacher.
    redone = _pipeline(workdir, f"folder:{unlabeled}", "--overwrite")
    assert redone.returncode == 0, redone.stderr[-3000:]
    stages_run = set(re.findall(r"\[stage \d+/\d+\] (\S+)", redone.stdout))
    assert stages_run == {"iteration1/predict", "iteration1/select",
                          "iteration1/train", "iteration1/eval"}, (
                              redone.stdout)
    summary = json.load(open(workdir / "manifest.json"))["stages"][
        "iteration1/predict"]["summary"]
    assert summary["num_images"] == 33


# ------------------------------------------------------ one owner ---

def test_a_stage_refuses_another_stages_folder(inputs, tmp_path):
    pred_dir = tmp_path / "predict"
    _predict(pred_dir, inputs["teacher"], inputs["unlabeled"])
    before = _records(pred_dir)
    select_config = selection.SelectConfig(
        pred_dir=str(pred_dir), out_dir=str(pred_dir))
    with pytest.raises(ValueError, match="--out_dir=.*records of a predict "
                                         "stage"):
        stages.run_select(select_config)
    eval_config = evaluator.EvalConfig(
        model_path=inputs["teacher"], out_dir=str(pred_dir),
        num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="--out_dir=.*records of a "
                                         "predict stage"):
        stages.run_eval(eval_config,
                        stages.DataConfig(test=inputs["unlabeled"]))
    export_config = export.ExportConfig(
        model_path=inputs["teacher"], out_dir=str(pred_dir), overwrite=True)
    with pytest.raises(ValueError, match="records of a predict stage"):
        stages.run_export(export_config)
    assert _records(pred_dir) == before
    # The other way round: predictions into a selection's folder.
    select_dir = tmp_path / "select"
    stages.run_select(selection.SelectConfig(
        pred_dir=str(pred_dir), out_dir=str(select_dir), min_confidence=0.0))
    with pytest.raises(ValueError, match="records of a select stage"):
        _predict(select_dir, inputs["teacher"], inputs["unlabeled"])


def test_ns_eval_refuses_a_model_dir_as_its_out_dir(inputs, tmp_path):
    model_dir = tmp_path / "teacher"
    shutil.copytree(inputs["teacher"], model_dir)
    stages.write_stage_config(str(model_dir), train={"model": "w0.25-d0.25"})
    before = _records(model_dir)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        # --output_dir: the flag's 0.1.0 name, an alias of --out_dir.
        [sys.executable, "-m", "noisy_student.cli.evaluate",
         f"--model_path={model_dir}", f"--output_dir={model_dir}",
         f"--test={inputs['unlabeled']}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"--out_dir={model_dir}, which holds the records of a train " \
           "stage" in result.stderr, result.stderr[-2000:]
    assert _records(model_dir) == before


def test_ns_train_names_the_images_that_changed_not_a_setting(tmp_path):
    """A resumed ns-train on other --labeled images is refused naming them
    (was: 'config.json differs in images_per_epoch=41 (was 40)', a setting
    without a flag)."""
    from noisy_student.training import config as train_config  # pylint: disable=g-import-not-at-top

    def train(count, steps):
        labeled = _images(tmp_path / "labeled.npz", 0, count)
        data = stages.DataConfig(labeled=labeled, test=labeled)
        config = train_config.TrainConfig.from_fields(
            width=0.25, depth=0.25, num_classes=NUM_CLASSES, image_size=16,
            small_images=True, batch_size=4, train_steps=steps,
            warmup_steps=0, lr_schedule="constant", steps_per_loop=1,
            log_every=1, checkpoint_every=1, eval_every=0,
            images_per_epoch=count, verbose=False, augment="none")
        return stages.run_train(config, data, str(tmp_path / "train"))

    train(40, 1)
    before = _records(tmp_path / "train")
    with pytest.raises(ValueError, match=r"Received: --labeled=npz:\S+ "
                       r"\(41 images\), changed since \(was 40 images\)"):
        train(41, 2)
    assert _records(tmp_path / "train") == before


def test_ns_train_leaves_another_stages_folder_as_it_was(inputs, tmp_path):
    pred_dir = tmp_path / "predict"
    _predict(pred_dir, inputs["teacher"], inputs["unlabeled"])
    before = _records(pred_dir)
    labeled = tmp_path / "labeled"
    for name in ("a", "b"):
        _png_folder(labeled / name, 4, seed=ord(name))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli.train",
         f"--model_dir={pred_dir}", f"--labeled=folder:{labeled}",
         "--model=w0.25-d0.25", "--image_size=16", "--train_steps=1",
         "--batch_size=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds the records of a predict stage" in result.stderr
    # Not even the scan of --labeled wrote its report there.
    assert _records(pred_dir) == before
