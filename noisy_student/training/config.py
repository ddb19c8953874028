"""The settings of one training run, in four parts: model, optimizer, loop,
input.

`TrainConfig` nests a `ModelConfig` (the keyword arguments of
`efficientnet.build_efficientnet`, passed to it unchanged), an
`OptimizerConfig` (loss terms, optimizer, learning-rate schedule, EMA), a
`LoopConfig` (batches, steps, distribution and bookkeeping) and an
`InputConfig` (`data.streams`: augmentation, flips, shuffling), plus the two
settings of a run that starts from other weights (`init_from`,
`freeze_blocks`). Every part checks its own values when built and
`TrainConfig` checks the values that span parts, so a bad setting fails
before any TensorFlow work with "Expected ... Received: name=value".

Defaults are the paper's / the official EfficientNet and Noisy Student code's
(github.com/google-research/noisystudent main.py flags:
`base_learning_rate` 0.016 per 256 images, `moving_average_decay` 0.9999,
`weight_decay` 1e-5, `label_smoothing` 0.1; RMSProp rho 0.9, momentum 0.9,
epsilon 1e-3 and the decay x0.97 every 2.4 epochs from the official
EfficientNet `main.py` / `utils.py`).
"""

import dataclasses

from noisy_student.data import streams
from noisy_student.model import efficientnet
from noisy_student.training import optimizers
from noisy_student.training import strategy as strategy_lib
from noisy_student.utils import storage

# Keras mixed-precision policy of each `LoopConfig.precision`.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16",
              "mixed_float16": "mixed_float16"}


def _fail(config, expected, name):
    raise ValueError(f"Expected {expected}. Received: "
                     f"{name}={getattr(config, name)!r}")


def _check_ints(config, names, minimum):
    bound = "> 0" if minimum == 1 else f">= {minimum}"
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, int) and value >= minimum):
            _fail(config, f"an integer {name} {bound}", name)


def _check_unit(config, names):
    for name in names:
        if not 0 <= getattr(config, name) < 1:
            _fail(config, f"{name} in [0, 1)", name)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The EfficientNet: exactly the keyword arguments of `build_efficientnet`.

    Attributes:
      variant: b0..b8 / l2, or None to give width and depth.
      width, depth: Scaling coefficients (override the variant's).
      num_classes: Output classes (>= 2).
      image_size: Input side in pixels; None takes the variant's resolution.
      small_images: Stride 1 in stages 2-3 (inputs of 64 px or less).
      channels: Input channels (1: grey, 3: RGB).
      dropout_rate: Head dropout; None takes the variant's (B0 0.2 ... B7
        0.5; 0.2 without a variant), as the official code.
      stochastic_depth_rate: Base stochastic-depth rate (paper: 0.2).
      bn_momentum, bn_epsilon: Batch norm settings (official: 0.99, 1e-3).
      sync_batch_norm: Batch statistics over all replicas; None is resolved
        by `TrainConfig` (on for strategy='tpu', off otherwise).

    Raises:
      ValueError: for a value out of range (the message names the field).
    """
    variant: str | None = None
    width: float | None = None
    depth: float | None = None
    num_classes: int = 10
    image_size: int | None = None
    small_images: bool = False
    channels: int = 3
    dropout_rate: float | None = None
    stochastic_depth_rate: float = 0.2
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    sync_batch_norm: bool | None = None

    def __post_init__(self):
        if self.variant is not None:
            efficientnet.get_variant(self.variant)
        elif self.width is None or self.depth is None:
            raise ValueError(
                "Expected a variant or both width and depth. Received: "
                f"variant=None, width={self.width!r}, depth={self.depth!r}")
        for name in ("width", "depth"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                _fail(self, f"{name} > 0", name)
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            _fail(self, "num_classes >= 2", "num_classes")
        if self.image_size is None and self.variant is None:
            _fail(self, "an image_size when no variant is given", "image_size")
        if self.image_size is not None and not self.image_size > 0:
            _fail(self, "image_size > 0", "image_size")
        if self.channels not in (1, 3):
            _fail(self, "channels 1 or 3", "channels")
        if self.dropout_rate is not None and not 0 <= self.dropout_rate < 1:
            _fail(self, "dropout_rate in [0, 1)", "dropout_rate")
        _check_unit(self, ("stochastic_depth_rate", "bn_momentum"))
        if not self.bn_epsilon > 0:
            _fail(self, "bn_epsilon > 0", "bn_epsilon")

    @property
    def model_name(self):
        """b0..b8 / l2, or wW-dD (the name `efficientnet` parses)."""
        if self.variant and self.width is None and self.depth is None:
            return self.variant
        return f"w{self.width}-d{self.depth}"

    @property
    def resolved_image_size(self):
        """The input side in pixels the builder uses."""
        if self.image_size is not None:
            return self.image_size
        return efficientnet.get_variant(self.variant).resolution


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How the weights move: loss terms, optimizer, schedule, EMA.

    Attributes:
      optimizer: rmsprop (paper) | sgd | adam | adamw.
      base_learning_rate: Learning rate per `lr_batch_size` labeled images
        (official: 0.016 per 256); the run's peak is scaled to its batch.
      lr_batch_size: The batch base_learning_rate refers to (256).
      momentum: rmsprop / sgd momentum (0.9).
      rmsprop_rho, rmsprop_epsilon: RMSProp decay and epsilon (0.9, 1e-3).
      warmup_epochs: Linear warm-up in epochs (5); warmup_steps overrides.
      warmup_steps: Linear warm-up in steps, or None to use warmup_epochs.
      lr_schedule: exponential (x lr_decay_rate every lr_decay_epochs,
        staircase) | cosine (over the run) | constant.
      lr_decay_rate, lr_decay_epochs: 0.97 every 2.4 epochs.
      weight_decay: L2 on every non-batch-norm trainable weight: the loss
        weight_decay * sum(w^2) / 2 (1e-5), applied as its gradient
        weight_decay * w added to the weights' gradients. With adamw it is
        AdamW's decoupled decay coefficient instead.
      label_smoothing: On the labeled cross-entropy (0.1).
      labeled_loss_weight: Weight of the labeled cross-entropy in a
        student's loss (see `losses.noisy_student_loss`): 1 is the paper's
        loss; 0 trains on the pseudo-labels alone (the labeled images are
        still forwarded). Not in the paper or the official code: an
        ablation. >= 0; a teacher (unlabel_ratio=0) needs > 0.
      ema_decay: Decay of the weights' moving average (0.9999); 0 = no
        average (evaluation and export use the weights themselves).
      ema_warmup: Use min(ema_decay, (1 + t) / (10 + t)) at step t, as the
        official code (TF's num_updates) does; needed for short runs.

    Raises:
      ValueError: for a value out of range (the message names the field).
    """
    optimizer: str = "rmsprop"
    base_learning_rate: float = 0.016
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
    labeled_loss_weight: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True

    def __post_init__(self):
        if self.optimizer not in optimizers.OPTIMIZERS:
            _fail(self, f"optimizer in {list(optimizers.OPTIMIZERS)}", "optimizer")
        if self.lr_schedule not in optimizers.LR_SCHEDULES:
            _fail(self, f"lr_schedule in {list(optimizers.LR_SCHEDULES)}",
                  "lr_schedule")
        _check_ints(self, ("lr_batch_size",), 1)
        _check_unit(self, ("label_smoothing", "ema_decay", "momentum"))
        for name in ("base_learning_rate", "rmsprop_epsilon",
                     "lr_decay_epochs"):
            if not getattr(self, name) > 0:
                _fail(self, f"{name} > 0", name)
        if not 0 < self.rmsprop_rho < 1:
            _fail(self, "rmsprop_rho in (0, 1)", "rmsprop_rho")
        if not 0 < self.lr_decay_rate <= 1:
            _fail(self, "lr_decay_rate in (0, 1]", "lr_decay_rate")
        for name in ("weight_decay", "warmup_epochs", "labeled_loss_weight"):
            if getattr(self, name) < 0:
                _fail(self, f"{name} >= 0", name)
        if self.warmup_steps is not None:
            _check_ints(self, ("warmup_steps",), 0)

    @property
    def needs_epochs(self):
        """True when the schedule is in epochs (needs images_per_epoch)."""
        return ((self.warmup_steps is None and self.warmup_epochs > 0)
                or self.lr_schedule == "exponential")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Batches, steps, distribution and bookkeeping of the loop.

    Attributes:
      batch_size: Labeled images per *global* batch (all replicas).
      unlabel_ratio: Unlabeled images per labeled image in every batch
        (official: 1 for B0, 3 for B1-B7, 14 or 28 for L2); 0 = a teacher.
      images_per_epoch: Labeled images per epoch; an epoch is
        images_per_epoch / batch_size steps. Needed when warm-up or decay is
        given in epochs.
      train_steps: Total steps; a resumed run stops here too.
      precision: float32 | bfloat16 | mixed_float16 (logits stay float32;
        mixed_float16 adds dynamic loss scaling).
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
        `layers.FusedBatchNormalization`; not with sync_batch_norm).
      cpu_kernels: On CPU devices in float32 without XLA, train SiLU and
        the depthwise filter gradients with this project's compiled
        kernels (`cpu_kernels`; TF's ops when they cannot be built).
      verbose: Print the progress lines.
      seed: Seeds Python, NumPy and TF (weights initialisation, noise).

    Raises:
      ValueError: for a value out of range (the message names the field).
    """
    batch_size: int = 128
    unlabel_ratio: int = 0
    images_per_epoch: int | None = None
    train_steps: int = 1000
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
    cpu_kernels: bool = True
    verbose: bool = True
    seed: int = 0

    def __post_init__(self):
        _check_ints(self, ("train_steps", "unlabel_ratio", "checkpoint_every",
                           "eval_every"), 0)
        _check_ints(self, ("batch_size", "steps_per_loop", "log_every",
                           "keep_checkpoints"), 1)
        if self.images_per_epoch is not None and not self.images_per_epoch > 0:
            _fail(self, "None or images_per_epoch > 0", "images_per_epoch")
        if self.precision not in PRECISIONS:
            _fail(self, f"precision in {list(PRECISIONS)}", "precision")
        if self.strategy not in strategy_lib.STRATEGIES:
            _fail(self, f"strategy in {list(strategy_lib.STRATEGIES)}",
                  "strategy")
        if self.strategy == "tpu" and not self.tpu:
            _fail(self, "a TPU address for strategy='tpu' ('local' on a TPU "
                  "VM)", "tpu")

    @property
    def is_student(self):
        """True when batches carry unlabeled images (unlabel_ratio > 0)."""
        return self.unlabel_ratio > 0


_PARTS = {"model": ModelConfig, "optimizer": OptimizerConfig,
          "loop": LoopConfig, "input": streams.InputConfig}
# The part of every leaf field (each name belongs to exactly one part).
_PART_OF = {f.name: part for part, cls in _PARTS.items()
            for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides its data and model_dir.

    Attributes:
      model: A `ModelConfig` (goes to `efficientnet.build_efficientnet`).
      optimizer: An `OptimizerConfig`.
      loop: A `LoopConfig`.
      input: A `data.streams.InputConfig` (how the training images are
        noised and shuffled; the stream takes its image size, batch size,
        unlabel_ratio and seed from `model` and `loop`).
      init_from: Pretrained weights that initialise the model (any source
        of `noisy_student.model.checkpoints`: an official TF1 / Noisy Student
        checkpoint, a Keras applications .h5 file, or a model_dir / .keras
        file of ours). External checkpoints must fit the model but for the
        head (fresh when the class count differs); a model of ours is
        copied layer by layer where names and shapes match (a larger
        student from its teacher). With train_steps=0 the model is the
        checkpoint unchanged (its head must fit).
      freeze_blocks: Freeze the stem and the first N MBConv blocks (FixRes-
        style fine-tune at a larger image_size); frozen BN uses its moving
        statistics.

    Raises:
      ValueError: for a value out of range, or settings of two parts that
        do not fit together (a schedule in epochs without images_per_epoch,
        train_steps=0 without init_from, labeled_loss_weight=0 for a
        teacher).
    """
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=OptimizerConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    input: streams.InputConfig = dataclasses.field(
        default_factory=streams.InputConfig)
    init_from: str | None = None
    freeze_blocks: int = 0

    def __post_init__(self):
        _check_ints(self, ("freeze_blocks",), 0)
        if self.loop.train_steps == 0 and not self.init_from:
            raise ValueError(
                "Expected train_steps > 0 (0 only with init_from: the "
                "checkpoint used unchanged). Received: train_steps=0")
        if (self.optimizer.labeled_loss_weight == 0
                and not self.loop.is_student):
            raise ValueError(
                "Expected labeled_loss_weight > 0 for a teacher "
                "(unlabel_ratio=0: its loss is the labeled term alone). "
                "Received: labeled_loss_weight="
                f"{self.optimizer.labeled_loss_weight!r}")
        if self.optimizer.needs_epochs and self.loop.images_per_epoch is None:
            raise ValueError(
                "Expected images_per_epoch when the schedule is given in "
                "epochs (warmup_epochs with no warmup_steps, or "
                "lr_schedule='exponential'). Received: images_per_epoch=None, "
                f"warmup_epochs={self.optimizer.warmup_epochs}, warmup_steps="
                f"{self.optimizer.warmup_steps}, lr_schedule="
                f"{self.optimizer.lr_schedule!r}")
        if self.model.sync_batch_norm is None:
            # Resolved here, where the strategy is known, so the model part
            # goes to the builder as it is.
            object.__setattr__(self, "model", dataclasses.replace(
                self.model, sync_batch_norm=self.loop.strategy == "tpu"))

    @classmethod
    def from_fields(cls, **fields):
        """Builds the config from leaf field names (`batch_size=8, ...`).

        Args:
          **fields: Fields of ModelConfig, OptimizerConfig, LoopConfig,
            InputConfig (each name belongs to one part) and `init_from`,
            `freeze_blocks`.

        Raises:
          TypeError: for a name that is no field.
          ValueError: as the parts' and the config's checks.
        """
        parts = {part: {} for part in _PARTS}
        top = {}
        for name, value in fields.items():
            if name in _PART_OF:
                parts[_PART_OF[name]][name] = value
            elif name in ("init_from", "freeze_blocks"):
                top[name] = value
            else:
                raise TypeError(f"Expected a TrainConfig field. Received: "
                                f"{name}={value!r}")
        return cls(**{part: _PARTS[part](**values)
                      for part, values in parts.items()}, **top)

    def fields(self):
        """The leaf fields as one flat dict (the inverse of `from_fields`)."""
        flat = {"init_from": self.init_from,
                "freeze_blocks": self.freeze_blocks}
        for part in _PARTS:
            flat.update(dataclasses.asdict(getattr(self, part)))
        return flat

    def replace(self, **fields):
        """A copy with some leaf fields changed (`config.replace(seed=1)`)."""
        return TrainConfig.from_fields(**{**self.fields(), **fields})

    def train_dataset_fn(self, labeled, unlabeled=None):
        """This run's training stream (`data.streams.train_dataset_fn`).

        Args:
          labeled: Unbatched {"image": uint8 [H, W, C], "label": int32}
            dataset.
          unlabeled: Unbatched {"image": uint8, "target": float32
            [num_classes]} dataset of selected pseudo-labels (a student's).

        Returns:
          `dataset_fn(input_context=None, start_step=0)` for
          `training.loop.train_and_evaluate`.
        """
        return streams.train_dataset_fn(
            labeled, self.input, image_size=self.model.resolved_image_size,
            batch_size=self.loop.batch_size,
            unlabel_ratio=self.loop.unlabel_ratio, seed=self.loop.seed,
            unlabeled=unlabeled, num_classes=self.model.num_classes)

    @property
    def peak_lr(self):
        """base_learning_rate scaled to the global labeled batch."""
        return (self.optimizer.base_learning_rate * self.loop.batch_size
                / self.optimizer.lr_batch_size)

    @property
    def steps_per_epoch(self):
        """images_per_epoch / batch_size (float), or None."""
        if self.loop.images_per_epoch is None:
            return None
        return self.loop.images_per_epoch / self.loop.batch_size

    @property
    def resolved_warmup_steps(self):
        """Warm-up in steps: warmup_steps, else warmup_epochs' steps."""
        if self.optimizer.warmup_steps is not None:
            return self.optimizer.warmup_steps
        if self.optimizer.warmup_epochs == 0:
            return 0
        return int(self.optimizer.warmup_epochs * self.steps_per_epoch)

    def to_dict(self):
        """The parts plus the derived values, as written to config.json."""
        resolved = {
            "image_size": self.model.resolved_image_size,
            "peak_lr": self.peak_lr,
            "warmup_steps": self.resolved_warmup_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }
        return {**dataclasses.asdict(self), "resolved": resolved}

    @classmethod
    def from_dict(cls, values):
        """Inverse of `to_dict` (ignores the derived values and unknown keys).

        Also reads the flat config.json of runs made before the config was
        nested (with `base_lr` and `dropout` for today's
        `base_learning_rate` and `dropout_rate`).
        """
        return cls.from_fields(**flat_fields(values))


# Fields added after the stage fingerprints were first computed, with the
# default that leaves them out of a fingerprint (see fingerprint_fields).
_ADDED_FIELDS = {"labeled_loss_weight": 1.0}
# Fields that choose how, not what, to compute (a killed run resumes with
# either value): never in a fingerprint.
_EXECUTION_FIELDS = ("cpu_kernels",)
# The input part's fields: fingerprinted apart, as the input config they
# were before they were a part of this one (`pipeline.experiment`).
INPUT_FIELDS = tuple(f.name for f in dataclasses.fields(streams.InputConfig))
# Field names of config.json files written before the rename.
_OLD_NAMES = {"base_lr": "base_learning_rate", "dropout": "dropout_rate"}


def flat_fields(values):
    """The leaf fields of a config.json dict, nested or (older runs) flat.

    Args:
      values: A dict as `TrainConfig.to_dict` writes it, or the flat dict
        of runs made before the config was nested.

    Returns:
      {leaf field name: value}, today's names, unknown keys dropped; not
      validated.
    """
    # A flat config.json holds "optimizer" as a name, a nested one as a part.
    flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
    for part in _PARTS:
        if isinstance(values.get(part), dict):
            flat.update(values[part])
    for old, new in _OLD_NAMES.items():
        if old in flat:
            flat.setdefault(new, flat.pop(old))
    names = set(_PART_OF) | {"init_from", "freeze_blocks"}
    return {k: v for k, v in flat.items() if k in names}


def fingerprint_fields(config):
    """The leaf fields as the flat config before the parts named them.

    The pipeline's stage fingerprints hash these, so a work directory made
    before the config had parts (and before `base_lr` and `dropout` took
    their flags' names) keeps its fingerprints and resumes. A
    sync_batch_norm equal to what the strategy implies is recorded as None,
    as the flat config held it. Fields added since are left out at their
    default (`labeled_loss_weight` 1.0), so they move no fingerprint of a
    run that does not set them; `cpu_kernels` (how, not what) never counts,
    nor the input part's fields (`INPUT_FIELDS`, fingerprinted apart).

    Args:
      config: A `TrainConfig`.

    Returns:
      {old leaf field name: value}.
    """
    flat = config.fields()
    if flat["sync_batch_norm"] == (flat["strategy"] == "tpu"):
        flat["sync_batch_norm"] = None
    for old, new in _OLD_NAMES.items():
        flat[old] = flat.pop(new)
    for name, default in _ADDED_FIELDS.items():
        if flat[name] == default:
            del flat[name]
    for name in _EXECUTION_FIELDS + INPUT_FIELDS:
        del flat[name]
    return flat


def default_fields():
    """{leaf field name: default} of every part."""
    defaults = {f.name: f.default for cls in _PARTS.values()
                for f in dataclasses.fields(cls)}
    return {**defaults, "init_from": None, "freeze_blocks": 0}


def config_from_json(path):
    """Reads a TrainConfig back from a run's config.json (local or gs://)."""
    return TrainConfig.from_dict(storage.read_json(path))
