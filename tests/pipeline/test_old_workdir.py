"""A work directory made by release 0.1.0 resumes with today's code.

`tests/fixtures/workdir_0.1.0` was made by the 0.1.0 code (commit 9cafe14, the
last before the package moves) with

    noisy-student --flagfile=flags/digits.cfg --teacher_model=w0.1-d0.1
        --image_size=16 --batch_size=8 --unlabel_ratio=1
        --teacher_train_steps=4 --student_train_steps=4 --warmup_steps=0
        --steps_per_loop=2 --log_every=2 --checkpoint_every=4
        --predict_batch_size=64 --records_per_file=500 --min_confidence=0.0
        --per_class=20 --iterations=1 --noexport

(a teacher and one student, RandAugment on both), then pruned of what a
finished stage is never read for again (checkpoints, model.keras, prediction
and selection records, PNGs, logs) to keep it at 180 KB. It still names the
folder it was made in: a copy elsewhere must resume too. Rerun with its
own flags.txt, today's pipeline must find every stage finished with the
fingerprint it recorded: a change to a config, a flag's default or a
fingerprint's encoding that would make such directories retrain fails here.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
OLD_WORKDIR = ROOT / "tests" / "fixtures" / "workdir_0.1.0"
STAGES = ("iteration0/train", "iteration0/eval", "iteration1/predict",
          "iteration1/select", "iteration1/train", "iteration1/eval")


def _fingerprints(workdir):
    stages = json.loads((workdir / "manifest.json").read_text())["stages"]
    return {name: stage["fingerprint"] for name, stage in stages.items()}


def test_a_release_0_1_0_work_directory_resumes_without_redoing_a_stage(
        tmp_path):
    workdir = tmp_path / "moved"
    shutil.copytree(OLD_WORKDIR, workdir)
    before = _fingerprints(workdir)
    assert sorted(before) == sorted(STAGES)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli.pipeline",
         f"--flagfile={workdir}/flags.txt", f"--workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in STAGES:
        assert f"Stage {name} finished earlier: skipped." in result.stderr, (
            name, result.stderr[-3000:])
    assert _fingerprints(workdir) == before
    # Nothing was retrained: the pruned files are still absent.
    assert not list(workdir.glob("*/train/model.keras"))
