"""The work directory's record of stages: started, finished, with what inputs.

Each stage has a fingerprint: a hash of the arguments it runs with and the
fingerprints of the stages it reads. Rerunning a pipeline skips a stage whose
recorded fingerprint matches and which finished; it resumes one that started
with the same fingerprint (the stage itself picks up its checkpoints or
shards); and refuses, unless told to overwrite, a stage that was started or
finished with a different fingerprint, since its files would mix two
configurations. A stage's `seconds` sum all its attempts (`runs`), a killed
one counted up to the last file it wrote.
"""

import dataclasses
import hashlib
import json
import time

from absl import logging
import tensorflow as tf

from noisy_student.utils import storage

MANIFEST = "manifest.json"


def fingerprint(args, *upstream):
    """A short stable hash of JSON-able `args` and upstream fingerprints."""
    if dataclasses.is_dataclass(args):
        args = dataclasses.asdict(args)
    text = json.dumps([args, list(upstream)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Manifest:
    """Reads and atomically rewrites `workdir/manifest.json`.

    Args:
      workdir: The pipeline's work directory (local or gs://).
      overwrite: Redo stages whose fingerprint changed instead of failing.
    """

    def __init__(self, workdir, overwrite=False):
        self.workdir = workdir
        self.overwrite = overwrite
        self.path = f"{workdir}/{MANIFEST}"
        self.stages = {}
        if tf.io.gfile.exists(self.path):
            self.stages = storage.read_json(self.path)["stages"]

    def _save(self):
        storage.write_json(self.path, {"stages": self.stages})

    def check(self, name, stage_fingerprint, redo_if_changed=False):
        """Raises if stage `name` was made with another fingerprint.

        Args:
          name: Stage name.
          stage_fingerprint: From `fingerprint`.
          redo_if_changed: The stage only mirrors its upstream (the export
            of the last iteration): when the run grows by an iteration it is
            redone instead of refused.

        Raises:
          ValueError: naming the stage, unless `overwrite` or
            `redo_if_changed` is set or the stage failed (an exception,
            recorded by `run`; not a kill).
        """
        entry = self.stages.get(name)
        # A stage that failed holds no work to resume: other settings (the
        # fix) redo it. A killed one may: other settings are refused.
        if entry and entry["fingerprint"] != stage_fingerprint and not (
                self.overwrite or redo_if_changed or "failed" in entry):
            raise ValueError(
                f"Expected the configuration that made {self.workdir}. "
                f"Received: different settings for its stage {name!r} "
                f"(fingerprint {stage_fingerprint}, recorded "
                f"{entry['fingerprint']}). Use a new --workdir, restore the "
                "flags, or pass --overwrite to redo it and what follows.")

    def finished(self, name, stage_fingerprint):
        """Whether a stage finished with these settings.

        Args:
          name: The stage's name in the manifest.
          stage_fingerprint: The fingerprint of its settings now.

        Returns:
          False for a stage never run, run with other settings, or killed
          before its end.
        """
        entry = self.stages.get(name)
        return bool(entry and entry["fingerprint"] == stage_fingerprint
                    and "finished_at" in entry)

    def run(self, name, stage_fingerprint, folder, fn,
            redo_if_changed=False):
        """Runs `fn()` as stage `name` unless it already finished.

        Args:
          name: Stage name, e.g. "iteration1/train".
          stage_fingerprint: From `fingerprint`.
          folder: The stage's output folder; deleted first when a stage made
            with other settings is overwritten.
          fn: Does the work; returns a JSON-able summary.
          redo_if_changed: See `check`.

        Returns:
          The stage's summary (recorded, when the stage was skipped).
        """
        self.check(name, stage_fingerprint, redo_if_changed)
        entry = self.stages.get(name)
        if self.finished(name, stage_fingerprint):
            logging.info("Stage %s finished earlier: skipped.", name)
            return entry["summary"]
        if entry and entry["fingerprint"] != stage_fingerprint:
            logging.warning("Overwriting stage %s (settings changed).", name)
            if tf.io.gfile.exists(folder):
                tf.io.gfile.rmtree(folder)
        started = time.time()
        resumed = bool(entry and entry["fingerprint"] == stage_fingerprint)
        # Seconds of the earlier, killed attempts: each one counts up to the
        # last file it wrote in the stage's folder (the time after that is
        # unknown, and its work was lost anyway).
        earlier = (entry.get("earlier_seconds", 0.0)
                   + _attempt_seconds(entry["started_at"], folder)
                   if resumed else 0.0)
        self.stages[name] = {"fingerprint": stage_fingerprint,
                             "started_at": started,
                             "earlier_seconds": round(earlier, 1),
                             "runs": entry.get("runs", 0) + 1 if resumed
                             else 1}
        self._save()
        try:
            summary = fn()
        except Exception as e:  # Recorded, then raised (not KeyboardInterrupt).
            self.stages[name]["failed"] = f"{type(e).__name__}: {e}"[:1000]
            self._save()
            raise
        self.stages[name].update(
            finished_at=time.time(), summary=summary,
            seconds=round(earlier + time.time() - started, 1))
        self._save()
        return summary


def _attempt_seconds(started_at, folder):
    """Seconds from `started_at` to the newest file under `folder` (0 if
    none is newer)."""
    newest = started_at
    if tf.io.gfile.exists(folder):
        for root, _, files in tf.io.gfile.walk(folder):
            for name in files:
                try:
                    stat = tf.io.gfile.stat(f"{root}/{name}")
                except tf.errors.NotFoundError:  # Renamed meanwhile.
                    continue
                newest = max(newest, stat.mtime_nsec / 1e9)
    return newest - started_at
