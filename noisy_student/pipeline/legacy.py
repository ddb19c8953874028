"""What the package keeps for work directories made by older releases.

Removed in 0.2.0 (with a note in the changelog naming the last release
that converts them).

The round -> iteration rename (0.1.0): work directories made before it name
the paper's iterations round: `round{r}/` folders, "round{r}/<stage>"
manifest keys, report.json's "rounds" / "round". `migrate` renames them in
place, so that rerunning the pipeline on such a directory continues it
(stage fingerprints never held a folder's name, and
tf.train.CheckpointManager's `checkpoint` file names its checkpoints
relative to its own folder). It is idempotent and safe to kill: each
folder's rename is recorded in `migration.json` before it starts (on gs://
a folder is renamed object by object, so a kill can leave both folders),
the manifest and the report are rewritten atomically, and a rerun finishes
whatever is left.

(Other old forms are read where the format lives, since a change there
would move every stage fingerprint: the flat config.json and the old field
names in `training.config.flat_fields` / `fingerprint_fields`, and the
inputs a prediction folder recorded before the runtime was a choice in
`pipeline.stages.run_predict`, the separate input config's fingerprint text
in `pipeline.experiment._input_fingerprint_args`, and ns-eval's
`--output_dir` alias of `--out_dir` in `cli.evaluate`; all go in 0.2.0.)
"""

import re

from absl import logging
import tensorflow as tf

from noisy_student.pipeline import layout
from noisy_student.pipeline import manifest
from noisy_student.utils import storage

# The word of work directories made before the rename.
OLD_WORD = "round"
# The folder rename in progress: {"from": "round1", "to": "iteration1"}.
MIGRATION_FILE = "migration.json"
_WHY = ("the work folders are named after the paper's iterations "
        "(--iterations) since the round -> iteration rename; no file in it "
        "changed")


def _old_to_new(name):
    """The new name of an old folder or stage key ("round1/train" ->
    "iteration1/train"); None when `name` is not an old one."""
    # Only the names the pipeline wrote ("round07" is someone else's).
    match = re.fullmatch(rf"{OLD_WORD}(0|[1-9]\d*)(/\w+)?", name)
    if not match:
        return None
    return layout.folder_name(int(match.group(1))) + (match.group(2) or "")


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
    _migrate_report(f"{workdir}/{layout.REPORT}")
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
                f"the new name of iteration {new[len(layout.ITERATION):]}'s "
                "folder); keep the one of the run you want and delete the "
                "other.")
        folders.append((name, new))
    return sorted(folders, key=lambda pair: int(pair[1][len(layout.ITERATION):]))


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
