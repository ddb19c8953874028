"""What bad input gets: a clear message before any work (issue 19).

Each test names the class of bad input of docs/bad_input.md's table. The
command-line tests run the real commands in subprocesses (exit
status, no traceback, the message naming the flag).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from noisy_student.model import efficientnet
from noisy_student.evaluation import evaluator
from noisy_student.serving import export
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import selection
from noisy_student.pipeline import stages
from noisy_student.training import config as train_config
from noisy_student.data import sources

ROOT = str(pathlib.Path(__file__).resolve().parents[2])


def write_npz(path, labels, size=8):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (len(labels), size, size), dtype=np.uint8)
    np.savez(path, x=x, y=np.asarray(labels))
    return f"npz:{path}"


# ------------------------------------------------------------- labels ---

def test_labels_with_a_gap_are_refused(tmp_path):
    spec = write_npz(tmp_path / "gap.npz", [0, 1, 7, 0, 1, 7])
    with pytest.raises(ValueError, match=r"no image of class \[2, 3, 4, 5, "
                                         r"6\].*renumber"):
        sources.load_source(spec)
    # Named with the flag when loaded for a command.
    with pytest.raises(ValueError, match="--labeled=npz:"):
        stages.DataConfig(labeled=spec).labeled_source()


def test_class_folder_without_images_is_refused(tmp_path):
    for name in ("cat", "dog", "empty"):
        os.makedirs(tmp_path / name)
    for name in ("cat", "dog"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
            tmp_path / name / "a.png")
    with pytest.raises(ValueError, match=r"no decodable image in \['empty'\]"):
        sources.load_source(f"folder:{tmp_path}")


def test_labels_per_class_checks_classes_without_images():
    # Class 2 exists (num_classes=3, e.g. from TFDS) but has no image.
    subset = sources.Subset("labeled", per_class=1)
    with pytest.raises(ValueError, match=r"\(--labels_per_class=1\).*"
                                         "class 2 has 0"):
        sources.subset_mask([0, 0, 1, 1], subset, num_classes=3)


def test_validation_part_needs_a_validation_size():
    data = stages.DataConfig(labeled="digits:train", labels_per_class=5)
    with pytest.raises(ValueError, match=r"--validation_size > 0.*"
                                         r"Received: --validation_size=0"):
        data.eval_source("validation")


def test_negative_labels_are_refused_without_a_class_count(tmp_path):
    spec = write_npz(tmp_path / "negative.npz", [0, 1, -1, 1])
    with pytest.raises(ValueError, match=r"Expected labels >= 0 in "
                                         r"npz:.*from -1 to 1"):
        sources.load_source(spec)


def test_one_class_names_the_flag(tmp_path):
    spec = write_npz(tmp_path / "one.npz", [0, 0, 0])
    with pytest.raises(ValueError, match=r"at least 2 classes in --labeled"):
        stages.DataConfig(labeled=spec).labeled_source()


def test_pseudo_labels_with_unlabel_ratio_0_are_refused(tmp_path):
    config = train_config.TrainConfig.from_fields(
        width=0.25, depth=0.25, image_size=16, warmup_steps=0,
        lr_schedule="constant")
    with pytest.raises(ValueError, match="unlabel_ratio > 0.*ignore them"):
        stages.run_train(config, stages.DataConfig(),
                         str(tmp_path / "run"), pseudo_dir=str(tmp_path))
    assert not (tmp_path / "run").exists()


def test_resume_with_other_settings_is_refused_and_records_kept(tmp_path):
    config = train_config.TrainConfig.from_fields(
        width=0.25, depth=0.25, num_classes=10, image_size=16,
        small_images=True, batch_size=8, train_steps=2, warmup_steps=0,
        lr_schedule="constant", steps_per_loop=1, log_every=1,
        checkpoint_every=0, verbose=False, augment="none")
    data = stages.DataConfig(labeled="digits:train", labels_per_class=2)
    model_dir = tmp_path / "m"
    stages.run_train(config, data, str(model_dir))
    records = {f: (model_dir / f).read_bytes()
               for f in ("config.json", "stage_config.json")}
    for changed, message in (
            (dict(base_learning_rate=0.5), "base_learning_rate=0.5 "),
            (dict(dropout_rate=0.5, seed=3), "dropout_rate=0.5 .*seed=3 "),
            (dict(optimizer="sgd"), "optimizer='sgd' [(]was 'rmsprop'[)]"),
            (dict(augment="randaugment"),
             "augment='randaugment' [(]was 'none'[)]")):
        with pytest.raises(ValueError, match="differs in .*" + message):
            stages.run_train(config.replace(**changed), data,
                             str(model_dir))
        for name, content in records.items():
            assert (model_dir / name).read_bytes() == content, name
    # Training longer, logging less often: resumed.
    result = stages.run_train(config.replace(train_steps=3, log_every=3),
                              data, str(model_dir))
    assert result["start_step"] == 2 and result["step"] == 3


def test_test_set_with_more_classes_than_the_model(tmp_path):
    spec = write_npz(tmp_path / "eleven.npz", list(range(11)))
    with pytest.raises(ValueError, match=r"--test=npz:.*\[0, 10\)"):
        stages.DataConfig(test=spec).eval_source(num_classes=10)


# ----------------------------------------------- configs when built ---

@pytest.mark.parametrize("kwargs, message", [
    (dict(per_class=-5), "per_class=-5"),
    (dict(min_confidence=1.5), "min_confidence=1.5"),
    (dict(label_type="fuzzy"), "label_type='fuzzy'"),
    (dict(temperature=0.0), "temperature=0.0"),
])
def test_select_config_is_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        selection.SelectConfig(pred_dir="p", out_dir="o", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(shard_index=2, num_shards=2), "shard_index=2"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(log_every_s=0), "log_every_s=0"),
])
def test_predict_config_is_checked_when_built(kwargs, message):
    args = dict(teacher="t", out_dir="o", num_classes=10)
    with pytest.raises(ValueError, match=message):
        prediction.PredictConfig(**{**args, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(num_classes=1), "num_classes=1"),
    (dict(attack="cw"), "attack='cw'"),
    (dict(corruptions=("rain",)), "rain"),
    (dict(severities=(6,)), "severities"),
    (dict(epsilons=(-1.0,)), "epsilons"),
])
def test_eval_config_is_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluator.EvalConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k=0"),
    (dict(image_size=-1), "image_size=-1"),
    (dict(out_dir=""), "out_dir=''"),
])
def test_export_config_is_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        export.ExportConfig(**{"model_path": "m", "out_dir": "o",
                                   **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels_per_class=-1), "labels_per_class=-1"),
    (dict(validation_size=-3), "validation_size=-3"),
    (dict(channels=2), "channels=2"),
])
def test_data_config_is_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stages.DataConfig(**kwargs)


def test_pipeline_predict_stage_honours_log_every_s(monkeypatch, tmp_path):
    seen = {}

    def fake_predict(*args, **kwargs):
        seen.update(kwargs)
        return prediction.PredictSummary(0, 0, 0, 0, 0.0, 0.0)
    monkeypatch.setattr(prediction, "predict", fake_predict)
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=10)
    model.save(str(tmp_path / "model.keras"))
    config = prediction.PredictConfig(
        teacher=str(tmp_path), out_dir=str(tmp_path / "predict"),
        num_classes=10, log_every_s=7.0)
    stages.run_predict(config, stages.DataConfig(unlabeled="digits:test"))
    assert seen["log_every_s"] == 7.0


# --------------------------------------------------- the commands ---

def _command(module, *args):
    env = {k: v for k, v in os.environ.items()
           if k != "TF_CPP_MIN_LOG_LEVEL"}  # The commands' own default.
    env["PYTHONPATH"] = ROOT
    return subprocess.Popen(
        [sys.executable, "-m", f"noisy_student.cli.{module}", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _finish(process):
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err

def _case(module, *args):
    """A command line of a batch: (module, args)."""
    return module, list(args)


def _run_batches(commands):
    """Runs {name: (module, args)} with one process per module (see
    cli_batch.py), all modules at once.

    Returns:
      ({name: {"code", "out", "err"}}, the processes' own stderr, joined).
    """
    by_module = {}
    for name, (module, args) in commands.items():
        by_module.setdefault(module, []).append((name, args))
    env = {k: v for k, v in os.environ.items()
           if k != "TF_CPP_MIN_LOG_LEVEL"}  # The commands' own default.
    env["PYTHONPATH"] = ROOT
    processes = {module: subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "cli_batch.py"),
         f"noisy_student.cli.{module}"], cwd=ROOT, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for module in by_module}
    results, stderr = {}, []
    for module, process in processes.items():
        out, err = process.communicate(
            json.dumps([args for _, args in by_module[module]]), timeout=300)
        lines = [l for l in out.splitlines() if l.startswith("CLI_BATCH=")]
        assert process.returncode == 0 and lines, err[-3000:]
        for (name, _), result in zip(by_module[module], json.loads(
                lines[-1][len("CLI_BATCH="):]), strict=True):
            results[name] = result
        stderr.append(err)
    return results, "".join(stderr)



COMMAND_FLAGS = {
    "train": ["--labeled", "--train_steps", "--batch_size", "--model"],
    "predict": ["--unlabeled", "--predict_batch_size", "--records_per_file"],
    "select": ["--per_class", "--min_confidence"],
    "evaluate": ["--test", "--labeled"],
    "pipeline": ["--labeled", "--teacher_train_steps", "--per_class",
                 "--predict_batch_size", "--teacher_init", "--student_init"],
    "export": ["--model_path", "--out_dir"],
    "convert": ["--checkpoint", "--model", "--num_classes",
                "--normalization"],
}


SCRIPTS = {"train": "ns-train", "predict": "ns-predict",
           "select": "ns-select", "evaluate": "ns-eval",
           "pipeline": "noisy-student", "export": "ns-export",
           "convert": "ns-convert"}


def test_help_of_every_command_lists_its_flags(batch):
    # Each command's --help (in the shared batch: the entry point run() with
    # sys.argv[0] its module), and once as the installed console script.
    results, _, _ = batch
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONPATH": ROOT}
    script = subprocess.Popen(
        [os.path.join(bin_dir, SCRIPTS["train"]), "--help"], cwd=ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, _ = _finish(script)
    outputs = {"script train": (code, out)}
    for module in COMMAND_FLAGS:
        result = results[f"help {module}"]
        outputs[module] = (result["code"], result["out"])
    for command, (code, out) in outputs.items():
        assert code == 0, command  # Help asked for is not an error.
        module = command.split()[-1]
        for flag in COMMAND_FLAGS[module]:
            assert flag + ":" in out, (command, flag, out[-500:])
        assert "--tf_" not in out  # Not the ~40 unrelated absl/TF flags.


# Out-of-range numbers, per command: refused while the flags are parsed,
# with the flag's own name (prefixed ones included), not a config field's.
BAD_NUMBERS = {
    "pipeline": ["--predict_batch_size=0", "--records_per_file=0",
                 "--student_dropout_rate=1.5", "--teacher_train_steps=-1",
                 "--student_stochastic_depth_rate=-0.1", "--batch_size=0",
                 "--steps_per_loop=0", "--iterations=-1", "--ema_decay=2",
                 "--label_smoothing=-1", "--validation_size=-3",
                 "--seed=-1", "--split_seed=4294967296", "--image_size=2",
                 "--select_seed=-2",
                 # Open bounds and non-finite numbers (absl's own bounds
                 # are inclusive and let NaN through).
                 "--temperature=0", "--base_learning_rate=0",
                 "--lr_decay_epochs=0", "--ema_decay=1",
                 "--student_dropout_rate=1", "--label_smoothing=1",
                 "--teacher_stochastic_depth_rate=1", "--log_every=0",
                 "--channels=2", "--base_learning_rate=nan",
                 "--student_magnitude=inf", "--weight_decay=-inf",
                 "--min_confidence=nan", "--min_confidence=1"],
    "evaluate": ["--eval_batch_size=0", "--pgd_steps=-1", "--epsilons=abc",
                 "--epsilons=2,-1", "--epsilons=nan", "--channels=4",
                 "--corruptions=gaussian_noise,fog"],
    "predict": ["--num_shards=0", "--shard_index=-1", "--num_classes=0"],
}
# Values at those bounds that are valid: accepted.
GOOD_NUMBERS = {
    "pipeline": ["--temperature=0.01", "--ema_decay=0", "--ema_decay=0.99999",
                 "--student_dropout_rate=0", "--label_smoothing=0",
                 "--teacher_stochastic_depth_rate=0.999", "--log_every=1",
                 "--channels=1", "--channels=3", "--min_confidence=0.999"],
    "evaluate": ["--epsilons=0,2,8", "--epsilons=0.5",
                 "--corruptions=gaussian_noise,jpeg_compression"],
    "predict": ["--num_shards=1"],
}
# Required flags, so that only the number under test can be wrong.
REQUIRED = {"pipeline": ["--workdir=w"], "evaluate": ["--model_path=m"],
            "predict": ["--teacher=t", "--out_dir=o"]}


def _number_cases():
    """{name: (module, {"parse": argv})} of BAD_NUMBERS and GOOD_NUMBERS."""
    cases = {}
    for module in BAD_NUMBERS:
        for arg in BAD_NUMBERS[module] + GOOD_NUMBERS[module]:
            cases[f"number {module} {arg}"] = (
                module, {"parse": [*REQUIRED[module], arg]})
    return cases


def test_out_of_range_numbers_are_refused_naming_the_flag(batch):
    results, _, _ = batch
    for module in BAD_NUMBERS:
        for arg in BAD_NUMBERS[module]:
            out = results[f"number {module} {arg}"]["out"]
            # absl names the flag with its parsed value (2 -> 2.0).
            name = arg.split("=")[0]
            assert out.startswith(f"REFUSED flag {name}="), (module, out)
        for arg in GOOD_NUMBERS[module]:
            out = results[f"number {module} {arg}"]["out"]
            assert out.strip() == "ACCEPTED", (module, arg, out)


def _user_error_cases(tmp_path):
    """{name: ((module, argv), message or messages)}: command lines that
    must exit 2 with the message, before any work."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    corrupt = tmp_path / "corrupt"
    for name in ("cat", "dog"):
        os.makedirs(corrupt / name, exist_ok=True)
        Image.new("RGB", (8, 8)).save(corrupt / name / "a.png")
    (corrupt / "dog" / "b.jpg").write_bytes(b"")  # zero bytes
    tiny = ["--teacher_model=w0.25-d0.25", "--image_size=16",
            "--labels_per_class=10"]
    cases = {
        "pseudo labels, ratio 0": (
            _case("train", f"--model_dir={tmp_path}/t",
                     "--labeled=digits:train", f"--pseudo_labels={tmp_path}",
                     "--unlabel_ratio=0"),
            "--unlabel_ratio > 0 with --pseudo_labels"),
        "per_class": (
            _case("pipeline", f"--workdir={tmp_path}/w1", *tiny,
                     "--per_class=-5"), "per_class=-5"),
        "min_confidence": (
            _case("pipeline", f"--workdir={tmp_path}/w2", *tiny,
                     "--min_confidence=1.5"), "min_confidence=1.5"),
        "unwritable workdir": (
            _case("pipeline", f"--workdir={blocker}/sub", *tiny),
            "writable folder --workdir"),
        "own data, no --test": (
            _case("pipeline", f"--workdir={tmp_path}/w4", *tiny,
                     f"--labeled=folder:{corrupt}"),
            "Expected --test (the labeled source of the final evaluation)"),
        "digits test split, no --test": (
            _case("pipeline", f"--workdir={tmp_path}/w5", *tiny,
                     "--labeled=digits:test"),
            "Expected --test (the labeled source of the final evaluation)"),
        "missing unlabeled folder": (
            _case("pipeline", f"--workdir={tmp_path}/w3", *tiny,
                     "--unlabeled=folder:/no/such/dir"),
            "--unlabeled=folder:/no/such/dir"),
        "no demo default": (
            _case("predict", f"--teacher={tmp_path}/none",
                     "--unlabeled=digits:test", f"--out_dir={tmp_path}/p"),
            "Received: teacher="),
        "no unlabeled source": (
            _case("predict", f"--teacher={tmp_path}/none",
                     "--labeled=digits:train", f"--out_dir={tmp_path}/p2"),
            "Received: --unlabeled=''"),
        "missing required flag": (
            _case("predict", "--unlabeled=digits:test",
                     f"--out_dir={tmp_path}/p3"), "--teacher"),
        "unwritable export folder": (
            _case("export", f"--model_path={tmp_path}/none",
                     f"--out_dir={blocker}/sub"),
            f"--out_dir={blocker}/sub"),
        "unwritable eval folder": (
            _case("evaluate", f"--model_path={tmp_path}/none",
                     "--test=digits:test", f"--out_dir={blocker}/sub"),
            "writable folder --out_dir"),
        "corrupt file, --noskip_corrupt": (
            _case("train", f"--model_dir={tmp_path}/t2",
                     f"--labeled=folder:{corrupt}", "--noskip_corrupt",
                     "--model=w0.25-d0.25", "--image_size=16",
                     "--train_steps=1"),
            (f"{corrupt}/dog/b.jpg: empty file", "--noskip_corrupt")),
        "missing selection": (
            _case("train", f"--model_dir={tmp_path}/t3",
                     "--labeled=digits:train", "--model=w0.25-d0.25",
                     "--image_size=16", "--pseudo_labels=/no/such/selection"),
            "/no/such/selection"),
        "missing prediction folder": (
            _case("select", "--pred_dir=/no/such/predictions",
                     f"--out_dir={tmp_path}/s"), "/no/such/predictions"),
    }
    return cases


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """(results by case name, the processes' stderr, the user errors'
    folder) of every command-line case of this module: --help, the
    numbers' parse, the user errors; one process per command."""
    tmp_path = tmp_path_factory.mktemp("user_errors")
    commands = {name: command for name, (command, _) in
                _user_error_cases(tmp_path).items()}
    commands.update(_number_cases())
    for module in COMMAND_FLAGS:
        commands[f"help {module}"] = (module, ["--help"])
    results, stderr = _run_batches(commands)
    return results, stderr, tmp_path


def test_user_errors_exit_2_with_a_message_naming_the_flag(batch):
    results, stderr, tmp_path = batch
    cases = _user_error_cases(tmp_path)
    # TF's C++ start-up lines are off by default.
    assert "oneDNN" not in stderr and "absl::InitializeLog" not in stderr, (
        stderr[-2000:])
    for name, (_, messages) in cases.items():
        code, err = results[name]["code"], results[name]["err"]
        assert code == 2, (name, err[-2000:])
        for message in (messages if isinstance(messages, tuple)
                        else (messages,)):
            assert message in err, (name, err[-2000:])
        assert "Traceback" not in err, name
        assert "num_classes=10" not in err, name  # No demo default used.
    assert not os.path.exists(tmp_path / "w1" / "manifest.json")
    # Nothing trained; an output folder made for a failed command is gone.
    assert os.listdir(tmp_path / "t2") == ["skipped_images.json"]
    for folder in ("p2", "t3", "s"):  # (t3 held flags.txt, s its config)
        assert not os.path.exists(tmp_path / folder), folder


def test_predict_takes_the_class_count_from_the_teacher(tmp_path):
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=7)
    model.save(str(tmp_path / "model.keras"))
    code, out, err = _finish(_command(
        "predict", f"--teacher={tmp_path}", "--unlabeled=digits:test",
        f"--out_dir={tmp_path}/p", "--records_per_file=400"))
    assert code == 0, err[-3000:]
    assert "'num_images': 360" in out


def test_dangling_symlink_in_a_folder_source_is_skipped(tmp_path):
    """Issue 32, 4b: a dangling symlink refused the whole run with
    `ns-predict: error: .../dangling.png; No such file or directory`."""
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=3)
    model.save(str(tmp_path / "model.keras"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(images / f"{i}.png")
    os.symlink(tmp_path / "nowhere.png", images / "dangling.png")
    skipping = _command("predict", f"--teacher={tmp_path}",
                        f"--unlabeled=folder:{images}",
                        f"--out_dir={tmp_path}/p")
    refusing = _command("predict", f"--teacher={tmp_path}",
                        f"--unlabeled=folder:{images}", "--noskip_corrupt",
                        f"--out_dir={tmp_path}/p2")
    code, out, err = _finish(skipping)
    assert code == 0, err[-3000:]
    assert "'num_images': 3" in out
    assert f"folder:{images}: 3 decoded, 1 skipped" in err
    report = (tmp_path / "p" / "skipped_images.json").read_text()
    assert (f'"{images}/dangling.png": "dangling symlink (to '
            f'{tmp_path}/nowhere.png)"') in report
    code, _, err = _finish(refusing)
    assert code == 2, err[-3000:]
    assert (f"{images}/dangling.png: dangling symlink" in err
            and "--noskip_corrupt" in err), err[-2000:]
    assert "Traceback" not in err


# A command run with the disk full at its write (`sys.argv[1]`: what).
FULL_DISK = """
import os, sys
import tensorflow as tf

real_save = tf.train.CheckpointManager.save

def ckpt_save(self, checkpoint_number=None, **kwargs):  # Full at step 2.
    if checkpoint_number != 2:
        return real_save(self, checkpoint_number=checkpoint_number, **kwargs)
    temp = f"{self.directory}/ckpt-{checkpoint_number}_temp"
    os.makedirs(temp)
    raise tf.errors.ResourceExhaustedError(None, None, f"{temp}/part-00000-"
        "of-00001.data-00000-of-00001.tempstate1; No space left on device")

gfile_write = tf.io.gfile.GFile.write

def json_write(self, data):
    if self.name.endswith(".json"):
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{self.name}; No space left on device")
    return gfile_write(self, data)

what, module, *sys.argv[1:] = sys.argv[1:]
if what == "checkpoint":
    tf.train.CheckpointManager.save = ckpt_save
else:
    tf.io.gfile.GFile.write = json_write
__import__(f"noisy_student.cli.{module}", fromlist=["run"]).run()
"""


def test_full_disk_is_one_line_naming_the_folder(tmp_path):
    """Issue 32, 4c: a full disk gave a raw ResourceExhaustedError."""
    tiny = ["--labeled=digits:train", "--model=w0.25-d0.25",
            "--image_size=16", "--batch_size=8", "--train_steps=2",
            "--steps_per_loop=1", "--log_every=1", "--checkpoint_every=1"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    runs = {what: subprocess.Popen(
        [sys.executable, "-c", FULL_DISK, what, "train",
         f"--model_dir={tmp_path}/{what}", *tiny], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for what in ("checkpoint", "json")}
    code, _, err = _finish(runs["checkpoint"])
    assert code == 2, err[-3000:]
    assert (f"ns-train: error: no space left on the device while writing "
            f"the checkpoint into {tmp_path}/checkpoint/checkpoints: free "
            "space and rerun (it resumes from its last checkpoint, step 1), "
            "or use another --model_dir\n") in err, err[-3000:]
    assert "Traceback" not in err
    assert not [n for n in os.listdir(tmp_path / "checkpoint" / "checkpoints")
                if n.endswith("_temp")]
    code, _, err = _finish(runs["json"])
    assert code == 2, err[-3000:]
    # The first JSON file ns-train writes, named (not its temporary name).
    written = re.escape(f"{tmp_path}/json/") + r"[a-z_]+\.json"
    assert re.search(f"ns-train: error: no space left on the device while "
                     f"writing {written}: free space and rerun, or use "
                     f"another --model_dir\n", err), err[-3000:]
    assert "Traceback" not in err
