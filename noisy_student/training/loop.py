"""One custom training loop for the teacher and the student.

`train_and_evaluate(config, model_dir, train_dataset_fn)` trains an
EfficientNet under any tf.distribute strategy (default, one_device, mirrored,
multi_worker_mirrored, tpu) and leaves in `model_dir`:

    config.json      the resolved configuration, written before step 0;
    checkpoints/     tf.train.CheckpointManager checkpoints (model, optimizer,
                     EMA, step, seed states), every `checkpoint_every` steps
                     and at the end;
    logs/train|eval  TensorBoard summaries;
    metrics.json     every evaluation, the best and the last (top-1, top-5);
    model.keras      the EMA weights in Keras format, written atomically at
                     the end (what later stages load with
                     `model.loading.load_model`).

The parts, as in flax's examples/imagenet: `train_config` (the nested
config), `training.state` (model, optimizer, EMA, step, checkpoints:
`create_train_state`), `train_step` (the step and evaluation functions,
built apart from the loop) and this module (the loop, logging, metrics.json).

A restarted run resumes from the latest checkpoint and stops exactly at
`train_steps`, and ends with the same weights as a run never stopped: the
checkpoint holds every state the step changes, and the input resumes at the
checkpoint's step. The iterator itself is not checkpointed (a shuffle buffer
of images would be too big); instead a `train_dataset_fn` that takes a
`start_step` argument is asked for its stream from that batch on (see
noisy_student.data.streams: a seeded stream is a function of the step), and
one that does not is skipped past its first `start_step` batches, which
costs making them. Even the cheap skip reads the skipped images again (about
35,000 in-memory digits images/s on the 2-core test machine; file sources
decode them too), so resuming late in a very long run (ImageNet) takes
minutes to hours; a per-epoch seeded shuffle that skips whole epochs without
reading them would remove that cost.

The loop (per host): `steps_per_loop` steps run inside one tf.function
(`train_step.make_train_loop`); a loop also ends at every logging,
checkpoint and evaluation step, so those happen at exactly their steps. A
non-finite loss stops training with FloatingPointError naming the step; the
state is not saved, so the last checkpoint is the last good one.
"""

import dataclasses
import json
import shutil
import time

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from noisy_student.training import config as config_lib
from noisy_student.training import losses
from noisy_student.training import state as state_lib
from noisy_student.training import step as train_step
from noisy_student.training import strategy as strategy_lib
from noisy_student.utils import storage

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
# The config.json fields a resumed run may change: how long it trains and
# how it runs (and init_from, used only at its start). Any other change
# would make the rest of the run, and its config.json, another run's.
_RESUMABLE_FIELDS = ("train_steps", "checkpoint_every", "eval_every",
                     "log_every", "steps_per_loop", "keep_checkpoints",
                     "verbose", "cpu_kernels", "jit_compile",
                     "fused_batch_norm", "strategy", "tpu", "sync_batch_norm",
                     "init_from")


@dataclasses.dataclass
class _Log:
    """What the loop reports, and where.

    Attributes:
      model_dir: The run's folder (metrics.json is written there).
      is_chief: Only the chief writes files.
      prefix: Put before every progress line.
      train_writer, eval_writer: TensorBoard summary writers.
      evals: Every evaluation so far: dicts step, top1, top5, count.
      last_window: The last log window's means (see `_window_means`).
    """
    model_dir: str
    is_chief: bool
    prefix: str
    train_writer: object
    eval_writer: object
    evals: list
    last_window: dict = dataclasses.field(default_factory=dict)


def train_and_evaluate(config, model_dir, train_dataset_fn, eval_dataset=None,
                       strategy=None, log_prefix=""):
    """Trains (or resumes) a teacher or a student; see the module docstring.

    Args:
      config: A `train_config.TrainConfig`.
      model_dir: Output folder (local or gs://); resumed if it holds
        checkpoints.
      train_dataset_fn: `fn(tf.distribute.InputContext) -> tf.data.Dataset`
        (or `fn(input_context, start_step=k)`, giving the stream from its
        batch k on: a resumed run asks for that; see the module docstring)
        yielding *per-replica* batches, endlessly:
        {"labeled": {"image": [b, H, W, C] float32/uint8 in [0, 255],
                     "label": [b] int},
         "unlabeled": {"image": [b * r, H, W, C],
                       "target": [b * r, num_classes] float}}
        with b = batch_size / replicas and r = unlabel_ratio ("unlabeled"
        only for a student). Shard with `input_context.input_pipeline_id`
        when there are several workers.
      eval_dataset: Optional finite dataset of batches {"image", "label"},
        evaluated with the EMA weights every `eval_every` steps and at the
        end. With TPUs its batches must all have the same size.
      strategy: An existing strategy; by default `make_strategy` of the
        config's (a multi-worker strategy must be made before other TF ops,
        so programs may make it first and pass it here).
      log_prefix: Printed before every progress line (e.g. the pipeline's
        "[iteration1/train] "), so a log of several stages says whose step
        it is.

    Returns:
      A dict of final metrics: step, start_step, loss (cross-entropy mean
      over the last log window plus the L2 term), weight_decay (the L2 term),
      labeled_loss, unlabeled_loss (mean cross-entropies), accuracy (train
      top-1 on labeled images), learning_rate, images_per_sec (labeled +
      unlabeled images per second of training time), eval_top1, eval_top5,
      best_eval_top1, best_eval_step (None where not measured), wall_time_s.

    Raises:
      FloatingPointError: if the loss becomes NaN or infinite.
      ValueError: for a dataset or model_dir that does not fit the config.
    """
    start_time = time.time()
    if strategy is None:
        strategy = strategy_lib.make_strategy(config.loop.strategy,
                                              config.loop.tpu)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(
        config_lib.PRECISIONS[config.loop.precision])
    state = None
    try:
        model_dir = str(model_dir).rstrip("/")
        is_chief = strategy_lib.is_chief(strategy)
        _check_batch_size(config, strategy.num_replicas_in_sync)
        if is_chief:
            _write_config(config, model_dir, strategy.num_replicas_in_sync)
        state = state_lib.create_train_state(config, strategy, model_dir,
                                             is_chief)
        step, log = _run(config, state, strategy, model_dir, is_chief,
                         train_dataset_fn, eval_dataset, log_prefix)
        return _result(log, state.start_step, step, start_time)
    finally:
        if state is not None and state.worker_temp_dir:
            shutil.rmtree(state.worker_temp_dir, ignore_errors=True)
        keras.mixed_precision.set_global_policy(previous_policy)


def _check_batch_size(config, replicas):
    if config.loop.batch_size % replicas:
        raise ValueError(
            f"Expected a batch_size divisible by the {replicas} replicas. "
            f"Received: batch_size={config.loop.batch_size}")


def _run(config, state, strategy, model_dir, is_chief, train_dataset_fn,
         eval_dataset, log_prefix):
    """Builds the input, the step functions and the log; runs the loop.

    Returns:
      (final step, the `_Log`).
    """
    metrics = train_step.create_metrics(strategy)
    iterator = iter(strategy.distribute_datasets_from_function(
        train_step.checked_dataset_fn(train_dataset_fn, config,
                                        state.start_step)))
    eval_loop = None
    if eval_dataset is not None:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        eval_loop = train_step.make_eval_loop(
            state.model, config.model.num_classes, strategy,
            strategy.experimental_distribute_dataset(
                eval_dataset.with_options(options)), metrics)
    train_loop = train_step.make_train_loop(state, config, strategy, metrics)
    log = _make_log(model_dir, is_chief, log_prefix, state.start_step)
    step = _loop(config, state, metrics, train_loop, iterator, eval_loop, log)
    if state.manager.latest_checkpoint is None or (
            state_lib.checkpoint_step(state.manager.latest_checkpoint)
            != step):
        state_lib.save_checkpoint(state, step)
    if eval_loop is not None:
        _evaluate(config, state, metrics, eval_loop, log, step)
    if is_chief:
        state_lib.export_ema_model(state, config, model_dir)
        _write_metrics(log, step)
    return step, log


def _make_log(model_dir, is_chief, prefix, start_step):
    """The `_Log` of a run, with the evaluations a resumed run made."""
    logdir = f"{model_dir}/logs"
    if is_chief:
        train_writer = tf.summary.create_file_writer(logdir + "/train")
        eval_writer = tf.summary.create_file_writer(logdir + "/eval")
    else:
        train_writer = tf.summary.create_noop_writer()
        eval_writer = tf.summary.create_noop_writer()
    path = f"{model_dir}/{METRICS_FILE}"
    evals = []
    if is_chief and tf.io.gfile.exists(path):
        evals = [e for e in storage.read_json(path).get("evals", [])
                 if e["step"] <= start_step]
    return _Log(model_dir, is_chief, prefix, train_writer, eval_writer, evals)


def _loop(config, state, metrics, train_loop, iterator, eval_loop, log):
    """Runs the steps from state.start_step to train_steps; returns the step.

    Throughput and ETA count training time only, not checkpoints,
    evaluations, nor the first loop call, which traces the step function
    (seconds to minutes) and would inflate the first ETA.
    """
    loop = config.loop
    step = state.start_step
    if loop.verbose and step:
        print(f"{log.prefix}Resuming from step {step} in {log.model_dir}/"
              f"{state_lib.CHECKPOINT_DIR} (the input skips the {step} "
              "batches already trained on)", flush=True)
    window = _Window()
    traced = False
    while step < loop.train_steps:
        num = _steps_until_event(loop, step, eval_loop is not None)
        if state.preemption_handler is not None:
            # Saves and exits if this worker or a peer got SIGTERM.
            state.preemption_handler.save_checkpoint_if_preempted(
                checkpoint_number=step)
        start = time.time()
        train_loop(iterator, tf.constant(step, tf.int64),
                   tf.constant(num, tf.int32))
        step += num
        _check_finite(metrics, step, log.model_dir)  # Waits for the loop.
        window.add(num, time.time() - start if traced else None)
        traced = True
        if step % loop.log_every == 0 or step == loop.train_steps:
            _log_window(config, state, metrics, log, step, window)
            window = _Window()
        if step == loop.train_steps or (
                loop.checkpoint_every and step % loop.checkpoint_every == 0):
            state_lib.save_checkpoint(state, step)
        if eval_loop is not None and loop.eval_every and (
                step % loop.eval_every == 0 and step != loop.train_steps):
            _evaluate(config, state, metrics, eval_loop, log, step)
    return step


@dataclasses.dataclass
class _Window:
    """Steps since the last log line; `seconds` timed `timed_steps` of them
    (the tracing call is not timed)."""
    steps: int = 0
    seconds: float = 0.0
    timed_steps: int = 0

    def add(self, num, seconds):
        """Counts `num` steps that took `seconds` (None: not timed)."""
        self.steps += num
        if seconds is not None:
            self.seconds += seconds
            self.timed_steps += num


def _steps_until_event(loop, step, evaluates):
    """Steps to run before the next log, checkpoint, evaluation or end."""
    num = min(loop.steps_per_loop, loop.train_steps - step)
    for every in (loop.log_every, loop.checkpoint_every,
                  loop.eval_every if evaluates else 0):
        if every:
            num = min(num, every - step % every)
    return num


def _check_finite(metrics, step, model_dir):
    """Raises FloatingPointError if a step's loss was not finite."""
    bad = int(metrics.first_bad_step.numpy())
    if bad >= 0:
        latest = tf.train.latest_checkpoint(
            f"{model_dir}/{state_lib.CHECKPOINT_DIR}")
        raise FloatingPointError(
            f"Expected a finite loss. Received: a NaN or infinite loss at "
            f"step {bad} (of the steps up to {step}). Training stopped; "
            f"the last good checkpoint is {latest} (nothing later was "
            "saved). Lower base_learning_rate, check the input for NaN/inf "
            "pixels, or use precision=float32.")


def _window_means(config, state, metrics, window):
    """The window's means from the summed metrics (which it resets).

    Returns:
      A dict: loss (mean cross-entropy + the L2 term), weight_decay (the L2
      term), labeled_loss, unlabeled_loss (None for a teacher), accuracy,
      learning_rate, images_per_sec (None when no step was timed).
    """
    sums = dict(zip(train_step.SUMS, metrics.sums.numpy().tolist()))
    metrics.sums.assign(tf.zeros([len(train_step.SUMS)]))
    images = sums["n_labeled"] + sums["n_unlabeled"]
    rate = (images * window.timed_steps / window.steps
            / max(window.seconds, 1e-9) if window.timed_steps else None)
    # The L2 term is not part of the in-graph loss (see train_step); its
    # value at this step is added here.
    decay = float(losses.l2_weight_decay(state.l2_variables,
                                         config.optimizer.weight_decay))
    return {
        "loss": sums["loss"] / window.steps + decay,
        "weight_decay": decay,
        "labeled_loss": sums["labeled_ce"] / max(sums["n_labeled"], 1),
        "unlabeled_loss": (sums["unlabeled_ce"] / sums["n_unlabeled"]
                           if sums["n_unlabeled"] else None),
        "accuracy": sums["correct"] / max(sums["n_labeled"], 1),
        "learning_rate": float(state.schedule(state.optimizer.iterations)),
        "images_per_sec": rate,
    }


def _log_window(config, state, metrics, log, step, window):
    """Writes the window's means as summaries and a progress line."""
    means = _window_means(config, state, metrics, window)
    log.last_window = means
    with log.train_writer.as_default(step=step):
        for name, value in means.items():
            if value is not None:
                _summary_scalar(name, value)
    log.train_writer.flush()
    if not config.loop.verbose:
        return
    total = config.loop.train_steps
    if window.timed_steps:
        eta = (total - step) * window.seconds / window.timed_steps
        speed = (f"{means['images_per_sec']:.1f} img/s eta "
                 f"{_format_seconds(eta)}")
    else:
        speed = "(tracing; speed at the next line)"
    unl = (f" unl {means['unlabeled_loss']:.4f}"
           if means["unlabeled_loss"] is not None else "")
    print(f"{log.prefix}step {step}/{total} loss {means['loss']:.4f} (lab "
          f"{means['labeled_loss']:.4f}{unl}) acc {means['accuracy']:.3f} "
          f"lr {means['learning_rate']:.5g} {speed}", flush=True)


def _evaluate(config, state, metrics, eval_loop, log, step):
    """Evaluates the EMA weights; records, logs and writes the result."""
    metrics.eval_sums.assign(tf.zeros([len(train_step.EVAL_SUMS)]))
    if state.ema is not None:
        state.ema.swap()
    try:
        eval_loop()
    finally:
        if state.ema is not None:
            state.ema.swap()
    top1_sum, top5_sum, count = metrics.eval_sums.numpy().tolist()
    if not count:
        raise ValueError("Expected a non-empty eval_dataset. Received: "
                         "eval_dataset with 0 images")
    result = {"step": step, "top1": top1_sum / count,
              "top5": top5_sum / count, "count": int(count)}
    log.evals = [e for e in log.evals if e["step"] != step] + [result]
    with log.eval_writer.as_default(step=step):
        _summary_scalar("top1", result["top1"])
        _summary_scalar("top5", result["top5"])
    log.eval_writer.flush()
    if config.loop.verbose:
        print(f"{log.prefix}eval step {step}: top1 {result['top1']:.4f} top5 "
              f"{result['top5']:.4f} ({int(count)} images, EMA weights)",
              flush=True)
    if log.is_chief:
        _write_metrics(log, step)


def check_resumable(config, model_dir):
    """Raises unless `config` may start or resume the run in `model_dir`.

    A model_dir with checkpoints resumes only with the settings its
    config.json records, but for how long it trains and how it runs
    (`_RESUMABLE_FIELDS`: --train_steps to train longer, the logging and
    checkpoint intervals, the strategy, the CPU kernels...).

    Args:
      config: The `TrainConfig` of the run.
      model_dir: Its folder (local or gs://).

    Raises:
      ValueError: naming every other field that differs, with its recorded
        and new values.
    """
    path = f"{model_dir}/{CONFIG_FILE}"
    if not (tf.io.gfile.exists(path) and tf.io.gfile.exists(
            f"{model_dir}/{state_lib.CHECKPOINT_DIR}")):
        return
    # A field missing from an older config.json had its default (e.g.
    # channels=3 before the field existed); JSON turns tuples into lists.
    recorded = storage.read_json(path)
    old = {**config_lib.default_fields(), **config_lib.flat_fields(recorded)}
    new = json.loads(json.dumps(config.fields()))
    unchecked = set(_RESUMABLE_FIELDS)
    if "input" not in recorded:
        # Runs made before the input settings were a part of this config
        # kept them in the stage's stage_config.json (the pipeline's
        # fingerprint checks them).
        unchecked.update(config_lib.INPUT_FIELDS)
    changed = [f"{k}={new[k]!r} (was {old.get(k)!r})" for k in sorted(new)
               if k not in unchecked and old.get(k) != new[k]]
    if changed:
        raise ValueError(
            f"Expected model_dir to be empty or to hold a run of the same "
            f"settings (a resumed run may change only "
            f"{', '.join(_RESUMABLE_FIELDS)}). Received: model_dir="
            f"{model_dir}, whose {CONFIG_FILE} differs in {', '.join(changed)}"
            ". Use a new model_dir, or restore those settings.")


def _write_config(config, model_dir, replicas):
    """Writes config.json; refuses a model_dir holding another run."""
    check_resumable(config, model_dir)
    storage.write_json(f"{model_dir}/{CONFIG_FILE}",
                        {**config.to_dict(), "num_replicas": replicas})


def _write_metrics(log, step):
    """Writes metrics.json: the step, every evaluation, best, last, train."""
    best = max(log.evals, key=lambda e: e["top1"]) if log.evals else None
    storage.write_json(f"{log.model_dir}/{METRICS_FILE}", {
        "step": step,
        "last": log.evals[-1] if log.evals else None,
        "best": best,
        "evals": log.evals,
        "train": log.last_window,
    })


def _result(log, start_step, step, start_time):
    """The dict `train_and_evaluate` returns (see there)."""
    best = max(log.evals, key=lambda e: e["top1"]) if log.evals else None
    last = log.evals[-1] if log.evals else {}
    window = log.last_window
    names = ("loss", "weight_decay", "labeled_loss", "unlabeled_loss",
             "accuracy", "learning_rate", "images_per_sec")
    return {
        "step": step,
        "start_step": start_step,
        **{name: window.get(name) for name in names},
        "eval_top1": last.get("top1"),
        "eval_top5": last.get("top5"),
        "best_eval_top1": best["top1"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "wall_time_s": time.time() - start_time,
    }


def _summary_scalar(name, value):
    """tf.summary.scalar without needing the tensorboard package installed.

    TF 2.21 no longer installs tensorboard, and tf.summary.scalar then fails;
    this writes the same event (a float32 tensor tagged for TensorBoard's
    scalars plugin) through the core tf.summary.write.
    """
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(name, tf.constant(value, tf.float32), metadata=metadata)


def _format_seconds(seconds):
    """h:mm:ss of a non-negative duration in seconds."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
