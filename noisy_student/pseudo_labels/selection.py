"""The select stage: filter and balance the teacher's pseudo-labels.

Step 3 of Noisy Student: drop images whose top confidence is below
`min_confidence` (0.3 in the paper: mostly out-of-domain images), keep per
class the `per_class` (K) most confident (130,000 on ImageNet), and duplicate
the images of classes with fewer than K up to K: each kept image of a class
with n < K images gets K/n copies, stochastically rounded (floor(K/n) copies,
plus one more with probability frac(K/n), drawn from a hash of (seed, index)
so the result does not depend on file order or on the machine).

The thresholds come from the prediction histograms alone (no pass over the
records): per class c, the bins are scanned from the most confident down, and
the boundary bin b*_c is the one where the running count first reaches K.
Every image of c in a higher bin is kept, plus exactly m_c = K - (count
above b*_c) images of bin b*_c: the FIRST m_c of them in global index order
(bins are 1/num_bins wide, 0.001 by default, so these tie-broken images differ
from the strictly most confident ones by less than one bin). This makes the
kept counts exact, and the records are read once, streaming, in index order.

`min_confidence` is applied at bin resolution: an image passes if its bin is
at least ceil(min_confidence * num_bins), i.e. min_confidence is rounded up
to the next bin edge (0.3 is an edge of the default 1000 bins, so it is
exact there); the report gives the effective value.

Targets (stored as float16, see `noisy_student.pseudo_labels.records`):
  soft: p^(1/T) renormalised (computed in log space). T = 1 keeps the
        teacher's probabilities, T < 1 sharpens them and T -> 0 approaches
        the one-hot argmax; T > 1 flattens them.
  hard: the one-hot argmax.

The selected records are written to `num_files` files, each to a temporary
name renamed at the end; copy j of an image goes to file (h + j) mod
num_files for a per-image hash h, so duplicates land in different files and
an interleaved reader does not see them back to back. selection.json, written
last, marks a finished selection; report.json / report.md / report.png give
every count (with the class names when the prediction folder records them,
class_names.json), and contact_sheets/ shows the most and least confident
kept images of each class (both written by `selection_report`).

Size: `select(config)` and its small steps, the histogram plan and the
per-record math (hash-seeded copies, targets) are one streaming pass over
the records; the report is apart (`selection_report`).
"""

import dataclasses
import math
import time

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.model import info as model_info
from noisy_student.pseudo_labels import records as pl
from noisy_student.pseudo_labels import selection_report
from noisy_student.utils import storage

LABEL_TYPES = ("soft", "hard")
MAX_OPEN_FILES = 256


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Settings of the select stage.

    Attributes:
      pred_dir: A complete prediction folder (from the predict stage).
      out_dir: The selection folder to write.
      per_class: K, images kept per class (the paper's 130,000 on
        ImageNet); None keeps every confident image once (no balancing).
      min_confidence: Images whose top probability is below this are
        dropped (the paper's 0.3).
      label_type: "soft" (probabilities) or "hard" (one-hot) targets.
      temperature: T of the soft targets p^(1/T) (1 keeps the teacher's).
      seed: Seed of the stochastic rounding of the duplication.
      duplicate: Duplicate classes with fewer than K images up to K.
      num_files: Number of output files; None sizes them to about
        `records_per_file` records each.
      records_per_file: Target records per output file when num_files is
        None.
    """
    pred_dir: str
    out_dir: str
    per_class: int | None = None
    min_confidence: float = 0.3
    label_type: str = "soft"
    temperature: float = 1.0
    seed: int = 0
    duplicate: bool = True
    num_files: int | None = None
    records_per_file: int = 4096

    def __post_init__(self):
        # Checked when built, so the pipeline refuses a bad value before
        # the teacher trains, not in the select stage hours later.
        per_class = self.per_class
        if per_class is not None and (
                not isinstance(per_class, (int, np.integer)) or per_class < 1):
            raise ValueError(
                "Expected per_class to be a positive integer or None. "
                f"Received: per_class={per_class!r}")
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError(
                "Expected 0 <= min_confidence < 1. Received: "
                f"min_confidence={self.min_confidence!r}")
        if self.label_type not in LABEL_TYPES:
            raise ValueError(
                f"Expected label_type in {LABEL_TYPES}. Received: "
                f"label_type={self.label_type!r}")
        if not self.temperature > 0:
            raise ValueError("Expected temperature > 0. Received: "
                             f"temperature={self.temperature!r}")
        if self.num_files is not None and self.num_files < 1:
            raise ValueError("Expected num_files >= 1 or None. Received: "
                             f"num_files={self.num_files}")
        if self.records_per_file < 1:
            raise ValueError("Expected records_per_file >= 1. Received: "
                             f"records_per_file={self.records_per_file}")


@dataclasses.dataclass(frozen=True)
class SelectionPlan:
    """Per-class decisions computed from the histograms alone.

    Attributes (arrays have one entry per class):
      min_bin: First bin that passes min_confidence.
      predicted: Images whose argmax is the class (any confidence).
      confident: Those with confidence >= min_confidence.
      full_bin: Every image in a bin >= full_bin is kept.
      boundary_bin: Bin from which only `boundary_take` images are kept
        (-1 for none).
      boundary_take: Images kept from `boundary_bin` (first in index order).
      kept_unique: Images kept (exact).
      duplication: Expected copies per kept image (K/n, or 1).
      threshold: Lower confidence edge of the lowest kept bin (NaN when
        nothing is kept).
    """
    num_bins: int
    min_bin: int
    predicted: np.ndarray
    confident: np.ndarray
    full_bin: np.ndarray
    boundary_bin: np.ndarray
    boundary_take: np.ndarray
    kept_unique: np.ndarray
    duplication: np.ndarray
    threshold: np.ndarray

    @property
    def expected_total(self):
        """Expected kept images per class, copies included."""
        return self.kept_unique * self.duplication


def min_bin_of(min_confidence, num_bins):
    """The first histogram bin that passes `min_confidence` (rounded up).

    Args:
      min_confidence: Threshold in [0, 1].
      num_bins: Bins over [0, 1] of the prediction histograms.

    Returns:
      int in [0, num_bins].
    """
    # The epsilon keeps an exact edge like 0.3 * 1000 = 300.00000000000006
    # on bin 300 instead of 301.
    return int(min(num_bins, max(0, math.ceil(min_confidence * num_bins
                                              - 1e-6))))


def plan_selection(histogram, per_class, min_confidence, duplicate=True):
    """Computes per-class thresholds, counts and duplication factors.

    Args:
      histogram: int [num_classes, num_bins] counts of images per argmax
        class and confidence bin (summed over the prediction blocks).
      per_class: K, or None for no cap and no duplication.
      min_confidence: Minimum top probability.
      duplicate: Duplicate classes with fewer than K images up to K.

    Returns:
      A `SelectionPlan`.
    """
    histogram = np.asarray(histogram, np.int64)
    num_classes, num_bins = histogram.shape
    min_bin = min_bin_of(min_confidence, num_bins)
    predicted = histogram.sum(axis=1)
    confident = histogram[:, min_bin:].sum(axis=1)
    full_bin = np.full(num_classes, min_bin, np.int64)
    boundary_bin = np.full(num_classes, -1, np.int64)
    boundary_take = np.zeros(num_classes, np.int64)
    kept = confident.copy()
    duplication = np.where(confident > 0, 1.0, 0.0)
    threshold = np.where(confident > 0, min_bin / num_bins, np.nan)
    if per_class is not None:
        # Running counts from the most confident bin down.
        from_top = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]
        for c in range(num_classes):
            if confident[c] > per_class:
                # Highest bin b whose count of images in bins >= b reaches K.
                b = int(np.nonzero(from_top[c] >= per_class)[0][-1])
                above = int(from_top[c, b + 1]) if b + 1 < num_bins else 0
                full_bin[c] = b + 1
                boundary_bin[c] = b
                boundary_take[c] = per_class - above
                kept[c] = per_class
                threshold[c] = b / num_bins
            elif confident[c] > 0 and duplicate:
                duplication[c] = per_class / confident[c]
    return SelectionPlan(num_bins, min_bin, predicted, confident, full_bin,
                         boundary_bin, boundary_take, kept, duplication,
                         threshold)


def hash_uniform(seed, indices, stream=0):
    """Uniform [0, 1) numbers from a hash of (seed, index, stream).

    A counter-based generator (splitmix64's finaliser): the draw of an image
    depends only on its index and the seed, not on the order of reading.

    Args:
      seed: Integer seed.
      indices: int array of global image indices.
      stream: Distinguishes independent uses of the same (seed, index).

    Returns:
      float64 array shaped like `indices`.
    """
    mask = (1 << 64) - 1
    x = np.asarray(indices, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64((seed * 0xD1B54A32D192ED03 + stream * 0x8CB92BA72F3D8DD7
                          + 0x632BE59BD9B4E019) & mask))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def stochastic_copies(duplication, indices, seed):
    """Copies per image: floor(d) plus one with probability frac(d).

    Args:
      duplication: float array, each image's expected copies d.
      indices: Global indices of the images (the randomness comes from them).
      seed: Integer seed.

    Returns:
      int64 array of copies (mean d over seeds).
    """
    duplication = np.asarray(duplication, np.float64)
    whole = np.floor(duplication)
    extra = hash_uniform(seed, indices) < duplication - whole
    return (whole + extra).astype(np.int64)


def make_targets(probs, labels, label_type, temperature):
    """Training targets from the teacher's probabilities.

    Args:
      probs: float [N, num_classes] probabilities.
      labels: int [N] argmax classes.
      label_type: "soft" or "hard".
      temperature: T > 0; soft targets are p^(1/T) renormalised.

    Returns:
      float32 [N, num_classes] targets, each summing to 1.
    """
    probs = np.asarray(probs, np.float64)
    if label_type == "hard":
        targets = np.zeros(probs.shape, np.float32)
        targets[np.arange(len(labels)), labels] = 1.0
        return targets
    if temperature == 1.0:
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    # Log space: p^(1/T) under- or overflows for small T in linear space.
    with np.errstate(divide="ignore"):
        logits = np.log(probs) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def total_histogram(pred_dir, info):
    """Sums the histograms of all blocks of a complete prediction folder.

    Args:
      pred_dir: The prediction folder.
      info: Its predict_info.json contents (num_classes, num_bins, blocks).

    Returns:
      (int64 [K, num_bins] counts, number of records).
    """
    total = np.zeros((info["num_classes"], info["num_bins"]), np.int64)
    num_records = 0
    for block in info["blocks"]:
        counts, records = pl.read_histogram(
            storage.join(pred_dir, pl.histogram_name(block)))
        total += counts
        num_records += records
    if num_records != info["num_images"]:
        raise ValueError(
            f"Expected the histograms of {pred_dir} to count "
            f"{info['num_images']} images (the source's size). Received: "
            f"{num_records}")
    return total


def _record_batches(pred_dir, info, batch_size=512, blocks=None):
    """Streams the prediction records of `blocks` (default: all) in index
    order, in numpy batches."""
    dataset = pl.prediction_dataset(pred_dir, decode_image=False, info=info,
                                    blocks=blocks, batch_size=batch_size)
    for batch in dataset.prefetch(2):
        yield {key: value.numpy() for key, value in batch.items()}


def select(config, num_classes=None):
    """Filters and balances the predictions, writes the selected set.

    Args:
      config: A `SelectConfig` (validated when built).
      num_classes: Expected class count (checked against the predictions);
        None takes the predictions'.

    Returns:
      The report as a dict (also written to out_dir/report.json).

    Raises:
      ValueError: if every image is filtered out, for incomplete predictions
        or another class count.
      FileNotFoundError: if pred_dir is not a prediction folder.
    """
    start = time.time()
    info, class_names, histogram = read_predictions(config, num_classes)
    plan = checked_plan(config, histogram, info)
    names = output_names(config, plan)
    clear_selection(config.out_dir)
    kept = _write_selection(config, plan, info, names)
    return finish(config, info, class_names, histogram, plan, kept, start)


def finish(config, info, class_names, histogram, plan, kept, start):
    """Checks what was written against the plan, removes stale files,
    writes the report and, last, selection.json.

    Args:
      config: The `SelectConfig`.
      info: The prediction folder's description (`records.check_predictions`).
      class_names: Names in label order, or None.
      histogram: int64 [K, num_bins], the summed block histograms.
      plan: The `SelectionPlan`.
      kept: The `Kept` of the whole selection (every block, in order).
      start: time.time() when the stage began (for the report's seconds).

    Returns:
      The report as a dict.

    Raises:
      ValueError: when the records kept differ from the plan's counts.
    """
    names = output_names(config, plan)
    num_files = len(names)
    marker = storage.join(config.out_dir, pl.SELECTION_FILE)
    if not np.array_equal(kept.unique, plan.kept_unique):
        # The histograms and the records disagree: a corrupt folder.
        raise ValueError(
            f"Expected the records of {config.pred_dir} to match its "
            f"histograms. Received: kept {kept.unique.tolist()} images per "
            f"class, planned {plan.kept_unique.tolist()}")
    # Files of an earlier selection with another file count are stale.
    for name in tf.io.gfile.listdir(config.out_dir):
        if pl.is_selected_file(name) and name not in names:
            tf.io.gfile.remove(storage.join(config.out_dir, name))
    report = selection_report.selection_report(
        config, plan, kept, info, num_files,
                               class_names)
    report["seconds"] = time.time() - start
    selection_report.write(config.out_dir, report, histogram, plan)
    storage.write_json(marker, {
        "num_classes": info["num_classes"], "channels": info.get("channels"),
        "files": names,
        "file_records": kept.file_counts.tolist(),
        "num_records": int(kept.total.sum()),
        "unique_images": int(kept.unique.sum()),
        "label_type": config.label_type, "temperature": config.temperature})
    logging.info("select: kept %d unique images, %d with copies, in %d files",
                 kept.unique.sum(), kept.total.sum(), num_files)
    return report


def read_predictions(config, num_classes=None):
    """The prediction folder's description, class names and histogram.

    Args:
      config: The `SelectConfig` (its pred_dir is read).
      num_classes: The expected class count, or None.

    Returns:
      (info, class names or None, [K, num_bins] int64 histogram) of
      config.pred_dir, checked complete and of `num_classes` classes.

    Raises:
      ValueError, FileNotFoundError: as `records.check_predictions`, or
        for another class count.
    """
    pred_dir = config.pred_dir
    info = pl.check_predictions(pred_dir)
    if num_classes is not None and num_classes != info["num_classes"]:
        raise ValueError(
            f"Expected num_classes={info['num_classes']} as in the "
            f"predictions of {pred_dir}. Received: num_classes={num_classes}")
    class_names = model_info.read_class_names(pred_dir)
    if class_names is not None and len(class_names) != info["num_classes"]:
        logging.warning("select: %d class names for %d classes in %s; "
                        "showing ids", len(class_names), info["num_classes"],
                        pred_dir)
        class_names = None
    return info, class_names, total_histogram(pred_dir, info)


def checked_plan(config, histogram, info):
    """The `SelectionPlan` of the summed histograms.

    Args:
      config: The `SelectConfig`.
      histogram: int64 [K, num_bins] counts.
      info: The prediction folder's description (its num_images).

    Returns:
      The `SelectionPlan`.

    Raises:
      ValueError: if it keeps no image.
    """
    plan = plan_selection(histogram, config.per_class, config.min_confidence,
                          config.duplicate)
    if plan.kept_unique.sum() == 0:
        top = np.nonzero(histogram.sum(axis=0))[0]
        best = (top.max() + 1) / plan.num_bins if top.size else 0.0
        raise ValueError(
            "Expected at least one image with confidence >= min_confidence. "
            f"Received: min_confidence={config.min_confidence} (effective "
            f"{plan.min_bin / plan.num_bins}); all {info['num_images']} "
            f"images are below it (highest confidence < {best:.3f})")
    return plan


def output_names(config, plan):
    """The output files' names: config.num_files of them, or enough for
    about `records_per_file` records each (at most MAX_OPEN_FILES, since
    all are open at once).

    Args:
      config: The `SelectConfig`.
      plan: Its `SelectionPlan`.

    Returns:
      ["selected-00000-of-0000M.tfrecord", ...].
    """
    num_files = config.num_files
    if not num_files:
        expected_total = float(plan.expected_total.sum())
        num_files = int(min(MAX_OPEN_FILES, max(
            1, math.ceil(expected_total / config.records_per_file))))
    return [pl.selected_name(i, num_files) for i in range(num_files)]


def clear_selection(out_dir):
    """Creates out_dir, unmarks a previous selection there (a half-replaced
    selection must not look finished) and removes temporary files.

    Args:
      out_dir: The selection folder.

    Returns:
      The path of the marker (selection.json).
    """
    tf.io.gfile.makedirs(out_dir)
    marker = storage.join(out_dir, pl.SELECTION_FILE)
    if tf.io.gfile.exists(marker):
        tf.io.gfile.remove(marker)
    for name in tf.io.gfile.listdir(out_dir):
        if storage.is_temp(name):
            tf.io.gfile.remove(storage.join(out_dir, name))
    return marker


@dataclasses.dataclass
class Kept:
    """What a selection (or a range of its blocks) kept (arrays per class
    unless said otherwise).

    Attributes:
      unique: int64: images kept.
      total: int64: records written, copies included.
      min_confidence: float: lowest kept confidence (inf: none kept).
      file_counts: int64 [num_files]: records per output file.
      extremes: The `selection_report.Extremes` for the contact sheets.
      taken_boundary: int64: images taken from the boundary bin so far.
    """
    unique: np.ndarray
    total: np.ndarray
    min_confidence: np.ndarray
    file_counts: np.ndarray
    extremes: "selection_report.Extremes"
    taken_boundary: np.ndarray

    @classmethod
    def empty(cls, num_classes, num_files):
        """Nothing kept yet.

        Args:
          num_classes: K.
          num_files: Output files.

        Returns:
          A `Kept` of zeros.
        """
        return cls(np.zeros(num_classes, np.int64),
                   np.zeros(num_classes, np.int64),
                   np.full(num_classes, np.inf),
                   np.zeros(num_files, np.int64),
                   selection_report.Extremes(
                       selection_report.CONTACT_SHEET_IMAGES,
                       selection_report.MAX_CONTACT_SHEETS),
                   np.zeros(num_classes, np.int64))

    def merge(self, later):
        """Adds the `Kept` of the blocks that follow this one's.

        Args:
          later: The `Kept` of a later block range (same classes, files).

        Returns:
          self, now counting both; the contact sheets' images are the
          ones a single pass would keep (`Extremes.merge`).
        """
        self.unique += later.unique
        self.total += later.total
        self.min_confidence = np.minimum(self.min_confidence,
                                         later.min_confidence)
        self.file_counts += later.file_counts
        self.extremes.merge(later.extremes)
        self.taken_boundary += later.taken_boundary
        return self


def boundary_counts(pred_dir, blocks, plan):
    """Images of each class in its boundary bin, in these blocks.

    From the blocks' histograms alone: what a range of blocks takes from
    the boundary bins depends on these counts of the blocks before it.

    Args:
      pred_dir: The prediction folder.
      blocks: Block numbers.
      plan: The `SelectionPlan`.

    Returns:
      int64 [K] counts (0 for a class without a boundary bin).
    """
    counts = np.zeros(len(plan.boundary_bin), np.int64)
    has = plan.boundary_bin >= 0
    classes = np.nonzero(has)[0]
    for block in blocks:
        hist, _ = pl.read_histogram(
            storage.join(pred_dir, pl.histogram_name(block)))
        counts[classes] += hist[classes, plan.boundary_bin[classes]]
    return counts


def taken_before(boundary_counts_before, plan):
    """What the blocks before a range have taken from the boundary bins.

    Args:
      boundary_counts_before: int64 [K], `boundary_counts` of all the
        blocks before the range.
      plan: The `SelectionPlan`.

    Returns:
      int64 [K]: min(those counts, boundary_take), the running count a
      single pass would hold when it reaches the range's first record.
    """
    return np.minimum(np.asarray(boundary_counts_before, np.int64),
                      plan.boundary_take)


def write_blocks(config, plan, info, paths, blocks=None, taken=None):
    """Writes the kept records of some blocks (with their copies).

    Streams the blocks' prediction records once, in index order, into the
    files `paths` (one per output file), each through a temporary name
    renamed at the end. With every block, `paths` are the output files
    (the in-process stage); with a range of blocks, they are that range's
    parts, which concatenated in range order give the output files byte
    for byte (a TFRecord file is its records one after another).

    Args:
      config: The `SelectConfig`.
      plan: The `SelectionPlan`.
      info: The prediction folder's description.
      paths: The files to write, one per output file, in output order.
      blocks: Block numbers in increasing order (default: all).
      taken: int64 [K] `taken_before` the first block (default: zeros).

    Returns:
      The `Kept` of these blocks.
    """
    temps = [storage.temp_path(path) for path in paths]
    writers = [tf.io.TFRecordWriter(path) for path in temps]
    kept = Kept.empty(info["num_classes"], len(paths))
    if taken is not None:
        kept.taken_boundary = np.array(taken, np.int64)
    try:
        for batch in _record_batches(config.pred_dir, info, blocks=blocks):
            _write_batch(config, plan, batch, writers, kept)
        for writer in writers:
            writer.close()
        for temp, final in zip(temps, paths):
            tf.io.gfile.rename(temp, final, overwrite=True)
    except BaseException:
        for writer, temp in zip(writers, temps):
            writer.close()
            if tf.io.gfile.exists(temp):
                tf.io.gfile.remove(temp)
        raise
    if taken is not None:
        kept.taken_boundary -= np.asarray(taken, np.int64)
    return kept


def _write_selection(config, plan, info, names):
    """Writes the whole selection into the files `names` of out_dir (one
    pass over every block); returns its `Kept`."""
    return write_blocks(config, plan, info,
                        [storage.join(config.out_dir, n) for n in names])


def assemble(path, parts):
    """Writes one output file as its range parts one after another.

    Args:
      path: The output file (written to a temporary name, then renamed).
      parts: The parts' paths, in block order.
    """
    temp = storage.temp_path(path)
    try:
        with tf.io.gfile.GFile(temp, "wb") as out:
            for part in parts:
                with tf.io.gfile.GFile(part, "rb") as f:
                    while True:
                        chunk = f.read(16 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
        tf.io.gfile.rename(temp, path, overwrite=True)
    except BaseException:
        storage.remove_quietly(temp)
        raise


def _kept_rows(plan, labels, bins, taken_boundary):
    """Rows of a batch the plan keeps: above the class's full bin, plus the
    first `boundary_take` of its boundary bin in index order."""
    keep = (bins >= plan.min_bin) & (bins >= plan.full_bin[labels])
    for row in np.nonzero(bins == plan.boundary_bin[labels])[0]:
        c = labels[row]
        if taken_boundary[c] < plan.boundary_take[c]:
            taken_boundary[c] += 1
            keep[row] = True
    return np.nonzero(keep)[0]


def _write_batch(config, plan, batch, writers, kept):
    """Writes one batch's kept records and adds them to `kept`."""
    labels = batch["label"].astype(np.int64)
    bins = pl.confidence_bins(batch["confidence"], plan.num_bins)
    rows = _kept_rows(plan, labels, bins, kept.taken_boundary)
    if not rows.size:
        return
    labels, indices = labels[rows], batch["index"][rows]
    confidences = batch["confidence"][rows]
    copies = stochastic_copies(plan.duplication[labels], indices, config.seed)
    targets = make_targets(batch["probs"][rows], labels, config.label_type,
                           config.temperature)
    num_files = len(writers)
    first_file = np.floor(hash_uniform(config.seed, indices, stream=1)
                          * num_files).astype(np.int64)
    images = batch["image"]
    for k, row in enumerate(rows):
        for copy in range(copies[k]):
            record = pl.encode_selected(images[row], targets[k], labels[k],
                                        confidences[k], indices[k], copy)
            file_index = (first_file[k] + copy) % num_files
            writers[file_index].write(record)
            kept.file_counts[file_index] += 1
    kept.extremes.add(labels, confidences, indices, images[rows])
    np.add.at(kept.unique, labels, 1)
    np.add.at(kept.total, labels, copies)
    np.minimum.at(kept.min_confidence, labels, confidences)
