"""The pipeline's work folders, one per iteration.

The paper calls one pass of the loop an *iteration* (Sec. 3.1: three
iterations on ImageNet), and so do `--iterations` and the docs. Iteration r
lives in `workdir/iteration{r}/`: iteration 0 is the teacher's training and
evaluation, iteration r >= 1 the predict, select, train and eval stages of
the r-th student. `manifest.json` records its stages as
"iteration{r}/<stage>" and report.json lists one entry per iteration under
"iterations", each with its "iteration" number. (Work directories made
before the round -> iteration rename are renamed by `pipeline.legacy`.)
"""

import re

ITERATION = "iteration"
REPORT = "report.json"


def folder_name(r):
    """The folder name of iteration `r` (0: the teacher), e.g. "iteration1"."""
    return f"{ITERATION}{r}"


def iteration_folder(workdir, r):
    """The folder of iteration `r`'s stages.

    Args:
      workdir: The pipeline's --workdir (local or gs://).
      r: The iteration, 0 for the teacher.

    Returns:
      "WORKDIR/iteration{r}".
    """
    return f"{workdir}/{folder_name(r)}"


def stage_name(r, kind):
    """The manifest key of a stage, also its folder under the workdir.

    Args:
      r: The iteration, 0 for the teacher.
      kind: predict, select, train or eval.

    Returns:
      e.g. "iteration1/train" for (1, "train").
    """
    return f"{folder_name(r)}/{kind}"


def stage_folder(workdir, r, kind):
    """The output folder of a stage (a train stage's is the model_dir of
    iteration r's model).

    Args:
      workdir: The pipeline's --workdir.
      r: The iteration, 0 for the teacher.
      kind: predict, select, train or eval.

    Returns:
      "WORKDIR/iteration{r}/{kind}".
    """
    return f"{workdir}/{stage_name(r, kind)}"


def parse_stage_name(name):
    """(r, kind) of a `stage_name`, or None for another stage ("export")."""
    match = re.fullmatch(rf"{ITERATION}(\d+)/(\w+)", name)
    return (int(match.group(1)), match.group(2)) if match else None
