"""A list of image files as a data set (the `list:FILE` source).

Spec: list:FILE[,names=NAMES_FILE]. FILE is a text or CSV file (local or
gs://), one image a line: `path` or `path,label` (CSV quoting allowed, so a
path may hold a comma). A relative path is relative to FILE's folder; an
absolute or gs:// path is used as it is. Blank lines and lines starting
with "#" are skipped, as is a first line "path" or "path,label" (a CSV
header).

Labels: an integer label is the class id; any other label is a class name.
The class names, in label order, come from a header line
`# classes: NAME,NAME,...` of FILE or from NAMES_FILE (one name a line);
without either, integer labels are their own ids (no names) and named
labels are numbered in sorted name order, as a folder's sub-folders are.
An unlabeled source reads only the paths (labels may be absent).

The files are checked once, as a folder's are (`image_scan.scan_files`):
undecodable ones are skipped, named and not counted, or refused with
--noskip_corrupt; the scan is cached in the command's output folder.
"""

import csv
import io

import numpy as np
import tensorflow as tf

from noisy_student.data import spec_options

CLASSES_HEADER = "# classes:"
OPTIONS = ("names",)


def parse(spec, rest):
    """(list file, names file or None) of a list spec's text after "list:".

    Args:
      spec: The whole spec (named in errors).
      rest: FILE[,names=FILE].

    Raises:
      ValueError: for an unknown option.
    """
    path, options = spec_options.split(spec, rest, OPTIONS, "the list file")
    return path, options.get("names")


def _read_text(path, spec, what):
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"Expected {what} for {spec}. Received: "
                                f"{path}, no such file")
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read().decode("utf-8")


def read_list(spec, path, names_file=None, labeled=True):
    """The paths, labels and class names a list file names.

    Args:
      spec: The source's spec (named in errors).
      path: The list file.
      names_file: A file of class names, one a line, or None.
      labeled: Whether to read the labels.

    Returns:
      (paths: list of str, labels: int32 [N] (empty when not labeled),
      class names: tuple or None).

    Raises:
      FileNotFoundError: for a missing list or names file.
      ValueError: for a line without a label (labeled), an integer label
        outside the names, a class name not among them, a mix of integer
        and named labels, or a list without any path.
    """
    text = _read_text(path, spec, "a list file of images")
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    names = None
    if names_file:
        names = tuple(line.strip() for line in _read_text(
            names_file, spec, "a file of class names (names=)").splitlines()
                      if line.strip())
    rows = []
    first = True
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.lower().startswith(CLASSES_HEADER):
            if names is None:
                names = tuple(n.strip() for n in next(csv.reader(
                    [stripped[len(CLASSES_HEADER):]])) if n.strip())
            continue
        if not stripped or stripped.startswith("#"):
            continue
        fields = next(csv.reader(io.StringIO(stripped)))
        if first and [f.strip().lower() for f in fields] in (
                ["path"], ["path", "label"]):
            first = False
            continue
        first = False
        rows.append((number, fields))
    if not rows:
        raise ValueError(f"Expected at least one image path in {spec}. "
                         f"Received: {path} lists none")
    paths = [_resolve(folder, fields[0].strip()) for _, fields in rows]
    if not labeled:
        return paths, np.zeros(0, np.int32), None
    raw = []
    for number, fields in rows:
        if len(fields) < 2 or not fields[1].strip():
            raise ValueError(
                f"Expected path,label on every line of {path} (a labeled "
                f"source). Received: line {number}: {','.join(fields)}")
        raw.append((number, fields[1].strip()))
    numeric = [_is_int(label) for _, label in raw]
    if any(numeric) and not all(numeric):
        number, label = raw[numeric.index(not numeric[0])]
        raise ValueError(
            f"Expected all labels of {path} to be class ids or all to be "
            f"class names. Received: line {number}: {label}")
    if all(numeric):
        labels = np.asarray([int(label) for _, label in raw], np.int64)
        limit = len(names) if names is not None else None
        bad = np.nonzero((labels < 0) | (
            labels >= (limit if limit is not None else np.inf)))[0]
        if bad.size:
            number, label = raw[bad[0]]
            raise ValueError(
                f"Expected labels in [0, {limit if limit else 'inf'}) in "
                f"{path}. Received: line {number}: {label}")
        return paths, labels.astype(np.int32), names
    if names is None:
        names = tuple(sorted({label for _, label in raw}))
    index = {name: i for i, name in enumerate(names)}
    for number, label in raw:
        if label not in index:
            raise ValueError(
                f"Expected class names from {names_file or 'the header'} in "
                f"{path}. Received: line {number}: {label}")
    return (paths, np.asarray([index[label] for _, label in raw], np.int32),
            names)


def _is_int(text):
    try:
        int(text)
    except ValueError:
        return False
    return True


def _resolve(folder, path):
    if path.startswith("/") or "://" in path:
        return path
    return f"{folder}/{path}"
