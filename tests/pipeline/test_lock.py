"""One run per work directory (noisy_student.pipeline.lock)."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from noisy_student.pipeline import lock as workdir_lock


def _write_lock(folder, **holder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, workdir_lock.LOCK_FILE), "w",
              encoding="utf-8") as f:
        json.dump({"host": socket.gethostname(), "started_at": 0.0,
                   **holder}, f)


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c",
                                "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_lock_is_taken_then_released(tmp_path):
    with workdir_lock.WorkdirLock(tmp_path) as lock:
        holder = json.loads((tmp_path / "lock.json").read_text())
        assert holder["pid"] == os.getpid()
        assert holder["host"] == socket.gethostname()
        with workdir_lock.WorkdirLock(tmp_path):  # Re-entrant.
            pass
        assert (tmp_path / "lock.json").exists()
        assert lock.path.endswith("lock.json")
    assert not (tmp_path / "lock.json").exists()


def test_live_holder_is_named_and_refused(tmp_path, live_process):
    pid = live_process.pid
    _write_lock(tmp_path, pid=pid,
                pid_start=workdir_lock._process_start(pid))  # pylint: disable=protected-access
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
        with workdir_lock.WorkdirLock(tmp_path):
            pytest.fail("entered a locked folder")
    message = str(error.value)
    assert f"pid {pid}" in message
    assert f"host {socket.gethostname()}" in message
    assert "started 1970-01-01" in message or "started 1969-12-31" in message
    assert (tmp_path / "lock.json").exists()  # Not taken from its holder.


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid, pid_start=1)
    with caplog.at_level(logging.WARNING):
        with workdir_lock.WorkdirLock(tmp_path):
            holder = json.loads((tmp_path / "lock.json").read_text())
            assert holder["pid"] == os.getpid()
    assert "no longer running" in caplog.text
    assert f"pid {dead.pid}" in caplog.text


def test_reused_pid_is_stale(tmp_path, live_process):
    # The pid runs, but a process started after the lock was written.
    pid = live_process.pid
    _write_lock(tmp_path, pid=pid,
                pid_start=workdir_lock._process_start(pid) - 1)  # pylint: disable=protected-access
    with workdir_lock.WorkdirLock(tmp_path):
        pass


def test_lock_of_another_host_is_refused_with_what_to_do(tmp_path):
    _write_lock(tmp_path, host="other-machine", pid=1234)
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=r"host other-machine, pid 1234.*delete"):
        with workdir_lock.WorkdirLock(tmp_path):
            pass


def test_remote_file_system_lock(monkeypatch):
    # ram:// takes the gs:// path (no create-exclusive): write, read back.
    monkeypatch.setattr(workdir_lock, "_GCS_SETTLE_SECONDS", 0.0)
    folder = f"ram://locks/{os.getpid()}"
    with workdir_lock.WorkdirLock(folder):
        with pytest.raises(workdir_lock.WorkdirBusyError):
            other = workdir_lock.WorkdirLock(folder)
            other.me = {**other.me, "host": "other-machine"}
            with other:
                pass
    with workdir_lock.WorkdirLock(folder):
        pass


def test_empty_lock_file_of_a_killed_writer_is_taken_over(tmp_path):
    (tmp_path / "lock.json").write_text("")  # Killed between create and write.
    with workdir_lock.WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / "lock.json").read_text())
        assert holder["pid"] == os.getpid()
