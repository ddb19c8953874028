"""The state of a training run: model, optimizer, EMA, step, checkpoints.

`create_train_state` builds it inside a tf.distribute strategy's scope and
restores the newest checkpoint of `model_dir`; `export_ema_model` writes the
averaged weights as the run's `model.keras`. The checkpoint holds every
state a training step changes: the model's weights, the optimizer's slots,
the EMA averages, the global step and the seed states of dropout and
stochastic depth (Keras SeedGenerators), so a resumed run draws the same
noise as a run never stopped.

Preemption: on multi_worker_mirrored a
tf.distribute.experimental.PreemptionCheckpointHandler watches for SIGTERM
(and peers' notices) and saves a checkpoint in `model_dir/preemption` that a
restart resumes from, along with the regular checkpoints (whichever is newer).
On Cloud TPU VMs TF 2.21's handler does nothing ("does not support usage with
TPU or CPU device on GCP"), so there the regular checkpoints are the
protection; keep `checkpoint_every` short enough.

Checkpoint timing stays ours (saves at multiples of `checkpoint_every`, see
`training.loop`) rather than `tf.train.CheckpointManager`'s `checkpoint_interval`
(checked with TF 2.21): that interval counts from the last save the manager
knows (its `last_checkpoint_step` argument, else none, so a fresh run would
save at its first loop), which after a resume from a preemption checkpoint
at step 137 would move every later save to 237, 337, ... instead of the
multiples the loop stops at (its loops end at every `checkpoint_every`
multiple anyway, for the logs and evaluations).
"""

import dataclasses
import tempfile

from absl import logging
import keras
import tensorflow as tf

from noisy_student.kernels import switch as kernel_switch
from noisy_student.model import checkpoints
from noisy_student.model import efficientnet
from noisy_student.model import layers
from noisy_student.model import loading
from noisy_student.training import losses
from noisy_student.training import optimizers as optim
from noisy_student.training import strategy as strategy_lib
from noisy_student.utils import storage

CHECKPOINT_DIR = "checkpoints"
PREEMPTION_DIR = "preemption"


@dataclasses.dataclass
class TrainState:
    """What a training step reads and changes, and how it is saved.

    Attributes:
      model: The EfficientNet being trained (`keras.Model`).
      optimizer: Its Keras optimizer (slots built).
      schedule: The `optim.WarmupDecaySchedule` the optimizer follows.
      ema: `optim.ExponentialMovingAverage` of the weights, or None
        (ema_decay=0).
      step: int64 tf.Variable, the global step (steps done).
      manager: `tf.train.CheckpointManager` of the checkpoint (model,
        optimizer, ema, step, seeds).
      l2_variables: Variables that get the L2 weight decay's gradient
        (empty with adamw or weight_decay=0).
      preemption_handler: PreemptionCheckpointHandler, or None.
      start_step: The step restored from the checkpoint (0 for a new run).
      worker_temp_dir: A non-chief worker's throw-away checkpoint folder.
    """
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: optim.WarmupDecaySchedule
    ema: optim.ExponentialMovingAverage | None
    step: tf.Variable
    manager: tf.train.CheckpointManager = None
    l2_variables: list = dataclasses.field(default_factory=list)
    preemption_handler: object = None
    start_step: int = 0
    worker_temp_dir: str | None = None

    def checkpoint_items(self, seeds=True):
        """The objects a checkpoint holds, as tf.train.Checkpoint kwargs."""
        items = dict(model=self.model, optimizer=self.optimizer,
                     ema=self.ema.averages if self.ema else [],
                     step=self.step)
        if seeds:
            items["seeds"] = seed_states(self.model)
        return items


def build_model(config):
    """The config's EfficientNet (uncompiled, float32 logits).

    Args:
      config: A `train_config.TrainConfig`; its model part is passed to
        `efficientnet.build_efficientnet` unchanged.
    """
    return efficientnet.build_efficientnet(
        **dataclasses.asdict(config.model))


def learning_rate_schedule(config):
    """The config's `optim.WarmupDecaySchedule` (peak at peak_lr).

    Args:
      config: A `train_config.TrainConfig`.
    """
    opt = config.optimizer
    decay_steps = 1.0
    if opt.lr_schedule == "exponential":
        decay_steps = opt.lr_decay_epochs * config.steps_per_epoch
    return optim.WarmupDecaySchedule(
        config.peak_lr, warmup_steps=config.resolved_warmup_steps,
        decay=opt.lr_schedule, decay_steps=decay_steps,
        decay_rate=opt.lr_decay_rate, total_steps=config.loop.train_steps)


def create_train_state(config, strategy, model_dir, is_chief=True):
    """Builds the state inside `strategy`'s scope and restores its newest
    checkpoint.

    Seeds Python, NumPy and TF with `config.loop.seed` first, so the same
    config initialises the same weights.

    Args:
      config: A `train_config.TrainConfig`.
      strategy: The tf.distribute strategy the run uses.
      model_dir: The run's folder; checkpoints in `model_dir/checkpoints`.
      is_chief: False on the non-chief workers of a multi-worker run (they
        save into a throw-away folder).

    Returns:
      A `TrainState` whose `start_step` is the restored step.

    Raises:
      ValueError: for an init_from checkpoint that does not fit, a
        freeze_blocks larger than the model's blocks, or a checkpoint
        beyond train_steps.
    """
    keras.utils.set_random_seed(config.loop.seed)
    pretrained = (checkpoints.read(config.init_from, config.model.model_name,
                                   what="init_from")
                  if config.init_from else None)
    with strategy.scope():
        model = build_model(config)
        if config.loop.fused_batch_norm:
            use_fused_batch_norm(model)
        if config.loop.cpu_kernels and _on_cpu_in_float32(config):
            kernel_switch.use_cpu_kernels(model)
        if pretrained is not None:
            _initialise(model, pretrained, config)
        efficientnet.freeze_blocks(model, config.freeze_blocks)
        state = _create_optimizer_state(model, config)
        state.manager, state.worker_temp_dir = _checkpoint_manager(
            state, config, model_dir, is_chief)
        state.preemption_handler = _preemption_handler(state, strategy,
                                                       model_dir)
        state.start_step = _restore(state, model_dir, config)
    return state


def _create_optimizer_state(model, config):
    """Optimizer, EMA and step of `model` (inside the strategy's scope)."""
    opt = config.optimizer
    trainable = model.trainable_variables
    decay_vars = losses.weight_decay_variables(model)
    l2_vars = (decay_vars if opt.optimizer != "adamw"
               and opt.weight_decay > 0 else [])
    no_decay = [v for v in trainable if all(v is not d for d in decay_vars)]
    schedule = learning_rate_schedule(config)
    optimizer = optim.build_optimizer(
        opt.optimizer, schedule, momentum=opt.momentum, rho=opt.rmsprop_rho,
        epsilon=opt.rmsprop_epsilon, decoupled_weight_decay=opt.weight_decay,
        no_decay_variables=no_decay,
        loss_scale=config.loop.precision == "mixed_float16")
    # Keras 3 optimizers must create their slots inside the scope before the
    # first step, or MirroredStrategy fails (seen with TF 2.21 / Keras 3.15;
    # the mirrored training tests cover it).
    optimizer.build(trainable)
    # ema_decay=0 means no averaging: skip its cost entirely.
    ema = (optim.ExponentialMovingAverage(
        optim.ema_source_variables(model), opt.ema_decay, opt.ema_warmup)
        if opt.ema_decay > 0 else None)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return TrainState(model=model, optimizer=optimizer, schedule=schedule,
                      ema=ema, step=step, l2_variables=l2_vars)


def _initialise(model, pretrained, config):
    """Copies init_from's weights (see TrainConfig.init_from)."""
    partial = pretrained.kind == checkpoints.MODEL_KERAS
    head_copied = checkpoints.apply(pretrained, model, config.model.model_name,
                                    partial=partial)
    if config.loop.train_steps == 0 and not head_copied:
        raise ValueError(
            f"Expected a checkpoint with a {config.model.num_classes}-class "
            "head to use unchanged (train_steps=0); it has "
            f"{pretrained.num_classes or 'no'} classes, so its head would "
            f"be untrained. Received: init_from={config.init_from}, "
            "train_steps=0")
    logging.info("init_from %s (%s): %s head", config.init_from,
                 pretrained.kind, "its" if head_copied else "a new")


def use_fused_batch_norm(model):
    """Switches the model's plain BatchNormalization layers to the fused one.

    Changes the layers' class in place (`layers.FusedBatchNormalization`
    adds behaviour, no state), so variables, checkpoints and the
    distribution of already-created variables are untouched; only the
    training computation changes. Exports are built fresh and keep Keras'
    class.

    Args:
      model: A Keras model.

    Returns:
      The number of layers switched.
    """
    switched = 0
    for layer in layers.all_layers(model):
        if type(layer) is keras.layers.BatchNormalization:  # pylint: disable=unidiomatic-typecheck
            layer.__class__ = layers.FusedBatchNormalization
            switched += 1
    return switched


def _on_cpu_in_float32(config):
    """Whether the step runs on CPU devices only, in float32, without XLA
    (the CPU kernels have no GPU, TPU or XLA kernel)."""
    return (config.loop.precision == "float32" and not config.loop.jit_compile
            and config.loop.strategy != "tpu"
            and not tf.config.list_logical_devices("GPU"))


def _checkpoint_manager(state, config, model_dir, is_chief):
    """(CheckpointManager, worker temp dir or None) of the state."""
    write_dir, temp_dir = f"{model_dir}/{CHECKPOINT_DIR}", None
    if not is_chief:
        # Every worker must save (MultiWorkerMirroredStrategy), but only the
        # chief's copy is kept.
        temp_dir = tempfile.mkdtemp(prefix="ns-worker-ckpt-")
        write_dir = temp_dir
    else:
        # A save that was killed (or whose clean-up failed) leaves its
        # ckpt-N_temp/ folder: never read, and the run holds the folder.
        for partial in tf.io.gfile.glob(f"{write_dir}/ckpt-*_temp"):
            storage.remove_quietly(partial)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(**state.checkpoint_items()), write_dir,
        max_to_keep=config.loop.keep_checkpoints, checkpoint_name="ckpt")
    return manager, temp_dir


def save_checkpoint(state, step):
    """Saves the state as checkpoint `step` of its CheckpointManager.

    Args:
      state: The run's `TrainState`.
      step: The checkpoint's number, the global step.

    Returns:
      The checkpoint's path prefix.

    Raises:
      utils.storage.DiskFullError: naming the checkpoint folder, if the device
        is full. Whatever the error, the failed save's files (its
        ckpt-N_temp/ folder) are removed and the last checkpoint stays
        the latest.
    """
    folder = state.manager.directory
    try:
        return state.manager.save(checkpoint_number=step)
    except BaseException as e:
        _remove_failed_save(folder, step)
        last = tf.train.latest_checkpoint(folder)  # ckpt-<step>
        note = (f"it resumes from its last checkpoint, step "
                f"{last.rsplit('-', 1)[1]}" if last
                else "no checkpoint was saved: it starts again")
        full = storage.DiskFullError.of(
            e, f"the checkpoint into {folder}", note)
        if full is None:
            raise
        raise full from e


def _remove_failed_save(folder, step):
    """Removes what a failed save of checkpoint `step` left in `folder`."""
    name = f"ckpt-{step}"
    storage.remove_quietly(f"{folder}/{name}_temp")
    state = tf.train.get_checkpoint_state(folder)
    recorded = [p.rsplit("/", 1)[-1]
                for p in state.all_model_checkpoint_paths] if state else []
    if name not in recorded:
        # Written, but the save failed before recording it (a recorded
        # one is whole, and may be the latest).
        for path in tf.io.gfile.glob(f"{folder}/{name}.*"):
            storage.remove_quietly(path)


def _preemption_handler(state, strategy, model_dir):
    """A PreemptionCheckpointHandler on multi-worker GPU/CPU, else None.

    Restores from model_dir/preemption if a preempted run left one.
    """
    if (not strategy_lib.is_multi_worker(strategy)
            or isinstance(strategy, tf.distribute.TPUStrategy)):
        return None
    return tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver,
        tf.train.Checkpoint(**state.checkpoint_items()),
        checkpoint_dir=f"{model_dir}/{PREEMPTION_DIR}")


def _restore(state, model_dir, config):
    """Restores the newest regular checkpoint if it is ahead of the state.

    Returns:
      The step restored (0 for a new run).

    Raises:
      ValueError: if the checkpoint's step is beyond train_steps.
    """
    checkpoint_dir = f"{model_dir}/{CHECKPOINT_DIR}"
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest and checkpoint_step(latest) > int(state.step.numpy()):
        seeds = _has_seed_states(latest)
        if not seeds:
            # Written before the seed states were saved (or a model
            # without random layers): resumable, with fresh noise.
            logging.warning("%s holds no dropout/stochastic-depth seed "
                            "states: they restart.", latest)
        tf.train.Checkpoint(**state.checkpoint_items(seeds)).restore(
            latest).assert_existing_objects_matched()
        logging.info("Restored %s", latest)
    start_step = int(state.step.numpy())
    if start_step > config.loop.train_steps:
        raise ValueError(
            f"Expected train_steps >= the {start_step} steps already in "
            f"{checkpoint_dir}. Received: train_steps="
            f"{config.loop.train_steps}")
    return start_step


def seed_states(model):
    """The model's random-op states (Keras SeedGenerators of dropout and
    stochastic depth): variables outside `model.weights`, advanced by every
    training step, so a resumed run must restore them to draw the same masks.
    """
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _has_seed_states(path):
    """True if the checkpoint at `path` holds the seed states."""
    names = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    return any(name.startswith("seeds/") for name in names)


def checkpoint_step(path):
    """The global step stored in a checkpoint of this module (int)."""
    reader = tf.train.load_checkpoint(path)
    return int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


def export_ema_model(state, config, model_dir):
    """Writes the EMA weights (the weights if no EMA) as model.keras.

    The weights go into a float32 model built fresh (Keras' own batch norm,
    not the fused training layer), saved under a temporary name and renamed.

    Args:
      state: The run's `TrainState`.
      config: Its `train_config.TrainConfig` (builds the export model).
      model_dir: The run's folder (or a .keras path), local or gs://.

    Raises:
      utils.storage.DiskFullError: naming model.keras, if the device is full
        (no partial file is left).
    """
    averages = state.ema.numpy_averages() if state.ema else {}
    values = [averages.get(id(v)) if id(v) in averages else v.numpy()
              for v in state.model.weights]
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        export = build_model(config)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    for target, value in zip(export.weights, values, strict=True):
        target.assign(value)
    # A pretrained source may normalise its pixels otherwise (AdvProp).
    source = state.model.get_layer(checkpoints.NORMALIZE)
    norm = export.get_layer(checkpoints.NORMALIZE)
    norm.mean, norm.stddev = source.mean, source.stddev
    path = loading.keras_path(model_dir)
    temp = storage.temp_path(path)
    try:
        with storage.naming_full_disk(f"the model {path}"):
            keras.saving.save_model(export, temp)
    except BaseException:
        storage.remove_quietly(temp)  # No partial file beside the model.
        raise
    tf.io.gfile.rename(temp, path, overwrite=True)
