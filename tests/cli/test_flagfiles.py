"""Every flagfile in flags/ parses against the flags of the command it names.

Each flagfile starts with a comment header (what it reproduces, the expected
result, the hardware and time, and the command). The test reads the command
from the header, loads that command's absl flags in a subprocess (the CLI
modules define their flags on the global FLAGS at import, so each command
needs its own process; the commands' files share one) and parses the header's
command line, flagfile included, exactly as the console script would. A
flagfile fails on an unknown flag, a bad value, a stray non-flag line (absl
would pass it on as an ignored positional argument), an unknown model name or
a malformed data source spec. The stage commands that tpu/run_pipeline.sh
composes are parsed the same way.

This file is also the checker: `python tests/cli/test_flagfiles.py MODULE` reads
jobs (JSON) on stdin and prints one JSON result line.
"""

import importlib.metadata
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGS_DIR = REPO / "flags"
HEADER_FIELDS = ("Reproduces:", "Expected:", "Hardware and time:", "Command:")
EXPECTED_FILES = (
    "digits.cfg", "fashion_mnist_1000.cfg", "svhn.cfg", "cifar10_4000.cfg",
    "fashion_mnist_1000/no_noise.cfg", "fashion_mnist_1000/hard_labels.cfg",
    "fashion_mnist_1000/no_filter.cfg",
    "fashion_mnist_1000/init_from_teacher.cfg",
    "fashion_mnist_1000/supervised.cfg",
    "imagenet/teacher_b7.cfg", "imagenet/predict.cfg", "imagenet/select.cfg",
    "imagenet/student_l2_iteration1.cfg",
    "imagenet/student_l2_iteration2.cfg",
    "imagenet/student_l2_iteration3.cfg", "imagenet/finetune_l2_800.cfg",
    "pretrained_b0_folder.cfg")
RESULT_PREFIX = "FLAGCHECK_RESULTS="
# Flags holding model names / data source specs, checked beyond parsing.
MODEL_FLAGS = ("teacher_model", "model")
LIST_MODEL_FLAGS = ("student_models",)
SPEC_FLAGS = ("labeled", "unlabeled", "test")


def console_scripts():
    """{console script: CLI module} of the installed package."""
    scripts = {}
    for ep in importlib.metadata.entry_points(group="console_scripts"):
        module = ep.value.split(":")[0]
        if module.startswith("noisy_student.cli."):
            scripts[ep.name] = module
    return scripts


def flagfiles():
    return sorted(p for p in FLAGS_DIR.rglob("*")
                  if p.is_file() and not p.name.startswith("."))


def relative(path):
    return path.relative_to(REPO).as_posix()


def read_header(path):
    """The leading comment block of a flagfile, as text without the '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def header_command(path):
    """The argv of the header's `Command:` line."""
    for line in read_header(path):
        if line.startswith("Command:"):
            return shlex.split(line[len("Command:"):])
    return []


# ---------------------------------------------------------------------------
# The checker, run in a subprocess per command.


def _check_jobs(module_name, jobs):
    """Parses each job's argv against the flags of `module_name`."""
    # pylint: disable=g-import-not-at-top
    import importlib
    from absl import flags
    importlib.import_module(module_name)
    from noisy_student.model import efficientnet
    from noisy_student.data import sources
    # pylint: enable=g-import-not-at-top
    flag_values = flags.FLAGS
    # Required string flags (e.g. --model_dir) get a placeholder first, so
    # that a flagfile which leaves them to the command line still parses.
    dummies = []
    all_flags = flag_values._flags()  # pylint: disable=protected-access
    for name, flag in all_flags.items():
        if (name == flag.name and flag.validators and flag.default is None
                and flag.flag_type() == "string"):
            dummies.append(f"--{name}=/tmp/ns-flagcheck/{name}")
    results = {}
    for job in jobs:
        errors = []
        flag_values.unparse_flags()
        try:
            rest = flag_values(["prog"] + dummies + job["argv"])
            if rest[1:]:
                errors.append(
                    f"non-flag arguments (ignored by absl): {rest[1:]}")
            for name in MODEL_FLAGS:
                if name in flag_values:
                    efficientnet.parse_model_name(flag_values[name].value)
            for name in LIST_MODEL_FLAGS:
                if name in flag_values:
                    for model in flag_values[name].value:
                        efficientnet.parse_model_name(model)
            for name in SPEC_FLAGS:
                if name in flag_values and flag_values[name].value:
                    sources.parse_spec(flag_values[name].value)
        except Exception as e:  # pylint: disable=broad-except
            errors.append(f"{type(e).__name__}: {e}")
        results[job["name"]] = errors
    return results


def _main():
    jobs = json.loads(sys.stdin.read())
    results = _check_jobs(sys.argv[1], jobs)
    print(RESULT_PREFIX + json.dumps(results), flush=True)


# ---------------------------------------------------------------------------
# The tests.


def _run_checkers(jobs_by_module):
    """Runs one checker process per module, all at once; merged results."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = {}
    for module, jobs in jobs_by_module.items():
        proc = subprocess.Popen(
            [sys.executable, __file__, module], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        procs[module] = (proc, json.dumps(jobs))
    results = {}
    for module, (proc, jobs) in procs.items():
        out, err = proc.communicate(jobs, timeout=600)
        lines = [l for l in out.splitlines() if l.startswith(RESULT_PREFIX)]
        assert proc.returncode == 0 and lines, (
            f"checker for {module} failed (rc {proc.returncode}):\n"
            f"{err[-3000:]}")
        results.update(json.loads(lines[-1][len(RESULT_PREFIX):]))
    return results


def _pipeline_stage_commands():
    """(console script, argv) of every stage tpu/run_pipeline.sh would run,
    plus the one-command pipeline through tpu/run_stage.sh."""
    runs = [
        ["tpu/run_pipeline.sh", "--dry_run", "--bucket=ns-check-bucket",
         "--accelerator_type=v4-32"],
        ["tpu/run_stage.sh", "--dry_run", "noisy-student",
         "--flagfile=flags/svhn.cfg", "--workdir=gs://ns-check-bucket/svhn"],
    ]
    # The scripts read their settings from the environment: start clean.
    env = {k: v for k, v in os.environ.items() if k not in (
        "PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
        "BUCKET", "NUM_WORKERS", "TF_VERSION", "DRY_RUN", "REMOTE_DIR",
        "REMOTE_VENV")}
    commands = []
    for run in runs:
        out = subprocess.run(["bash"] + run, cwd=REPO, check=True, env=env,
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            words = shlex.split(line) if not line.startswith("#") else []
            remote = [w[len("--command="):] for w in words
                      if w.startswith("--command=")]
            if not remote:
                continue
            words = shlex.split(remote[0])
            # The stage command is the last `&&`-separated segment.
            while "&&" in words:
                words = words[words.index("&&") + 1:]
            commands.append((words[0], words[1:]))
    return commands


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """Parses every flagfile (and the checker's own bad examples) once."""
    scripts = console_scripts()
    assert scripts, "no noisy_student console scripts (pip install -e .)"
    jobs = {}
    for path in flagfiles():
        command = header_command(path)
        if command and command[0] in scripts:
            jobs.setdefault(scripts[command[0]], []).append(
                {"name": relative(path), "argv": command[1:]})
    # Files that must fail: the checker itself has to be able to fail.
    bad_dir = tmp_path_factory.mktemp("bad_flagfiles")
    bad = {
        "unknown_flag": ("--no_such_flag=1\n", "no_such_flag"),
        "bad_value": ("--batch_size=many\n", "batch_size"),
        "stray_line": ("labeled=digits:train\n", "non-flag"),
        "bad_model": ("--teacher_model=b9\n", "b9"),
        "bad_spec": ("--labeled=tfds\n", "spec"),
    }
    for name, (text, _) in bad.items():
        (bad_dir / f"{name}.cfg").write_text("# bad on purpose\n" + text)
        jobs.setdefault(scripts["noisy-student"], []).append(
            {"name": f"bad:{name}", "argv": [
                f"--flagfile={bad_dir / name}.cfg", "--workdir=/tmp/x"]})
    for i, (command, argv) in enumerate(_pipeline_stage_commands()):
        jobs.setdefault(scripts[command], []).append(
            {"name": f"tpu:{i}:{command}", "argv": argv})
    return {"results": _run_checkers(jobs), "bad": bad, "scripts": scripts}


def test_expected_flagfiles_exist():
    present = {relative(p)[len("flags/"):] for p in flagfiles()}
    assert not set(EXPECTED_FILES) - present


@pytest.mark.parametrize("path", flagfiles(), ids=relative)
def test_header(path):
    """The header names what, the expected result, hardware/time, command."""
    header = read_header(path)
    assert header and header[0], f"{relative(path)}: no title comment"
    for field in HEADER_FIELDS:
        lines = [l for l in header if l.startswith(field)]
        assert lines and lines[0][len(field):].strip(), (
            f"{relative(path)}: header lacks '# {field} ...'")
    command = header_command(path)
    assert command[0] in console_scripts(), (
        f"{relative(path)}: Command names {command[0]!r}, not one of "
        f"{sorted(console_scripts())}")
    assert f"--flagfile={relative(path)}" in command, (
        f"{relative(path)}: Command does not use --flagfile={relative(path)}")


@pytest.mark.parametrize("path", flagfiles(), ids=relative)
def test_parses_against_its_command(check, path):
    errors = check["results"].get(relative(path))
    assert errors is not None, f"{relative(path)} was not checked"
    assert not errors, f"{relative(path)}: {errors}"


def test_bad_flagfiles_fail(check):
    for name, (_, expected) in check["bad"].items():
        errors = check["results"][f"bad:{name}"]
        assert errors and expected in " ".join(errors), (name, errors)


def test_tpu_pipeline_commands_parse(check):
    """Every stage tpu/run_pipeline.sh composes is valid for its command."""
    tpu = {k: v for k, v in check["results"].items() if k.startswith("tpu:")}
    # teacher, 3 x (4 predict shards + select + student), finetune, eval,
    # export, and the one-command pipeline.
    assert len(tpu) == 1 + 3 * 6 + 3 + 1
    assert {k.split(":")[2] for k in tpu} == {
        "ns-train", "ns-predict", "ns-select", "ns-eval", "ns-export",
        "noisy-student"}
    assert not {k: v for k, v in tpu.items() if v}


if __name__ == "__main__":
    _main()
