"""One custom training loop for the teacher and the student.

`train(config, model_dir, train_dataset_fn)` trains an EfficientNet under any
tf.distribute strategy (default, one_device, mirrored, multi_worker_mirrored,
tpu) and leaves in `model_dir`:

    config.json      the resolved configuration, written before step 0;
    checkpoints/     tf.train.CheckpointManager checkpoints (model, optimizer,
                     EMA, step), every `checkpoint_every` steps and at the end;
    logs/train|eval  TensorBoard summaries;
    metrics.json     every evaluation, the best and the last (top-1, top-5);
    model.keras      the EMA weights in Keras format, written atomically at
                     the end (what later stages load, see
                     `load_trained_model`).

A restarted run resumes from the latest checkpoint and stops exactly at
`train_steps`, and ends with the same weights as a run never stopped: the
checkpoint holds every state the step changes (model, optimizer, EMA, step,
and the seed states of dropout and stochastic depth), and the input resumes
at the checkpoint's step. The iterator itself is not checkpointed (a shuffle
buffer of images would be too big); instead a `train_dataset_fn` that takes
a `start_step` argument is asked for its stream from that batch on (see
noisy_student.data.pipeline: a seeded stream is a function of the step), and
one that does not is skipped past its first `start_step` batches, which
costs making them. Even the cheap skip reads the skipped images again (about
35,000 in-memory digits images/s on the 2-core test machine; file sources
decode them too), so resuming late in a very long run (ImageNet) takes
minutes to hours; a per-epoch seeded shuffle that skips whole epochs without
reading them would remove that cost.

The loop (per host):
  * `steps_per_loop` steps run inside one tf.function (a `tf.range` loop over
    the distributed iterator, the TPU host-loop pattern), so Python runs once
    per loop, not once per step. A loop also ends at every logging,
    checkpoint and evaluation step, so those happen at exactly their steps.
  * One step, per replica: forward the labeled and unlabeled images as one
    batch (as the official code does, so batch norm sees both), loss
    (see noisy_student.losses) divided by the *global* labeled batch,
    gradients plus the L2 weight decay's gradient on non-BN weights,
    optimizer (gradients summed over replicas by Keras; RMSProp as one fused
    kernel per weight), EMA update, metric sums in SyncOnRead variables.
    Batch norm trains with TF's fused kernel (`FusedBatchNormalization`).
  * A non-finite loss stops training with FloatingPointError naming the
    step; the state is not saved, so the last checkpoint is the last good one.

Preemption: on multi_worker_mirrored, a
tf.distribute.experimental.PreemptionCheckpointHandler watches for SIGTERM
(and peers' notices) and saves a checkpoint in `model_dir/preemption` that a
restart resumes from, along with the regular checkpoints (whichever is newer).
On Cloud TPU VMs TF 2.21's handler does nothing ("does not support usage with
TPU or CPU device on GCP"), so there the regular checkpoints are the
protection; keep `checkpoint_every` short enough.
"""

import dataclasses
import inspect
import re
import shutil
import tempfile
import time

from absl import logging
import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from noisy_student import checkpoints
from noisy_student import efficientnet
from noisy_student import io_utils
from noisy_student import losses
from noisy_student import optim
from noisy_student import strategy as strategy_lib

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16",
              "mixed_float16": "mixed_float16"}
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
PREEMPTION_DIR = "preemption"
# Fields that shape the saved state: a model_dir holding a run with other
# values cannot be resumed by this config.
_STATE_FIELDS = ("variant", "width", "depth", "num_classes", "channels",
                 "small_images", "optimizer", "freeze_blocks")
# Order of the per-replica training sums kept in one SyncOnRead vector.
_SUMS = ("loss", "labeled_ce", "unlabeled_ce", "correct", "n_labeled",
         "n_unlabeled")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides its data and model_dir.

    Model:
      variant: EfficientNet b0..b8 / l2, or None to give width and depth.
      width, depth: Scaling coefficients (override the variant's).
      num_classes: Output classes.
      image_size: Input side; None takes the variant's resolution.
      small_images: Stride 1 in stages 2-3 (inputs of 64 px or less).
      channels: Input channels of the model (1: grey, 3: RGB).
      dropout: Head dropout; None takes the variant's (0.2 without variant).
      stochastic_depth_rate: Base stochastic-depth rate (paper: 0.2).
      sync_batch_norm: Batch statistics over all replicas; None = on for
        tpu, off otherwise.
      bn_momentum, bn_epsilon: Batch norm settings (official: 0.99, 1e-3).

    Data:
      batch_size: Labeled images per *global* batch (all replicas).
      unlabel_ratio: Unlabeled images per labeled image in every batch
        (official: 1 for B0, 3 for B1-B7, 14 or 28 for L2); 0 = a teacher.
      images_per_epoch: Labeled images per epoch; an epoch is
        images_per_epoch / batch_size steps. Needed when warm-up or decay is
        given in epochs.
      train_steps: Total steps; a resumed run stops here too.

    Optimisation:
      optimizer: rmsprop (paper) | sgd | adam | adamw.
      base_lr: Learning rate per `lr_batch_size` labeled images (0.016/256).
      lr_batch_size: The batch base_lr refers to (256).
      momentum: rmsprop / sgd momentum (0.9).
      rmsprop_rho, rmsprop_epsilon: RMSProp decay and epsilon (0.9, 1e-3).
      warmup_epochs: Linear warm-up in epochs (5); warmup_steps overrides.
      lr_schedule: exponential (x lr_decay_rate every lr_decay_epochs,
        staircase) | cosine (over train_steps) | constant.
      lr_decay_rate, lr_decay_epochs: 0.97 every 2.4 epochs.
      weight_decay: L2 on every non-batch-norm trainable weight: the loss
        weight_decay * sum(w^2) / 2 (1e-5), applied as its gradient
        weight_decay * w added to the weights' gradients. With adamw it is
        AdamW's decoupled decay coefficient instead.
      label_smoothing: On the labeled cross-entropy (0.1).
      ema_decay: Decay of the weights' moving average (0.9999); 0 = no
        average (evaluation and export use the weights themselves).
      ema_warmup: Use min(ema_decay, (1 + t) / (10 + t)) at step t, as the
        official code (TF's num_updates) does; needed for short runs.
      precision: float32 | bfloat16 | mixed_float16 (logits stay float32;
        mixed_float16 adds dynamic loss scaling).

    Distribution and bookkeeping:
      strategy: default | one_device | mirrored | multi_worker_mirrored | tpu.
      tpu: TPU address for strategy=tpu (`local` on a TPU VM).
      steps_per_loop: Steps per tf.function call.
      checkpoint_every: Steps between checkpoints (0: only at the end).
      keep_checkpoints: Checkpoints kept.
      eval_every: Steps between evaluations (0: only at the end).
      log_every: Steps between progress lines and summaries.
      jit_compile: XLA-compile the per-replica step (slower on CPU; TPU
        compiles anyway). Tested with the default strategy only.
      fused_batch_norm: Train batch norm with TF's fused kernel (see
        `FusedBatchNormalization`; not with sync_batch_norm).
      verbose: Print the progress lines.

    Student options:
      init_from: Pretrained weights that initialise the model (any source
        of `noisy_student.checkpoints`: an official TF1 / Noisy Student
        checkpoint, a Keras applications .h5 file, or a model_dir / .keras
        file of ours). External checkpoints must fit the model but for the
        head (fresh when the class count differs); a model of ours is
        copied layer by layer where names and shapes match (a larger
        student from its teacher). With train_steps=0 the model is the
        checkpoint unchanged (its head must fit).
      freeze_blocks: Freeze the stem and the first N MBConv blocks (FixRes-
        style fine-tune at a larger image_size); frozen BN uses its moving
        statistics.

      seed: Seeds Python, NumPy and TF (weights initialisation, noise).
    """
    variant: str | None = None
    width: float | None = None
    depth: float | None = None
    num_classes: int = 10
    image_size: int | None = None
    small_images: bool = False
    channels: int = 3
    dropout: float | None = None
    stochastic_depth_rate: float = 0.2
    sync_batch_norm: bool | None = None
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3

    batch_size: int = 128
    unlabel_ratio: int = 0
    images_per_epoch: int | None = None
    train_steps: int = 1000

    optimizer: str = "rmsprop"
    base_lr: float = 0.016
    lr_batch_size: int = 256
    momentum: float = 0.9
    rmsprop_rho: float = 0.9
    rmsprop_epsilon: float = 1e-3
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    lr_schedule: str = "exponential"
    lr_decay_rate: float = 0.97
    lr_decay_epochs: float = 2.4
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    precision: str = "float32"

    strategy: str = "default"
    tpu: str | None = None
    steps_per_loop: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 5
    eval_every: int = 0
    log_every: int = 100
    jit_compile: bool = False
    fused_batch_norm: bool = True
    verbose: bool = True

    init_from: str | None = None
    freeze_blocks: int = 0
    seed: int = 0

    def __post_init__(self):
        def fail(expected, name):
            raise ValueError(f"Expected {expected}. Received: "
                             f"{name}={getattr(self, name)!r}")

        if self.variant is not None:
            efficientnet.get_variant(self.variant)
        elif self.width is None or self.depth is None:
            raise ValueError(
                "Expected a variant or both width and depth. Received: "
                f"variant=None, width={self.width!r}, depth={self.depth!r}")
        for name in ("width", "depth"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                fail(f"{name} > 0", name)
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            fail("num_classes >= 2", "num_classes")
        if self.image_size is None and self.variant is None:
            fail("an image_size when no variant is given", "image_size")
        if self.image_size is not None and not self.image_size > 0:
            fail("image_size > 0", "image_size")
        if self.channels not in (1, 3):
            fail("channels 1 or 3", "channels")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            fail("dropout in [0, 1)", "dropout")
        for name in ("stochastic_depth_rate", "label_smoothing", "ema_decay",
                     "momentum", "bn_momentum"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{name} in [0, 1)", name)
        if self.train_steps == 0 and not self.init_from:
            fail("train_steps > 0 (0 only with init_from: the checkpoint "
                 "used unchanged)", "train_steps")
        if not (isinstance(self.train_steps, int) and self.train_steps >= 0):
            fail("an integer train_steps >= 0", "train_steps")
        for name in ("batch_size", "lr_batch_size",
                     "steps_per_loop", "log_every", "keep_checkpoints"):
            if not (isinstance(getattr(self, name), int)
                    and getattr(self, name) > 0):
                fail(f"an integer {name} > 0", name)
        for name in ("unlabel_ratio", "checkpoint_every", "eval_every",
                     "freeze_blocks"):
            if not (isinstance(getattr(self, name), int)
                    and getattr(self, name) >= 0):
                fail(f"an integer {name} >= 0", name)
        if self.optimizer not in optim.OPTIMIZERS:
            fail(f"optimizer in {list(optim.OPTIMIZERS)}", "optimizer")
        for name in ("base_lr", "rmsprop_epsilon", "bn_epsilon",
                     "lr_decay_epochs"):
            if not getattr(self, name) > 0:
                fail(f"{name} > 0", name)
        if not 0 < self.rmsprop_rho < 1:
            fail("rmsprop_rho in (0, 1)", "rmsprop_rho")
        if not 0 < self.lr_decay_rate <= 1:
            fail("lr_decay_rate in (0, 1]", "lr_decay_rate")
        if self.weight_decay < 0:
            fail("weight_decay >= 0", "weight_decay")
        if self.warmup_epochs < 0:
            fail("warmup_epochs >= 0", "warmup_epochs")
        if self.warmup_steps is not None and not (
                isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            fail("None or an integer warmup_steps >= 0", "warmup_steps")
        if self.lr_schedule not in optim.LR_SCHEDULES:
            fail(f"lr_schedule in {list(optim.LR_SCHEDULES)}", "lr_schedule")
        if self.images_per_epoch is not None and not self.images_per_epoch > 0:
            fail("None or images_per_epoch > 0", "images_per_epoch")
        needs_epochs = (
            (self.warmup_steps is None and self.warmup_epochs > 0)
            or self.lr_schedule == "exponential")
        if needs_epochs and self.images_per_epoch is None:
            raise ValueError(
                "Expected images_per_epoch when the schedule is given in "
                "epochs (warmup_epochs with no warmup_steps, or "
                "lr_schedule='exponential'). Received: images_per_epoch=None, "
                f"warmup_epochs={self.warmup_epochs}, warmup_steps="
                f"{self.warmup_steps}, lr_schedule={self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            fail(f"precision in {list(PRECISIONS)}", "precision")
        if self.strategy not in strategy_lib.STRATEGIES:
            fail(f"strategy in {list(strategy_lib.STRATEGIES)}", "strategy")
        if self.strategy == "tpu" and not self.tpu:
            fail("a TPU address for strategy='tpu' ('local' on a TPU VM)",
                 "tpu")

    @property
    def is_student(self):
        """True when batches carry unlabeled images (unlabel_ratio > 0)."""
        return self.unlabel_ratio > 0

    @property
    def model_name(self):
        """b0..b8 / l2, or wW-dD (the name `efficientnet` parses)."""
        if self.variant and self.width is None and self.depth is None:
            return self.variant
        return f"w{self.width}-d{self.depth}"

    @property
    def resolved_image_size(self):
        if self.image_size is not None:
            return self.image_size
        return efficientnet.get_variant(self.variant).resolution

    @property
    def resolved_sync_batch_norm(self):
        if self.sync_batch_norm is not None:
            return self.sync_batch_norm
        return self.strategy == "tpu"

    @property
    def peak_lr(self):
        """base_lr scaled to the global labeled batch."""
        return self.base_lr * self.batch_size / self.lr_batch_size

    @property
    def steps_per_epoch(self):
        if self.images_per_epoch is None:
            return None
        return self.images_per_epoch / self.batch_size

    @property
    def resolved_warmup_steps(self):
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_epochs == 0:
            return 0
        return int(self.warmup_epochs * self.steps_per_epoch)

    def to_dict(self):
        """The fields plus the derived values, as written to config.json."""
        resolved = {
            "image_size": self.resolved_image_size,
            "sync_batch_norm": self.resolved_sync_batch_norm,
            "peak_lr": self.peak_lr,
            "warmup_steps": self.resolved_warmup_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }
        return {**dataclasses.asdict(self), "resolved": resolved}

    @classmethod
    def from_dict(cls, values):
        """Inverse of `to_dict` (ignores the derived values)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def learning_rate_schedule(config):
    """The config's `optim.WarmupDecaySchedule`."""
    decay_steps = 1.0
    if config.lr_schedule == "exponential":
        decay_steps = config.lr_decay_epochs * config.steps_per_epoch
    return optim.WarmupDecaySchedule(
        config.peak_lr, warmup_steps=config.resolved_warmup_steps,
        decay=config.lr_schedule, decay_steps=decay_steps,
        decay_rate=config.lr_decay_rate, total_steps=config.train_steps)


def build_model(config):
    """The config's EfficientNet (uncompiled, float32 logits)."""
    return efficientnet.build_efficientnet(
        config.variant, width=config.width, depth=config.depth,
        num_classes=config.num_classes, image_size=config.resolved_image_size,
        small_images=config.small_images, channels=config.channels,
        dropout_rate=config.dropout,
        stochastic_depth_rate=config.stochastic_depth_rate,
        bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon,
        sync_batch_norm=config.resolved_sync_batch_norm)


@keras.saving.register_keras_serializable(package="noisy_student")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training step is one fused kernel.

    Keras 3 computes batch norm in training as a dozen separate ops (moments,
    rsqrt, scale, shift, and their gradients); TF's FusedBatchNormV3 does the
    forward and the backward pass in one kernel each (oneDNN on CPU, cuDNN on
    GPU, XLA on TPU). In A/B runs on this project's 2-core CPU it made a B0
    training step about 1.1x (32 px) and 1.2-1.3x (64 px) faster. Same
    arithmetic as Keras: batch statistics in float32, moving averages of the
    batch mean and the *biased* batch variance. Inference, frozen layers, masks and
    synchronized (cross-replica) batch norm use Keras' own code.
    """

    def call(self, inputs, training=None, mask=None):
        axis = self.axis if self.axis >= 0 else len(inputs.shape) + self.axis
        if (not training or not self.trainable or mask is not None
                or self.synchronized or self.renorm or len(inputs.shape) != 4
                or axis != 3 or not (self.scale and self.center)):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
            epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # The kernel returns the unbiased variance; Keras averages the biased.
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
        variance = variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum
                                + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum
                                    + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)


def use_fused_batch_norm(model):
    """Switches the model's plain BatchNormalization layers to the fused one.

    Changes the layers' class in place (`FusedBatchNormalization` adds
    behaviour, no state), so variables, checkpoints and the distribution of
    already-created variables are untouched; only the training computation
    changes. Exports are built fresh and keep Keras' class.

    Args:
      model: A Keras model.

    Returns:
      The number of layers switched.
    """
    switched = 0
    for layer in losses.all_layers(model):
        if type(layer) is keras.layers.BatchNormalization:  # pylint: disable=unidiomatic-typecheck
            layer.__class__ = FusedBatchNormalization
            switched += 1
    return switched


_BLOCK_RE = re.compile(r"^(block\d(?:[a-z]|_\d+)_)")


def freeze_blocks(model, num_blocks):
    """Freezes the stem and the first `num_blocks` MBConv blocks.

    Args:
      model: An EfficientNet from noisy_student.efficientnet (stable names).
      num_blocks: Blocks to freeze, in network order (block1a, block2a, ...).

    Returns:
      The names of the frozen layers.

    Raises:
      ValueError: if the model has fewer blocks.
    """
    if num_blocks <= 0:
        return []
    blocks = []
    for layer in model.layers:
        match = _BLOCK_RE.match(layer.name)
        if match and match.group(1) not in blocks:
            blocks.append(match.group(1))
    if num_blocks > len(blocks):
        raise ValueError(
            f"Expected freeze_blocks <= {len(blocks)} (the model's blocks). "
            f"Received: freeze_blocks={num_blocks}")
    prefixes = ("stem_",) + tuple(blocks[:num_blocks])
    frozen = []
    for layer in model.layers:
        if layer.name.startswith(prefixes):
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def load_trained_model(model_dir):
    """Loads the EMA-weight model a finished run left in `model_dir`.

    Args:
      model_dir: The run's folder (holding model.keras), or a .keras file.

    Returns:
      The `keras.Model` (float32 policy; call it with training=False).

    Raises:
      FileNotFoundError: if there is no model.keras.
    """
    path = _model_path(model_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"Expected a trained model at {path} (written at the end of "
            f"training). Received: model_dir={model_dir}")
    return keras.saving.load_model(path, compile=False)


def _model_path(model_dir):
    model_dir = str(model_dir)
    if model_dir.endswith(".keras"):
        return model_dir
    return f"{model_dir.rstrip('/')}/{MODEL_FILE}"


def train(config, model_dir, train_dataset_fn, eval_dataset=None,
          strategy=None, log_prefix=""):
    """Trains (or resumes) a teacher or a student; see the module docstring.

    Args:
      config: A `TrainConfig`.
      model_dir: Output folder (local or gs://); resumed if it holds
        checkpoints.
      train_dataset_fn: `fn(tf.distribute.InputContext) -> tf.data.Dataset`
        (or `fn(input_context, start_step=k)`, giving the stream from its
        batch k on: a resumed run asks for that; see the module docstring)
        yielding *per-replica* batches, endlessly:
        {"labeled": {"image": [b, H, W, 3] float32/uint8 in [0, 255],
                     "label": [b] int},
         "unlabeled": {"image": [b * r, H, W, 3],
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
        "[round1/train] "), so a log of several stages says whose step it is.

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
    if strategy is None:
        strategy = strategy_lib.make_strategy(config.strategy, config.tpu)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(PRECISIONS[config.precision])
    trainer = None
    try:
        trainer = _Trainer(config, str(model_dir).rstrip("/"), strategy,
                           train_dataset_fn, eval_dataset)
        trainer.log_prefix = log_prefix
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        keras.mixed_precision.set_global_policy(previous_policy)


class _Trainer:
    """The state of one `train` call."""

    def __init__(self, config, model_dir, strategy, train_dataset_fn,
                 eval_dataset):
        self.config = config
        self.model_dir = model_dir
        self.strategy = strategy
        self.is_chief = strategy_lib.is_chief(strategy)
        self.replicas = strategy.num_replicas_in_sync
        self.start_time = time.time()
        self.log_prefix = ""
        if config.batch_size % self.replicas:
            raise ValueError(
                f"Expected a batch_size divisible by the {self.replicas} "
                f"replicas. Received: batch_size={config.batch_size}")
        self.checkpoint_dir = f"{model_dir}/{CHECKPOINT_DIR}"
        self._worker_temp_dir = None
        self._handler = None
        if self.is_chief:
            self._write_config()

        keras.utils.set_random_seed(config.seed)
        pretrained = (checkpoints.read(config.init_from, config.model_name,
                                       what="init_from")
                      if config.init_from else None)
        with strategy.scope():
            self.model = build_model(config)
            if config.fused_batch_norm:
                use_fused_batch_norm(self.model)
            if pretrained is not None:
                self._initialise(pretrained)
            self.frozen = freeze_blocks(self.model, config.freeze_blocks)
            self.trainable = self.model.trainable_variables
            decay_vars = losses.weight_decay_variables(self.model)
            self.l2_vars = (decay_vars if config.optimizer != "adamw"
                            and config.weight_decay > 0 else [])
            l2_ids = {id(v) for v in self.l2_vars}
            self._l2_mask = [id(v) in l2_ids for v in self.trainable]
            no_decay = [v for v in self.trainable
                        if all(v is not d for d in decay_vars)]
            self.schedule = learning_rate_schedule(config)
            self.optimizer = optim.build_optimizer(
                config.optimizer, self.schedule, momentum=config.momentum,
                rho=config.rmsprop_rho, epsilon=config.rmsprop_epsilon,
                decoupled_weight_decay=config.weight_decay,
                no_decay_variables=no_decay,
                loss_scale=config.precision == "mixed_float16")
            # Keras 3 optimizers must create their slots inside the scope
            # before the first step, or MirroredStrategy fails (seen with
            # TF 2.21 / Keras 3.15; the mirrored training tests cover it).
            self.optimizer.build(self.trainable)
            # ema_decay=0 means no averaging: skip its cost entirely.
            self.ema = (optim.ExponentialMovingAverage(
                optim.ema_source_variables(self.model), config.ema_decay,
                config.ema_warmup) if config.ema_decay > 0 else None)
            self._ema_averages = self.ema.averages if self.ema else []
            self.step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            on_read = dict(synchronization=tf.VariableSynchronization.ON_READ,
                           trainable=False)
            self.sums = tf.Variable(
                tf.zeros([len(_SUMS)]), name="train_sums",
                aggregation=tf.VariableAggregation.SUM, **on_read)
            self.eval_sums = tf.Variable(
                tf.zeros([3]), name="eval_sums",
                aggregation=tf.VariableAggregation.SUM, **on_read)
            # Every replica sees the same all-reduced loss, so the first
            # replica's copy tells the first non-finite step.
            self.first_bad_step = tf.Variable(
                tf.constant(-1, tf.int64), name="first_bad_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                **on_read)
            self.checkpoint = tf.train.Checkpoint(
                model=self.model, optimizer=self.optimizer,
                ema=self._ema_averages, step=self.step,
                seeds=_seed_states(self.model))
            self._restore()

        self.train_iterator = iter(strategy.distribute_datasets_from_function(
            self._checked_dataset_fn(train_dataset_fn)))
        self.eval_dataset = None
        if eval_dataset is not None:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.DATA)
            self.eval_dataset = strategy.experimental_distribute_dataset(
                eval_dataset.with_options(options))
        self._train_loop = tf.function(self._train_loop_fn)
        self._replica_step = (tf.function(self._replica_step_fn,
                                          jit_compile=True)
                              if config.jit_compile else self._replica_step_fn)
        self._eval_loop = tf.function(self._eval_loop_fn)
        logdir = f"{model_dir}/logs"
        if self.is_chief:
            self.train_writer = tf.summary.create_file_writer(logdir + "/train")
            self.eval_writer = tf.summary.create_file_writer(logdir + "/eval")
        else:
            self.train_writer = tf.summary.create_noop_writer()
            self.eval_writer = tf.summary.create_noop_writer()

    # ----------------------------------------------------------- set-up ---

    def _initialise(self, pretrained):
        """Copies init_from's weights (see TrainConfig.init_from)."""
        config = self.config
        partial = pretrained.kind == checkpoints.MODEL_KERAS
        head_copied = checkpoints.apply(pretrained, self.model,
                                        config.model_name, partial=partial)
        if config.train_steps == 0 and not head_copied:
            raise ValueError(
                f"Expected a checkpoint with a {config.num_classes}-class "
                "head to use unchanged (train_steps=0); it has "
                f"{pretrained.num_classes or 'no'} classes, so its head would "
                f"be untrained. Received: init_from={config.init_from}, "
                "train_steps=0")
        logging.info("init_from %s (%s): %s head", config.init_from,
                     pretrained.kind, "its" if head_copied else "a new")

    def _write_config(self):
        path = f"{self.model_dir}/{CONFIG_FILE}"
        if tf.io.gfile.exists(path):
            old = io_utils.read_json(path)
            new = self.config.to_dict()
            # A field missing from an older config.json had its default
            # (e.g. channels=3 before the field existed).
            defaults = {f.name: f.default
                        for f in dataclasses.fields(TrainConfig)}
            changed = [k for k in _STATE_FIELDS
                       if old.get(k, defaults.get(k)) != new.get(k)]
            if changed and tf.io.gfile.exists(self.checkpoint_dir):
                raise ValueError(
                    f"Expected model_dir to be empty or to hold a run of the "
                    f"same model; its {CONFIG_FILE} differs in {changed}. "
                    f"Received: model_dir={self.model_dir}")
        io_utils.write_json(path, {**self.config.to_dict(),
                                   "num_replicas": self.replicas})

    def _restore(self):
        """Sets up checkpoint managers and restores the newest state."""
        write_dir = self.checkpoint_dir
        if not self.is_chief:
            # Every worker must save (MultiWorkerMirroredStrategy), but only
            # the chief's copy is kept.
            self._worker_temp_dir = tempfile.mkdtemp(prefix="ns-worker-ckpt-")
            write_dir = self._worker_temp_dir
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, write_dir,
            max_to_keep=self.config.keep_checkpoints, checkpoint_name="ckpt")
        if (strategy_lib.is_multi_worker(self.strategy)
                and not isinstance(self.strategy, tf.distribute.TPUStrategy)):
            # Restores from model_dir/preemption if a preempted run left one.
            self._handler = (
                tf.distribute.experimental.PreemptionCheckpointHandler(
                    self.strategy.cluster_resolver,
                    tf.train.Checkpoint(model=self.model,
                                        optimizer=self.optimizer,
                                        ema=self._ema_averages,
                                        step=self.step,
                                        seeds=_seed_states(self.model)),
                    checkpoint_dir=f"{self.model_dir}/{PREEMPTION_DIR}"))
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if latest and _checkpoint_step(latest) > int(self.step.numpy()):
            checkpoint = self.checkpoint
            if not _has_seed_states(latest):
                # Written before the seed states were saved (or a model
                # without random layers): resumable, with fresh noise.
                logging.warning("%s holds no dropout/stochastic-depth seed "
                                "states: they restart.", latest)
                checkpoint = tf.train.Checkpoint(
                    model=self.model, optimizer=self.optimizer,
                    ema=self._ema_averages, step=self.step)
            checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Restored %s", latest)
        self.start_step = int(self.step.numpy())
        if self.start_step > self.config.train_steps:
            raise ValueError(
                f"Expected train_steps >= the {self.start_step} steps already "
                f"in {self.checkpoint_dir}. Received: train_steps="
                f"{self.config.train_steps}")

    def _checked_dataset_fn(self, dataset_fn):
        config = self.config
        start_step = self.start_step
        takes_start = _takes_start_step(dataset_fn)

        def fn(input_context):
            if takes_start:
                dataset = dataset_fn(input_context, start_step=start_step)
            else:
                dataset = dataset_fn(input_context)
                if start_step:
                    dataset = dataset.skip(start_step)
            per_replica = input_context.get_per_replica_batch_size(
                config.batch_size)
            _check_element_spec(dataset.element_spec, config, per_replica)
            return dataset
        return fn

    # ------------------------------------------------------- tf.functions ---

    def _replica_step_fn(self, batch, step):
        """One training step on this replica's batch; `step` is 0-based."""
        config = self.config
        labeled = batch["labeled"]
        images = tf.cast(labeled["image"], tf.float32)
        labels = tf.cast(labeled["label"], tf.int32)
        n_labeled = tf.shape(images)[0]
        if config.is_student:
            unlabeled = batch["unlabeled"]
            images = tf.concat(
                [images, tf.cast(unlabeled["image"], tf.float32)], axis=0)
        with tf.GradientTape() as tape:
            logits = tf.cast(self.model(images, training=True), tf.float32)
            if config.is_student:
                loss, labeled_ce, unlabeled_ce = losses.noisy_student_loss(
                    labels, logits[:n_labeled], config.batch_size,
                    targets=unlabeled["target"],
                    unlabeled_logits=logits[n_labeled:],
                    label_smoothing=config.label_smoothing)
            else:
                loss, labeled_ce, unlabeled_ce = losses.noisy_student_loss(
                    labels, logits, config.batch_size,
                    label_smoothing=config.label_smoothing)
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, self.trainable)
        if self.l2_vars:
            # The L2 term's gradient, weight_decay * w, added directly: the
            # same update as differentiating the term, with fewer ops.
            # Gradients are summed over replicas, so each adds its share,
            # and scaled like the loss (mixed_float16).
            coefficient = self.optimizer.scale_loss(
                tf.constant(config.weight_decay / self.replicas, tf.float32))
            grads = [g + tf.cast(coefficient, g.dtype) * v if decay else g
                     for g, v, decay in zip(grads, self.trainable,
                                            self._l2_mask)]
        self.optimizer.apply_gradients(zip(grads, self.trainable))
        if self.ema is not None:
            self.ema.update(step + 1)

        replica_context = tf.distribute.get_replica_context()
        global_loss = replica_context.all_reduce(
            tf.distribute.ReduceOp.SUM, loss)
        predicted = tf.argmax(logits[:n_labeled], axis=-1,
                              output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels),
                                        tf.float32))
        self.sums.assign_add(tf.stack([
            loss, tf.reduce_sum(labeled_ce), tf.reduce_sum(unlabeled_ce),
            correct, tf.cast(n_labeled, tf.float32),
            tf.cast(tf.shape(unlabeled_ce)[0], tf.float32)]))
        self.first_bad_step.assign(tf.where(
            (self.first_bad_step < 0) & ~tf.math.is_finite(global_loss),
            step + 1, self.first_bad_step))

    def _train_loop_fn(self, iterator, start_step, num_steps):
        for i in tf.range(num_steps):
            self.strategy.run(self._replica_step,
                              args=(next(iterator),
                                    start_step + tf.cast(i, tf.int64)))
        self.step.assign_add(tf.cast(num_steps, tf.int64))

    def _eval_replica_fn(self, batch):
        logits = tf.cast(self.model(tf.cast(batch["image"], tf.float32),
                                    training=False), tf.float32)
        labels = tf.cast(tf.reshape(batch["label"], [-1]), tf.int32)
        k = min(5, self.config.num_classes)
        top1 = tf.math.in_top_k(labels, logits, 1)
        top5 = tf.math.in_top_k(labels, logits, k)
        self.eval_sums.assign_add(tf.stack([
            tf.reduce_sum(tf.cast(top1, tf.float32)),
            tf.reduce_sum(tf.cast(top5, tf.float32)),
            tf.cast(tf.shape(labels)[0], tf.float32)]))

    def _eval_loop_fn(self):
        for batch in self.eval_dataset:
            self.strategy.run(self._eval_replica_fn, args=(batch,))

    # --------------------------------------------------------- the loop ---

    def run(self):
        config = self.config
        step = self.start_step
        self.evals = self._previous_evals(step)
        self.last_window = {}
        if config.verbose and step:
            print(f"{self.log_prefix}Resuming from step {step} in "
                  f"{self.checkpoint_dir} (the input skips the {step} "
                  "batches already trained on)", flush=True)
        # Throughput and ETA count training time only, not checkpoints,
        # evaluations, nor the first loop call, which traces the step
        # function (seconds to minutes) and would inflate the first ETA.
        window_seconds, window_steps, timed_steps = 0.0, 0, 0
        traced = False
        while step < config.train_steps:
            num = self._steps_until_event(step)
            if self._handler is not None:
                # Saves and exits if this worker or a peer got SIGTERM.
                self._handler.save_checkpoint_if_preempted(
                    checkpoint_number=step)
            start = time.time()
            self._train_loop(self.train_iterator,
                             tf.constant(step, tf.int64),
                             tf.constant(num, tf.int32))
            step += num
            self._check_finite(step)  # also waits for the loop to finish
            if traced:
                window_seconds += time.time() - start
                timed_steps += num
            traced = True
            window_steps += num
            if step % config.log_every == 0 or step == config.train_steps:
                self._log(step, window_steps, window_seconds, timed_steps)
                window_seconds, window_steps, timed_steps = 0.0, 0, 0
            if step == config.train_steps or (
                    config.checkpoint_every
                    and step % config.checkpoint_every == 0):
                self.manager.save(checkpoint_number=step)
            if self.eval_dataset is not None and config.eval_every and (
                    step % config.eval_every == 0
                    and step != config.train_steps):
                self._evaluate(step)
        if self.manager.latest_checkpoint is None or (
                _checkpoint_step(self.manager.latest_checkpoint) != step):
            self.manager.save(checkpoint_number=step)
        if self.eval_dataset is not None:
            self._evaluate(step)
        if self.is_chief:
            self._export()
            self._write_metrics(step)
        return self._result(step)

    def _steps_until_event(self, step):
        config = self.config
        num = min(config.steps_per_loop, config.train_steps - step)
        for every in (config.log_every, config.checkpoint_every,
                      config.eval_every if self.eval_dataset is not None
                      else 0):
            if every:
                num = min(num, every - step % every)
        return num

    def _check_finite(self, step):
        bad = int(self.first_bad_step.numpy())
        if bad >= 0:
            latest = tf.train.latest_checkpoint(self.checkpoint_dir)
            raise FloatingPointError(
                f"Expected a finite loss. Received: a NaN or infinite loss at "
                f"step {bad} (of the steps up to {step}). Training stopped; "
                f"the last good checkpoint is {latest} (nothing later was "
                "saved). Lower base_lr, check the input for NaN/inf pixels, "
                "or use precision=float32.")

    def _log(self, step, window_steps, seconds, timed_steps):
        """Logs the window's means; `seconds` timed `timed_steps` of its
        `window_steps` (rate and ETA are unknown when none was timed)."""
        sums = dict(zip(_SUMS, self.sums.numpy().tolist()))
        self.sums.assign(tf.zeros([len(_SUMS)]))
        images = sums["n_labeled"] + sums["n_unlabeled"]
        rate = (images * timed_steps / window_steps / max(seconds, 1e-9)
                if timed_steps else None)
        lr = float(self.schedule(self.optimizer.iterations))
        # The L2 term is not part of the in-graph loss (see _replica_step_fn);
        # its value at this step is added here.
        decay = float(losses.l2_weight_decay(self.l2_vars,
                                             self.config.weight_decay))
        window = {
            "loss": sums["loss"] / window_steps + decay,
            "weight_decay": decay,
            "labeled_loss": sums["labeled_ce"] / max(sums["n_labeled"], 1),
            "unlabeled_loss": (sums["unlabeled_ce"] / sums["n_unlabeled"]
                               if sums["n_unlabeled"] else None),
            "accuracy": sums["correct"] / max(sums["n_labeled"], 1),
            "learning_rate": lr,
            "images_per_sec": rate,
        }
        self.last_window = window
        with self.train_writer.as_default(step=step):
            for name, value in window.items():
                if value is not None:
                    _summary_scalar(name, value)
        self.train_writer.flush()
        if self.config.verbose:
            if timed_steps:
                eta = (self.config.train_steps - step) * seconds / timed_steps
                speed = f"{rate:.1f} img/s eta {_format_seconds(eta)}"
            else:
                speed = "(tracing; speed at the next line)"
            unl = (f" unl {window['unlabeled_loss']:.4f}"
                   if window["unlabeled_loss"] is not None else "")
            print(f"{self.log_prefix}step {step}/{self.config.train_steps} loss "
                  f"{window['loss']:.4f} (lab {window['labeled_loss']:.4f}"
                  f"{unl}) acc {window['accuracy']:.3f} lr {lr:.5g} "
                  f"{speed}", flush=True)

    def _evaluate(self, step):
        self.eval_sums.assign(tf.zeros([3]))
        if self.ema is not None:
            self.ema.swap()
        try:
            self._eval_loop()
        finally:
            if self.ema is not None:
                self.ema.swap()
        top1_sum, top5_sum, count = self.eval_sums.numpy().tolist()
        if not count:
            raise ValueError("Expected a non-empty eval_dataset. Received: "
                             "eval_dataset with 0 images")
        result = {"step": step, "top1": top1_sum / count,
                  "top5": top5_sum / count, "count": int(count)}
        self.evals = [e for e in self.evals if e["step"] != step] + [result]
        with self.eval_writer.as_default(step=step):
            _summary_scalar("top1", result["top1"])
            _summary_scalar("top5", result["top5"])
        self.eval_writer.flush()
        if self.config.verbose:
            print(f"{self.log_prefix}eval step {step}: top1 "
                  f"{result['top1']:.4f} top5 "
                  f"{result['top5']:.4f} ({int(count)} images, EMA weights)",
                  flush=True)
        if self.is_chief:
            self._write_metrics(step)

    def _previous_evals(self, step):
        path = f"{self.model_dir}/{METRICS_FILE}"
        if not self.is_chief or not tf.io.gfile.exists(path):
            return []
        return [e for e in io_utils.read_json(path).get("evals", [])
                if e["step"] <= step]

    def _write_metrics(self, step):
        best = max(self.evals, key=lambda e: e["top1"]) if self.evals else None
        io_utils.write_json(f"{self.model_dir}/{METRICS_FILE}", {
            "step": step,
            "last": self.evals[-1] if self.evals else None,
            "best": best,
            "evals": self.evals,
            "train": self.last_window,
        })

    def _export(self):
        """Writes the EMA weights as model.keras, atomically."""
        averages = self.ema.numpy_averages() if self.ema else {}
        values = [averages.get(id(v)) if id(v) in averages else v.numpy()
                  for v in self.model.weights]
        policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("float32")
        try:
            export = build_model(self.config)
        finally:
            keras.mixed_precision.set_global_policy(policy)
        for target, value in zip(export.weights, values, strict=True):
            target.assign(value)
        # A pretrained source may normalise its pixels otherwise (AdvProp).
        source = self.model.get_layer(checkpoints.NORMALIZE)
        norm = export.get_layer(checkpoints.NORMALIZE)
        norm.mean, norm.stddev = source.mean, source.stddev
        path = _model_path(self.model_dir)
        temp = io_utils.temp_path(path)
        keras.saving.save_model(export, temp)
        tf.io.gfile.rename(temp, path, overwrite=True)

    def _result(self, step):
        best = max(self.evals, key=lambda e: e["top1"]) if self.evals else None
        last = self.evals[-1] if self.evals else {}
        window = self.last_window
        return {
            "step": step,
            "start_step": self.start_step,
            "loss": window.get("loss"),
            "weight_decay": window.get("weight_decay"),
            "labeled_loss": window.get("labeled_loss"),
            "unlabeled_loss": window.get("unlabeled_loss"),
            "accuracy": window.get("accuracy"),
            "learning_rate": window.get("learning_rate"),
            "images_per_sec": window.get("images_per_sec"),
            "eval_top1": last.get("top1"),
            "eval_top5": last.get("top5"),
            "best_eval_top1": best["top1"] if best else None,
            "best_eval_step": best["step"] if best else None,
            "wall_time_s": time.time() - self.start_time,
        }

    def close(self):
        if self._worker_temp_dir:
            shutil.rmtree(self._worker_temp_dir, ignore_errors=True)
            self._worker_temp_dir = None


def _seed_states(model):
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


def _takes_start_step(dataset_fn):
    """True if `dataset_fn` accepts a `start_step` keyword."""
    try:
        parameters = inspect.signature(dataset_fn).parameters
    except (TypeError, ValueError):
        return False
    return "start_step" in parameters or any(
        p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _check_element_spec(spec, config, per_replica):
    """Raises ValueError unless `spec` matches the batch contract."""
    size = config.resolved_image_size

    def check(cond, expected, received):
        if not cond:
            raise ValueError(f"Expected train_dataset_fn to yield {expected}. "
                             f"Received: {received}")

    check(isinstance(spec, dict) and "labeled" in spec,
          'dicts {"labeled": {...}, "unlabeled": {...}}',
          f"element_spec={spec}")
    labeled = spec["labeled"]
    check(isinstance(labeled, dict) and {"image", "label"} <= set(labeled),
          'a "labeled" dict with "image" and "label"',
          f"labeled spec={labeled}")
    image = labeled["image"].shape
    check(image.rank == 4 and image[1:3].as_list() in ([size, size],
                                                       [None, None]),
          f"labeled images of shape [batch, {size}, {size}, channels]",
          f"shape={image}")
    check(image[0] in (None, per_replica),
          f"per-replica labeled batches of {per_replica} (batch_size="
          f"{config.batch_size} over the replicas)",
          f"labeled image shape={image}")
    if not config.is_student:
        check("unlabeled" not in spec,
              'no "unlabeled" part for a teacher (unlabel_ratio=0)',
              f"keys={sorted(spec)}")
        return
    check("unlabeled" in spec,
          f'an "unlabeled" part for a student (unlabel_ratio='
          f"{config.unlabel_ratio})", f"keys={sorted(spec)}")
    unlabeled = spec["unlabeled"]
    check(isinstance(unlabeled, dict) and {"image", "target"} <= set(unlabeled),
          'an "unlabeled" dict with "image" and "target"',
          f"unlabeled spec={unlabeled}")
    expected = per_replica * config.unlabel_ratio
    check(unlabeled["image"].shape[0] in (None, expected),
          f"per-replica unlabeled batches of {expected} (batch x "
          f"unlabel_ratio)",
          f"unlabeled image shape={unlabeled['image'].shape}")
    check(unlabeled["target"].shape[-1] in (None, config.num_classes),
          f"targets over {config.num_classes} classes",
          f"target shape={unlabeled['target'].shape}")


def _checkpoint_step(path):
    """The global step stored in a checkpoint of this module."""
    reader = tf.train.load_checkpoint(path)
    return int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


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
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def config_from_json(path):
    """Reads a TrainConfig back from a run's config.json."""
    return TrainConfig.from_dict(io_utils.read_json(path))

