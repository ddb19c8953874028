"""The pipeline's work folders, one per iteration, and their old names.

The paper calls one pass of the loop an *iteration* (Sec. 3.1: three
iterations on ImageNet), and so do `--iterations` and the docs. Iteration r
lives in `workdir/iteration{r}/`: iteration 0 is the teacher's training and
evaluation, iteration r >= 1 the predict, select, train and eval stages of
the r-th student. `manifest.json` records its stages as
"iteration{r}/<stage>" and report.json lists one entry per iteration under
"iterations", each with its "iteration" number.

Work directories made before that rename name the same things round:
`round{r}/` folders, "round{r}/<stage>" manifest keys, report.json's
"rounds" / "round". `migrate` renames them in place, so that rerunning the
pipeline on such a directory continues it (stage fingerprints never held a
folder's name, and tf.train.CheckpointManager's `checkpoint` file names
its checkpoints relative to its own folder). It is idempotent and safe to
kill: each folder's rename is recorded in `migration.json` before it starts
(on gs:// a folder is renamed object by object, so a kill can leave both
folders), the manifest and the report are rewritten atomically, and a rerun
finishes whatever is left.
"""

import re

from absl import logging
import tensorflow as tf

from noisy_student.utils import storage
from noisy_student.pipeline import manifest

ITERATION = "iteration"
# The word of work directories made before the rename.
OLD_WORD = "round"
# The folder rename in progress: {"from": "round1", "to": "iteration1"}.
MIGRATION_FILE = "migration.json"
REPORT = "report.json"
_WHY = ("the work folders are named after the paper's iterations "
        "(--iterations) since the round -> iteration rename; no file in it "
        "changed")


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


def _old_to_new(name):
    """The new name of an old folder or stage key ("round1/train" ->
    "iteration1/train"); None when `name` is not an old one."""
    # Only the names the pipeline wrote ("round07" is someone else's).
    match = re.fullmatch(rf"{OLD_WORD}(0|[1-9]\d*)(/\w+)?", name)
    if not match:
        return None
    return folder_name(int(match.group(1))) + (match.group(2) or "")


def migrate(workdir):
    """Renames a work directory made before the round -> iteration rename.

    Folders `round{r}/` become `iteration{r}/` (their files untouched, one
    log line each), then manifest.json's "round{r}/<stage>" keys and
    report.json's "rounds" / "round" keys are renamed (each file rewritten
    atomically; the records themselves are kept as they are, so paths they
    quote still name the old folders). A new or missing work directory is
    left alone.

    Args:
      workdir: The pipeline's work directory (local or gs://), without a
        trailing slash.

    Returns:
      [(old folder, new folder)] renamed by this call.

    Raises:
      ValueError: naming both, when a folder or a manifest key exists under
        its old and its new name (unless a recorded, killed rename of that
        folder is being finished); nothing is changed then.
    """
    if not tf.io.gfile.isdir(workdir):
        return []
    pending = _pending(workdir)
    folders = _old_folders(workdir, pending)
    manifest_path = f"{workdir}/{manifest.MANIFEST}"
    stages = (storage.read_json(manifest_path)["stages"]
              if tf.io.gfile.exists(manifest_path) else {})
    keys = {key: _old_to_new(key) for key in stages if _old_to_new(key)}
    for old, new in keys.items():
        if new in stages:
            raise ValueError(
                f"Expected each stage once in {manifest_path}. Received: "
                f"both {old!r} and {new!r} (the old and the new name of one "
                "stage); keep the record of the run you want and delete the "
                "other.")
    renamed = []
    for old, new in folders:
        storage.write_json(f"{workdir}/{MIGRATION_FILE}",
                            {"from": old, "to": new})
        _move(f"{workdir}/{old}", f"{workdir}/{new}")
        logging.warning("Renamed %s/%s to %s/%s: %s.", workdir, old, workdir,
                        new, _WHY)
        renamed.append((f"{workdir}/{old}", f"{workdir}/{new}"))
    if keys:
        storage.write_json(manifest_path, {"stages": {
            keys.get(key, key): entry for key, entry in stages.items()}})
        logging.warning("Renamed %d stage records of %s from round{r}/... "
                        "to iteration{r}/...", len(keys), manifest_path)
    _migrate_report(f"{workdir}/{REPORT}")
    if pending is not None or folders:
        tf.io.gfile.remove(f"{workdir}/{MIGRATION_FILE}")
    return renamed


def _pending(workdir):
    """The recorded folder rename of a migration (None if none is)."""
    path = f"{workdir}/{MIGRATION_FILE}"
    return storage.read_json(path) if tf.io.gfile.exists(path) else None


def _old_folders(workdir, pending):
    """[(old name, new name)] of the old folders, in iteration order.

    Raises:
      ValueError: if an iteration has both folders and no recorded rename
        between them is being finished.
    """
    names = {name.rstrip("/") for name in tf.io.gfile.listdir(workdir)}
    folders = []
    for name in names:
        new = _old_to_new(name)
        if new is None or "/" in new or not tf.io.gfile.isdir(
                f"{workdir}/{name}"):
            continue
        if new in names and pending != {"from": name, "to": new}:
            raise ValueError(
                f"Expected one folder per iteration in {workdir}. Received: "
                f"both {workdir}/{name} and {workdir}/{new} (the old and "
                f"the new name of iteration {new[len(ITERATION):]}'s "
                "folder); keep the one of the run you want and delete the "
                "other.")
        folders.append((name, new))
    return sorted(folders, key=lambda pair: int(pair[1][len(ITERATION):]))


def _move(source, target):
    """Renames folder `source` to `target`, finishing a killed rename.

    A local folder is renamed in one step. When both exist (a gs:// rename,
    object by object, was killed), the files still under `source` are moved
    one by one (a file already copied is overwritten by the same bytes) and
    `source` is deleted.
    """
    if not tf.io.gfile.exists(target):
        tf.io.gfile.rename(source, target)
        return
    for folder, _, files in tf.io.gfile.walk(source):
        relative = folder[len(source):].strip("/")
        destination = f"{target}/{relative}" if relative else target
        tf.io.gfile.makedirs(destination)
        for name in files:
            tf.io.gfile.rename(f"{folder.rstrip('/')}/{name}",
                               f"{destination}/{name}", overwrite=True)
    tf.io.gfile.rmtree(source)


def _migrate_report(path):
    """Renames report.json's "rounds" / "round" keys (atomic rewrite)."""
    if not tf.io.gfile.exists(path):
        return
    report = storage.read_json(path)
    if "rounds" not in report:
        return
    entries = [{("iteration" if k == "round" else k): v
                for k, v in entry.items()} for entry in report["rounds"]]
    storage.write_json(path, {("iterations" if k == "rounds" else k):
                               (entries if k == "rounds" else v)
                               for k, v in report.items()})
