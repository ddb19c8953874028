"""The predict stage: the un-noised teacher labels the unlabeled images.

Step 2 of Noisy Student: the teacher (its EMA weights, `training=False`, no
dropout, no stochastic depth, no augmentation) sees clean eval-preprocessed
images at its own resolution, and its full probability vector is written for
every image, with the ORIGINAL image (the source file's own bytes, or a PNG
of an array source's image) so the student can crop and augment it at the
student's resolution. The record and file formats are documented in
`noisy_student.pseudo_labels.records`.

Work splits over machines: the source is cut into blocks of `records_per_file`
consecutive images and worker `shard_index` of `num_shards` labels the blocks
b with b % num_shards == shard_index. The blocks partition the source exactly,
and the output files are the same whatever the number of workers.

Resume: each block is written to a temporary name and renamed when complete,
then its histogram is written; a block with a histogram is complete and a
rerun skips it. Temporary leftovers of this worker's blocks are deleted.
Each worker still reads the whole source (to count it and find its blocks),
but it only preprocesses and predicts its own, unfinished blocks.

Memory does not grow with the unlabeled set: images stream through tf.data in
batches and each batch is written out before the next one is kept.

Size: the stage's config, its input stream and its labelling loop are read
together; the teacher's runtime and the block writer are modules of their own.
"""

import dataclasses
import itertools
import time

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.data import preprocess as preprocess_lib
from noisy_student.model import loading
from noisy_student.pseudo_labels import inference_runtime
from noisy_student.pseudo_labels import records
from noisy_student.pseudo_labels import writer

# Images per prediction file (block), the one default of ns-predict,
# noisy-student and PredictConfig: 4096 keeps an ImageNet-scale unlabeled set
# (~130M images) at ~32k files while a preempted worker redoes at most one
# block of work.
RECORDS_PER_FILE = 4096
# Images per teacher call, the one default of --predict_batch_size and
# PredictConfig.
BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Settings of one prediction worker.

    Attributes:
      teacher: A training run's model_dir (holding model.keras), a .keras
        file, or a SavedModel folder.
      out_dir: The prediction folder (shared by all workers).
      num_classes: Number of classes of the labeled set; the teacher must
        output as many.
      batch_size: Images per teacher call.
      shard_index: This worker's index, in [0, num_shards).
      num_shards: Number of workers sharing the work.
      records_per_file: Images per output file (a block: the unit of resume
        and of the work split between workers).
      num_bins: Bins over [0, 1] of the per-class confidence histograms.
      image_size: The teacher's input side; None reads it from the teacher.
      log_every_s: Seconds between progress lines.
      inference_precision: The precision of the teacher's forward pass,
        one of `inference_runtime.PRECISIONS` (bfloat16 with OpenVINO only).
      inference_runtime: What runs it, one of `inference_runtime.RUNTIMES`
        (TensorFlow, the reference, or OpenVINO).
    """
    teacher: str
    out_dir: str
    num_classes: int
    batch_size: int = BATCH_SIZE
    shard_index: int = 0
    num_shards: int = 1
    records_per_file: int = RECORDS_PER_FILE
    num_bins: int = records.DEFAULT_NUM_BINS
    image_size: int | None = None
    log_every_s: float = 30.0
    # In this order: the runtime field's name hides the module below it.
    inference_precision: str = inference_runtime.DEFAULT_PRECISION
    inference_runtime: str = inference_runtime.DEFAULT_RUNTIME

    def __post_init__(self):
        # Checked when built: the pipeline builds every iteration's config
        # before any work.
        _check_args(self.num_classes, self.batch_size, self.shard_index,
                    self.num_shards, self.records_per_file, self.num_bins,
                    self.inference_runtime, self.inference_precision)
        if self.image_size is not None and not (
                isinstance(self.image_size, (int, np.integer))
                and self.image_size > 0):
            raise ValueError("Expected None or an image_size > 0. Received: "
                             f"image_size={self.image_size!r}")
        if not self.log_every_s > 0:
            raise ValueError("Expected log_every_s > 0. Received: "
                             f"log_every_s={self.log_every_s!r}")


@dataclasses.dataclass(frozen=True)
class PredictSummary:
    """What one prediction worker did."""
    num_images: int          # size of the whole unlabeled source
    images_written: int      # images this call predicted and wrote
    blocks_written: int
    blocks_skipped: int      # this worker's blocks already complete
    seconds: float           # labelling, the runtime's start-up left out
    images_per_second: float
    # In this order: the runtime field's name hides the module below it.
    inference_precision: str = inference_runtime.DEFAULT_PRECISION
    inference_runtime: str = inference_runtime.DEFAULT_RUNTIME


def default_preprocess(image_size, channels=None, recipe=None):
    """The eval transform of the teacher (`preprocess.eval_image`).

    Args:
      image_size: The teacher's input side.
      channels: The teacher's input channels (1 or 3); None keeps the
        image's.
      recipe: The teacher's `preprocess.Recipe` (default: the default one).

    Returns:
      A function uint8 [H, W, C] -> float32 [image_size, image_size,
      channels] in [0, 255] (the model normalises inside).
    """

    def transform(image):
        return tf.cast(preprocess_lib.eval_image(image, image_size, channels,
                                                 recipe), tf.float32)

    return transform


def _check_args(num_classes, batch_size, shard_index, num_shards,
                records_per_file, num_bins, runtime, precision):
    """Raises ValueError for a bad setting of the stage (naming it), and as
    `inference_runtime.check` for a runtime this machine cannot run."""
    inference_runtime.check(runtime, precision)
    for name, value in (("num_classes", num_classes),
                        ("batch_size", batch_size),
                        ("num_shards", num_shards),
                        ("records_per_file", records_per_file),
                        ("num_bins", num_bins)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"Expected a positive integer. Received: {name}={value!r}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            "Expected 0 <= shard_index < num_shards. Received: "
            f"shard_index={shard_index}, num_shards={num_shards}")


def _check_dataset(dataset):
    spec = dataset.element_spec
    if not isinstance(spec, dict) or "image" not in spec:
        raise ValueError(
            "Expected an unlabeled dataset of {'image': uint8 [H, W, C]} "
            f"dicts. Received: element_spec={spec}")
    image = spec["image"]
    if image.dtype != tf.uint8 or image.shape.rank != 3:
        raise ValueError(
            "Expected unlabeled images of dtype uint8 and shape [H, W, C]. "
            f"Received: image spec={image}")
    if int(dataset.cardinality()) == 0:
        raise ValueError(
            "Expected a non-empty unlabeled dataset. Received: an empty "
            "dataset (cardinality 0)")


def _input_pipeline(dataset, *, records_per_file, shard_index, num_shards,
                    skip_blocks, preprocess, image_size, channels,
                    batch_size, seen):
    """Enumerates the source, keeps this worker's unfinished blocks, batches.

    `seen` (a tf.Variable) counts the source's elements as they pass, so the
    worker learns the source's size without a second pass.
    """
    dataset = dataset.enumerate()

    def count(index, element):
        with tf.control_dependencies([seen.assign(index + 1)]):
            return tf.identity(index), element

    # Sequential on purpose: `seen` must grow in order.
    dataset = dataset.map(count)
    per_file = tf.constant(records_per_file, tf.int64)
    table = None
    if skip_blocks:
        keys = tf.constant(sorted(skip_blocks), tf.int64)
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                keys, tf.ones_like(keys)), default_value=0)

    def keep(index, element):
        del element
        block = index // per_file
        mine = tf.equal(block % num_shards, shard_index)
        if table is not None:
            mine = tf.logical_and(mine, tf.equal(table.lookup(block), 0))
        return mine

    dataset = dataset.filter(keep)
    return _batches(dataset, preprocess=preprocess, image_size=image_size,
                    channels=channels, batch_size=batch_size)


def _batches(dataset, *, preprocess, image_size, channels, batch_size):
    """(index, element) pairs -> padded batches of {"index", "encoded",
    "pixels"}: the eval transform, the stored bytes, a fixed batch shape."""

    def prepare(index, element):
        image = element["image"]
        pixels = tf.cast(preprocess(image), tf.float32)
        pixels = tf.ensure_shape(pixels, [image_size, image_size, channels])
        # The source's own file bytes when it has them (no re-encoding,
        # no second copy of the data set); arrays are encoded as PNG.
        encoded = (element["encoded"] if "encoded" in element
                   else tf.io.encode_png(image))
        return {"index": index, "encoded": encoded,
                "pixels": pixels}

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
    dataset = dataset.batch(batch_size)

    def pad(batch):
        # A fixed batch shape: one trace of the teacher, and every image is
        # computed in the same kernel configuration whatever its position.
        missing = batch_size - tf.shape(batch["index"])[0]
        batch["pixels"] = tf.pad(batch["pixels"],
                                 [[0, missing], [0, 0], [0, 0], [0, 0]])
        batch["pixels"] = tf.ensure_shape(
            batch["pixels"], [batch_size, image_size, image_size, channels])
        return batch

    return dataset.map(pad).prefetch(tf.data.AUTOTUNE)


def predict(teacher, dataset, out_dir, num_classes, batch_size=BATCH_SIZE,
            shard_index=0, num_shards=1, records_per_file=RECORDS_PER_FILE,
            preprocess=None, image_size=None, num_bins=records.DEFAULT_NUM_BINS,
            log_every_s=30.0,
            runtime=inference_runtime.DEFAULT_RUNTIME,
            precision=inference_runtime.DEFAULT_PRECISION):
    """Labels this worker's part of the unlabeled set with the teacher.

    Args:
      teacher: A keras.Model returning logits, a
        `model.loading.SavedModelClassifier`, or a path for `model.loading.load_model`.
      dataset: Unbatched tf.data.Dataset of {"image": uint8 [H, W, C]} in a
        deterministic order (the global index of an image is its position).
      out_dir: The prediction folder, shared by all workers.
      num_classes: Number of classes; the teacher must output as many.
      batch_size: Images per teacher call.
      shard_index: This worker's index in [0, num_shards).
      num_shards: Number of workers.
      records_per_file: Images per output file (block).
      preprocess: Eval preprocessing, uint8 [H, W, C] image -> [S, S, C]
        pixels in [0, 255] at the teacher's side S; default
        `default_preprocess` (the teacher's eval transform, with the recipe
        recorded beside a teacher given as a path).
      image_size: The teacher's input side S; None reads it from the teacher.
      num_bins: Bins over [0, 1] of the confidence histograms.
      log_every_s: Seconds between progress lines.
      runtime: What runs the teacher, one of `inference_runtime.RUNTIMES`.
      precision: Its precision, one of `inference_runtime.PRECISIONS`.

    Returns:
      A `PredictSummary`.

    Raises:
      ValueError: for a teacher whose class count differs from
        `num_classes`, an empty dataset, a bad argument, a teacher path
        whose model cannot be read, or a runtime this machine cannot run.
      FileNotFoundError: for a teacher path that holds no model.
      inference_runtime.RuntimeNotInstalledError: OpenVINO is missing.
    """
    _check_args(num_classes, batch_size, shard_index, num_shards,
                records_per_file, num_bins, runtime, precision)
    teacher, recipe, image_size, channels = _load_teacher(
        teacher, num_classes, image_size)
    _check_dataset(dataset)
    preprocess = preprocess or default_preprocess(image_size, channels,
                                                  recipe)

    complete = writer.prepare_out_dir(
        out_dir, dataset, num_classes, records_per_file, num_bins,
        shard_index, num_shards)
    total, todo = _images_to_do(dataset, records_per_file, shard_index,
                                num_shards, complete)
    if todo == 0:
        # Everything of this worker is already there; no need to read.
        writer.write_done(out_dir, shard_index, num_shards, total,
                                     0)
        return PredictSummary(total, 0, 0, len(complete), 0.0, 0.0,
                              precision, runtime)

    probabilities = inference_runtime.probabilities_fn(
        teacher, runtime, precision, batch_size, image_size, channels)
    start = time.time()
    what = f"predict shard {shard_index}/{num_shards}"
    logging.info("%s: %d of its blocks already complete, %s images to "
                 "label; the teacher runs on %s in %s", what, len(complete),
                 todo if todo is not None else "an unknown number of",
                 runtime, precision)
    sink = writer.ThreadedSink(writer.BlockSink(
        out_dir, records_per_file, num_classes, num_bins))
    num_images, written = _label_unfinished_blocks(
        dataset, probabilities, sink, num_classes,
        _progress_logger(what, todo, start, log_every_s),
        records_per_file=records_per_file, shard_index=shard_index,
        num_shards=num_shards, skip_blocks=complete, preprocess=preprocess,
        image_size=image_size, channels=channels, batch_size=batch_size)
    blocks_written = sink.finish()
    writer.write_done(out_dir, shard_index, num_shards, num_images,
                                 written)
    return _summary(num_images, written, blocks_written, len(complete),
                    time.time() - start, what, precision, runtime)


def _label_unfinished_blocks(dataset, probabilities, sink, num_classes,
                             progress, **pipeline):
    """Runs the teacher over this worker's unfinished blocks.

    Args:
      dataset: The unlabeled source.
      probabilities: The teacher's pixels -> probabilities function.
      sink: The `pseudo_labels.writer.ThreadedSink` that writes the blocks.
      num_classes: K, checked against the teacher's output.
      progress: Called with the number of images labeled so far.
      **pipeline: The arguments of `_input_pipeline` but `seen`.

    Returns:
      (images in the whole source, images labeled).

    Raises:
      ValueError: for a source that yielded no images, or a teacher of
        another class count.
    """
    seen = tf.Variable(0, dtype=tf.int64, trainable=False)
    batches = _input_pipeline(dataset, seen=seen, **pipeline)
    written = _label_batches(batches, probabilities, sink, num_classes,
                             progress)
    num_images = int(seen.numpy())
    if num_images == 0:
        sink.abort()  # Ends its thread.
        raise ValueError(
            "Expected a non-empty unlabeled dataset. Received: a dataset "
            "that yielded no images")
    return num_images, written


def _summary(num_images, written, blocks_written, blocks_skipped, seconds,
             what, precision, runtime):
    """Logs the end of a worker's run and returns its `PredictSummary`.

    Args:
      num_images: Images in the whole unlabeled set.
      written: Images labeled in this run.
      blocks_written: Blocks completed in this run.
      blocks_skipped: Blocks already complete before it.
      seconds: Wall time of the labeling, in seconds.
      what: The log prefix, e.g. "predict shard 0/4".
      precision: The teacher's inference precision.
      runtime: Its inference runtime.

    Returns:
      The `PredictSummary`.
    """
    rate = written / seconds if seconds > 0 else 0.0
    logging.info("%s done: %d images in %d files, %.1f images/s", what,
                 written, blocks_written, rate)
    return PredictSummary(num_images, written, blocks_written, blocks_skipped,
                          seconds, rate, precision, runtime)


def _progress_logger(what, todo, start, log_every_s):
    """A function written -> None that logs progress every log_every_s.

    Args:
      what: The prefix of each line, e.g. "predict shard 0/4".
      todo: Images to label, or None when unknown.
      start: time.time() when labeling started.
      log_every_s: Seconds between lines.

    Returns:
      The function, to call with the images labeled so far.
    """
    last_log = [start]

    def progress(written):
        now = time.time()
        if now - last_log[0] >= log_every_s:
            last_log[0] = now
            logging.info("%s: %d%s images, %.1f images/s", what, written,
                         f"/{todo}" if todo is not None else "",
                         written / (now - start))

    return progress


def _load_teacher(teacher, num_classes, image_size):
    """The teacher model, its recipe, input side and channels.

    Args:
      teacher: A model, or a path for `model.loading.load_model` (its recorded
        preprocessing recipe is read too).
      num_classes: The class count the teacher must output.
      image_size: The teacher's input side, or None to read it from the
        teacher.

    Returns:
      (model, recipe or None, image_size, channels).

    Raises:
      ValueError: for a teacher of another class count, or without a static
        square input shape and no image_size.
    """
    recipe = None
    if isinstance(teacher, str):
        recipe = preprocess_lib.read_recipe(teacher)
        teacher = loading.load_model(teacher, what="teacher")
    teacher_classes = loading.num_classes(teacher)
    if teacher_classes != num_classes:
        raise ValueError(
            f"Expected a teacher with num_classes={num_classes} outputs (the "
            f"dataset's class count). Received: teacher outputs "
            f"{teacher_classes} classes")
    image_size = image_size or loading.image_size(teacher)
    if image_size is None:
        raise ValueError(
            "Expected image_size for a teacher without a static square "
            f"input shape. Received: image_size=None, teacher input shape="
            f"{getattr(teacher, 'input_shape', None)}")
    return teacher, recipe, image_size, loading.channels(teacher) or 3


def _images_to_do(dataset, records_per_file, shard_index, num_shards,
                  complete):
    """How many images this worker still has to label.

    Args:
      dataset: The unlabeled data set.
      records_per_file: Images per block.
      shard_index: This worker's index.
      num_shards: Number of workers; worker i owns blocks b with
        b % num_shards == i.
      complete: Block numbers already complete.

    Returns:
      (total images or None, images left to label or None) when the data
      set's cardinality is unknown.
    """
    total = int(dataset.cardinality())
    if total < 0:
        return None, None
    num_blocks = -(-total // records_per_file)
    mine = [b for b in range(num_blocks) if b % num_shards == shard_index]
    todo = sum(min(records_per_file, total - b * records_per_file)
               for b in mine if b not in complete)
    return total, todo


def _label_batches(batches, probabilities, sink, num_classes, progress):
    """Runs the teacher over the batches and hands the results to the sink.

    The teacher computes one batch while the next one is read and started
    (`probabilities.start`), and the sink's thread writes the one before.

    Args:
      batches: Batches of {"index", "pixels", "encoded"} (`_input_pipeline`).
      probabilities: From `inference_runtime.probabilities_fn`.
      sink: A `pseudo_labels.writer.ThreadedSink`; aborted (temporary files
        removed) on any exception, which is re-raised.
      num_classes: K, checked against the teacher's output.
      progress: Called with the number of images labeled so far.

    Returns:
      The number of images labeled.

    Raises:
      ValueError: if the teacher outputs another class count.
    """
    written = 0
    pending = None  # (batch, a function waiting for its probabilities)
    try:
        for batch in itertools.chain(batches, [None]):
            started = batch and (batch, probabilities.start(batch["pixels"]))
            if pending:
                written += _hand_to_sink(*pending, sink, num_classes)
                progress(written)
            pending = started
    except BaseException:
        sink.abort()
        raise
    return written


def _hand_to_sink(batch, wait, sink, num_classes):
    """Waits for a batch's probabilities and hands its records to the sink;
    returns the batch's image count."""
    indices = batch["index"].numpy()
    probs = wait()[:len(indices)]
    if probs.shape[-1] != num_classes:
        raise ValueError(
            f"Expected a teacher with num_classes={num_classes} "
            f"outputs. Received: teacher outputs {probs.shape[-1]}")
    labels = probs.argmax(axis=-1)
    confidences = probs[np.arange(len(labels)), labels]
    sink.add(indices, batch["encoded"].numpy(), probs, labels, confidences)
    return len(indices)


class BlockLabeler:
    """Labels whole blocks, one at a time: a Beam worker's predict stage.

    The teacher's runtime is made once (a worker process keeps one
    labeler); each block runs the stage's own input pipeline (`_batches`:
    eval transform, stored bytes, fixed batch shape), teacher call and
    block writer (`writer.BlockSink`, temporary name renamed, then the
    histogram). A block's batches start at its first image, so with
    `records_per_file` not a multiple of `batch_size` they hold other
    images than the in-process stage's batches (which run across block
    ends): the records are the same because the fixed batch shape gives
    every image the same computation whatever its batch (the property
    that makes the files independent of `num_shards`).
    """

    def __init__(self, teacher, out_dir, num_classes, *, image_size,
                 preprocess=None, batch_size=BATCH_SIZE,
                 records_per_file=RECORDS_PER_FILE,
                 num_bins=records.DEFAULT_NUM_BINS,
                 runtime=inference_runtime.DEFAULT_RUNTIME,
                 precision=inference_runtime.DEFAULT_PRECISION):
        """Loads the teacher and makes its runtime.

        Args:
          teacher: A model or a path, as `predict`'s.
          out_dir: The prediction folder.
          num_classes: K; the teacher must output as many.
          image_size: The teacher's input side S, or None to read it.
          preprocess: Eval preprocessing, as `predict`'s (default: the
            teacher's eval transform).
          batch_size: Images per teacher call.
          records_per_file: Images per block.
          num_bins: Bins of the confidence histograms.
          runtime: What runs the teacher (`inference_runtime.RUNTIMES`).
          precision: Its precision (`inference_runtime.PRECISIONS`).

        Raises:
          ValueError: as `predict`, for a bad setting or teacher.
        """
        _check_args(num_classes, batch_size, 0, 1, records_per_file,
                    num_bins, runtime, precision)
        # Kept: the runtime's function holds the model by a weak reference.
        self._model, recipe, self.image_size, self.channels = _load_teacher(
            teacher, num_classes, image_size)
        model = self._model
        self._preprocess = preprocess or default_preprocess(
            self.image_size, self.channels, recipe)
        self._probabilities = inference_runtime.probabilities_fn(
            model, runtime, precision, batch_size, self.image_size,
            self.channels)
        self._out_dir = out_dir
        self._num_classes = num_classes
        self._batch_size = batch_size
        self._per_file = records_per_file
        self._num_bins = num_bins

    def label(self, block, dataset, num_images):
        """Labels block `block` and writes its records and histogram.

        A block already written is written again, to the same bytes (a
        retried task).

        Args:
          block: The block number b (images b * records_per_file ...).
          dataset: That block's images, {"image": uint8 [H, W, C],
            "encoded"?: string []}, in source order (`ImageSource.range`).
          num_images: Images in the whole source (the last block's end).

        Returns:
          The number of images labeled.

        Raises:
          ValueError: when `dataset` holds another number of images than
            the block (the source changed since it was counted); nothing
            is written then.
        """
        start = block * self._per_file
        expected = min(self._per_file, num_images - start)
        batches = _batches(dataset.enumerate(start),
                           preprocess=self._preprocess,
                           image_size=self.image_size,
                           channels=self.channels,
                           batch_size=self._batch_size).prefetch(
                               tf.data.AUTOTUNE)
        sink = _CountingSink(writer.BlockSink(
            self._out_dir, self._per_file, self._num_classes,
            self._num_bins), expected, block)
        written = _label_batches(batches, self._probabilities, sink,
                                 self._num_classes, lambda written: None)
        sink.finish()
        return written


class _CountingSink:
    """A `writer.BlockSink` that refuses more or fewer images than one
    block holds (aborting it: no histogram, the block stays to do)."""

    def __init__(self, sink, expected, block):
        self._sink = sink
        self._expected = expected
        self._block = block
        self._count = 0

    def add(self, indices, *rest):
        """As `writer.BlockSink.add`; raises past the block's end."""
        self._count += len(indices)
        self._check(self._count > self._expected)
        self._sink.add(indices, *rest)

    def finish(self):
        """Completes the block, if it holds all of its images."""
        self._check(self._count != self._expected)
        self._sink.finish()

    def abort(self):
        """Drops the block in progress."""
        self._sink.abort()

    def _check(self, wrong):
        if wrong:
            self._sink.abort()
            raise ValueError(
                f"Expected {self._expected} images in block {self._block} "
                f"(as counted when the work was planned). Received: "
                f"{self._count}: the source changed since it was counted")


def run_predict(config, dataset, preprocess=None):
    """Runs one prediction worker from a `PredictConfig`.

    Args:
      config: A `PredictConfig`.
      dataset: The unlabeled source (see `predict`).
      preprocess: Eval preprocessing (see `predict`).

    Returns:
      A `PredictSummary`.
    """
    return predict(
        config.teacher, dataset, config.out_dir, config.num_classes, batch_size=config.batch_size,
        shard_index=config.shard_index, num_shards=config.num_shards,
        records_per_file=config.records_per_file, preprocess=preprocess,
        image_size=config.image_size, num_bins=config.num_bins,
        log_every_s=config.log_every_s, runtime=config.inference_runtime,
        precision=config.inference_precision)
