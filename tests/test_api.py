"""The Python API builds the configs the commands build.

(examples/quickstart.ipynb, the digits loop through the API, is run by
tests/pipeline/test_experiment.py against the command's tiny run it already makes:
bitwise the same weights and scores.)
"""

import os

from absl import flags
import pytest

from noisy_student import api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_command_builds_its_config_through_the_api(pipeline_flags,
                                                       tmp_path):
    """`noisy-student`'s flags resolve to what `api.pipeline_config` gives
    for the same settings (the commands hold no recipe rule of their own)."""
    workdir = str(tmp_path / "w")
    flags.FLAGS([
        "noisy-student", f"--workdir={workdir}",
        f"--flagfile={ROOT}/flags/digits.cfg", "--student_magnitude=7",
        "--teacher_dropout_rate=0.3", "--seed=4", "--student_models=w0.5-d1"])
    from_flags = pipeline_flags.experiment_config()
    shared = {"image_size": 32, "batch_size": 32, "unlabel_ratio": 2,
              "warmup_steps": 50, "lr_schedule": "cosine",
              "ema_decay": 0.999, "steps_per_loop": 25, "log_every": 50,
              "checkpoint_every": 100, "seed": 4}
    teacher = api.Recipe(model="w0.5-d0.5", train_steps=300, magnitude=5,
                         dropout_rate=0.3, **shared)
    student = api.Recipe(train_steps=250, magnitude=7, **shared)
    from_api = api.pipeline_config(
        workdir, api.DataConfig(labeled="digits:train", test="digits:test",
                                labels_per_class=10),
        teacher=teacher, student=student, iterations=2,
        student_models=("w0.5-d1",), init_student_from_teacher=True,
        select_settings={"per_class": 130})
    assert from_api == from_flags


def test_a_bad_recipe_names_the_field():
    data = api.DataConfig(labeled="digits:train", test="digits:test")
    with pytest.raises(ValueError, match="batch_size"):
        api.pipeline_config("/tmp/unused", data,
                            teacher=api.Recipe(batch_size=0))
