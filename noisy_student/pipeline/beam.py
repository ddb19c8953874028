"""Apache Beam runs of the predict and select stages (--beam_pipeline_options).

`--beam_pipeline_options="runner=...,key=value,..."` (TensorFlow Datasets'
flag and syntax: each item becomes one `--key=value` of Beam's
`PipelineOptions`) runs a stage as a Beam pipeline on any runner: the
DirectRunner (in this process, or `direct_running_mode=multi_processing,
direct_num_workers=N` worker processes), Dataflow, Flink or Spark. Empty,
the stages run in this process as before. The files are the same, byte
for byte, either way.

Predict: one element per unfinished block (`records_per_file` images, the
stage's unit of work and resume). Each worker process loads the teacher
once (`DoFn.setup` through `apache_beam.utils.shared.Shared`) and labels a
block with the stage's own tf.data input, teacher call and block writer
(`prediction.BlockLabeler`), reading only that block of the source
(`sources.ImageSource.range`: a folder's or list's files, a tfrecord
source's shards from the scan's per-shard counts). No worker counts the
source: the launcher does, once (cached in the output folder), and writes
the `done` marker when every block is complete. A retried task rewrites
the same bytes (temporary name, then rename); blocks written by manual
--shard_index workers count as complete.

Select: the plan from the summed block histograms (a global combine); each
range of `blocks_per_task` consecutive blocks starts from what the blocks
before it took of the boundary bins (a prefix sum of their histograms'
boundary-bin counts: `selection.taken_before`), writes its part of every
output file with the stage's own writer (`selection.write_blocks`), and
the parts are concatenated in block order into the output files
(`selection.assemble`); the launcher writes the report and, last,
selection.json (`selection.finish`). A worker holds one range's records
at a time, streaming.

Beam's RunInference is not used: it imports tf_keras / tensorflow_hub,
cannot load a Keras 3 SavedModel and runs the model eagerly.

`apache_beam` is imported here only, when a pipeline is built: the
package and its other commands need no Beam.
"""

import dataclasses
import json
import pickle
import time

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.model import info as model_info
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import records
from noisy_student.pseudo_labels import selection
from noisy_student.pseudo_labels import writer
from noisy_student.utils import storage

FLAG = "--beam_pipeline_options"
# Blocks per select task: 64 blocks of 4,096 images (the default
# records_per_file) are 262k records read per task; 300M images make
# ~1,100 tasks, each writing one part of every output file.
BLOCKS_PER_TASK = 64
PARTS_DIR = "beam-parts"  # Under the selection folder, removed at the end.
_SUMMARY = "beam-summary.pkl"
_METRICS = "noisy_student"


class BeamNotInstalledError(ImportError):
    """--beam_pipeline_options was given, but apache_beam is not installed."""


def import_beam(options=""):
    """apache_beam, or a one-line error naming the flag.

    Args:
      options: The flag's value (named in the error).

    Raises:
      BeamNotInstalledError: when apache_beam cannot be imported.
    """
    try:
        import apache_beam  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise BeamNotInstalledError(
            f"Expected Apache Beam installed for {FLAG} (pip install "
            f"'noisy-student[beam]'). Received: {FLAG}={options!r} and "
            f"no apache_beam ({e})") from None
    return apache_beam


def pipeline_options(text):
    """Beam's `PipelineOptions` of the flag's "key=value,key=value" text.

    Args:
      text: E.g. "runner=DirectRunner,direct_num_workers=2".

    Returns:
      apache_beam.options.pipeline_options.PipelineOptions.

    Raises:
      BeamNotInstalledError: without apache_beam.
      ValueError: for an item that is not key=value.
    """
    import_beam(text)
    from apache_beam.options import pipeline_options as options_lib  # pylint: disable=g-import-not-at-top
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ValueError(
                f"Expected {FLAG} as key=value,key=value (e.g. "
                f"runner=DataflowRunner,project=P). Received: {item!r} in "
                f"{FLAG}={text!r}")
    return options_lib.PipelineOptions(
        flags=[f"--{item.lstrip('-')}" for item in items])


def _run(pipeline, what):
    """Runs a built pipeline to its end; its metrics' results."""
    result = pipeline.run()
    state = result.wait_until_finish()
    if str(state) not in ("DONE", "PipelineState.DONE"):
        raise RuntimeError(f"Expected the Beam {what} pipeline to finish. "
                           f"Received: state {state}")
    return result


def _distribution(result, name):
    """(min, max, sum, count) of a distribution metric, or None."""
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top
    found = result.metrics().query(
        MetricsFilter().with_namespace(_METRICS).with_name(name))
    values = [d.committed or d.attempted for d in found["distributions"]]
    values = [v for v in values if v is not None and v.count]
    if not values:
        return None
    return (min(v.min for v in values), max(v.max for v in values),
            sum(v.sum for v in values), sum(v.count for v in values))


# Predict ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PredictJob:
    """What a predict worker needs (pickled to every worker).

    Attributes:
      config: The `prediction.PredictConfig`.
      data: The `stages.DataConfig` whose unlabeled source is labeled
        (channels resolved to the teacher's).
      content: The source's content key (`sources.ImageSource.content`),
        checked by each worker.
      num_images: Images in the source, as the launcher counted them.
      image_size: The teacher's input side.
    """
    config: prediction.PredictConfig
    data: object
    content: str | None
    num_images: int
    image_size: int


class _PredictWorker:
    """One worker process's teacher and source (made once, shared)."""

    def __init__(self, job):
        started = time.time()
        self.job = job
        self.source = job.data.unlabeled_source(keep_encoded=True)
        if self.source.content != job.content or (
                self.source.num_examples != job.num_images):
            raise ValueError(
                f"Expected the unlabeled source the launcher counted "
                f"({job.num_images} images, content {job.content}). "
                f"Received: {self.source.num_examples} images, content "
                f"{self.source.content}: it changed")
        config = job.config
        self.labeler = prediction.BlockLabeler(
            config.teacher, config.out_dir, config.num_classes,
            image_size=job.image_size, batch_size=config.batch_size,
            records_per_file=config.records_per_file,
            num_bins=config.num_bins, runtime=config.inference_runtime,
            precision=config.inference_precision)
        self.setup_seconds = time.time() - started

    def label(self, block):
        per_file = self.job.config.records_per_file
        start = block * per_file
        stop = min(start + per_file, self.job.num_images)
        return self.labeler.label(block, self.source.range(start, stop),
                                  self.job.num_images)


def _predict_fn(beam, job):
    """The DoFn that labels one block per element."""
    from apache_beam.utils import shared  # pylint: disable=g-import-not-at-top
    handle = shared.Shared()
    tag = json.dumps([dataclasses.asdict(job.config), job.content,
                      job.num_images, job.image_size], default=str)

    class LabelBlock(beam.DoFn):
        """Labels a block with the worker's one teacher."""

        def setup(self):
            """Loads (or finds) this process's teacher and source."""
            started = time.time()
            self._worker = handle.acquire(lambda: _PredictWorker(job), tag)
            beam.metrics.Metrics.distribution(
                _METRICS, "setup_ms").update(
                    int((time.time() - started) * 1000))

        def process(self, block):
            """Labels `block`; yields its image count."""
            started = time.time()
            written = self._worker.label(int(block))
            ended = time.time()
            metric = beam.metrics.Metrics.distribution
            metric(_METRICS, "block_start_ms").update(int(started * 1000))
            metric(_METRICS, "block_end_ms").update(int(ended * 1000))
            metric(_METRICS, "block_images").update(written)
            yield written

    return LabelBlock()


def run_predict(config, data, source, image_size, options):
    """Labels the unfinished blocks of the unlabeled source with Beam.

    The launcher's side: the prediction folder is prepared (settings
    checked, temporary leftovers removed), the blocks without a histogram
    are labeled by the pipeline, then the `done` marker is written.

    Args:
      config: The `prediction.PredictConfig` (shard_index 0, num_shards 1).
      data: The `stages.DataConfig` (channels resolved).
      source: Its unlabeled `sources.ImageSource` (counted).
      image_size: The teacher's input side.
      options: The --beam_pipeline_options text.

    Returns:
      A `prediction.PredictSummary`; its seconds span the first block's
      start to the last block's end over all workers (the workers'
      start-up excluded; `setup_seconds` in the log).

    Raises:
      ValueError: for num_shards > 1, a source of unknown size, or blocks
        still missing after the pipeline.
      BeamNotInstalledError: without apache_beam.
    """
    beam = import_beam(options)
    if config.num_shards != 1:
        raise ValueError(
            f"Expected --num_shards=1 with {FLAG} (Beam shares the blocks "
            f"among its workers). Received: --num_shards={config.num_shards}")
    num_images = source.num_examples
    if num_images is None or num_images <= 0:
        raise ValueError(
            f"Expected an unlabeled source of known, non-zero size for "
            f"{FLAG}. Received: {num_images} images in {source.spec}")
    per_file = config.records_per_file
    complete = writer.prepare_out_dir(
        config.out_dir, source.dataset, config.num_classes, per_file,
        config.num_bins, 0, 1)
    num_blocks = -(-num_images // per_file)
    todo = [b for b in range(num_blocks) if b not in complete]
    logging.info("predict (Beam): %d of %d blocks to label", len(todo),
                 num_blocks)
    job = PredictJob(config, data, source.content, num_images, image_size)
    seconds, written = 0.0, 0
    if todo:
        started = time.time()
        pipeline = beam.Pipeline(options=pipeline_options(options))
        _ = (pipeline
             | "Blocks" >> beam.Create(todo)
             | "Spread" >> beam.Reshuffle()
             | "Label" >> beam.ParDo(_predict_fn(beam, job)))
        result = _run(pipeline, "predict")
        starts = _distribution(result, "block_start_ms")
        ends = _distribution(result, "block_end_ms")
        setup = _distribution(result, "setup_ms")
        seconds = ((ends[1] - starts[0]) / 1000.0 if starts and ends
                   else time.time() - started)
        logging.info("predict (Beam): %.1f s in all, %.1f s labeling; "
                     "worker set-up %s", time.time() - started, seconds,
                     "n/a" if not setup else
                     f"{setup[1] / 1000:.1f} s at most, {setup[3]} set-ups")
    missing = sorted(set(range(num_blocks)) - records.complete_blocks(
        config.out_dir))
    if missing:
        raise ValueError(
            f"Expected every block complete after the Beam pipeline. "
            f"Received: missing blocks {missing[:10]} in {config.out_dir}")
    written = sum(min(per_file, num_images - b * per_file) for b in todo)
    writer.write_done(config.out_dir, 0, 1, num_images, written)
    rate = written / seconds if seconds > 0 else 0.0
    return prediction.PredictSummary(
        num_images, written, len(todo), len(complete), seconds, rate,
        config.inference_precision, config.inference_runtime)


# Select -------------------------------------------------------------------


class _HistogramSum:
    """A CombineFn body: sums sparse block histograms into a dense one."""

    def __init__(self, num_classes, num_bins):
        self.shape = (num_classes, num_bins)

    def create(self):
        """An empty accumulator (a dense count matrix, a record count)."""
        return [np.zeros(self.shape, np.int64), 0]

    def add(self, accumulator, histogram):
        """Adds one block's (dense counts, records)."""
        accumulator[0] += histogram[0]
        accumulator[1] += histogram[1]
        return accumulator

    def merge(self, accumulators):
        """Sums accumulators."""
        accumulators = list(accumulators)
        total = accumulators[0]
        for more in accumulators[1:]:
            total = self.add(total, more)
        return total


def _combine_fn(beam, body):
    class Combine(beam.CombineFn):
        """A CombineFn of `body`'s create/add/merge."""

        def create_accumulator(self):
            """As `body.create`."""
            return body.create()

        def add_input(self, accumulator, element):
            """As `body.add`."""
            return body.add(accumulator, element)

        def merge_accumulators(self, accumulators):
            """As `body.merge`."""
            return body.merge(accumulators)

        def extract_output(self, accumulator):
            """The accumulator itself."""
            return accumulator

    return Combine()


def _read_histogram(pred_dir, block):
    return records.read_histogram(
        storage.join(pred_dir, records.histogram_name(block)))


def _plan(config, info, total):
    histogram, num_records = total
    if num_records != info["num_images"]:
        raise ValueError(
            f"Expected the histograms of {config.pred_dir} to count "
            f"{info['num_images']} images (the source's size). Received: "
            f"{num_records}")
    plan = selection.checked_plan(config, histogram, info)
    return {"histogram": histogram, "plan": plan,
            "names": selection.output_names(config, plan)}


def _part_path(config, task, file_index):
    return storage.join(config.out_dir, PARTS_DIR,
                        f"part-{task:06d}-{file_index:05d}.tfrecord")


def _write_task(config, info, task, blocks, planned, starts):
    """Writes one range's parts of every output file; (task, Kept)."""
    plan, names = planned["plan"], planned["names"]
    paths = [_part_path(config, task, i) for i in range(len(names))]
    kept = selection.write_blocks(
        config, plan, info, paths, blocks=blocks,
        taken=selection.taken_before(starts[task], plan))
    return task, kept


def _prefix_sums(counted, num_tasks, num_classes):
    """{task: boundary counts of all the tasks before it}."""
    by_task = dict(counted)
    running = np.zeros(num_classes, np.int64)
    starts = {}
    for task in range(num_tasks):
        starts[task] = running.copy()
        running += by_task.get(task, 0)
    return starts


def _merge_kept(pairs):
    pairs = sorted(pairs, key=lambda pair: pair[0])
    kept = pairs[0][1]
    for _, more in pairs[1:]:
        kept.merge(more)
    return kept


def _assemble(config, file_index, planned, num_tasks, kept):
    del kept  # A side input: assembly starts after every range is written.
    name = planned["names"][file_index]
    selection.assemble(storage.join(config.out_dir, name),
                       [_part_path(config, task, file_index)
                        for task in range(num_tasks)])
    return file_index


def _save_summary(config, planned, kept, assembled):
    del assembled  # A side input: saved after every file is assembled.
    storage.atomic_write(
        storage.join(config.out_dir, _SUMMARY),
        pickle.dumps({"histogram": planned["histogram"],
                      "plan": planned["plan"], "kept": kept}))


def run_select(config, options, blocks_per_task=BLOCKS_PER_TASK):
    """Filters and balances a finished prediction folder with Beam.

    Args:
      config: A `selection.SelectConfig`.
      options: The --beam_pipeline_options text.
      blocks_per_task: Consecutive blocks per writing task.

    Returns:
      The report dict, as `selection.select`'s.

    Raises:
      ValueError, FileNotFoundError: as `selection.select`.
      BeamNotInstalledError: without apache_beam.
    """
    beam = import_beam(options)
    if blocks_per_task < 1:
        raise ValueError("Expected blocks_per_task >= 1. Received: "
                         f"blocks_per_task={blocks_per_task}")
    started = time.time()
    info = records.check_predictions(config.pred_dir)
    class_names = model_info.read_class_names(config.pred_dir)
    if class_names is not None and len(class_names) != info["num_classes"]:
        class_names = None
    selection.clear_selection(config.out_dir)
    parts = storage.join(config.out_dir, PARTS_DIR)
    storage.remove_quietly(parts)
    storage.remove_quietly(storage.join(config.out_dir, _SUMMARY))
    tf.io.gfile.makedirs(parts)
    blocks = info["blocks"]
    tasks = [(t, blocks[i:i + blocks_per_task]) for t, i in
             enumerate(range(0, len(blocks), blocks_per_task))]
    body = _HistogramSum(info["num_classes"], info["num_bins"])
    pipeline = beam.Pipeline(options=pipeline_options(options))
    singleton = beam.pvalue.AsSingleton
    total = (pipeline
             | "Blocks" >> beam.Create(blocks)
             | "ReadHistograms" >> beam.Map(
                 lambda b: _read_histogram(config.pred_dir, b))
             | "SumHistograms" >> beam.CombineGlobally(
                 _combine_fn(beam, body)))
    planned = total | "Plan" >> beam.Map(lambda t: _plan(config, info, t))
    ranges = (pipeline | "Ranges" >> beam.Create(tasks)
              | "SpreadRanges" >> beam.Reshuffle())
    starts = (ranges
              | "BoundaryCounts" >> beam.Map(
                  lambda task, p: (task[0], selection.boundary_counts(
                      config.pred_dir, task[1], p["plan"])),
                  singleton(planned))
              | "AllCounts" >> beam.combiners.ToList()
              | "PrefixSums" >> beam.Map(
                  lambda counted: _prefix_sums(counted, len(tasks),
                                               info["num_classes"])))
    kept = (ranges
            | "Write" >> beam.Map(
                lambda task, p, s: _write_task(config, info, task[0],
                                               task[1], p, s),
                singleton(planned), singleton(starts))
            | "AllKept" >> beam.combiners.ToList()
            | "MergeKept" >> beam.Map(_merge_kept))
    assembled = (planned
                 | "FileIndices" >> beam.FlatMap(
                     lambda p: range(len(p["names"])))
                 | "SpreadFiles" >> beam.Reshuffle()
                 | "Assemble" >> beam.Map(
                     lambda f, p, k: _assemble(config, f, p, len(tasks), k),
                     singleton(planned), singleton(kept))
                 | "AllAssembled" >> beam.combiners.Count.Globally())
    _ = (planned
         | "Save" >> beam.Map(
             lambda p, k, a: _save_summary(config, p, k, a),
             singleton(kept), singleton(assembled)))
    _run(pipeline, "select")
    summary_path = storage.join(config.out_dir, _SUMMARY)
    with tf.io.gfile.GFile(summary_path, "rb") as f:
        summary = pickle.loads(f.read())
    storage.remove_quietly(parts)
    storage.remove_quietly(summary_path)
    return selection.finish(config, info, class_names, summary["histogram"],
                            summary["plan"], summary["kept"], started)
