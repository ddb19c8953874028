"""The tpu/ scripts: syntax, shellcheck, options, and their --dry_run output.

A dry run must print every command (gcloud, the local build, the remote
command lines) without running any: the tests put fake gcloud / python3 / tar
/ git / sudo / pip commands first on PATH that record any call, and check
that none happened. The printed lines are parsed back with shlex, so the
tests also check that the quoting survives two shells (local and remote).
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = ("create_vm.sh", "setup_vm.sh", "run_stage.sh", "run_pipeline.sh",
           "vm_install.sh")
LIBRARY = "common.sh"
SETTINGS = ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE",
            "RUNTIME_VERSION", "BUCKET", "NUM_WORKERS", "TF_VERSION",
            "DRY_RUN", "REMOTE_DIR", "REMOTE_VENV")
FAKED = ("gcloud", "python3", "tar", "git", "sudo", "pip", "gsutil")
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    """A PATH folder whose gcloud & co. only record that they were called."""
    folder = tmp_path_factory.mktemp("fake_bin")
    log = folder / "calls.log"
    for name in FAKED:
        tool = folder / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 97\n')
        tool.chmod(0o755)
    return folder


@pytest.fixture
def run(fake_bin):
    """Runs a tpu/ script with a clean environment; no real tool reachable."""
    def _run(script, *args, env=None, check=True):
        environ = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        environ["PATH"] = f"{fake_bin}:{environ.get('PATH', '')}"
        environ.update(env or {})
        result = subprocess.run(["bash", str(TPU / script), *args],
                                capture_output=True, text=True, env=environ,
                                cwd=fake_bin, timeout=60)
        if check:
            assert result.returncode == 0, result.stderr
        return result
    yield _run
    log = fake_bin / "calls.log"
    calls = log.read_text() if log.exists() else ""
    log.unlink(missing_ok=True)  # Blame only the test that ran something.
    assert not calls, f"a dry run executed: {calls}"


def commands(stdout):
    """The non-comment lines of a dry run, each as (argv, in_background)."""
    parsed = []
    for line in stdout.splitlines():
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        background = words[-1] == "&"
        parsed.append((words[:-1] if background else words, background))
    return parsed


def ssh_calls(stdout):
    """Every `gcloud ... tpu-vm ssh`: worker, remote argv, background."""
    calls = []
    for words, background in commands(stdout):
        if words[:5] != SSH:
            continue
        options = dict(w.split("=", 1) for w in words if w.startswith("--"))
        calls.append({"tpu": words[5], "worker": options["--worker"],
                      "zone": options.get("--zone"),
                      "project": options.get("--project"),
                      "remote": options["--command"],
                      "argv": shlex.split(options["--command"]),
                      "background": background})
    return calls


def stage(call):
    """The stage command's argv: the last `&&` segment of the remote line."""
    words = call["argv"]
    while "&&" in words:
        words = words[words.index("&&") + 1:]
    return words


def flag(argv, name):
    values = [w.split("=", 1)[1] for w in argv if w.startswith(f"--{name}=")]
    return values[-1] if values else None


def test_the_scripts_exist_and_are_strict():
    for name in SCRIPTS:
        text = (TPU / name).read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), name
        assert "set -euo pipefail" in text, name
        assert os.access(TPU / name, os.X_OK), f"{name} is not executable"
    assert (TPU / LIBRARY).read_text().startswith("# shellcheck shell=bash")


@pytest.mark.parametrize("name", SCRIPTS + (LIBRARY,))
def test_bash_syntax(name):
    result = subprocess.run(["bash", "-n", str(TPU / name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SCRIPTS + (LIBRARY,))
def test_shellcheck(name):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-x", str(TPU / name)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_bad_options(run, name):
    result = run(name, "--help")
    assert result.stdout.startswith("Usage: ")
    assert "--dry_run" in result.stdout
    if name != "vm_install.sh":
        for variable in ("PROJECT", "ZONE", "ACCELERATOR_TYPE", "BUCKET"):
            assert f"[{variable}]" in result.stdout, variable
    bad = run(name, "--dry_run", "--no_such_option=1", check=False)
    assert bad.returncode == 2
    assert "Expected" in bad.stderr and "--no_such_option=1" in bad.stderr


def test_create_vm(run):
    out = run("create_vm.sh", "--dry_run", "--project=my-proj",
              "--zone=europe-west4-a", "--tpu_name=ns",
              "--accelerator_type=v3-32", "--spot").stdout
    assert ("gcloud compute tpus tpu-vm create ns --zone=europe-west4-a "
            "--project=my-proj --accelerator-type=v3-32 "
            "--version=tpu-ubuntu2204-base --spot") in out.splitlines()
    out = run("create_vm.sh", "--dry_run", "--delete", "--tpu_name=ns").stdout
    assert ("gcloud compute tpus tpu-vm delete ns --zone=us-central2-b "
            "--quiet") in out.splitlines()


def test_settings_from_environment_and_flags(run):
    env = {"PROJECT": "env-proj", "ZONE": "us-east1-d", "TPU_NAME": "env-tpu",
           "ACCELERATOR_TYPE": "v5litepod-16"}
    words, _ = commands(run("create_vm.sh", "--dry_run", env=env).stdout)[0]
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create",
                         "env-tpu"]
    assert "--project=env-proj" in words and "--zone=us-east1-d" in words
    assert "--version=v2-alpha-tpuv5-lite" in words
    words, _ = commands(run("create_vm.sh", "--dry_run", "--zone=flag-zone",
                            env=env).stdout)[0]
    assert "--zone=flag-zone" in words


@pytest.mark.parametrize("accelerator, hosts", [
    ("v2-8", 1), ("v3-8", 1), ("v3-32", 4), ("v4-8", 1), ("v4-32", 4),
    ("v4-2048", 256), ("v5p-8", 1), ("v5p-128", 16), ("v5litepod-8", 1),
    ("v5litepod-16", 4), ("v6e-256", 64)])
def test_hosts_per_slice(run, accelerator, hosts):
    calls = ssh_calls(run("run_stage.sh", "--dry_run",
                          f"--accelerator_type={accelerator}", "ns-predict",
                          "--teacher=gs://b/t", "--out_dir=gs://b/p").stdout)
    assert [c["worker"] for c in calls] == [str(i) for i in range(hosts)]


def test_bad_accelerator_type(run):
    result = run("run_stage.sh", "--dry_run", "--accelerator_type=tpu8",
                 "ns-select", check=False)
    assert result.returncode == 2
    assert "Received: accelerator_type=tpu8" in result.stderr


def test_setup_vm_from_a_wheel(run):
    out = run("setup_vm.sh", "--dry_run", "--tpu_name=ns",
              "--accelerator_type=v4-32", "--tf_version=2.17.1").stdout
    lines = commands(out)
    build = [w for w, _ in lines if w[:3] == ["python3", "-m", "pip"]]
    assert build and build[0][3] == "wheel" and build[0][-1] == str(REPO)
    tar = [w for w, _ in lines if w[0] == "tar"]
    assert tar and {"flags", "tpu", "dist"} <= set(tar[0])
    scp = [w for w, _ in lines if w[:5] == ["gcloud", "compute", "tpus",
                                            "tpu-vm", "scp"]]
    assert scp and "--worker=all" in scp[0]
    assert scp[0][6] == "ns:noisy-student.tgz"
    (call,) = ssh_calls(out)
    assert call["worker"] == "all"
    assert ("bash noisy-student/tpu/vm_install.sh --package=noisy-student "
            "--venv=ns-venv --tf_version=2.17.1") in call["remote"]
    assert "tar -xzf noisy-student.tgz -C noisy-student" in call["remote"]


def test_setup_vm_from_git(run):
    out = run("setup_vm.sh", "--dry_run",
              "--git_url=https://github.com/me/noisy-student.git",
              "--git_ref=v0.1").stdout
    assert not [w for w, _ in commands(out) if "scp" in w]
    (call,) = ssh_calls(out)
    assert call["worker"] == "all"
    assert ("git clone https://github.com/me/noisy-student.git noisy-student"
            " && git -C noisy-student checkout v0.1") in call["remote"]
    assert "vm_install.sh --package=noisy-student" in call["remote"]
    bad = run("setup_vm.sh", "--dry_run", "--git_ref=main", check=False)
    assert bad.returncode == 2 and "git_url" in bad.stderr


def test_vm_install(run, tmp_path):
    (tmp_path / "dist").mkdir()
    wheel = tmp_path / "dist" / "noisy_student-0.1.0-py3-none-any.whl"
    wheel.write_text("")
    out = run("vm_install.sh", "--dry_run", f"--package={tmp_path}",
              "--venv=/v", "--tf_version=2.18.0").stdout
    lines = [w for w, _ in commands(out)]
    assert ["python3", "-m", "venv", "/v"] in lines
    assert ["/v/bin/pip", "install", "--quiet", str(wheel),
            "tensorflow==2.18.0"] in lines
    order = [i for i, w in enumerate(lines)
             if w[:2] == ["/v/bin/pip", "uninstall"]
             or "tensorflow-tpu==2.18.0" in w]
    assert len(order) == 2 and order[0] < order[1], "TPU build after CPU one"
    assert any(w.endswith("libtpu-tf-releases/index.html")
               for w in lines[order[1]])
    # A source tree (git clone) without dist/ installs the tree itself.
    out = run("vm_install.sh", "--dry_run", f"--package={REPO}",
              "--venv=/v").stdout
    assert any(w[:4] == ["/v/bin/pip", "install", "--quiet", str(REPO)]
               for w, _ in commands(out))


def test_run_stage_predict_shards_over_hosts(run):
    out = run("run_stage.sh", "--dry_run", "--accelerator_type=v4-32",
              "--tpu_name=ns", "--zone=us-central2-b", "--project=p",
              "ns-predict", "--flagfile=flags/imagenet/predict.cfg",
              "--teacher=gs://my-bucket/t", "--out_dir=gs://my-bucket/p").stdout
    calls = ssh_calls(out)
    assert len(calls) == 4
    for i, call in enumerate(calls):
        assert (call["tpu"], call["worker"], call["zone"], call["project"]) == (
            "ns", str(i), "us-central2-b", "p")
        assert call["background"], "the hosts must label at the same time"
        argv = stage(call)
        assert argv[0] == "ns-predict"
        assert argv[-2:] == [f"--shard_index={i}", "--num_shards=4"]
        assert flag(argv, "out_dir") == "gs://my-bucket/p"
        assert "--strategy=tpu" not in argv
        assert call["argv"][:6] == [".", "ns-venv/bin/activate", "&&", "cd",
                                    "noisy-student", "&&"]
    assert out.rstrip().splitlines()[-1] == "wait"


def test_run_stage_training_on_one_host_and_on_a_pod(run):
    (call,) = ssh_calls(run("run_stage.sh", "--dry_run",
                            "--accelerator_type=v4-8", "ns-train",
                            "--model_dir=gs://b/m").stdout)
    assert call["worker"] == "0" and not call["background"]
    assert stage(call)[-2:] == ["--strategy=tpu", "--tpu=local"]
    assert "TPU_LOAD_LIBRARY" not in call["remote"]
    (call,) = ssh_calls(run("run_stage.sh", "--dry_run",
                            "--accelerator_type=v4-64", "--tpu_name=pod",
                            "noisy-student",
                            "--flagfile=flags/svhn.cfg",
                            "--workdir=gs://b/w").stdout)
    assert call["worker"] == "0"
    assert "export TPU_LOAD_LIBRARY=0 && noisy-student" in call["remote"]
    assert stage(call)[-2:] == ["--strategy=tpu", "--tpu=pod"]


def test_run_stage_other_commands_and_errors(run):
    for command in ("ns-select", "ns-eval", "ns-export"):
        (call,) = ssh_calls(run("run_stage.sh", "--dry_run",
                                "--accelerator_type=v4-32", command,
                                "--out_dir=gs://b/o").stdout)
        assert call["worker"] == "0" and stage(call) == [command,
                                                         "--out_dir=gs://b/o"]
    bad = run("run_stage.sh", "--dry_run", "rm", "-rf", "/", check=False)
    assert bad.returncode == 2 and "Received: command=rm" in bad.stderr
    bad = run("run_stage.sh", "--dry_run", check=False)
    assert bad.returncode == 2 and "COMMAND" in bad.stderr


def test_quoting_survives_both_shells(run):
    tricky = "--unlabeled=folder:gs://b/it's a \"dir\" $HOME;`x`"
    out = run("run_stage.sh", "--dry_run", "ns-predict", tricky).stdout
    assert stage(ssh_calls(out)[0])[1] == tricky
    for text in (out, ssh_calls(out)[0]["remote"]):
        syntax = subprocess.run(["bash", "-n"], input=text, text=True,
                                capture_output=True)
        assert syntax.returncode == 0, syntax.stderr


def test_run_pipeline(run):
    out = run("run_pipeline.sh", "--dry_run", "--bucket=gs://my-bucket/",
              "--accelerator_type=v4-32", "--tpu_name=ns").stdout
    syntax = subprocess.run(["bash", "-n"], input=out, text=True,
                            capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    steps = re.findall(r"^# step (\S+)$", out, re.M)
    assert steps == ["teacher", "predict1", "select1", "student1", "predict2",
                     "select2", "student2", "predict3", "select3", "student3",
                     "finetune", "eval", "export"]
    work = "gs://my-bucket/noisy-student/imagenet"
    calls = [stage(c) for c in ssh_calls(out)]
    for argv in calls:
        flagfile = flag(argv, "flagfile")
        if flagfile:
            assert (REPO / flagfile).is_file(), flagfile
        for word in argv[1:]:
            if "gs://" in word:
                assert "gs://my-bucket/" in word and "YOUR_BUCKET" not in word
    trains = [a for a in calls if a[0] == "ns-train"]
    assert [flag(a, "flagfile") for a in trains] == [
        "flags/imagenet/teacher_b7.cfg",
        "flags/imagenet/student_l2_iteration1.cfg",
        "flags/imagenet/student_l2_iteration2.cfg",
        "flags/imagenet/student_l2_iteration3.cfg",
        "flags/imagenet/finetune_l2_800.cfg"]
    assert [flag(a, "model_dir") for a in trains] == [
        f"{work}/teacher_b7", f"{work}/iteration1/student_l2",
        f"{work}/iteration2/student_l2", f"{work}/iteration3/student_l2",
        f"{work}/finetune_l2_800"]
    assert [flag(a, "pseudo_labels") for a in trains[1:4]] == [
        f"{work}/iteration{r}/select" for r in (1, 2, 3)]
    assert flag(trains[4], "init_from") == f"{work}/iteration3/student_l2"
    assert all(a[-2:] == ["--strategy=tpu", "--tpu=ns"] for a in trains)
    predicts = [a for a in calls if a[0] == "ns-predict"]
    assert len(predicts) == 3 * 4
    # Each iteration's teacher is the previous one's model; 4 disjoint
    # shards.
    teachers = ["teacher_b7", "iteration1/student_l2",
                "iteration2/student_l2"]
    for r in range(3):
        shards = predicts[4 * r: 4 * r + 4]
        assert {flag(a, "teacher") for a in shards} == {f"{work}/{teachers[r]}"}
        assert {flag(a, "out_dir") for a in shards} == {
            f"{work}/iteration{r + 1}/predict"}
        assert [flag(a, "shard_index") for a in shards] == ["0", "1", "2", "3"]
        assert {flag(a, "num_shards") for a in shards} == {"4"}
        assert flag(shards[0], "unlabeled") == "folder:gs://my-bucket/unlabeled"
    selects = [a for a in calls if a[0] == "ns-select"]
    assert [(flag(a, "pred_dir"), flag(a, "out_dir")) for a in selects] == [
        (f"{work}/iteration{r}/predict", f"{work}/iteration{r}/select")
        for r in (1, 2, 3)]
    (evaluate,) = [a for a in calls if a[0] == "ns-eval"]
    (export,) = [a for a in calls if a[0] == "ns-export"]
    assert flag(evaluate, "model_path") == flag(export, "model_path") == (
        f"{work}/finetune_l2_800")
    assert flag(export, "out_dir") == f"{work}/export"


def test_run_pipeline_steps_and_errors(run):
    out = run("run_pipeline.sh", "--dry_run", "--bucket=b", "--from=student2",
              "--to=select3", "--workdir=gs://other/w").stdout
    assert re.findall(r"^# step (\S+)$", out, re.M) == [
        "student2", "predict3", "select3"]
    predict = [stage(c) for c in ssh_calls(out) if stage(c)[0] == "ns-predict"]
    assert flag(predict[0], "teacher") == "gs://other/w/iteration2/student_l2"
    bad = run("run_pipeline.sh", "--dry_run", check=False)
    assert bad.returncode == 2 and "--bucket" in bad.stderr
    bad = run("run_pipeline.sh", "--dry_run", "--bucket=b", "--from=nope",
              check=False)
    assert bad.returncode == 2 and "Received: from=nope" in bad.stderr
    bad = run("run_pipeline.sh", "--dry_run", "--bucket=b",
              "--workdir=/local/dir", check=False)
    assert bad.returncode == 2 and "gs://" in bad.stderr


def test_run_pipeline_refuses_the_folders_old_names(run, fake_bin, tmp_path):
    """A workdir whose folders have their names from before the round ->
    iteration rename stops before any stage, saying how to rename them."""
    old = tmp_path / "old_bin"
    old.mkdir()
    # gcloud finds gs://b/w/round2/ and nothing else; it runs nothing.
    gcloud = old / "gcloud"
    gcloud.write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "storage ls gs://b/w/round2/" ]\n')
    gcloud.chmod(0o755)
    # The other tools stay the recording fakes.
    path = f"{old}:{fake_bin}:{os.environ.get('PATH', '')}"
    bad = run("run_pipeline.sh", "--bucket=b", "--workdir=gs://b/w",
              env={"PATH": path}, check=False)
    assert bad.returncode == 2, bad.stderr
    assert "Received: gs://b/w/round2" in bad.stderr
    assert "gcloud storage mv gs://b/w/round2 gs://b/w/iteration2" in (
        bad.stderr)
    assert "step" not in bad.stderr
    dry = run("run_pipeline.sh", "--dry_run", "--bucket=b").stdout
    assert "# check: no gs://b/noisy-student/imagenet/round1/" in dry
