"""The Python API: the digits loop in a few calls equals the command's run.

The loop of `noisy-student --flagfile=flags/digits.cfg` (made tiny: smaller
model, images and step counts, one iteration) runs once through the
command and once as examples/quickstart.ipynb runs it through
`noisy_student.api` (teacher, predict, select, student: ten lines of API
calls; the notebook also evaluates, exports and serves one image). Both
must give bitwise the same teacher and student weights and the same test
scores: the commands are flags -> the same calls, and the notebook runs.
"""

import json
import os
import re
import subprocess
import sys

from absl import flags
import keras
import numpy as np
import pytest

from noisy_student import api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")
# The digits demo made tiny (seconds per stage): the command's flags and
# the same settings for the notebook's recipe and selection.
TINY = ["--teacher_model=w0.25-d0.25", "--image_size=16",
        "--teacher_train_steps=20", "--student_train_steps=20",
        "--warmup_steps=5", "--steps_per_loop=5", "--checkpoint_every=10",
        "--log_every=10", "--iterations=1", "--noexport",
        "--min_confidence=0.0"]
TINY_NOTEBOOK = {
    "recipe": {"model": "w0.25-d0.25", "image_size": 16, "train_steps": 20,
               "warmup_steps": 5, "steps_per_loop": 5,
               "checkpoint_every": 10, "log_every": 10},
    "select": {"min_confidence": 0.0}}
# Runs a notebook's code cells in order in one namespace, as a kernel would.
RUN_CELLS = """
import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
scope = {"__name__": "__main__"}
for cell in cells:
    if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), scope)
"""


def _weights(model_dir):
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    return [np.asarray(w) for w in model.weights]


def _top1(eval_dir):
    with open(os.path.join(eval_dir, "results.json")) as f:
        return json.load(f)["clean"]["top1"]


def _run(command, env=None):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart_notebook_equals_the_command(tmp_path):
    workdir = tmp_path / "pipeline"
    _run([sys.executable, "-m", "noisy_student.cli.pipeline",
          f"--workdir={workdir}", f"--flagfile={ROOT}/flags/digits.cfg",
          *TINY])
    notebook_dir = tmp_path / "notebook"
    out = _run([sys.executable, "-c", RUN_CELLS, NOTEBOOK],
               {"NS_QUICKSTART": json.dumps(TINY_NOTEBOOK),
                "NS_QUICKSTART_DIR": str(notebook_dir)})

    for ours, theirs in (("teacher", "iteration0"), ("student", "iteration1")):
        for a, b in zip(_weights(notebook_dir / ours),
                        _weights(workdir / theirs / "train"), strict=True):
            np.testing.assert_array_equal(a, b)
    printed = [float(x) for x in re.findall(r"test top-1: ([0-9.]+)", out)]
    assert printed == [_top1(workdir / "iteration0" / "eval"),
                       _top1(workdir / "iteration1" / "eval")], out
    # The selection's contact sheet was found, and the SavedModel served
    # the image: three class ids in [0, 10).
    assert "contact sheet: " in out and ".png" in out, out
    served = re.search(r"served: \[(\d+) (\d+) (\d+)\]", out)
    assert served and all(0 <= int(c) < 10 for c in served.groups()), out


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
