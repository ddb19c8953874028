"""EfficientNet B0-B8 and L2 as one Keras 3 functional builder.

The architecture is the table `BLOCKS` (the B0 baseline of Tan & Le, 2019)
scaled by a width and a depth coefficient with `round_filters` and
`round_repeats`, as the official TF code and keras.applications do. Layer names
are stable: `stem_conv`, `block{stage}{letter}_{op}` (e.g. `block2b_project_bn`),
`top_conv`, `predictions`, so checkpoints and frozen-layer lists can refer to
them.

The model takes pixels in [0, 255] (any float dtype) and normalises inside, and
returns float32 logits (also under mixed precision).

Feature-map sides per stage (the output of stages 1..7) for a 32 px input:
  standard strides:    16, 8, 4, 2, 2, 1, 1
  small_images=True:   16, 16, 16, 8, 8, 4, 4
The small-image variant uses stride 1 in stages 2 and 3 (for inputs of 64 px
or less), so a 32 px image still ends on a 4x4 map.

Size: the block table, the builder and the layer names it gives are one
idea; the names are read here too (`block_prefixes`, `freeze_blocks`,
`stage_outputs`), so no other module re-derives them.
"""

import contextlib
import dataclasses
import math
import re
import string
import sys

import keras

from noisy_student.model import layers as ns_layers


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks in the B0 baseline (before scaling)."""
    kernel_size: int
    repeats: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    strides: int
    se_ratio: float = 0.25


BLOCKS = (
    BlockArgs(3, 1, 32, 16, 1, 1),
    BlockArgs(3, 2, 16, 24, 6, 2),
    BlockArgs(5, 2, 24, 40, 6, 2),
    BlockArgs(3, 3, 40, 80, 6, 2),
    BlockArgs(5, 3, 80, 112, 6, 1),
    BlockArgs(5, 4, 112, 192, 6, 2),
    BlockArgs(3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280
# Stages (0-based) whose stride becomes 1 in the small-image variant.
SMALL_IMAGE_STRIDE1_STAGES = (1, 2)


@dataclasses.dataclass(frozen=True)
class Variant:
    """Compound-scaling coefficients of one EfficientNet."""
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS = {
    "b0": Variant(1.0, 1.0, 224, 0.2),
    "b1": Variant(1.0, 1.1, 240, 0.2),
    "b2": Variant(1.1, 1.2, 260, 0.3),
    "b3": Variant(1.2, 1.4, 300, 0.3),
    "b4": Variant(1.4, 1.8, 380, 0.4),
    "b5": Variant(1.6, 2.2, 456, 0.4),
    "b6": Variant(1.8, 2.6, 528, 0.5),
    "b7": Variant(2.0, 3.1, 600, 0.5),
    "b8": Variant(2.2, 3.6, 672, 0.5),
    "l2": Variant(4.3, 5.3, 800, 0.5),
}

def conv_initializer():
    """He-normal fan-out initialiser, as the official code uses.

    A new instance per layer: a Keras initialiser fixes its seed when it is
    made, so one shared instance would give equal-shaped layers equal
    weights.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="truncated_normal")


def dense_initializer():
    """Uniform fan-out initialiser of the classifier (official code)."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_out", distribution="uniform")


def get_variant(name):
    """Returns the `Variant` called `name` (b0..b8, l2; case-insensitive).

    Raises:
      ValueError: if the name is unknown.
    """
    key = str(name).lower()
    if key not in VARIANTS:
        raise ValueError(
            f"Expected an EfficientNet variant in {sorted(VARIANTS)}. "
            f"Received: variant={name!r}")
    return VARIANTS[key]


def parse_model_name(name):
    """Reads a model name: a variant (b0..b8, l2) or "wW-dD" coefficients.

    "w0.5-d0.5" names an EfficientNet with width 0.5 and depth 0.5 (the tiny
    models of the CPU demo and the tests).

    Returns:
      (variant or None, width, depth).

    Raises:
      ValueError: for a name of neither form.
    """
    key = str(name).strip().lower()
    if key in VARIANTS:
        return key, VARIANTS[key].width, VARIANTS[key].depth
    width, sep, depth = key.partition("-")
    try:
        if not (sep and width[0] == "w" and depth[0] == "d"):
            raise ValueError
        width, depth = float(width[1:]), float(depth[1:])
    except (ValueError, IndexError):
        raise ValueError(
            f"Expected a model name in {sorted(VARIANTS)} or 'wW-dD' (e.g. "
            f"w0.5-d0.5). Received: model={name!r}") from None
    if not (0 < width < math.inf and 0 < depth < math.inf):  # NaN too.
        raise ValueError(f"Expected finite width and depth > 0. Received: "
                         f"model={name!r}")
    return None, width, depth


def is_smaller(name, than):
    """Whether model `name` is narrower or shallower than model `than`.

    Args:
      name: A model name (b0..b8, l2 or "w{width}-d{depth}").
      than: Another model name.

    Returns:
      True if its width or its depth coefficient is smaller (the paper's
      students are equal or larger in both).
    """
    _, width, depth = parse_model_name(name)
    _, other_width, other_depth = parse_model_name(than)
    return width < other_width or depth < other_depth


def round_filters(filters, width, divisor=8):
    """Scales a channel count by `width`, rounded to a multiple of `divisor`.

    Never rounds down by more than 10% (the official `round_filters`).

    Args:
      filters: The B0 channel count.
      width: Width coefficient.
      divisor: The result is a multiple of it (8 in the official code).

    Returns:
      The scaled channel count, an int >= divisor.
    """
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats, depth):
    """Scales a stage's block count by `depth`, rounded up.

    Args:
      repeats: The B0 block count of the stage.
      depth: Depth coefficient.

    Returns:
      ceil(depth * repeats), an int.
    """
    return int(math.ceil(depth * repeats))


def block_name(stage, index):
    """Stable name prefix of a block, as keras.applications names it.

    Args:
      stage: The stage, 1-based (1..7).
      index: The block within the stage, 0-based (a, b, c ...).

    Returns:
      E.g. "block2b_" for stage 2, index 1.
    """
    letters = string.ascii_lowercase
    suffix = letters[index] if index < len(letters) else f"_{index}"
    return f"block{stage}{suffix}_"


# A layer name's block prefix, as `block_name` writes it ("block2b_",
# "block4_27_"), and the prefix of the stem's layers.
_BLOCK_PREFIX = re.compile(r"^(block\d+(?:[a-z]|_\d+)_)")
STEM_PREFIX = "stem_"


def block_prefixes(model):
    """The name prefixes of the model's MBConv blocks, in network order.

    Args:
      model: A model of `build_efficientnet` (its layer names).

    Returns:
      A list like ["block1a_", "block2a_", "block2b_", ...].
    """
    blocks = []
    for layer in model.layers:
        match = _BLOCK_PREFIX.match(layer.name)
        if match and match.group(1) not in blocks:
            blocks.append(match.group(1))
    return blocks


def freeze_blocks(model, num_blocks):
    """Freezes the stem and the first `num_blocks` MBConv blocks.

    FixRes-style fine-tuning at a larger resolution (the paper's L2 at
    800 px, Section 3) trains only the later layers. Frozen batch norm uses
    its moving statistics.

    Args:
      model: A model of `build_efficientnet`.
      num_blocks: Blocks to freeze, in network order (block1a, block2a,
        ...); 0 freezes nothing.

    Returns:
      The names of the frozen layers.

    Raises:
      ValueError: if the model has fewer blocks.
    """
    if num_blocks <= 0:
        return []
    blocks = block_prefixes(model)
    if num_blocks > len(blocks):
        raise ValueError(
            f"Expected freeze_blocks <= {len(blocks)} (the model's blocks). "
            f"Received: freeze_blocks={num_blocks}")
    prefixes = (STEM_PREFIX,) + tuple(blocks[:num_blocks])
    frozen = []
    for layer in model.layers:
        if layer.name.startswith(prefixes):
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def drop_rates(depth, base_rate=0.2):
    """Stochastic-depth rate of every block, in network order.

    Block i (0-based) of n scaled blocks gets `base_rate * i / n`: the rate
    rises linearly from 0, and the last block's is `base_rate * (n - 1) / n`,
    as in the official EfficientNet code. Blocks without an identity skip
    (the first of each stage) ignore their rate.

    Args:
      depth: Depth coefficient (sets the number of blocks n).
      base_rate: The paper's stochastic-depth rate (0.2).

    Returns:
      A list of n floats in [0, base_rate).
    """
    total = sum(round_repeats(b.repeats, depth) for b in BLOCKS)
    return [base_rate * i / total for i in range(total)]


def _check_args(width, depth, num_classes, image_size, dropout_rate,
                stochastic_depth_rate):
    def positive(name, value):
        if not value > 0:
            raise ValueError(
                f"Expected {name} > 0. Received: {name}={value!r}")
    positive("width", width)
    positive("depth", depth)
    positive("num_classes", num_classes)
    positive("image_size", image_size)
    for name, value in (("dropout_rate", dropout_rate),
                        ("stochastic_depth_rate", stochastic_depth_rate)):
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"Expected {name} in [0, 1). Received: {name}={value!r}")


def build_efficientnet(variant=None, *, width=None, depth=None,
                       num_classes=1000, image_size=None, small_images=False,
                       dropout_rate=None, stochastic_depth_rate=0.2,
                       bn_momentum=0.99, bn_epsilon=1e-3,
                       sync_batch_norm=False, channels=3, name=None):
    """Builds an EfficientNet classifier that outputs float32 logits.

    Args:
      variant: One of b0..b8, l2, or None to give `width` and `depth`.
      width: Width coefficient; overrides the variant's.
      depth: Depth coefficient; overrides the variant's.
      num_classes: Number of output classes.
      image_size: Input side in pixels; defaults to the variant's resolution.
      small_images: Use stride 1 in stages 2 and 3 (inputs of 64 px or less).
      dropout_rate: Dropout before the classifier; defaults to the variant's
        (0.2 when no variant is given).
      stochastic_depth_rate: Base stochastic-depth rate (the paper's 0.2).
      bn_momentum: Batch-norm moving-average momentum.
      bn_epsilon: Batch-norm epsilon.
      sync_batch_norm: Use batch statistics synchronised across replicas.
      channels: Input channels.
      name: Model name; defaults to `efficientnet-<variant>`.

    Returns:
      An uncompiled `keras.Model` mapping [0, 255] images of shape
      (image_size, image_size, channels) to logits of shape (num_classes,).

    Raises:
      ValueError: for an unknown variant or an argument out of range.
    """
    width, depth, image_size, dropout_rate, name = _resolve_variant(
        variant, width, depth, image_size, dropout_rate, name)
    _check_args(width, depth, num_classes, image_size, dropout_rate,
                stochastic_depth_rate)

    def batch_norm(layer_name):
        return keras.layers.BatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon,
            synchronized=sync_batch_norm, name=layer_name)

    inputs = keras.Input((image_size, image_size, channels), name="image")
    x = _stem(inputs, width, channels, batch_norm)
    x = _blocks(x, width, depth, small_images, stochastic_depth_rate,
                batch_norm)
    outputs = _head(x, width, num_classes, dropout_rate, batch_norm)
    with deep_graph_recursion():
        return keras.Model(inputs, outputs, name=name)


# Python frames Keras may take to map a functional graph: it recurses once
# per layer on the graph's longest path, about 950 frames for L2, next to
# Python's default limit of 1000, so L2 failed to build or load from any
# deeper call stack (a notebook, a test runner's worker).
GRAPH_RECURSION_LIMIT = 10_000


@contextlib.contextmanager
def deep_graph_recursion():
    """Raises Python's recursion limit to GRAPH_RECURSION_LIMIT (never
    lowers it) while Keras builds or loads a functional model; restores it
    after."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, GRAPH_RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def _resolve_variant(variant, width, depth, image_size, dropout_rate, name):
    """The variant's coefficients, with the given arguments taking priority.

    Args:
      variant: A name of VARIANTS, or None (then width and depth are
        required; resolution 224 and dropout 0.2 are the defaults).
      width: Width coefficient or None.
      depth: Depth coefficient or None.
      image_size: Input side in pixels or None.
      dropout_rate: Dropout before the classifier or None.
      name: Model name or None.

    Returns:
      (width, depth, image_size, dropout_rate, name), none of them None.

    Raises:
      ValueError: for no variant without both width and depth, or an
        unknown variant.
    """
    if variant is None:
        if width is None or depth is None:
            raise ValueError(
                "Expected a variant name or both width and depth. Received: "
                f"variant=None, width={width!r}, depth={depth!r}")
        spec = Variant(width, depth, 224, 0.2)
        name = name or f"efficientnet-w{width}-d{depth}"
    else:
        spec = get_variant(variant)
        name = name or f"efficientnet-{str(variant).lower()}"
    return (spec.width if width is None else width,
            spec.depth if depth is None else depth,
            spec.resolution if image_size is None else image_size,
            spec.dropout if dropout_rate is None else dropout_rate,
            name)


def _stem(inputs, width, channels, batch_norm):
    """In-model normalisation, then the stride-2 3x3 stem convolution.

    Args:
      inputs: float [B, S, S, channels] pixels in [0, 255].
      width: Width coefficient (scales the stem's 32 filters).
      channels: Input channels; a grey model normalises with the mean of
        the ImageNet RGB statistics.
      batch_norm: Function layer name -> BatchNormalization layer.

    Returns:
      The stem's activations [B, S/2, S/2, round_filters(32, width)].
    """
    mean, stddev = ns_layers.IMAGENET_MEAN_RGB, ns_layers.IMAGENET_STDDEV_RGB
    if channels != 3:
        mean = (sum(mean) / 3,) * channels
        stddev = (sum(stddev) / 3,) * channels
    x = ns_layers.PixelNormalization(mean, stddev, name="normalize")(inputs)
    x = keras.layers.Conv2D(
        round_filters(STEM_FILTERS, width), 3, strides=2, padding="same",
        use_bias=False, kernel_initializer=conv_initializer(),
        name="stem_conv")(x)
    x = batch_norm("stem_bn")(x)
    return keras.layers.Activation("swish", name="stem_activation")(x)


def _blocks(x, width, depth, small_images, stochastic_depth_rate,
            batch_norm):
    """The MBConv blocks of BLOCKS, scaled by width and depth.

    Args:
      x: The stem's activations.
      width: Width coefficient.
      depth: Depth coefficient.
      small_images: Stride 1 in SMALL_IMAGE_STRIDE1_STAGES.
      stochastic_depth_rate: Base rate; block i of n gets rate * i / n.
      batch_norm: Function layer name -> BatchNormalization layer.

    Returns:
      The last block's activations.
    """
    rates = iter(drop_rates(depth, stochastic_depth_rate))
    for stage, args in enumerate(BLOCKS):
        strides = args.strides
        if small_images and stage in SMALL_IMAGE_STRIDE1_STAGES:
            strides = 1
        filters_in = round_filters(args.filters_in, width)
        filters_out = round_filters(args.filters_out, width)
        for index in range(round_repeats(args.repeats, depth)):
            x = _mbconv_block(
                x, filters_in=filters_in if index == 0 else filters_out,
                filters_out=filters_out, kernel_size=args.kernel_size,
                strides=strides if index == 0 else 1,
                expand_ratio=args.expand_ratio, se_ratio=args.se_ratio,
                drop_rate=next(rates), batch_norm=batch_norm,
                prefix=block_name(stage + 1, index))
    return x


def _head(x, width, num_classes, dropout_rate, batch_norm):
    """1x1 conv to 1280 * width filters, pooling, dropout, the classifier.

    Args:
      x: The last block's activations.
      width: Width coefficient.
      num_classes: Output classes K.
      dropout_rate: Dropout before the classifier (none at 0).
      batch_norm: Function layer name -> BatchNormalization layer.

    Returns:
      float32 logits [B, K].
    """
    x = ns_layers.PointwiseConv2D(
        round_filters(TOP_FILTERS, width), use_bias=False,
        kernel_initializer=conv_initializer(), name="top_conv")(x)
    x = batch_norm("top_bn")(x)
    x = keras.layers.Activation("swish", name="top_activation")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout_rate > 0:
        x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
    # float32 logits keep the softmax and the loss stable under mixed
    # precision.
    return keras.layers.Dense(
        num_classes, kernel_initializer=dense_initializer(), dtype="float32",
        name="predictions")(x)


def _mbconv_block(x, *, filters_in, filters_out, kernel_size, strides,
                  expand_ratio, se_ratio, drop_rate, batch_norm, prefix):
    """Mobile inverted bottleneck with squeeze-and-excitation."""
    shortcut = x
    filters = filters_in * expand_ratio
    if expand_ratio != 1:
        x = ns_layers.PointwiseConv2D(
            filters, use_bias=False, kernel_initializer=conv_initializer(),
            name=prefix + "expand_conv")(x)
        x = batch_norm(prefix + "expand_bn")(x)
        x = keras.layers.Activation("swish", name=prefix + "expand_activation")(x)
    x = ns_layers.SmallMapDepthwiseConv2D(
        kernel_size, strides=strides, padding="same", use_bias=False,
        depthwise_initializer=conv_initializer(), name=prefix + "dwconv")(x)
    x = batch_norm(prefix + "bn")(x)
    x = keras.layers.Activation("swish", name=prefix + "activation")(x)

    if 0 < se_ratio <= 1:
        squeezed = max(1, int(filters_in * se_ratio))
        se = keras.layers.GlobalAveragePooling2D(
            keepdims=True, name=prefix + "se_squeeze")(x)
        se = ns_layers.PointwiseConv2D(
            squeezed, activation="swish",
            kernel_initializer=conv_initializer(), name=prefix + "se_reduce")(se)
        se = ns_layers.PointwiseConv2D(
            filters, activation="sigmoid",
            kernel_initializer=conv_initializer(), name=prefix + "se_expand")(se)
        x = keras.layers.Multiply(name=prefix + "se_excite")([x, se])

    x = ns_layers.PointwiseConv2D(
        filters_out, use_bias=False, kernel_initializer=conv_initializer(),
        name=prefix + "project_conv")(x)
    x = batch_norm(prefix + "project_bn")(x)
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = ns_layers.StochasticDepth(drop_rate, name=prefix + "drop")(x)
        x = keras.layers.Add(name=prefix + "add")([x, shortcut])
    return x


def stage_outputs(model):
    """Returns {stage: last layer of that stage} for stages 1..7 of `model`."""
    last = {}
    for layer in model.layers:
        if layer.name.startswith("block"):
            last[int(layer.name[len("block")])] = layer
    return dict(sorted(last.items()))


def stochastic_depth_layers(model):
    """Returns the model's StochasticDepth layers in network order."""
    return [layer for layer in model.layers
            if isinstance(layer, ns_layers.StochasticDepth)]
