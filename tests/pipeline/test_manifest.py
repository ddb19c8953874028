"""The stage manifest: skip finished stages, refuse changed settings."""

import pytest

from noisy_student.pipeline import manifest


def test_finished_stage_is_skipped_and_changed_settings_refused(tmp_path):
    calls = []
    work = str(tmp_path)
    fp = manifest.fingerprint({"steps": 10})
    m = manifest.Manifest(work)
    assert m.run("iteration0/train", fp, f"{work}/iteration0",
                 lambda: calls.append(1) or {"top1": 0.5}) == {"top1": 0.5}
    # A new process (new Manifest) reads the record and skips the stage.
    again = manifest.Manifest(work)
    assert again.run("iteration0/train", fp, f"{work}/iteration0",
                     lambda: calls.append(2)) == {"top1": 0.5}
    assert calls == [1]
    changed = manifest.fingerprint({"steps": 20})
    with pytest.raises(ValueError, match="iteration0/train.*--overwrite"):
        again.run("iteration0/train", changed, f"{work}/iteration0", dict)
    (tmp_path / "iteration0").mkdir()
    (tmp_path / "iteration0" / "old").write_text("x")
    forced = manifest.Manifest(work, overwrite=True)
    forced.run("iteration0/train", changed, f"{work}/iteration0",
               lambda: {"x": 1})
    assert not (tmp_path / "iteration0" / "old").exists()
    assert manifest.Manifest(work).finished("iteration0/train", changed)


def test_stage_that_mirrors_its_upstream_is_redone_not_refused(tmp_path):
    work = str(tmp_path)
    m = manifest.Manifest(work)
    m.run("export", manifest.fingerprint({}, "iteration2"), f"{work}/export",
          lambda: {"from": 2})
    grown = manifest.fingerprint({}, "iteration3")
    with pytest.raises(ValueError, match="export"):
        m.check("export", grown)
    assert m.run("export", grown, f"{work}/export", lambda: {"from": 3},
                 redo_if_changed=True) == {"from": 3}
    assert manifest.Manifest(work).finished("export", grown)


def test_started_but_unfinished_stage_reruns(tmp_path):
    work = str(tmp_path)
    fp = manifest.fingerprint({"a": 1})

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        manifest.Manifest(work).run("s", fp, f"{work}/s", killed)
    m = manifest.Manifest(work)
    assert not m.finished("s", fp)
    assert m.run("s", fp, f"{work}/s", lambda: {"ok": True}) == {"ok": True}
    assert manifest.Manifest(work).stages["s"]["runs"] == 2


def test_failed_stage_takes_other_settings_killed_one_refuses_them(tmp_path):
    work = str(tmp_path)
    fp = manifest.fingerprint({"min_confidence": 0.3})
    fixed = manifest.fingerprint({"min_confidence": 0.0})

    def failed():
        raise ValueError("no image passes the confidence threshold")

    with pytest.raises(ValueError, match="threshold"):
        manifest.Manifest(work).run("select", fp, f"{work}/select", failed)
    assert "threshold" in manifest.Manifest(work).stages["select"]["failed"]
    # The failure is fixed by other settings, without --overwrite.
    assert manifest.Manifest(work).run(
        "select", fixed, f"{work}/select", lambda: {"ok": 1}) == {"ok": 1}
    assert manifest.Manifest(work).finished("select", fixed)
    # A killed stage (its work resumable) still refuses other settings.
    with pytest.raises(KeyboardInterrupt):
        manifest.Manifest(work).run("train", fp, f"{work}/train",
                                    _raise(KeyboardInterrupt))
    with pytest.raises(ValueError, match="'train'.*--overwrite"):
        manifest.Manifest(work).check("train", fixed)


def _raise(error):
    def fn():
        raise error
    return fn


def test_fingerprint_depends_on_args_and_upstream():
    a = manifest.fingerprint({"x": 1}, "up1")
    assert a == manifest.fingerprint({"x": 1}, "up1")
    assert a != manifest.fingerprint({"x": 2}, "up1")
    assert a != manifest.fingerprint({"x": 1}, "up2")
