"""The one-command pipeline: outputs, report, resume after SIGKILL, bad flags."""

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import flags
import pytest

from pipeline_runs import pipeline_command
from pipeline_runs import run_pipeline
from pipeline_runs import TINY

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
STAGES_PER_ITERATION = ("predict", "select", "train", "eval")


def _finished_block(name):
    """A prediction block's histogram renamed into place (a killed run's
    temporary file ends in .hist.npz too, and a rerun removes it)."""
    from noisy_student.utils import storage  # pylint: disable=g-import-not-at-top
    return name.endswith(".hist.npz") and not storage.is_temp(name)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def stage_times(workdir):
    stages = read_json(f"{workdir}/manifest.json")["stages"]
    return {name: (s.get("finished_at"), s["runs"])
            for name, s in stages.items()}


def as_made_before_the_rename(workdir):
    """Turns a pipeline's workdir into the one the code before the round ->
    iteration rename made of the same run: round{r}/ folders,
    "round{r}/<stage>" manifest keys, report.json's "rounds" / "round".
    (That code computed the same fingerprints: see
    test_fingerprints_of_work_directories_made_before_the_config_had_parts.)
    """
    for name in os.listdir(workdir):
        if re.fullmatch(r"iteration\d+", name):
            os.rename(f"{workdir}/{name}",
                      f"{workdir}/round{name[len('iteration'):]}")
    stages = read_json(f"{workdir}/manifest.json")["stages"]
    with open(f"{workdir}/manifest.json", "w") as f:
        json.dump({"stages": {re.sub(r"^iteration(\d+)/", r"round\1/", k): v
                              for k, v in stages.items()}}, f)
    if os.path.exists(f"{workdir}/report.json"):
        report = read_json(f"{workdir}/report.json")
        report["rounds"] = [
            {("round" if k == "iteration" else k): v for k, v in e.items()}
            for e in report.pop("iterations")]
        with open(f"{workdir}/report.json", "w") as f:
            json.dump(report, f)


def file_hashes(workdir, skip=("report.json", "report.md", "report.png",
                               "flags.txt")):
    """{path relative to workdir: sha256} of every file but `skip`'s."""
    hashes = {}
    for folder, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, workdir)
            if relative not in skip:
                with open(path, "rb") as f:
                    hashes[relative] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def check_outputs(workdir, iterations, train_steps=20):
    """Every stage's outputs exist and the report agrees with them."""
    for r in range(iterations + 1):
        folder = f"{workdir}/iteration{r}"
        assert os.path.exists(f"{folder}/train/model.keras")
        assert os.path.exists(f"{folder}/train/stage_config.json")
        assert os.path.exists(f"{folder}/eval/confusion_matrix.png")
        if r:
            assert os.path.exists(f"{folder}/select/selection.json")
            assert os.path.exists(f"{folder}/select/report.png")
    assert os.path.exists(f"{workdir}/export/saved_model.pb")
    for name in ("report.md", "report.png", "flags.txt"):
        assert os.path.getsize(f"{workdir}/{name}") > 0
    report = read_json(f"{workdir}/report.json")
    assert [r["iteration"] for r in report["iterations"]] == list(
        range(iterations + 1))
    assert [r["role"] for r in report["iterations"]] == (
        ["teacher"] + ["student"] * iterations)
    for entry in report["iterations"]:
        results = read_json(f"{workdir}/iteration{entry['iteration']}/eval/"
                            "results.json")
        assert entry["test_top1"] == pytest.approx(results["clean"]["top1"])
        assert 0.0 <= entry["test_top1"] <= 1.0
        assert entry["train_steps"] == train_steps
    for entry in report["iterations"][1:]:
        selection = read_json(f"{workdir}/iteration{entry['iteration']}/"
                              "select/report.json")
        assert entry["pseudo_labels"]["unique"] == (
            selection["totals"]["unique"])
        assert 0 < entry["pseudo_labels"]["unique"] <= 1337
    stages = read_json(f"{workdir}/manifest.json")["stages"]
    assert all("finished_at" in s for s in stages.values())
    return report


# The uninterrupted reference run: checked by the end-to-end test, grown by
# one iteration there (in a copy), and compared with the killed and rerun
# pipeline. 60 steps: long enough after the first checkpoint to be killed in.
LONGER = ("--iterations=1", "--teacher_train_steps=60",
          "--student_train_steps=60")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(workdir, stdout) of the LONGER pipeline run once, never killed."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "work")
    done = run_pipeline(workdir, *LONGER)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout


def test_pipeline_end_to_end_then_rerun_is_a_no_op(uninterrupted, tmp_path):
    reference, stdout = uninterrupted
    check_outputs(reference, 1, train_steps=60)
    assert "| 1 | student | w0.25-d0.25 |" in stdout
    # Step lines say whose they are; the run ends saying where its results
    # are; stages are counted.
    assert "[iteration0/train] step 10/60" in stdout
    assert "[iteration1/train] eval step 60" in stdout
    assert "[stage 1/7] iteration0/train" in stdout
    assert f"Report: {reference}/report.json" in stdout
    assert f"SavedModel: {reference}/export" in stdout
    # A copied workdir is the same run (nothing in it names its folder),
    # also when it was made before the round -> iteration rename: the rerun
    # renames its folders (one line each) and manifest keys, and redoes
    # nothing; every file of its stages is kept byte for byte.
    workdir = str(tmp_path / "work")
    shutil.copytree(reference, workdir)
    before = stage_times(reference)
    assert len(before) == 2 + len(STAGES_PER_ITERATION) + 1
    files = file_hashes(reference)
    as_made_before_the_rename(workdir)
    assert not os.path.exists(f"{workdir}/iteration0")
    again = run_pipeline(workdir, *LONGER)
    assert again.returncode == 0, again.stderr[-3000:]
    for r in (0, 1):
        assert again.stderr.count(
            f"Renamed {workdir}/round{r} to {workdir}/iteration{r}: ") == 1
    assert "[stage " not in again.stdout  # nothing redone
    assert stage_times(workdir) == before
    assert read_json(f"{workdir}/manifest.json") == read_json(
        f"{reference}/manifest.json")
    assert file_hashes(workdir) == files
    assert read_json(f"{workdir}/report.json")["iterations"] == read_json(
        f"{reference}/report.json")["iterations"]
    # Changed settings are refused before any work starts.
    changed = run_pipeline(workdir, *LONGER, "--student_train_steps=30")
    assert changed.returncode != 0
    assert "iteration1/train" in changed.stderr and "--overwrite" in (
        changed.stderr)
    # ... naming the flag that changed, with its recorded value.
    assert "--student_train_steps=30 (was 60)" in changed.stderr, (
        changed.stderr[-3000:])
    assert stage_times(workdir) == before
    # One more iteration: iterations 0-1 are kept, 2 added, the export
    # redone from it.
    grown = run_pipeline(workdir, *LONGER, "--iterations=2")
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "[stage 7/11] iteration2/predict" in grown.stdout, (
        grown.stdout[-3000:])
    check_outputs(workdir, 2, train_steps=60)
    after = stage_times(workdir)
    assert {k: after[k] for k in before if k != "export"} == {
        k: v for k, v in before.items() if k != "export"}
    assert after["export"][0] > before["export"][0]
    assert len(after) == len(before) + len(STAGES_PER_ITERATION)
    # Fewer iterations again are refused: the export would silently become
    # iteration 1's student.
    shrunk = run_pipeline(workdir, *LONGER)
    assert shrunk.returncode == 2, shrunk.stderr[-3000:]
    assert "Expected --iterations >= 2" in shrunk.stderr
    assert stage_times(workdir) == after


# examples/quickstart.ipynb made tiny: the settings of the LONGER run (TINY +
# LONGER above) as its recipe, selection and prediction overrides.
NOTEBOOK_SETTINGS = {
    "recipe": {"model": "w0.25-d0.25", "image_size": 16, "batch_size": 16,
               "unlabel_ratio": 2, "train_steps": 60, "warmup_steps": 5,
               "steps_per_loop": 5, "log_every": 10, "checkpoint_every": 5,
               "augment": "none"},
    "select": {"min_confidence": 0.0},
    "predict": {"batch_size": 16, "records_per_file": 100}}
# Runs a notebook's code cells in order in one namespace, as a kernel would.
RUN_CELLS = """
import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
scope = {"__name__": "__main__"}
for cell in cells:
    if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), scope)
"""


def _model_weights(model_dir):
    from noisy_student.model import loading  # pylint: disable=g-import-not-at-top
    return [w.numpy() for w in loading.load_model(str(model_dir)).weights]


def test_quickstart_notebook_equals_the_command(uninterrupted, tmp_path):
    """examples/quickstart.ipynb drives the digits loop through
    `noisy_student.api` (teacher, predict, select, student in ten lines;
    then evaluate, export and serve one image): with the command's settings
    it gives bitwise the command's teacher and student weights and test
    scores (the commands are flags -> the same calls, and the notebook
    runs)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    workdir, _ = uninterrupted
    notebook_dir = tmp_path / "notebook"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "NS_QUICKSTART": json.dumps(NOTEBOOK_SETTINGS),
           "NS_QUICKSTART_DIR": str(notebook_dir)}
    done = subprocess.run(
        [sys.executable, "-c", RUN_CELLS, f"{ROOT}/examples/quickstart.ipynb"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for ours, theirs in (("teacher", "iteration0"), ("student", "iteration1")):
        for a, b in zip(_model_weights(notebook_dir / ours),
                        _model_weights(f"{workdir}/{theirs}/train"),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    printed = [float(x) for x in re.findall(r"test top-1: ([0-9.]+)", out)]
    assert printed == [
        read_json(f"{workdir}/iteration{r}/eval/results.json")["clean"]["top1"]
        for r in (0, 1)], out
    # The selection's contact sheet was found, and the SavedModel served
    # the image: three class ids in [0, 10).
    assert "contact sheet: " in out and ".png" in out, out
    served = re.search(r"served: \[(\d+) (\d+) (\d+)\]", out)
    assert served and all(0 <= int(c) < 10 for c in served.groups()), out


def _kill_when(process, condition, log_path, timeout=300):
    start = time.time()
    while not condition():
        if process.poll() is not None:
            raise AssertionError("the pipeline ended before the kill point:\n"
                                 + log_path.read_text()[-3000:])
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _started(workdir, name):
    try:
        stage = read_json(f"{workdir}/manifest.json")["stages"].get(name, {})
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return "started_at" in stage and "finished_at" not in stage


def _final_state(workdir):
    """The last student's EMA weights and checkpoint, and the test top-1s."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    reader = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(f"{workdir}/iteration1/train/checkpoints"))
    tensors = {name: reader.get_tensor(name)
               for name in reader.get_variable_to_shape_map()
               if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
               and not name.startswith("save_counter")}
    import h5py  # pylint: disable=g-import-not-at-top
    import zipfile  # pylint: disable=g-import-not-at-top
    with zipfile.ZipFile(f"{workdir}/iteration1/train/model.keras") as archive:
        with archive.open("model.weights.h5") as f, h5py.File(f) as h5:
            ema = {}
            h5.visititems(lambda n, d: ema.setdefault(
                n, np.array(d)) if isinstance(d, h5py.Dataset) else None)
    top1 = [r["test_top1"] for r in read_json(f"{workdir}/report.json")[
        "iterations"]]
    return tensors, ema, top1


def test_pipeline_resumes_after_sigkill_in_prediction_and_training(
        uninterrupted, tmp_path):
    workdir = str(tmp_path / "work")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    reference_dir, _ = uninterrupted  # The same command, never interrupted.

    log_path = tmp_path / "log.txt"

    def start():
        # Output goes to a file: an unread pipe could fill up and block.
        with open(log_path, "a") as log:
            return subprocess.Popen(
                pipeline_command(workdir, *LONGER), cwd=ROOT,
                env=env, stdout=log, stderr=subprocess.STDOUT)

    def files(folder):
        return os.listdir(folder) if os.path.isdir(folder) else []

    predict_dir = f"{workdir}/iteration1/predict"
    # 1. Killed while predicting: some blocks written, the stage unfinished.
    # (A training killed and resumed is step 2's, the student's: the same
    # stage code as the teacher's.)
    _kill_when(start(), lambda: _started(workdir, "iteration1/predict") and (
        any(_finished_block(n) for n in files(predict_dir))), log_path)
    teacher = stage_times(workdir)["iteration0/train"]
    blocks = {n: os.path.getmtime(f"{predict_dir}/{n}")
              for n in os.listdir(predict_dir) if _finished_block(n)}
    # 2. Killed while the student trains, after its first checkpoint (the
    # "checkpoint" file is written once a checkpoint is complete).
    _kill_when(start(), lambda: _started(workdir, "iteration1/train") and (
        os.path.exists(f"{workdir}/iteration1/train/checkpoints/checkpoint")),
        log_path)
    # 3. The same command completes, in the workdir the code before the
    # round -> iteration rename would have left, half renamed (a migration
    # killed after its first folder): the student's training resumes from
    # its checkpoint in the renamed folder.
    as_made_before_the_rename(workdir)
    os.rename(f"{workdir}/round0", f"{workdir}/iteration0")
    process = start()
    assert process.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    check_outputs(workdir, 1, train_steps=60)
    times = stage_times(workdir)
    assert times["iteration0/train"] == teacher  # the teacher was not redone
    assert times["iteration1/predict"][1] == 2  # resumed once after the kill
    for name, mtime in blocks.items():  # finished blocks were kept
        assert os.path.getmtime(f"{predict_dir}/{name}") == mtime
    metrics = read_json(f"{workdir}/iteration1/train/metrics.json")
    assert metrics["step"] == 60
    log = log_path.read_text()
    # Only the folder left was renamed, once.
    assert log.count(f"Renamed {workdir}/round") == 1
    assert log.count(f"Renamed {workdir}/round1 to {workdir}/iteration1") == 1
    # The student's training was resumed from a checkpoint before its end.
    resumed = [int(line.split("Resuming from step ")[1].split()[0])
               for line in log.splitlines() if "Resuming from step" in line]
    assert len(resumed) == 1 and all(0 < s < 60 for s in resumed), resumed
    # The killed and rerun pipeline is the uninterrupted one: same test
    # top-1s, same final weights to the bit (same ops on the same data).
    tensors, ema, top1 = _final_state(workdir)
    ref_tensors, ref_ema, ref_top1 = _final_state(reference_dir)
    assert top1 == ref_top1
    assert tensors.keys() == ref_tensors.keys() and ema.keys() == (
        ref_ema.keys())
    for name in ref_tensors:
        assert (tensors[name] == ref_tensors[name]).all(), name
    for name in ref_ema:
        assert (ema[name] == ref_ema[name]).all(), name
    # "train s" counts every attempt, not only the last.
    stage = read_json(f"{workdir}/manifest.json")["stages"]["iteration1/train"]
    assert stage["runs"] == 2
    assert stage["seconds"] >= (
        stage["finished_at"] - stage["started_at"] + 1.0)


def test_second_pipeline_on_a_busy_workdir_exits_at_once(tmp_path):
    workdir = str(tmp_path / "work")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(pipeline_command(workdir, "--iterations=1"),
                                 cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _started(workdir, "iteration0/train"), first)
        manifest = read_json(f"{workdir}/manifest.json")
        second = run_pipeline(workdir, "--iterations=1")
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr, second.stderr[-3000:]
        assert f"host {socket.gethostname()}" in second.stderr
        assert "started 20" in second.stderr
        # It wrote nothing: the first run's record is untouched.
        assert read_json(f"{workdir}/manifest.json")["stages"][
            "iteration0/train"] == manifest["stages"]["iteration0/train"]
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def _wait_for(condition, process, timeout=120):
    start = time.time()
    while not condition():
        assert process.poll() is None, "the process ended early"
        assert time.time() - start < timeout
        time.sleep(0.05)


def parse(pipeline, tmp_path, *extra):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["noisy-student", f"--workdir={tmp_path}", *TINY, *extra])
    return pipeline.experiment_config()


@pytest.mark.parametrize("extra, message", [
    (["--teacher_model=b9"], "model='b9'"),
    (["--student_models=w0.25-d0.125"], "equal-or-larger"),
    (["--unlabel_ratio=0"], "unlabel_ratio=0"),
    (["--labeled=npz:/no/such/file.npz"], "/no/such/file.npz"),
    (["--unlabeled=folder:/no/such/folder"],
     "--unlabeled=folder:/no/such/folder"),
    # Out of the flags' bounds: refused while the flags are parsed.
    (["--per_class=-5"], "--per_class=-5"),
    (["--min_confidence=1.5"], "--min_confidence=1.5"),
    (["--predict_batch_size=0"], "--predict_batch_size=0"),
    # Checked when the stage configs are built, not after the teacher.
    (["--temperature=0"], "temperature=0"),
])
def test_bad_flags_fail_before_any_work(pipeline_flags, tmp_path, extra,
                                        message):
    with pytest.raises((ValueError, FileNotFoundError, flags.Error),
                       match=message):
        parse(pipeline_flags, tmp_path, *extra)
    assert not os.listdir(tmp_path)


def test_test_set_with_more_classes_fails_before_any_work(pipeline_flags,
                                                         tmp_path):
    import numpy as np  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz",
             x=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
             y=np.arange(12) % 11)  # 11 classes; digits has 10.
    workdir = tmp_path / "work"
    flags.FLAGS.unparse_flags()
    with pytest.raises(ValueError, match=r"--test=npz:.*\[0, 10\)"):
        flags.FLAGS(["noisy-student", f"--workdir={workdir}", *TINY,
                     f"--test=npz:{tmp_path}/test.npz"])
        pipeline_flags.experiment_config()
    assert not workdir.exists()


def test_smaller_student_allowed_when_asked(pipeline_flags, tmp_path):
    config = parse(pipeline_flags, tmp_path, "--student_models=w0.25-d0.125",
                   "--allow_smaller_student")
    assert config.student_model(1) == "w0.25-d0.125"


def test_students_train_at_their_variants_resolution(pipeline_flags,
                                                     tmp_path):
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["noisy-student", f"--workdir={tmp_path}",
                 "--teacher_model=b0", "--student_models=b1,b2",
                 "--teacher_train_steps=1", "--labels_per_class=10"])
    config = pipeline_flags.experiment_config()
    assert config.teacher.model.image_size == 224
    trains = [s for s in experiment.plan(config)
              if s.name.endswith("/train")]
    assert [s.name for s in trains] == ["iteration0/train", "iteration1/train",
                                        "iteration2/train"]
    assert [s.config.model.image_size for s in trains] == [224, 240, 260]
    assert [s.config.model.variant for s in trains] == ["b0", "b1", "b2"]


def test_folder_scans_go_to_the_workdir_and_change_no_fingerprint(
        pipeline_flags, tmp_path):
    """skipped_images.json lives in the workdir (issue 19, fault 6); where
    it is written is not a data setting, so no stage's fingerprint moves."""
    import dataclasses  # pylint: disable=g-import-not-at-top
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    config = parse(pipeline_flags, tmp_path)
    assert config.data.scan_dir == str(tmp_path)
    moved = dataclasses.replace(config, data=dataclasses.replace(
        config.data, scan_dir="/elsewhere"))
    assert ([s.fingerprint for s in experiment.plan(config)]
            == [s.fingerprint for s in experiment.plan(moved)])
    changed = dataclasses.replace(config, data=dataclasses.replace(
        config.data, skip_corrupt=False))
    assert ([s.fingerprint for s in experiment.plan(config)]
            != [s.fingerprint for s in experiment.plan(changed)])


def test_labeled_loss_weight_is_the_students_and_fingerprinted_only_if_set(
        pipeline_flags, tmp_path):
    """--labeled_loss_weight weights the students' labeled loss; the
    teacher keeps 1 (its loss is the labeled term). At its default no
    fingerprint moves (work directories made before the option resume);
    set, only the students' training (and what follows it) is redone."""
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    default = parse(pipeline_flags, tmp_path)
    weighted = parse(pipeline_flags, tmp_path, "--labeled_loss_weight=0")
    assert weighted.teacher.optimizer.labeled_loss_weight == 1.0
    assert weighted.student.optimizer.labeled_loss_weight == 0.0
    assert default.student.optimizer.labeled_loss_weight == 1.0
    before = [(s.name, s.fingerprint) for s in experiment.plan(default)]
    after = [(s.name, s.fingerprint) for s in experiment.plan(weighted)]
    changed = [a[0] for a, b in zip(before, after) if a != b]
    # The first stage that changes is the first student's training.
    first_student = next(s.name for s in experiment.plan(weighted)
                         if s.config is not None
                         and s.config.loop.unlabel_ratio > 0)
    assert changed and changed[0] == first_student


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="OpenVINO (the [openvino] extra) is not installed")
def test_teacher_runtime_is_fingerprinted_from_the_first_predict_stage(
        pipeline_flags, tmp_path):
    """Another --inference_runtime redoes the pseudo-labels and what
    follows them, not the teacher; the default moves no fingerprint (the
    hashes of the test below)."""
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    default = parse(pipeline_flags, tmp_path)
    openvino = parse(pipeline_flags, tmp_path, "--inference_runtime=openvino")
    assert openvino.predict.inference_runtime == "openvino"
    before = [(s.name, s.fingerprint) for s in experiment.plan(default)]
    after = [(s.name, s.fingerprint) for s in experiment.plan(openvino)]
    changed = [a[0] for a, b in zip(before, after) if a != b]
    assert changed and changed[0] == "iteration1/predict"
    assert "iteration0/train" not in changed


def test_fingerprints_of_work_directories_made_before_the_config_had_parts(
        pipeline_flags, tmp_path):
    """A workdir made before the train config was nested (and base_lr /
    dropout renamed) must resume: its stages keep their fingerprints. The
    hashes are what the code before that change computed for TINY (they
    change with flags/digits.cfg: recompute them with that code if it
    changes; TINY's RandAugment came later, so it is set back here)."""
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    config = parse(pipeline_flags, tmp_path, "--teacher_augment=randaugment",
                   "--student_augment=randaugment")
    fingerprints = {s.name: s.fingerprint for s in experiment.plan(config)}
    assert fingerprints["iteration0/train"] == "a8f0725830864a19"
    assert fingerprints["iteration1/train"] == "144f933ab1c3effa"
    assert fingerprints["iteration2/select"] == "94aff73c62d84850"


def test_fingerprints_name_no_folder(pipeline_flags, tmp_path):
    """No fingerprint holds a folder's name: a workdir made before the
    round -> iteration rename, or moved elsewhere, keeps its stages."""
    import dataclasses  # pylint: disable=g-import-not-at-top
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    config = parse(pipeline_flags, tmp_path, "--init_student_from_teacher")
    moved = dataclasses.replace(config, workdir="/elsewhere/round7")
    assert ([s.fingerprint for s in experiment.plan(config)]
            == [s.fingerprint for s in experiment.plan(moved)])


def test_old_and_new_folder_of_an_iteration_stop_the_pipeline(
        pipeline_flags, tmp_path):
    """round1/ and iteration1/ both present: one line naming both, before
    any work, and nothing in the workdir changed."""
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    workdir = tmp_path / "work"
    for folder in ("round0/train", "round1/train", "iteration1/train"):
        (workdir / folder).mkdir(parents=True)
        (workdir / folder / "metrics.json").write_text(folder)
    # A record that the code before the rename would refuse for other
    # reasons: the error must be about the folders, raised first.
    (workdir / "manifest.json").write_text(json.dumps({"stages": {
        "round0/train": {"fingerprint": "other", "started_at": 1.0}}}))
    before = file_hashes(str(workdir), skip=())
    config = parse(pipeline_flags, workdir)
    with pytest.raises(ValueError) as error:
        experiment.run(config)
    message = str(error.value)
    assert "\n" not in message
    assert f"both {workdir}/round1 and {workdir}/iteration1" in message
    assert file_hashes(str(workdir), skip=()) == before
    assert sorted(os.listdir(workdir)) == [
        "iteration1", "manifest.json", "round0", "round1"]
