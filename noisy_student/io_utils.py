"""File helpers that work on local and gs:// paths alike (tf.io.gfile).

Every write is atomic: the data goes to a temporary name beside the target,
which is then renamed, so a killed run never leaves a half-written file that a
later stage would read.
"""

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
    """
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    if folder:
        tf.io.gfile.makedirs(folder)
    tmp = temp_path(path)
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
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
