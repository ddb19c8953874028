"""The tiny `noisy-student` run the pipeline tests share."""

import os
import pathlib
import subprocess
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
# A tiny configuration of the digits demo: seconds per stage.
TINY = [
    f"--flagfile={ROOT}/flags/digits.cfg", "--teacher_model=w0.25-d0.25",
    "--image_size=16", "--batch_size=16", "--unlabel_ratio=2",
    "--teacher_train_steps=20", "--student_train_steps=20",
    "--warmup_steps=5", "--steps_per_loop=5", "--log_every=10",
    "--checkpoint_every=5", "--predict_batch_size=16",
    "--records_per_file=100", "--min_confidence=0.0",
    # RandAugment's tf.data graph costs a fifth of a tiny run to trace;
    # tests/training/test_noise.py checks it in the student's real stream.
    "--teacher_augment=none", "--student_augment=none",
]


def pipeline_command(workdir, *extra):
    """The command line of the TINY run into `workdir`, plus `extra` flags."""
    return [sys.executable, "-m", "noisy_student.cli.pipeline",
            f"--workdir={workdir}", *TINY, *extra]


def run_pipeline(workdir, *extra):
    """Runs `pipeline_command` (output captured); the CompletedProcess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(pipeline_command(workdir, *extra), cwd=ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=600)
