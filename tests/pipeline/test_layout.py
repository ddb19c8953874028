"""Work folders named by iteration, and the migration of work directories
made before the rename (round{r}/ folders, "round{r}/..." manifest keys).

Fast: fake work directories of a few small files; the pipeline-level checks
(a real finished run reruns as a no-op, a killed training resumes from its
checkpoint after the rename) are in test_experiment.py.
"""

import json
import logging
import os

import pytest

from noisy_student.pipeline import layout
from noisy_student.pipeline import legacy


def _tree(root):
    """{relative path: bytes} of every file under `root`."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


STAGES = ("round0/train", "round0/eval", "round1/predict", "round1/select",
          "round1/train", "round1/eval", "export")


def old_workdir(root, iterations=1):
    """A work directory as the code before the rename left it."""
    for r in range(iterations + 1):
        _write(f"{root}/round{r}/train/checkpoints/checkpoint",
               'model_checkpoint_path: "ckpt-20"\n')
        _write(f"{root}/round{r}/train/checkpoints/ckpt-20.index", f"w{r}")
        _write(f"{root}/round{r}/eval/results.json", f'{{"top1": 0.{r}}}')
    _write(f"{root}/export/saved_model.pb", "pb")
    stages = {name: {"fingerprint": f"fp-{name}", "finished_at": 1.0,
                     "summary": {"name": name}} for name in STAGES}
    _write(f"{root}/manifest.json", json.dumps({"stages": stages}))
    _write(f"{root}/report.json", json.dumps({
        "rounds": [{"round": r, "role": "student" if r else "teacher",
                    "test_top1": 0.5} for r in range(iterations + 1)],
        "updated_at": "then"}))
    return stages


def _renamed(tree):
    """`tree` with round{r}/ paths as they are after the migration."""
    renamed = {}
    for path, data in tree.items():
        head, sep, rest = path.partition(os.sep)
        if head.startswith("round") and sep:
            head = "iteration" + head[len("round"):]
        renamed[head + sep + rest] = data
    return renamed


def test_names_of_folders_and_stages():
    assert layout.iteration_folder("gs://b/w", 2) == (
        "gs://b/w/iteration2")
    assert layout.stage_name(0, "train") == "iteration0/train"
    assert layout.stage_folder("/w", 1, "select") == (
        "/w/iteration1/select")
    assert layout.parse_stage_name("iteration12/eval") == (12, "eval")
    assert layout.parse_stage_name("export") is None


def test_old_work_directory_is_migrated_in_place(tmp_path, caplog):
    root = str(tmp_path)
    stages = old_workdir(root)
    before = _tree(root)
    with caplog.at_level(logging.INFO):
        renamed = legacy.migrate(root)
    assert renamed == [(f"{root}/round0", f"{root}/iteration0"),
                       (f"{root}/round1", f"{root}/iteration1")]
    assert sorted(os.listdir(root)) == [
        "export", "iteration0", "iteration1", "manifest.json", "report.json"]
    # Every file of the folders is kept, byte for byte (the checkpoint
    # index names checkpoints relative to its folder).
    after = _tree(root)
    for name in ("manifest.json", "report.json"):
        del before[name], after[name]
    assert after == _renamed(before)
    # The manifest's records are the same, under the new keys.
    new_stages = _read_json(f"{root}/manifest.json")["stages"]
    assert new_stages == {
        name.replace("round", "iteration"): entry
        for name, entry in stages.items()}
    report = _read_json(f"{root}/report.json")
    assert report["iterations"] == [
        {"iteration": r, "role": "student" if r else "teacher",
         "test_top1": 0.5} for r in (0, 1)]
    assert "rounds" not in report and report["updated_at"] == "then"
    # One line per folder, saying what was renamed and why.
    lines = [r.getMessage() for r in caplog.records
             if "Renamed" in r.getMessage() and "/round" in r.getMessage()]
    assert len(lines) == 2
    for r, line in enumerate(lines):
        assert f"{root}/round{r} to {root}/iteration{r}" in line
        assert "--iterations" in line
    assert not os.path.exists(f"{root}/{legacy.MIGRATION_FILE}")
    # Idempotent: a second call changes and says nothing.
    caplog.clear()
    migrated = _tree(root)
    assert legacy.migrate(root) == []
    assert _tree(root) == migrated
    assert not [r for r in caplog.records if "Renamed" in r.getMessage()]


def test_half_migrated_work_directory_is_finished(tmp_path):
    """Killed after its first folder: the rerun renames the rest and the
    manifest keys."""
    root = str(tmp_path)
    stages = old_workdir(root, iterations=2)
    os.rename(f"{root}/round0", f"{root}/iteration0")
    before = _tree(root)
    assert legacy.migrate(root) == [
        (f"{root}/round1", f"{root}/iteration1"),
        (f"{root}/round2", f"{root}/iteration2")]
    after = _tree(root)
    for name in ("manifest.json", "report.json"):
        del before[name], after[name]
    assert after == _renamed(before)
    assert set(_read_json(f"{root}/manifest.json")["stages"]) == {
        name.replace("round", "iteration") for name in stages}


def test_manifest_of_a_killed_migration_is_finished(tmp_path):
    """Killed after the manifest was rewritten but before the last
    folder's rename (or the other way round): the rerun finishes both."""
    root = str(tmp_path)
    old_workdir(root)
    legacy.migrate(root)
    os.rename(f"{root}/iteration1", f"{root}/round1")
    assert legacy.migrate(root) == [
        (f"{root}/round1", f"{root}/iteration1")]
    stages = _read_json(f"{root}/manifest.json")["stages"]
    assert "iteration1/train" in stages and "round1/train" not in stages


def test_both_folders_of_an_iteration_stop_it_and_nothing_changes(tmp_path):
    root = str(tmp_path)
    old_workdir(root)
    _write(f"{root}/iteration1/train/other", "x")
    before = _tree(root)
    with pytest.raises(ValueError) as error:
        legacy.migrate(root)
    message = str(error.value)
    assert "\n" not in message
    assert f"{root}/round1" in message and f"{root}/iteration1" in message
    assert _tree(root) == before


def test_both_manifest_keys_of_a_stage_stop_it_and_nothing_changes(tmp_path):
    root = str(tmp_path)
    stages = old_workdir(root)
    stages["iteration1/train"] = stages["round1/train"]
    _write(f"{root}/manifest.json", json.dumps({"stages": stages}))
    before = _tree(root)
    with pytest.raises(ValueError, match="round1/train.*iteration1/train"):
        legacy.migrate(root)
    assert _tree(root) == before


def test_folder_rename_killed_half_way_is_finished(tmp_path):
    """On gs:// a folder is renamed object by object: a kill leaves both
    folders, each with part of the files. The record of the rename in
    progress lets the rerun finish it (a pair it does not name is
    refused, as above)."""
    root = str(tmp_path)
    old_workdir(root)
    before = _tree(root)
    _write(f"{root}/{legacy.MIGRATION_FILE}", json.dumps(
        {"from": "round1", "to": "iteration1"}))
    os.makedirs(f"{root}/iteration1/train")
    os.rename(f"{root}/round1/eval", f"{root}/iteration1/eval")
    os.rename(f"{root}/round1/train/checkpoints",
              f"{root}/iteration1/train/checkpoints")
    legacy.migrate(root)
    after = _tree(root)
    for name in ("manifest.json", "report.json"):
        del before[name], after[name]
    assert after == _renamed(before)


def test_new_or_empty_work_directory_is_left_alone(tmp_path):
    assert legacy.migrate(str(tmp_path / "absent")) == []
    assert not (tmp_path / "absent").exists()
    _write(f"{tmp_path}/iteration0/train/x", "x")
    _write(f"{tmp_path}/manifest.json", json.dumps(
        {"stages": {"iteration0/train": {"fingerprint": "a"}}}))
    before = _tree(str(tmp_path))
    assert legacy.migrate(str(tmp_path)) == []
    assert _tree(str(tmp_path)) == before


def test_folders_the_pipeline_never_wrote_are_left_alone(tmp_path):
    # "round07" is not a name the pipeline wrote (it wrote round7): renaming
    # it would merge it into iteration7 beside a real round7.
    for name in ("round07", "round_notes", "round7x"):
        _write(f"{tmp_path}/{name}/x", name)
    before = _tree(str(tmp_path))
    assert legacy.migrate(str(tmp_path)) == []
    assert _tree(str(tmp_path)) == before
