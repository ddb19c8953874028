"""One run per work directory: a lock file naming the process that holds it.

Two processes training into the same folder would write the same
checkpoints and lose each other's manifest updates, and both would exit 0.
`WorkdirLock(folder)` makes the second one fail at once instead, naming the
holder:

    with WorkdirLock(workdir):
        ...  # The work.

The lock is the file `folder/lock.json`: {"host", "pid", "started_at",
"pid_start", "command"}. A lock left by a killed process (SIGKILL, a crash,
a reboot) is taken over with a warning when it is *stale*: held by this host
and its pid is no longer running (or now belongs to a process that started
later, the pid having been reused). A lock of another host cannot be
checked from here; the message says to delete the file if that run is gone.

Local folders take the lock with an atomic create-exclusive (O_CREAT |
O_EXCL). gs:// has no create-exclusive through tf.io.gfile, so there the
lock is best effort: it is read, written if absent, and read back after a
short pause to see that this process is the holder. Two processes starting
within that pause on different machines can both proceed; start runs on a
shared bucket one at a time (the TPU scripts run one pipeline per workdir).
"""

import json
import os
import socket
import sys
import time

from absl import logging
import tensorflow as tf

LOCK_FILE = "lock.json"
# Pause before reading a gs:// lock back (GCS writes are strongly consistent;
# the pause lets a concurrent writer's object land first).
_GCS_SETTLE_SECONDS = 1.0


class WorkdirBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


def _process_start(pid):
    """Start time of `pid` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            # Field 22; the command name (field 2) may hold spaces, so split
            # after its closing parenthesis.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, another user's.
        return True
    return True


def _describe(holder):
    started = holder.get("started_at")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "?")
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {when}")


class WorkdirLock:
    """Context manager holding `folder/lock.json` for this process.

    Re-entrant within a process: taking a lock this process already holds
    (e.g. the command line, then the pipeline it calls) succeeds and only the
    outermost exit releases it.

    Args:
      folder: The work directory (local or gs://); created if missing.

    Raises (on enter):
      WorkdirBusyError: naming the holder (host, pid, start time) when
        another live process holds the lock, or a process of another host.
    """

    def __init__(self, folder):
        self.folder = str(folder).rstrip("/")
        self.path = f"{self.folder}/{LOCK_FILE}"
        self._owned = False
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "pid_start": _process_start(os.getpid()),
                   "started_at": time.time(),
                   "command": " ".join(sys.argv)[:500]}

    def _is_me(self, holder):
        return (holder.get("host") == self.me["host"]
                and holder.get("pid") == self.me["pid"]
                and holder.get("pid_start") == self.me["pid_start"])

    def _is_stale(self, holder):
        """True if `holder` is a process of this host that no longer runs."""
        if holder.get("host") != self.me["host"]:
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return True
        recorded, now = holder.get("pid_start"), _process_start(pid)
        return recorded is not None and now is not None and recorded != now

    def _read(self):
        try:
            with tf.io.gfile.GFile(self.path, "r") as f:
                return json.loads(f.read() or "{}")
        except tf.errors.NotFoundError:
            return None
        except json.JSONDecodeError:
            return {}  # Half-written by a killed process: stale below.

    def _create(self):
        """Writes the lock if absent; True if this process now holds it."""
        data = json.dumps(self.me, indent=2)
        if "://" not in self.folder:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                             0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            return True
        # gs:// and other remote file systems: best effort (module docstring).
        if tf.io.gfile.exists(self.path):
            return False
        with tf.io.gfile.GFile(self.path, "w") as f:
            f.write(data)
        time.sleep(_GCS_SETTLE_SECONDS)
        holder = self._read()
        return bool(holder) and self._is_me(holder)

    def _read_settled(self):
        """The holder; an empty or partial file (its writer may be between
        create and write) is read again for up to 2 s before it counts as
        a dead writer's ({})."""
        holder = self._read()
        for _ in range(4):
            if holder != {}:
                break
            time.sleep(0.5)
            holder = self._read()
        return holder

    def __enter__(self):
        tf.io.gfile.makedirs(self.folder)
        for _ in range(3):
            if self._create():
                self._owned = True
                return self
            holder = self._read_settled()
            if holder is None:
                continue  # Released meanwhile: try again.
            if self._is_me(holder):
                return self  # Re-entered by its holder.
            if holder and not self._is_stale(holder):
                other_host = holder.get("host") != self.me["host"]
                raise WorkdirBusyError(
                    f"Expected no other run in {self.folder}. Received: it "
                    f"is locked by {_describe(holder)} ({self.path}). Wait "
                    "for that run, or use another folder"
                    + (f"; if no run is left on {holder.get('host')}, "
                       f"delete {self.path}" if other_host else "") + ".")
            logging.warning(
                "Taking over the lock of %s: its holder (%s) is no longer "
                "running (killed or crashed).", self.folder,
                _describe(holder or {}))
            try:
                tf.io.gfile.remove(self.path)
            except tf.errors.NotFoundError:
                pass
        raise WorkdirBusyError(
            f"Expected to take the lock {self.path}. Received: another "
            "process took it each time (several runs starting at once).")

    def __exit__(self, *exc_info):
        if not self._owned:
            return
        self._owned = False
        holder = self._read()
        if holder and self._is_me(holder):
            try:
                tf.io.gfile.remove(self.path)
            except tf.errors.NotFoundError:
                pass
