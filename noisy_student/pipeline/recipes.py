"""A role's training recipe and the configs it resolves to.

`Recipe` holds what one model's training is asked to be, in the commands'
words: every field is the flag of the same name (`--teacher_<field>` /
`--student_<field>` for the fields that differ between the two roles), with
the flag's default. `resolve` turns it against the data into the
`TrainConfig` the training stage runs with, by the rules the commands and
the Python API share:

- the image size is `image_size`, else the resolution of the model's
  variant (B0's 224 for a wW-dD model; the official EfficientNet table);
- `small_images` (stride 1 in stages 2-3) follows, when unset, a pretrained
  source's stride layout, else the image size (<= 64 px:
  `preprocess.SMALL_IMAGE_MAX`);
- `flip` follows, when unset, what the source allows
  (`sources.ImageSource.allows_flip`: not for digits, MNIST, SVHN);
- a teacher's loss is the labeled term alone (labeled_loss_weight 1).
"""

import dataclasses

from noisy_student.data import preprocess
from noisy_student.data import streams
from noisy_student.model import checkpoints
from noisy_student.model import efficientnet
from noisy_student.training import config as train_config


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one model (a teacher or a student) is trained.

    Defaults are the commands' (and, where it has one, the paper's or the
    official code's; each flag's help text says which). The configs check
    the values when `resolve` builds them.

    Attributes:
      model: EfficientNet name: b0..b8, l2, or wW-dD.
      train_steps: Training steps (global batches).
      augment: Input noise: "randaugment" (the paper's), "keras_cv" or
        "none".
      magnitude: RandAugment M on the paper's 0..10 scale.
      num_layers: RandAugment N (ops per image).
      dropout_rate: Head dropout; None: the variant's (B0 0.2 ... B7 0.5).
      stochastic_depth_rate: Base stochastic-depth drop rate (paper: 0.2).
      image_size: Model input side in pixels; None: the variant's.
      small_images: Stride 1 in stages 2-3; None: see the module docstring.
      flip: Random left-right flips; None: what the source allows.
      batch_size: Labeled images per global batch.
      unlabel_ratio: Unlabeled images per labeled one in a student's batch
        (the official code's unlabel_ratio); unused by a teacher.
      optimizer, base_learning_rate, warmup_epochs, warmup_steps,
      lr_schedule, lr_decay_epochs, weight_decay, label_smoothing,
      labeled_loss_weight, ema_decay: `training.config.OptimizerConfig`'s.
      precision, strategy, tpu, jit_compile, cpu_kernels, steps_per_loop,
      checkpoint_every, eval_every, log_every, seed:
        `training.config.LoopConfig`'s.
    """
    model: str = "b0"
    train_steps: int = 1000
    augment: str = "randaugment"
    magnitude: float = 10.0
    num_layers: int = 2
    dropout_rate: float | None = None
    stochastic_depth_rate: float = 0.2
    image_size: int | None = None
    small_images: bool | None = None
    flip: bool | None = None
    batch_size: int = 128
    unlabel_ratio: int = 3
    optimizer: str = "rmsprop"
    base_learning_rate: float = 0.016
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    lr_schedule: str = "exponential"
    lr_decay_epochs: float = 2.4
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    labeled_loss_weight: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "float32"
    strategy: str = "default"
    tpu: str | None = None
    jit_compile: bool = False
    cpu_kernels: bool = True
    steps_per_loop: int = 50
    checkpoint_every: int = 500
    eval_every: int = 0
    log_every: int = 50
    seed: int = 0

    def replace(self, **fields):
        """A copy with `fields` changed."""
        return dataclasses.replace(self, **fields)


def resolved_image_size(recipe):
    """The recipe's image size in pixels: `image_size`, else the resolution
    of its model's variant (B0's for a wW-dD model)."""
    if recipe.image_size:
        return recipe.image_size
    variant, _, _ = efficientnet.parse_model_name(recipe.model)
    return efficientnet.get_variant(variant or "b0").resolution


def resolve(recipe, source, channels=3, teacher=False, unlabel_ratio=0,
            init_from=None, layout_from=None, freeze_blocks=0):
    """The `TrainConfig` of `recipe` on the labeled `source`.

    Args:
      recipe: A `Recipe`.
      source: The labeled `sources.ImageSource` (its class count, size and
        whether it allows flips).
      channels: Image channels the model takes (1 or 3).
      teacher: The pipeline's teacher: its loss is the labeled term alone.
      unlabel_ratio: Unlabeled images per labeled one (0: no pseudo-labels;
        a student passes `recipe.unlabel_ratio`).
      init_from: Pretrained weights the model starts from.
      layout_from: Pretrained weights whose stride layout sets an unset
        `small_images` (ImageNet checkpoints: standard strides); default
        `init_from`.
      freeze_blocks: MBConv blocks frozen (`TrainConfig.freeze_blocks`).

    Returns:
      A `training.config.TrainConfig`, validated.

    Raises:
      ValueError: for a value out of range (naming the field) or an
        unknown model name.
    """
    image_size = resolved_image_size(recipe)
    small = recipe.small_images
    layout_from = layout_from or init_from
    if small is None and layout_from:
        small = checkpoints.source_small_images(layout_from)
    elif small is None:
        small = image_size <= preprocess.SMALL_IMAGE_MAX
    variant, width, depth = efficientnet.parse_model_name(recipe.model)
    if variant:
        width = depth = None
    return train_config.TrainConfig(
        model=train_config.ModelConfig(
            variant=variant, width=width, depth=depth,
            num_classes=source.num_classes, image_size=image_size,
            small_images=small, channels=channels,
            dropout_rate=recipe.dropout_rate,
            stochastic_depth_rate=recipe.stochastic_depth_rate),
        optimizer=train_config.OptimizerConfig(
            optimizer=recipe.optimizer,
            base_learning_rate=recipe.base_learning_rate,
            warmup_epochs=recipe.warmup_epochs,
            warmup_steps=recipe.warmup_steps,
            lr_schedule=recipe.lr_schedule,
            lr_decay_epochs=recipe.lr_decay_epochs,
            weight_decay=recipe.weight_decay,
            label_smoothing=recipe.label_smoothing,
            labeled_loss_weight=(1.0 if teacher
                                 else recipe.labeled_loss_weight),
            ema_decay=recipe.ema_decay),
        loop=train_config.LoopConfig(
            batch_size=recipe.batch_size, unlabel_ratio=unlabel_ratio,
            images_per_epoch=source.num_examples,
            train_steps=recipe.train_steps, precision=recipe.precision,
            strategy=recipe.strategy, tpu=recipe.tpu,
            steps_per_loop=recipe.steps_per_loop,
            checkpoint_every=recipe.checkpoint_every,
            eval_every=recipe.eval_every, log_every=recipe.log_every,
            jit_compile=recipe.jit_compile, cpu_kernels=recipe.cpu_kernels,
            seed=recipe.seed),
        input=streams.InputConfig(
            augment=recipe.augment, num_layers=recipe.num_layers,
            magnitude=recipe.magnitude,
            flip=recipe.flip if recipe.flip is not None
            else source.allows_flip),
        init_from=init_from, freeze_blocks=freeze_blocks)
