"""A folder of image files as a data set (the `folder:PATH` source).

Which files are read comes from the folder's one scan (`image_scan`):
only files that decode. A labeled folder has one sub-folder per class (sorted
names give the label ids, or the model's class names do for a test set); an
unlabeled one may hold its images at any depth. Each file is decoded upright
by `preprocess.decode_image`, the decoder of the serving signature.
"""

import os

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.data import image_scan
from noisy_student.data import preprocess


def check_scan(spec, scan, skip_corrupt):
    """Raises before any reading if the folder has nothing to read, or
    (skip_corrupt False) any undecodable file.

    Args:
      spec: The source's spec (named in messages).
      scan: Its `image_scan.ScanResult`.
      skip_corrupt: Whether undecodable files are left out (else refused).

    Raises:
      ValueError: for a folder without a decodable image file.
      image_scan.UndecodableImagesError: for undecodable files when
        skip_corrupt is False.
    """
    if not scan.decoded and not scan.skipped:
        raise ValueError(
            "Expected image files (" + ", ".join(image_scan.IMAGE_EXTENSIONS) + ") "
            f"in the folder. Received: path={scan.folder} with none"
            + (f" ({len(scan.ignored)} of an unsupported type, e.g. "
               f"{next(iter(scan.ignored))})" if scan.ignored else ""))
    if scan.skipped and not skip_corrupt:
        raise image_scan.UndecodableImagesError(scan)
    if not scan.decoded:
        raise ValueError(
            f"Expected at least one decodable image in {spec}. Received: "
            f"{scan.summary()}: " + "; ".join(scan.examples(3)))


def check_every_class_has_images(spec, labels, class_names):
    """Raises ValueError naming the class folders with no decodable image.

    Args:
      spec: The source's spec (named in the message).
      labels: int [N], the label of each decodable file.
      class_names: The class sub-folders' names, in label order.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts) if n == 0]
    if empty:
        raise ValueError(
            f"Expected decodable image files in every class folder of "
            f"{spec}. Received: no decodable image in {empty[:10]}"
            + (f" and {len(empty) - 10} more" if len(empty) > 10 else ""))


def list_files(scan, need_labels, known_classes=None):
    """(files, labels, class names) of a scanned folder's decodable files.

    Labeled: each file takes the label of the class sub-folder it is in (at
    any depth below it), classes in sorted folder order, files sorted
    within; files directly in the folder are not used. Unlabeled: every
    decodable file, sorted.

    Args:
      scan: The folder's `image_scan.ScanResult`.
      need_labels: Whether the files take their class sub-folder's label.
      known_classes: The model's classes in label order (a test set scored
        against a trained model), or None to number the sorted sub-folders.

    Returns:
      (files: list of paths, labels: int32 [N] (empty without labels),
      class names: list).

    Raises:
      ValueError: for a sub-folder that is none of `known_classes`, or no
        decodable file in a class sub-folder.
    """
    path = scan.folder
    if not need_labels:
        return list(scan.decoded), np.asarray([], np.int32), []
    class_names = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                         if tf.io.gfile.isdir(os.path.join(path, d)))
    index = {name: i for i, name in enumerate(class_names)}
    if known_classes is not None:
        unknown = [n for n in class_names if n not in known_classes]
        if unknown:
            raise ValueError(
                f"Expected sub-folders named after the model's classes "
                f"{list(known_classes)[:20]}. Received: path={path} with "
                f"sub-folders {unknown[:10]} that are none of them")
        index = {name: list(known_classes).index(name)
                 for name in class_names}
        class_names = list(known_classes)
    by_class = {name: [] for name in index}
    outside = []
    for file in scan.decoded:
        name, sep, _ = file[len(path) + 1:].partition("/")
        if sep and name in by_class:
            by_class[name].append(file)
        else:
            outside.append(file)
    if outside:
        # Counted as decoded by the scan, but without a class: say so.
        logging.warning(
            "folder:%s: %d decodable images are not in a class sub-folder "
            "and are not used as labeled images: %s%s", path, len(outside),
            ", ".join(outside[:image_scan.SHOWN]),
            " ..." if len(outside) > image_scan.SHOWN else "")
    files, labels = [], []
    for name in sorted(index):
        files += by_class[name]
        labels += [index[name]] * len(by_class[name])
    if not files:
        raise ValueError(
            "Expected decodable image files in one sub-folder per class of "
            f"the folder. Received: path={path} with none")
    return files, np.asarray(labels, np.int32), class_names


def dataset(files, labels, channels, keep_encoded=False):
    """Reads and decodes `files`, all checked by the scan to decode.

    Args:
      files: Image paths, in data set order.
      labels: int32 [N], or None for an unlabeled source.
      channels: Channels to decode to (1 or 3; None: 3).
      keep_encoded: Also yield each file's bytes as "encoded".

    Returns:
      A dataset of {"image": uint8 [H, W, C], "label"?, "encoded"?}.
    """
    def decode(element):
        # The serving signature decodes bytes with the same function:
        # EXIF orientation applied, channels converted the same way.
        data = tf.io.read_file(element["path"])
        image = preprocess.decode_image(data, channels=channels or 3)
        image.set_shape([None, None, channels or 3])
        out = {"image": image}
        if keep_encoded:
            out["encoded"] = data
        if "label" in element:
            out["label"] = element["label"]
        return out

    columns = {"path": tf.constant(files, tf.string)}
    if labels is not None:
        columns["label"] = tf.constant(labels, tf.int32)
    # No ignore_errors: every file was decoded by the scan, so a failure
    # here means a file changed during the run, which must not pass
    # silently (a rerun scans the changed listing again).
    return tf.data.Dataset.from_tensor_slices(columns).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
