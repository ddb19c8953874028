"""TFRecord shards of tf.train.Example as a data set (`tfrecord:PATTERN`).

The format of ImageNet as the official EfficientNet / Noisy Student code
reads it (tensorflow/tpu `models/official/efficientnet/imagenet_input.py`,
written by its `tools/datasets/imagenet_to_gcs.py`): one serialized
tf.train.Example per image, the encoded image under "image/encoded" and
the class under "image/class/label". Those labels run 1..1000 (0 is the
unused "background" class of the old Inception code); the source never
guesses that: `first_label=1` says so (label = stored value - 1), and
without it the stored values are the labels, so such shards fail the
"labels 0..K-1, each with an image" check naming the option.

Spec: tfrecord:PATTERN[,OPTION=VALUE...], PATTERN a local or gs:// glob
(`tf.io.gfile.glob`), shards read in sorted name order, records in file
order. Options (after the pattern, comma separated):

    image_key=KEY    the bytes feature of the encoded image (image/encoded)
    label_key=KEY    the int64 feature of the class (image/class/label);
                     an unlabeled source never reads it (its records need
                     none)
    first_label=N    the stored value of class 0 (default 0; 1 for the
                     ImageNet shards above)
    names=FILE       class names in label order, one a line (else none)

The shards are streamed (never held in memory). Before any work they are
checked once by `scan_records`, as a folder's files are (`image_scan`):
every record is parsed and its image decoded with `preprocess.decode_image`'s
decode op; a record that is not a tf.train.Example, lacks the image (or,
labeled, the label), or whose image does not decode is skipped, named
"SHARD[N]" (N its position in the shard) in the log and in the command's
`image_scan.REPORT_FILE`, and not counted; a shard that cannot be read to
its end (truncated: DataLossError) keeps its readable records and is named
"SHARD[N...]". The same entry of REPORT_FILE is the cache of the count:
reused while every shard's path, size and modification time (names only
on gs://) and the TensorFlow version are unchanged, so the per-shard
record counts a Beam worker needs to find its block are read from it
instead of from the shards.

A record's image bytes are passed through unchanged ("encoded", with
`keep_encoded`) to the prediction records.
"""

import bisect
import dataclasses
import hashlib
import json
import time

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.data import image_scan
from noisy_student.data import preprocess
from noisy_student.data import spec_options

DEFAULT_IMAGE_KEY = "image/encoded"
DEFAULT_LABEL_KEY = "image/class/label"
OPTIONS = ("image_key", "label_key", "first_label", "names")
_SCAN_VERSION = 1  # Bump when what the scan accepts changes.
_READ_BUFFER = 8 << 20  # Bytes of a shard read at once (fewer gs:// calls).


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """Where a record keeps its image and label, and how labels count.

    Attributes:
      image_key: The bytes feature holding the encoded image.
      label_key: The int64 feature holding the class.
      first_label: The stored value of class 0 (1 for ImageNet's shards).
      names: A file of class names, one a line, or None.
    """
    image_key: str = DEFAULT_IMAGE_KEY
    label_key: str = DEFAULT_LABEL_KEY
    first_label: int = 0
    names: str | None = None


def parse(spec, rest):
    """(pattern, `RecordFormat`) of a tfrecord spec's text after "tfrecord:".

    Args:
      spec: The whole spec (named in errors).
      rest: PATTERN[,OPTION=VALUE...].

    Raises:
      ValueError: for an unknown option or a non-integer first_label.
    """
    pattern, options = spec_options.split(spec, rest, OPTIONS,
                                          "the pattern")
    if "first_label" in options:
        try:
            options["first_label"] = int(options["first_label"])
        except ValueError:
            raise ValueError(
                f"Expected an integer first_label in {spec}. Received: "
                f"first_label={options['first_label']}") from None
    return pattern, RecordFormat(**options)


@dataclasses.dataclass(frozen=True)
class RecordScan:
    """What a set of TFRecord shards holds for the pipeline.

    Attributes:
      pattern: The glob.
      shards: The shards' paths, sorted.
      counts: Records readable in each shard (skipped ones included).
      skipped: {"SHARD[N]": reason} of records left out, in shard order.
      label_counts: Records per label (labels after first_label), labeled
        scans only, else None.
      key: Hash of the shard listing, the format and the decoder.
      cached: Whether this came from an earlier scan (REPORT_FILE).
      report: The REPORT_FILE written or read, or None.
    """
    pattern: str
    shards: tuple
    counts: tuple
    skipped: dict
    label_counts: tuple | None
    key: str
    cached: bool = False
    report: str | None = None

    @property
    def folder(self):
        """The name `image_scan.UndecodableImagesError` shows."""
        return self.pattern

    @property
    def num_records(self):
        """Records the source yields (readable, not skipped)."""
        return sum(self.counts) - len(self.skipped)

    def summary(self):
        """"N decoded, M skipped" over the shards."""
        return (f"{len(self.shards)} shards, {self.num_records} decoded, "
                f"{len(self.skipped)} skipped")

    def examples(self, limit=image_scan.SHOWN):
        """The first `limit` "SHARD[N]: reason" lines."""
        return [f"{name}: {reason}"
                for name, reason in list(self.skipped.items())[:limit]]

    def bad_positions(self):
        """{shard index: sorted record positions left out}; a truncated
        shard's lost tail is not among them (its count ends before it)."""
        index = {path: i for i, path in enumerate(self.shards)}
        bad = {}
        for name in self.skipped:
            path, _, position = name[:-1].rpartition("[")
            if position.endswith("..."):
                continue
            bad.setdefault(index[path], []).append(int(position))
        return {i: sorted(p) for i, p in bad.items()}


def scan_records(pattern, fmt, labeled, report_dir=None,
                 log_every_s=image_scan.LOG_EVERY_S):
    """Lists the shards of `pattern` and checks every record once.

    Args:
      pattern: A local or gs:// glob of TFRecord files.
      fmt: The `RecordFormat`.
      labeled: Whether records need a label (and labels are counted).
      report_dir: Folder of `image_scan.REPORT_FILE` (read as a cache, then
        written); None scans without writing.
      log_every_s: Seconds between progress lines.

    Returns:
      A `RecordScan`; its summary is logged (WARNING with the first
      skipped records when some were skipped).

    Raises:
      FileNotFoundError: when the pattern matches no file.
    """
    shards = tuple(sorted(tf.io.gfile.glob(pattern)))
    if not shards:
        raise FileNotFoundError(
            f"Expected TFRecord files matching the pattern. Received: "
            f"pattern={pattern} matches none")
    name = f"tfrecord:{pattern}" + (" (labeled)" if labeled else "")
    key = _listing_key(shards, fmt, labeled)
    entry = image_scan.read_entry(report_dir, name)
    if entry is not None and entry.get("key") == key:
        scan = RecordScan(pattern, shards, tuple(entry["counts"]),
                          dict(entry["skipped"]),
                          None if entry.get("label_counts") is None
                          else tuple(entry["label_counts"]), key, cached=True,
                          report=_report(report_dir))
    else:
        scan = _scan(pattern, shards, fmt, labeled, key, log_every_s)
        if report_dir:
            path = image_scan.write_entry(report_dir, name, {
                "key": key, "files": sum(scan.counts),
                "decoded": scan.num_records, "skipped": scan.skipped,
                "counts": list(scan.counts),
                "label_counts": (None if scan.label_counts is None
                                 else list(scan.label_counts)),
                "decoder": _decoder_name(fmt, labeled),
                "scanned": time.strftime("%Y-%m-%d %H:%M:%S")})
            scan = dataclasses.replace(scan, report=path)
    _log_summary(scan)
    return scan


def _report(report_dir):
    return f"{str(report_dir).rstrip('/')}/{image_scan.REPORT_FILE}"


def _decoder_name(fmt, labeled):
    return (f"tfrecord scan version {_SCAN_VERSION}, {fmt}, labeled="
            f"{labeled}, preprocess.decode_image (TensorFlow "
            f"{tf.__version__})")


def _listing_key(shards, fmt, labeled):
    """Hash of every shard's path with its size and mtime (paths only for
    remote ones), the format and the decoder."""
    rows = []
    for path in shards:
        if "://" in path:
            rows.append(path)
            continue
        stat = tf.io.gfile.stat(path)
        rows.append([path, stat.length, stat.mtime_nsec])
    text = json.dumps([_decoder_name(fmt, labeled), rows])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _features(fmt, labeled):
    features = {fmt.image_key: tf.io.FixedLenFeature([], tf.string)}
    if labeled:
        features[fmt.label_key] = tf.io.FixedLenFeature([], tf.int64)
    return features


def _count(path):
    """(records readable in the shard, None or the read error that ended
    it early)."""
    try:
        return int(tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER)
                   .reduce(np.int64(0), lambda n, _: n + 1)), None
    except tf.errors.DataLossError as e:
        readable = tf.data.TFRecordDataset(path).map(
            lambda r: tf.constant(1, tf.int64)).ignore_errors()
        return int(readable.reduce(np.int64(0), lambda n, x: n + x)), e


def _scan(pattern, shards, fmt, labeled, key, log_every_s):
    start = time.time()
    counts, skipped = [], {}
    for path in shards:
        count, error = _count(path)
        counts.append(count)
        if error is not None:
            skipped[f"{path}[{count}...]"] = (
                f"unreadable from record {count} on: "
                f"{image_scan._clean(error.message)}")  # pylint: disable=protected-access
    features = _features(fmt, labeled)

    def check(shard, position, serialized):
        parsed = tf.io.parse_single_example(serialized, features)
        image = tf.io.decode_image(parsed[fmt.image_key],
                                   **preprocess.DECODE_ARGS)
        label = (parsed[fmt.label_key] - fmt.first_label if labeled
                 else tf.constant(0, tf.int64))
        # The shape output makes the decode run (else it is pruned).
        return shard, position, label, tf.shape(image)[0]

    def records(shard, path, count):
        return tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).take(
            count).enumerate().map(lambda i, r: (shard, i, r))

    dataset = tf.data.Dataset.from_tensor_slices(
        (np.arange(len(shards), dtype=np.int64), list(shards),
         np.asarray(counts, np.int64))).interleave(
             records, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE,
             deterministic=False).map(
                 check, num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=False).ignore_errors().map(
                     lambda s, i, label, _: (s, i, label)).batch(1024)
    good = [np.zeros(count, bool) for count in counts]
    label_counts = np.zeros(0, np.int64)
    last = time.time()
    done = 0
    for shard, position, label in dataset.as_numpy_iterator():
        for s in np.unique(shard):
            good[s][position[shard == s]] = True
        if labeled:
            if label.min() < 0:
                raise ValueError(
                    f"Expected labels >= first_label={fmt.first_label} in "
                    f"tfrecord:{pattern}. Received: a stored label "
                    f"{int(label.min()) + fmt.first_label}")
            counted = np.bincount(label)
            if len(counted) > len(label_counts):
                label_counts = np.pad(label_counts,
                                      (0, len(counted) - len(label_counts)))
            label_counts[:len(counted)] += counted
        done += len(shard)
        if time.time() - last >= log_every_s:
            last = time.time()
            logging.info("Scanning tfrecord:%s: %d of %d records checked",
                         pattern, done, sum(counts))
    for s, path in enumerate(shards):
        for position in np.nonzero(~good[s])[0]:
            skipped[f"{path}[{position}]"] = _reason(path, int(position),
                                                     features, fmt)
    skipped = dict(sorted(skipped.items(), key=lambda item: _order(
        item[0], shards)))
    logging.info("Scanned tfrecord:%s in %.1f s (%d records)", pattern,
                 time.time() - start, sum(counts))
    return RecordScan(pattern, shards, tuple(counts), skipped,
                      tuple(int(c) for c in label_counts) if labeled
                      else None, key)


def _order(name, shards):
    path, _, position = name[:-1].rpartition("[")
    return shards.index(path), int(position.rstrip("."))


def _reason(path, position, features, fmt):
    """Why record `position` of `path` is left out, one line."""
    serialized = next(iter(tf.data.TFRecordDataset(path).skip(position)))
    try:
        parsed = tf.io.parse_single_example(serialized, features)
    except tf.errors.OpError as e:
        example = tf.train.Example()
        try:
            example.ParseFromString(serialized.numpy())
        except Exception:  # pylint: disable=broad-except
            return "not a tf.train.Example"
        missing = [k for k in features if k not in example.features.feature]
        if missing:
            return f"no feature {missing[0]}"
        return image_scan._clean(e.message)  # pylint: disable=protected-access
    data = parsed[fmt.image_key]
    if not len(data.numpy()):
        return f"empty {fmt.image_key} (0 bytes)"
    try:
        tf.io.decode_image(data, **preprocess.DECODE_ARGS)
    except tf.errors.OpError as e:
        return image_scan._clean(e.message)  # pylint: disable=protected-access
    return "unreadable (a passing read error)"


def _log_summary(scan):
    head = f"tfrecord:{scan.pattern}: {scan.summary()}"
    if scan.cached:
        head += " (scan reused)"
    if not scan.skipped:
        logging.info("%s", head)
        return
    lines = scan.examples()
    if len(scan.skipped) > len(lines):
        lines.append(f"... and {len(scan.skipped) - len(lines)} more")
    if scan.report:
        lines.append(f"listed in {scan.report}")
    logging.warning("%s\n  %s", head, "\n  ".join(lines))


def read_labels(scan, fmt):
    """The labels of the records the source yields, in order.

    One pass over the shards, parsing the label feature only.

    Args:
      scan: The shards' `RecordScan`.
      fmt: The `RecordFormat`.

    Returns:
      int64 [N] labels, after first_label.
    """
    dataset = _records(scan, 0, scan.num_records).map(
        lambda r: tf.io.parse_single_example(
            r, {fmt.label_key: tf.io.FixedLenFeature([], tf.int64)})[
                fmt.label_key] - fmt.first_label,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.concatenate([b for b in dataset.batch(65536)
                           .as_numpy_iterator()] or [np.zeros(0, np.int64)])


def _records(scan, start, stop):
    """The serialized records start..stop-1 (counting only the records the
    source yields), read from the shards that hold them.

    Each shard is read from its first needed record (tf.data skips the
    ones before it without parsing them) to its last; skipped records are
    filtered out by position.
    """
    bad = scan.bad_positions()
    kept = [count - len(bad.get(i, ())) for i, count in
            enumerate(scan.counts)]
    ends = np.cumsum(kept)
    pieces = []
    first = bisect.bisect_right(ends.tolist(), start)
    for shard in range(first, len(scan.shards)):
        before = int(ends[shard] - kept[shard])
        if before >= stop:
            break
        lo, hi = max(start - before, 0), min(stop - before, kept[shard])
        if hi <= lo:
            continue
        positions = bad.get(shard, [])
        raw_lo, raw_hi = _raw(lo, positions), _raw(hi - 1, positions) + 1
        pieces.append((scan.shards[shard], raw_lo, raw_hi,
                       [p for p in positions if raw_lo <= p < raw_hi]))
    datasets = [_shard_piece(*piece) for piece in pieces]
    if not datasets:
        return tf.data.Dataset.from_tensor_slices(tf.constant([], tf.string))
    dataset = datasets[0]
    for more in datasets[1:]:
        dataset = dataset.concatenate(more)
    return dataset


def _raw(k, bad_positions):
    """The shard position of its k-th (0-based) kept record."""
    position = k
    for bad in bad_positions:  # Sorted: each bad one at or before shifts.
        if bad <= position:
            position += 1
        else:
            break
    return position


def _shard_piece(path, lo, hi, bad):
    dataset = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).skip(
        lo).take(hi - lo)
    if not bad:
        return dataset
    drop = tf.constant(bad, tf.int64)
    return dataset.enumerate(lo).filter(
        lambda i, r: tf.logical_not(tf.reduce_any(tf.equal(drop, i)))).map(
            lambda i, r: r)


def dataset(scan, fmt, start=0, stop=None, labels=None, channels=None,
            keep_encoded=False, keep=None):
    """The records start..stop-1 as images, streamed in order.

    Args:
      scan: The shards' `RecordScan`.
      fmt: The `RecordFormat`.
      start, stop: The range of records (among those the source yields;
        stop None: to the end).
      labels: Yield "label" (int32, after first_label).
      channels: Channels to decode to (1 or 3; None: 3).
      keep_encoded: Also yield the record's image bytes as "encoded".
      keep: An optional bool [N] mask over all the source's records (a
        `sources.Subset`'s part); the range counts the kept ones only.

    Returns:
      A dataset of {"image": uint8 [H, W, C], "label"?, "encoded"?}.
    """
    features = _features(fmt, labels)
    if keep is not None:
        # Subsets are small parts of labeled sets: filter the whole stream.
        chosen = tf.constant(keep)
        records = _records(scan, 0, scan.num_records).enumerate().filter(
            lambda i, r: tf.gather(chosen, i)).map(lambda i, r: r)
        stop = int(np.sum(keep)) if stop is None else stop
        records = records.skip(start).take(stop - start)
    else:
        stop = scan.num_records if stop is None else stop
        records = _records(scan, start, stop)

    def decode(serialized):
        parsed = tf.io.parse_single_example(serialized, features)
        data = parsed[fmt.image_key]
        image = preprocess.decode_image(data, channels=channels or 3)
        image.set_shape([None, None, channels or 3])
        out = {"image": image}
        if keep_encoded:
            out["encoded"] = data
        if labels:
            out["label"] = tf.cast(parsed[fmt.label_key] - fmt.first_label,
                                   tf.int32)
        return out

    return records.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)


def read_names(fmt, spec):
    """The class names of `fmt.names` (one a line), or None.

    Args:
      fmt: The `RecordFormat`.
      spec: The source's spec (named in errors).

    Raises:
      FileNotFoundError: naming the file and the spec.
    """
    if not fmt.names:
        return None
    if not tf.io.gfile.exists(fmt.names):
        raise FileNotFoundError(
            f"Expected a file of class names (names=) for {spec}. Received: "
            f"names={fmt.names}, no such file")
    with tf.io.gfile.GFile(fmt.names) as f:
        return tuple(line.strip() for line in f.read().splitlines()
                     if line.strip())
