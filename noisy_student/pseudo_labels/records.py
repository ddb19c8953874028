"""Pseudo-label records: the files the predict and select stages share.

Two folders, both written only through temporary names that are renamed when
complete (a killed run never leaves a file that looks finished):

Prediction folder (written by `noisy_student.pseudo_labels.prediction.predict`)
---------------------------------------------------------------
The unlabeled source is cut into *blocks* of `records_per_file` consecutive
images by their global index i (block = i // records_per_file). Block b is
labelled by worker `b % num_shards`, so the set of output files, and every
byte in them, does not depend on how many workers shared the work.

  predict_config.json           num_classes, records_per_file, num_bins and
                                 channels (of the stored images, or null).
  predictions-BBBBBBBB.tfrecord  the records of block B (a TFRecord file of
                                 tf.train.Example, in index order).
  predictions-BBBBBBBB.hist.npz  the block's per-class confidence histogram,
                                 written AFTER its records file was renamed
                                 into place. A block is complete if and only
                                 if its histogram exists.
  done-SSSSS-of-NNNNN.json       written by worker S when it has finished; it
                                 holds the source's size (num_images).

Each prediction record (tf.train.Example) has the features
  image:       bytes   the ORIGINAL image, encoded, so the student can crop
                       and augment at its own resolution: the source file's
                       own bytes (JPEG, PNG, GIF, BMP, WebP) where the source has
                       them (folder sources: no second copy of the data set,
                       no re-encoding), else a PNG of the uint8 [H, W, C]
                       array (npz, idx, digits, TFDS). Readers decode it with
                       `preprocess.decode_image` to the stored `channels`,
                       as the source did, so the student sees the teacher's
                       pixels.
  probs:       bytes   the teacher's full probability vector, float16
                       little-endian, num_classes values.
  label:       int64   argmax of the probabilities.
  confidence:  float   the top probability (from float32 probabilities).
  index:       int64   the image's global index in the unlabeled source (the
                       stable reference to its source).

A histogram file (.npz) is sparse: arrays `classes`, `bins` and `counts` list
the non-zero cells of a [num_classes, num_bins] count matrix, where cell
(c, b) counts the block's images whose argmax is c and whose confidence falls
in bin b = min(floor(confidence * num_bins), num_bins - 1) (computed in
float32 by `confidence_bins`); also scalars `num_classes`, `num_bins` and
`num_records`.

Selection folder (written by `noisy_student.pseudo_labels.selection.select`)
------------------------------------------------------------
  selected-FFFFF-of-MMMMM.tfrecord  the selected records, a duplicated image's
                                    copies spread over different files.
  selection.json                    num_classes, files, counts; written last,
                                    so it marks a finished selection.
  report.json, report.md, report.png

Each selected record has the features image, label, confidence and index of
its prediction record, plus
  target:  bytes   the training target, float16 little-endian, num_classes
                   values (soft: re-tempered probabilities; hard: one-hot).
  copy:    int64   0 for the first copy of an image, 1.. for duplicates.

The student's reader is `selected_dataset`; `prediction_dataset` reads the
prediction records (one by one, or in batches for the select stage).

Size: the record format is defined once: both folders' file names, the
encoders, the block writer and the readers, so that the predict and select
stages cannot disagree about a byte of it.
"""

import io
import re

import numpy as np
import tensorflow as tf

from noisy_student.data import preprocess
from noisy_student.data import streams
from noisy_student.utils import storage

DEFAULT_NUM_BINS = 1000
PREDICT_CONFIG = "predict_config.json"
SELECTION_FILE = "selection.json"

_BLOCK_RE = re.compile(r"^predictions-(\d{8})\.(tfrecord|hist\.npz)$")
_SELECTED_RE = re.compile(r"^selected-\d{5}-of-\d{5}\.tfrecord$")
_DONE_RE = re.compile(r"^done-(\d{5})-of-(\d{5})\.json$")


def records_name(block):
    """File name of block `block`'s prediction records."""
    return f"predictions-{block:08d}.tfrecord"


def histogram_name(block):
    """File name of block `block`'s confidence histogram."""
    return f"predictions-{block:08d}.hist.npz"


def done_name(shard_index, num_shards):
    """File name of the marker a finished prediction worker writes.

    Args:
      shard_index: The worker's index.
      num_shards: Number of workers.

    Returns:
      E.g. "done-00001-of-00004.json".
    """
    return f"done-{shard_index:05d}-of-{num_shards:05d}.json"


def selected_name(file_index, num_files):
    """File name of one file of a selected set.

    Args:
      file_index: The file's index, 0-based.
      num_files: Number of files of the set.

    Returns:
      E.g. "selected-00000-of-00016.tfrecord".
    """
    return f"selected-{file_index:05d}-of-{num_files:05d}.tfrecord"


def block_of_name(name):
    """The block number in a prediction file name (or temp name), else None."""
    name = name.rsplit("/", 1)[-1]
    if storage.is_temp(name):
        # Temp names are `.tmp-<8 hex>-<final name>`.
        name = name[len(storage.TEMP_MARKER) + 9:]
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) if match else None


def confidence_bins(confidence, num_bins):
    """Histogram bin of each confidence: min(floor(c * num_bins), num_bins-1).

    Computed in float32 so that the predict stage (which fills histograms) and
    the select stage (which re-bins the stored float32 confidences) always
    agree.

    Args:
      confidence: Array-like of confidences in [0, 1].
      num_bins: Number of equal bins over [0, 1].

    Returns:
      An int64 numpy array of bin indices, shaped like `confidence`.
    """
    scaled = np.asarray(confidence, np.float32) * np.float32(num_bins)
    return np.clip(np.floor(scaled).astype(np.int64), 0, num_bins - 1)


def _bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _float_feature(value):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))


def encode_prediction(image, probs, label, confidence, index):
    """Serialises one prediction record.

    Args:
      image: The original image, encoded (see the module docstring).
      probs: The probability vector (any float dtype; stored as float16).
      label: Argmax class.
      confidence: Top probability.
      index: Global index of the image in the unlabeled source.

    Returns:
      The serialised tf.train.Example (bytes).
    """
    return _serialize(image, "probs", probs, label, confidence, index)


def encode_selected(image, target, label, confidence, index, copy=0):
    """Serialises one selected record (see the module docstring).

    Args:
      image: The original image, encoded (see the module docstring).
      target: The training target vector (stored as float16).
      label: The teacher's argmax class.
      confidence: The teacher's top probability.
      index: Global index of the image in the unlabeled source.
      copy: 0 for the first copy of an image, 1.. for its duplicates.

    Returns:
      The serialised tf.train.Example (bytes).
    """
    return _serialize(image, "target", target, label, confidence, index,
                      copy=copy)


def _serialize(image, vector_key, vector, label, confidence, index, **ints):
    """One tf.train.Example of either record kind, serialised.

    Args:
      image: Encoded image bytes.
      vector_key: "probs" (prediction records) or "target" (selected ones).
      vector: float [num_classes], stored as little-endian float16 bytes.
      label: Argmax class.
      confidence: Top probability.
      index: Global index of the image.
      **ints: Further int64 features (the selected records' "copy").

    Returns:
      The serialised example (bytes).
    """
    feature = {
        "image": _bytes_feature(image),
        vector_key: _bytes_feature(np.asarray(vector, "<f2").tobytes()),
        "label": _int_feature(label),
        "confidence": _float_feature(confidence),
        "index": _int_feature(index),
    }
    feature.update({key: _int_feature(value) for key, value in ints.items()})
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Deterministic: map fields in key order, so the bytes do not depend on
    # the process (the kill-and-resume result is byte-identical).
    return example.SerializeToString(deterministic=True)


# The fields both record kinds have (see the module docstring).
_COMMON_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "confidence": tf.io.FixedLenFeature([], tf.float32),
    "index": tf.io.FixedLenFeature([], tf.int64),
}
PREDICTION_FEATURES = {**_COMMON_FEATURES,
                       "probs": tf.io.FixedLenFeature([], tf.string)}
SELECTED_FEATURES = {**_COMMON_FEATURES,
                     "target": tf.io.FixedLenFeature([], tf.string),
                     "copy": tf.io.FixedLenFeature([], tf.int64)}


def decode_float16(raw, num_classes=None):
    """Decodes float16 bytes (scalar or batch) to float32 [..., num_classes].

    Args:
      raw: string tensor, [] or [B], of little-endian float16 bytes.
      num_classes: The vectors' length, for a static shape (None: dynamic).

    Returns:
      float32 [num_classes] or [B, num_classes].
    """
    values = tf.cast(tf.io.decode_raw(raw, tf.float16, little_endian=True),
                     tf.float32)
    if num_classes is not None:
        values = tf.ensure_shape(
            values, raw.shape.as_list() + [num_classes])
    return values


class BlockWriter:
    """Writes one block of prediction records, then its histogram.

    Records go to a temporary file that is renamed when `close` is called;
    the histogram is written (atomically) only after that rename, so an
    existing histogram implies a complete records file.
    """

    def __init__(self, pred_dir, block, num_classes, num_bins):
        self.path = storage.join(pred_dir, records_name(block))
        self.hist_path = storage.join(pred_dir, histogram_name(block))
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.num_records = 0
        self._temp = storage.temp_path(self.path)
        tf.io.gfile.makedirs(pred_dir)
        self._writer = tf.io.TFRecordWriter(self._temp)
        # Flat histogram cell ids (class * num_bins + bin), one per record;
        # at most records_per_file ints, so memory stays bounded.
        self._cells = []

    def write(self, image, probs, label, confidence, index):
        """Appends one record.

        Args:
          image: Encoded image bytes (PNG, JPEG...).
          probs: float [K] teacher probabilities.
          label: The teacher's argmax class.
          confidence: probs[label].
          index: The image's global index in the unlabeled source.
        """
        self._writer.write(
            encode_prediction(image, probs, label, confidence, index))
        self._cells.append(
            int(label) * self.num_bins
            + int(confidence_bins(confidence, self.num_bins)))
        self.num_records += 1

    def write_batch(self, images, probs, labels, confidences, indices):
        """Appends a batch of records (numpy arrays, one row per record).

        Args:
          images: [B] encoded image bytes.
          probs: float [B, K] teacher probabilities (stored as float16).
          labels: int [B] argmax classes.
          confidences: float [B] probabilities of those classes.
          indices: int [B] global indices in the unlabeled source.
        """
        probs16 = np.asarray(probs, "<f2")
        for row in range(len(indices)):
            self._writer.write(encode_prediction(
                images[row], probs16[row], labels[row], confidences[row],
                indices[row]))
        bins = confidence_bins(confidences, self.num_bins)
        self._cells.extend(
            (np.asarray(labels, np.int64) * self.num_bins + bins).tolist())
        self.num_records += len(indices)

    def close(self):
        """Renames the records into place, then writes the histogram."""
        self._writer.close()
        tf.io.gfile.rename(self._temp, self.path, overwrite=True)
        cells, counts = np.unique(np.asarray(self._cells, np.int64),
                                  return_counts=True)
        write_histogram(self.hist_path, cells // self.num_bins,
                        cells % self.num_bins, counts, self.num_classes,
                        self.num_bins, self.num_records)

    def abort(self):
        """Closes and deletes the temporary file (the block stays to do)."""
        try:
            self._writer.close()
        finally:
            if tf.io.gfile.exists(self._temp):
                tf.io.gfile.remove(self._temp)


def write_histogram(path, classes, bins, counts, num_classes, num_bins,
                    num_records):
    """Writes a sparse confidence histogram (see the module docstring).

    Args:
      path: Destination file, local or gs:// (written atomically).
      classes: int [M] class of each non-empty cell.
      bins: int [M] confidence bin of each non-empty cell.
      counts: int [M] images in each cell.
      num_classes: K.
      num_bins: Bins over [0, 1].
      num_records: Records of the block (the sum of counts).
    """
    buffer = io.BytesIO()
    np.savez(buffer, classes=np.asarray(classes, np.int32),
             bins=np.asarray(bins, np.int32),
             counts=np.asarray(counts, np.int64),
             num_classes=np.int64(num_classes), num_bins=np.int64(num_bins),
             num_records=np.int64(num_records))
    storage.atomic_write(path, buffer.getvalue())


def read_histogram(path):
    """Reads a histogram file.

    Args:
      path: A `.hist.npz` file written by `write_histogram`.

    Returns:
      (counts, num_records): a dense int64 [num_classes, num_bins] matrix and
      the number of records of the block.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()))
        dense = np.zeros((int(data["num_classes"]), int(data["num_bins"])),
                         np.int64)
        np.add.at(dense, (data["classes"], data["bins"]), data["counts"])
        return dense, int(data["num_records"])


def complete_blocks(pred_dir):
    """Blocks of `pred_dir` whose histogram (hence records) is complete."""
    if not tf.io.gfile.isdir(pred_dir):
        return set()
    blocks = set()
    for name in tf.io.gfile.listdir(pred_dir):
        if name.endswith(".hist.npz") and not storage.is_temp(name):
            block = block_of_name(name)
            if block is not None:
                blocks.add(block)
    return blocks


def check_predictions(pred_dir):
    """Checks that a prediction folder is complete and describes it.

    Args:
      pred_dir: The folder `predict` wrote.

    Returns:
      A dict with num_classes, num_bins, records_per_file, num_images,
      num_blocks, and `blocks`: the sorted list of block numbers.

    Raises:
      FileNotFoundError: if the folder or its config is missing.
      ValueError: if a worker has not finished or a block is missing.
    """
    config = _read_folder_json(pred_dir, PREDICT_CONFIG,
                               "a prediction folder written by predict",
                               "pred_dir")
    sizes = set()
    num_shards = set()
    for name in tf.io.gfile.listdir(pred_dir):
        match = _DONE_RE.match(name)
        if match:
            sizes.add(storage.read_json(
                storage.join(pred_dir, name))["num_images"])
            num_shards.add(int(match.group(2)))
    if not sizes:
        raise ValueError(
            "Expected at least one finished prediction worker (a done-*.json "
            f"file). Received: pred_dir={pred_dir}")
    if len(sizes) > 1:
        raise ValueError(
            "Expected every prediction worker to see the same unlabeled "
            f"source. Received: num_images={sorted(sizes)} in {pred_dir}")
    num_images = sizes.pop()
    per_file = config["records_per_file"]
    num_blocks = -(-num_images // per_file)
    missing = sorted(set(range(num_blocks)) - complete_blocks(pred_dir))
    if missing:
        hint = ""
        if len(num_shards) == 1:
            shards = sorted({b % max(num_shards) for b in missing})
            hint = (f" (rerun predict with num_shards={max(num_shards)} for "
                    f"shard_index in {shards[:10]})")
        raise ValueError(
            f"Expected all {num_blocks} prediction blocks to be complete. "
            f"Received: pred_dir={pred_dir} missing blocks {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}{hint}")
    return dict(config, num_images=num_images, num_blocks=num_blocks,
                blocks=list(range(num_blocks)))


def decode(data, channels=0):
    """A record's image, uint8 [H, W, C]: decoded as the source decoded it.

    `preprocess.decode_image` (any of JPEG/PNG/GIF/BMP/WebP, EXIF orientation,
    channels converted to `channels`; 0 keeps the file's).

    Args:
      data: string tensor [] of the encoded image.
      channels: 1 or 3 to convert to, 0 to keep the file's channels.

    Returns:
      uint8 [H, W, C].
    """
    return preprocess.decode_image(data, channels=channels or None)


def prediction_dataset(pred_dir, decode_image=True, channels=None, *,
                       info=None, blocks=None, batch_size=None):
    """Reads a prediction folder's records in index order: the one reader
    of prediction records (the select stage's too).

    Args:
      pred_dir: A complete prediction folder.
      decode_image: Decode the image to uint8 [H, W, C] (`decode`); else
        keep the encoded bytes. Not with `batch_size`.
      channels: Channels to decode to; None: the source's (0 if unknown).
      info: `check_predictions(pred_dir)` when the caller has it (not
        listed again).
      blocks: The blocks to read, in this order (default: all).
      batch_size: Parse whole batches of this many records at once (the
        select stage's stream); None: one record per element.

    Returns:
      A tf.data.Dataset of {"image", "probs": float32 [num_classes],
      "label": int64, "confidence": float32, "index": int64}, each with a
      leading batch dimension when `batch_size` is given.

    Raises:
      ValueError: for decode_image with batch_size.
    """
    if batch_size and decode_image:
        raise ValueError("Expected decode_image=False with batch_size. "
                         f"Received: batch_size={batch_size}")
    info = info or check_predictions(pred_dir)
    files = [storage.join(pred_dir, records_name(b))
             for b in (info["blocks"] if blocks is None else blocks)]
    num_classes = info["num_classes"]
    if channels is None:
        channels = info.get("channels") or 0

    def parse(serialized):
        parse_fn = tf.io.parse_example if batch_size else (
            tf.io.parse_single_example)
        features = parse_fn(serialized, PREDICTION_FEATURES)
        features["probs"] = decode_float16(features["probs"], num_classes)
        if decode_image:
            features["image"] = decode(features["image"], channels)
        return features

    dataset = tf.data.TFRecordDataset(files, buffer_size=1 << 20)
    if batch_size:
        return dataset.batch(batch_size).map(parse)
    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)


def _read_folder_json(folder, name, expected, argument):
    """The JSON file that marks a folder as written by a stage.

    Args:
      folder: The folder, local or gs://.
      name: The marker's file name.
      expected: What the folder should be, for the message.
      argument: The argument (or flag) that named the folder.

    Returns:
      The parsed JSON.

    Raises:
      FileNotFoundError: naming the folder, if the marker is missing.
    """
    path = storage.join(folder, name)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Expected {expected} (with {name}). "
                                f"Received: {argument}={folder}")
    return storage.read_json(path)


def selected_files(path):
    """The record files of a selected set (a folder, a file or a glob)."""
    if tf.io.gfile.isdir(path):
        info = _read_folder_json(path, SELECTION_FILE,
                                 "a finished selection folder", "path")
        return [storage.join(path, name) for name in info["files"]], info
    files = sorted(tf.io.gfile.glob(path))
    if not files:
        raise FileNotFoundError(
            "Expected a selection folder, a selected-*.tfrecord file or a glob "
            f"matching some. Received: path={path}")
    return files, None


def selected_dataset(path, num_classes=None, channels=None, cycle_length=8,
                     shuffle_files=False, seed=None, deterministic=True):
    """The student's reader of a selected pseudo-labeled set.

    Shuffling the records is the caller's job (a shuffle buffer after this);
    `shuffle_files` only reorders the files before interleaving them.

    Args:
      path: A selection folder (written by `select`), one of its record files
        or a glob of them.
      num_classes: Length of the targets; read from selection.json when
        `path` is a folder, needed for a static shape otherwise.
      channels: Channels to decode the PNG to (3: RGB, 1: grey); None: the
        source's (from selection.json; 0, i.e. as encoded, if unknown).
      cycle_length: Number of files read at once (interleave).
      shuffle_files: Shuffle the file order (seeded by `seed`).
      seed: Seed of the file shuffle.
      deterministic: Keep the interleave order deterministic.

    Returns:
      An unbatched tf.data.Dataset of {"image": uint8 [H, W, C],
      "target": float32 [num_classes]}; soft targets are renormalised to sum
      to 1 in float32.

    Raises:
      FileNotFoundError: if `path` holds no finished selection.
    """
    files, info = selected_files(path)
    if info is not None:
        if num_classes is not None and num_classes != info["num_classes"]:
            raise ValueError(
                f"Expected num_classes={info['num_classes']} (from "
                f"{SELECTION_FILE}). Received: num_classes={num_classes}")
        num_classes = info["num_classes"]
        if channels is None:
            channels = info.get("channels") or 0
    channels = channels or 0
    if not files:
        raise ValueError(
            f"Expected a selection with at least one file. Received: {path}")

    def parse(serialized):
        features = tf.io.parse_single_example(serialized, SELECTED_FEATURES)
        target = decode_float16(features["target"], num_classes)
        # float16 storage loses ~5e-4 relative; renormalising in float32
        # restores an exact probability vector (a no-op for one-hot).
        target = target / tf.reduce_sum(target, axis=-1, keepdims=True)
        image = decode(features["image"], channels)
        return {"image": image, "target": target}

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        dataset = (dataset.shuffle(len(files)) if seed is None else
                   streams.seeded_shuffle(dataset, len(files), seed, seed))
    dataset = dataset.interleave(
        tf.data.TFRecordDataset, cycle_length=max(1, min(cycle_length,
                                                         len(files))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=deterministic)


def is_selected_file(name):
    """True for the final name of a selected record file."""
    return bool(_SELECTED_RE.match(name.rsplit("/", 1)[-1]))
