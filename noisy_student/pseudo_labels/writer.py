"""The predict stage's writer: the prediction folder and its blocks.

`prepare_out_dir` creates the folder, records (or checks) its settings and
removes a worker's temporary leftovers; `write_done` marks a finished worker.

`BlockSink` turns batches of teacher outputs into the block files of
`noisy_student.pseudo_labels.records` (records, then the block's histogram, each
renamed into place when complete, so a killed run leaves only whole blocks);
`ThreadedSink` runs it a few batches behind the teacher, so serialising
records overlaps with the teacher's computation.
"""

import queue
import threading

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.pseudo_labels import records
from noisy_student.utils import storage


class BlockSink:
    """Writes batches of predictions into their blocks' files.

    The filtered stream holds whole blocks in index order, so a batch is a
    few runs of equal block numbers, and the arrival of a new block means
    the previous one is complete.
    """

    def __init__(self, out_dir, records_per_file, num_classes, num_bins):
        """A sink with no block open.

        Args:
          out_dir: The prediction folder, local or gs://.
          records_per_file: Images per block; image i belongs to block
            i // records_per_file.
          num_classes: Length of the probability vectors.
          num_bins: Bins of each block's confidence histogram.
        """
        self._out_dir = out_dir
        self._per_file = records_per_file
        self._num_classes = num_classes
        self._num_bins = num_bins
        self._writer = None
        self._block = None
        self.blocks_written = 0

    def add(self, indices, images, probs, labels, confidences):
        """Writes one batch (numpy arrays, one row per image).

        Args:
          indices: int64 [B] global image indices, increasing.
          images: object [B] encoded image bytes.
          probs: float32 [B, K] teacher probabilities.
          labels: int [B] argmax classes.
          confidences: float32 [B] top probabilities.
        """
        blocks = indices // self._per_file
        for block in np.unique(blocks):
            rows = blocks == block
            if self._writer is not None and self._block != block:
                self._writer.close()
                self.blocks_written += 1
                self._writer = None
            if self._writer is None:
                self._writer = records.BlockWriter(self._out_dir, int(block),
                                              self._num_classes,
                                              self._num_bins)
                self._block = block
            self._writer.write_batch(images[rows], probs[rows], labels[rows],
                                     confidences[rows], indices[rows])

    def finish(self):
        """Completes the last block (the stream has ended)."""
        if self._writer is not None:
            self._writer.close()
            self.blocks_written += 1
            self._writer = None

    def abort(self):
        """Drops the block in progress (it stays to do)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class ThreadedSink:
    """Runs a `BlockSink` in a background thread, a few batches behind.

    The Python work of serialising records overlaps with the teacher's
    computation (which releases the GIL). Errors of the thread surface in
    the next `add` or in `finish`.
    """

    def __init__(self, sink, max_pending=4):
        """Starts the thread.

        Args:
          sink: A `BlockSink`.
          max_pending: Batches queued before `add` waits (bounds memory).
        """
        self._sink = sink
        self._queue = queue.Queue(maxsize=max_pending)
        self._error = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            command, args = self._queue.get()
            if command == "add":
                if self._error is None:
                    try:
                        self._sink.add(*args)
                    except BaseException as e:  # pylint: disable=broad-except
                        self._error = e
                continue
            try:
                if command == "finish" and self._error is None:
                    self._sink.finish()
                else:
                    self._sink.abort()
            except BaseException as e:  # pylint: disable=broad-except
                self._error = self._error or e
            return

    def add(self, *args):
        """Queues one batch for `BlockSink.add` (same arguments).

        Raises:
          BaseException: the error of an earlier batch in the thread.
        """
        if self._error is not None:
            raise self._error
        self._queue.put(("add", args))

    def finish(self):
        """Waits for the writes, completes the last block; blocks written."""
        self._queue.put(("finish", None))
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._sink.blocks_written

    def abort(self):
        """Waits for the thread and drops the block in progress."""
        if self._thread.is_alive():
            self._queue.put(("abort", None))
            self._thread.join()


def prepare_out_dir(out_dir, dataset, num_classes, records_per_file,
                    num_bins, shard_index, num_shards):
    """Creates the folder, records the settings, removes this worker's
    temporary leftovers and lists its complete blocks.

    Args:
      out_dir: The prediction folder, local or gs://.
      dataset: The unlabeled data set (its channels are recorded).
      num_classes: Length of the probability vectors.
      records_per_file: Images per block.
      num_bins: Bins of the confidence histograms.
      shard_index: This worker's index.
      num_shards: Number of workers.

    Returns:
      The set of this worker's block numbers that are already complete.

    Raises:
      ValueError: if the folder holds predictions made with other settings.
    """
    tf.io.gfile.makedirs(out_dir)
    source_channels = dataset.element_spec["image"].shape[-1]
    _write_predict_config(out_dir, num_classes, records_per_file, num_bins,
                          source_channels)
    removed = _clean_temp_files(out_dir, shard_index, num_shards)
    if removed:
        logging.info("predict: removed %d temporary leftovers", removed)
    return {b for b in records.complete_blocks(out_dir)
            if b % num_shards == shard_index}


def _write_predict_config(out_dir, num_classes, records_per_file, num_bins,
                          channels):
    """Writes predict_config.json, or checks it against an existing one."""
    path = storage.join(out_dir, records.PREDICT_CONFIG)
    config = {"num_classes": int(num_classes),
              "records_per_file": int(records_per_file),
              "num_bins": int(num_bins),
              # Channels of the stored (original) images; None if unknown.
              "channels": channels}
    if tf.io.gfile.exists(path):
        existing = storage.read_json(path)
        for key, value in config.items():
            if existing.get(key) != value:
                raise ValueError(
                    f"Expected {key}={existing.get(key)} as in the existing "
                    f"predictions of {out_dir} (use another out_dir to start "
                    f"afresh). Received: {key}={value}")
        return
    storage.write_json(path, config)


def _clean_temp_files(out_dir, shard_index, num_shards):
    """Deletes temporary leftovers of this worker's blocks only.

    Other workers may be writing their own temporary files in the same
    folder right now, so only names of this worker's blocks are touched.
    """
    removed = 0
    for name in tf.io.gfile.listdir(out_dir):
        if not storage.is_temp(name):
            continue
        block = records.block_of_name(name)
        if block is not None and block % num_shards == shard_index:
            tf.io.gfile.remove(storage.join(out_dir, name))
            removed += 1
    return removed


def write_done(out_dir, shard_index, num_shards, num_images, written):
    """Writes the marker of a finished worker (done-i-of-n.json).

    Args:
      out_dir: The prediction folder.
      shard_index: This worker's index.
      num_shards: Number of workers.
      num_images: Images in the whole unlabeled set (as this worker saw).
      written: Images this worker labeled in this run.
    """
    storage.write_json(
        storage.join(out_dir, records.done_name(shard_index, num_shards)),
        {"num_images": int(num_images), "images_written": int(written),
         "shard_index": shard_index, "num_shards": num_shards})
