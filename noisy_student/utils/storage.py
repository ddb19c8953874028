"""File helpers that work on local and gs:// paths alike (tf.io.gfile).

Every write is atomic: the data goes to a temporary name beside the target,
which is then renamed, so a killed run never leaves a half-written file that a
later stage would read.

A write that fails for lack of space (or quota) raises `DiskFullError`,
which names what was written and where; the commands print it as one line
(`cli/common.run_command`).
"""

import contextlib
import errno
import json
import uuid

import tensorflow as tf

TEMP_MARKER = ".tmp-"


def join(folder, *names):
    """Joins a folder and names with "/", for local and gs:// paths alike.

    `os.path.join` is not used: it would join with "\\" on Windows, which
    breaks gs:// paths, and it drops the folder when a name starts with "/".

    Args:
      folder: A folder, local or gs:// (a trailing "/" is ignored); "" or
        None gives the names alone, relative to the working folder.
      *names: Path components below the folder, e.g. "eval", "results.json".

    Returns:
      The joined path as a str, e.g. join("gs://b/run/", "eval", "x.json")
      == "gs://b/run/eval/x.json".
    """
    names = [str(n) for n in names]
    if not folder:
        return "/".join(names)
    # rstrip leaves "" of the root "/", which the join turns back into "/".
    return "/".join([str(folder).rstrip("/")] + names)


def temp_path(path):
    """A unique temporary name in the same folder as `path`."""
    folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
    temp_name = f"{TEMP_MARKER}{uuid.uuid4().hex[:8]}-{name}"
    return f"{folder}/{temp_name}" if folder else temp_name


def is_temp(path):
    """True for names made by `temp_path` (leftovers of a killed run)."""
    return path.rsplit("/", 1)[-1].startswith(TEMP_MARKER)


def atomic_write(path, data):
    """Writes `data` (str or bytes) to `path` atomically.

    Args:
      path: Destination file, local or gs://. Its folder is created.
      data: The whole content, str (written as UTF-8) or bytes.

    Raises:
      DiskFullError: naming `path`, if the device is full (no partial
        temporary file is left).
    """
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    if folder:
        tf.io.gfile.makedirs(folder)
    tmp = temp_path(path)
    try:
        # Named as the file it is written for (a caller may write to a
        # temporary name too).
        with naming_full_disk(_written(path)), tf.io.gfile.GFile(
                tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    except BaseException:
        remove_quietly(tmp)  # No partial file left beside the target.
        raise
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path, obj):
    """Writes `obj` as indented, key-sorted JSON to `path` atomically.

    Args:
      path: Destination file, local or gs://.
      obj: JSON types only (see `report.jsonable` for numpy values).
    """
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def beside_model(model_path, name):
    """The path of file `name` recorded with a model.

    Args:
      model_path: A model_dir or SavedModel folder, or a .keras file (its
        folder is used). Local or gs://.
      name: The file's name (e.g. class_names.json).
    """
    path = str(model_path).rstrip("/")
    folder = path if tf.io.gfile.isdir(path) else path.rsplit("/", 1)[0] if (
        "/" in path) else ""
    return join(folder, name)


def read_beside_model(model_path, name):
    """Reads the JSON file `name` recorded with a model, if there is one.

    Args:
      model_path: A model_dir or SavedModel folder, or a .keras file (its
        folder is searched). Local or gs://.
      name: The file's name (e.g. class_names.json).

    Returns:
      (path, value): the file's path (for error messages) and its parsed
      JSON, or None when the file does not exist.
    """
    path = beside_model(model_path, name)
    if not tf.io.gfile.exists(path):
        return path, None
    return path, read_json(path)


def read_json(path):
    """Reads a JSON file written by `write_json`.

    Raises:
      FileNotFoundError: naming the path, if it does not exist.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Expected a JSON file. Received: path={path}")
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def remove_quietly(path):
    """Removes a file or folder if it exists; a failure is ignored (for
    clean-ups after a failure, which must not hide it)."""
    try:
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
    except (tf.errors.OpError, OSError):
        pass


# errno values of a full device (or quota), and how TensorFlow's file
# system words them (its errors carry the text, not the errno).
_DISK_FULL = {errno.ENOSPC: ("No space left on device",
                             "no space left on the device"),
              errno.EDQUOT: ("Disk quota exceeded",
                             "the disk quota is exceeded")}


class DiskFullError(OSError):
    """A write failed for lack of space on the device (or of quota).

    The message names what was written and what to do: "no space left on
    the device while writing the checkpoint into M/checkpoints: free space
    and rerun (it resumes from its last checkpoint, step 500), or use
    another --model_dir".

    Attributes:
      errno: errno.ENOSPC or errno.EDQUOT.
      target: What was written, with its path ("the checkpoint into
        M/checkpoints", or a file's path); None if unknown.
      note: What a rerun does, or None.
      flag: The command's flag of the output folder, or None.
    """

    def __init__(self, error_number, target=None, note=None, flag=None):
        self.target, self.note, self.flag = target, note, flag
        message = _DISK_FULL[error_number][1]
        if target:
            message += f" while writing {target}"
        message += ": free space and rerun" + (f" ({note})" if note else "")
        if flag:
            message += f", or use another --{flag}"
        super().__init__(message)
        self.errno = error_number

    @classmethod
    def of(cls, error, target=None, note=None):
        """`error` as a DiskFullError if a full device raised it, else None.

        Args:
          error: Any exception: an OSError with errno ENOSPC or EDQUOT, or
            a TensorFlow error (ResourceExhaustedError) saying so; a
            DiskFullError is returned as it is.
          target, note: As the attributes; `target` defaults to the file
            the error names.
        """
        if isinstance(error, cls):
            return error
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return cls(error.errno, target or _written(error.filename), note)
        # Only a full device's: running out of (GPU) memory is a
        # ResourceExhaustedError too.
        message = getattr(error, "message", None)
        if isinstance(error, tf.errors.OpError) and message:
            for number, (text, _) in _DISK_FULL.items():
                if text in message:
                    # TF's file errors read "PATH; No space left on device".
                    words = message.split(f"; {text}")[0].split()
                    named = words[-1] if words and "/" in words[-1] else None
                    return cls(number, target or _written(named), note)
        return None

    def with_flag(self, flag):
        """This error, also naming the output folder's --flag."""
        return DiskFullError(self.errno, self.target, self.note,
                             self.flag or flag)


def _written(path):
    """The file `path` was written for: the target of a `temp_path`."""
    if not path or not is_temp(path):
        return path
    folder, _, name = str(path).rpartition("/")
    name = name[len(TEMP_MARKER) + 9:]  # After TEMP_MARKER, 8 hex digits, "-".
    return f"{folder}/{name}" if folder else name


@contextlib.contextmanager
def naming_full_disk(target=None, note=None):
    """A context that raises a full device's error as a `DiskFullError`.

    Args:
      target: What the block writes, with its path ("the checkpoint into
        M/checkpoints"); default: the file the error names.
      note: What a rerun does, for the message.

    Raises:
      DiskFullError: from a full device's error of the block (other errors
        pass unchanged).
    """
    try:
        yield
    except Exception as e:
        full = DiskFullError.of(e, target, note)
        if full is None:
            raise
        raise full from e
