"""RandAugment as Noisy Student used it, vectorised over the batch in TF ops.

The paper's input noise is RandAugment (Cubuk et al., 2019) with the 16 ops of
the official code (google-research/noisystudent `randaugment.py`, the same ops
as tensorflow/tpu `models/official/efficientnet/autoaugment.py`). This module
re-implements them in TensorFlow ops that work on a whole batch at once, with a
*different random op per image* (the official code augments one image at a
time inside `dataset.map`).

Level scale and argument mapping (as the official `level_to_arg`):
  A level is on the paper's 0..10 scale; levels above 10 extrapolate (the
  ImageNet recipes use M=27). `MAX_LEVEL = 10`, `r = level / 10`.

  =============  ====================================  =====================
  op             argument at level L (r = L / 10)      identity at
  =============  ====================================  =====================
  AutoContrast   none (per channel min..max -> 0..255)  no level (*)
  Equalize       none (Pillow's histogram equalize)     no level
  Invert         none (255 - x)                         no level
  Rotate         +-30 * r degrees, random sign          L = 0
  Posterize      bits = clip(int(4 r), 1, 8)            L >= 20 (8 bits)
  Solarize       threshold = clip(int(256 r), 0, 256)   L >= 10 (256)
  SolarizeAdd    +int(110 r) to pixels < 128            L = 0
  Color          factor 0.1 + 1.8 r                     L = 5 (factor 1.0)
  Contrast       factor 0.1 + 1.8 r                     L = 5
  Brightness     factor 0.1 + 1.8 r                     L = 5
  Sharpness      factor 0.1 + 1.8 r                     L = 5
  ShearX/ShearY  +-0.3 r, random sign                   L = 0
  TranslateX/Y   +-translate_frac * size * r, random    L = 0
                 sign (official: 100 px at 224 px)
  Cutout         square of side 2 * int(cutout_frac     L = 0
                 * min(H, W) * r), random centre
                 (official: pad 40 px at 224 px)
  =============  ====================================  =====================
  (*) AutoContrast leaves an image unchanged when each channel already spans
  0..255.

  Notes on fidelity to the official code:
  * Posterize: the official `int(4 r)` bits is 0 below level 2.5, and the
    official `shift = 8 - bits` is then 8; TensorFlow clamps uint8 shift
    amounts to 7, so the official op keeps 1 bit there. We clamp bits to 1..8
    so levels < 2.5 keep 1 bit (as the official op effectively does) and
    levels >= 20 keep 8 bits (the identity; from level 22.5 the official
    code would build a negative shift). Note the official direction:
    *higher* level keeps *more* bits (a weaker op), and Solarize's threshold
    likewise rises with the level (threshold 256 at level 10 inverts
    nothing). We follow it.
  * Enhance ops (Color, Contrast, Brightness, Sharpness) are the identity at
    level 5 and degrade towards factor 0.1 at level 0, as in the official code.
  * Contrast blends with the image's mean grey level, as Pillow does. The
    official TF code uses `sum(histogram) / 256` (the pixel count / 256, a
    known bug) instead of the mean; we follow Pillow here.
  * Translate and Cutout are in pixels in the official code: 100 and 40 px
    for ImageNet at any resolution. We scale them with the image size so that
    224 px gives the official numbers (`translate_frac = 100 / 224`,
    `cutout_frac = 40 / 224`); TranslateX scales with the width, TranslateY
    with the height, Cutout with min(H, W). The official small-image recipe
    (CIFAR-10/SVHN, 32 px) uses `image_size // 8` for both constants and a
    final cutout of pad `image_size // 4` on every image:
    `translate_frac=1/8, cutout_frac=1/8, extra_cutout_frac=1/4`.
  * Geometric ops use nearest-neighbour sampling and fill 128, as the
    official `contrib_image.transform` + wrap/unwrap does. Rotation is about
    the image centre; shears are about the top-left corner (as Pillow and the
    official code).
  * The official RandAugment draws a `prob` in [0.2, 0.8] per op, but none of
    the 16 ops takes a `prob` argument, so it is unused: the chosen op is
    *always* applied, with the fixed magnitude M. We do the same.
  * `cutout=False` drops Cutout from the op list, like the official
    `--cutout_op` flag.

Level 0 (M = 0) precisely: Rotate, ShearX, ShearY, TranslateX, TranslateY,
SolarizeAdd and Cutout are the identity. AutoContrast, Equalize and Invert
have no level and still act; Posterize keeps 1 bit; Solarize (threshold 0)
inverts every pixel; Color, Contrast, Brightness and Sharpness blend with
factor 0.1. `LEVEL_ZERO_IDENTITY_OPS` lists the first group.

Randomness is stateless: every random choice derives from a `[2]` int seed,
so the same seed gives the same output, eagerly or inside tf.data. See
`augment_dataset` for per-element seeds in a parallel, reproducible pipeline.

Implementation: the ops fall into five groups, and each RandAugment layer
partitions the batch by group (`tf.dynamic_partition`), runs each group once
on its images and stitches the batch back (`tf.dynamic_stitch`):
  * point ops (AutoContrast, Equalize, Invert, Posterize, Solarize,
    SolarizeAdd, Brightness, Contrast) become one 256-entry lookup table per
    image and channel, applied with one `gather_nd`; the histogram that
    Equalize, AutoContrast and Contrast need is one `bincount` over the group;
  * geometric ops (Rotate, ShearX/Y, TranslateX/Y) become one projective
    matrix per image, applied with one `ImageProjectiveTransformV3`;
  * Color, Sharpness and Cutout each run once on their images.
A single image (a per-image `dataset.map`) skips the partition and runs only
its op's group, through `tf.switch_case`. Mapping over batches is faster:
augment after `batch()` where the pipeline allows it.

Size: the 16 ops, their level-to-argument table and the batched policy that
picks among them read as one table, as the official `randaugment.py` keeps
them; each op is a few lines, and a module per op group would scatter the
table.
"""

import dataclasses
import functools
import math
import numbers
from typing import Callable, Optional, Tuple

import tensorflow as tf

MAX_LEVEL = 10.0
FILL_VALUE = 128

# The official op list (tensorflow/tpu autoaugment.py, in its order).
OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")

# Ops that return the image unchanged at level 0 (see the module docstring).
LEVEL_ZERO_IDENTITY_OPS = (
    "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "SolarizeAdd",
    "Cutout")

# Official constants at 224 px, as fractions of the image size.
TRANSLATE_FRAC = 100.0 / 224.0
CUTOUT_FRAC = 40.0 / 224.0

AUGMENT_KINDS = ("randaugment", "keras_cv", "none")

# Op groups: each group is computed by one vectorised routine.
_LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize",
            "SolarizeAdd", "Brightness", "Contrast")
_GEO_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
_GROUPS = (("lut", _LUT_OPS), ("geo", _GEO_OPS),
           ("color", ("Color",)), ("sharpness", ("Sharpness",)),
           ("cutout", ("Cutout",)))
_OP_GROUP = {op: g for g, (_, ops) in enumerate(_GROUPS) for op in ops}
# Position of each op inside its group (LUT / geometric candidate stacks).
_OP_LOCAL = {op: i for _, ops in _GROUPS for i, op in enumerate(ops)}
# Python tuples, made tensors where used: no TF work at import time (it would
# initialise TF's devices before callers could configure them).
_GROUP_OF_ID = tuple(_OP_GROUP[n] for n in OP_NAMES)
_LOCAL_OF_ID = tuple(_OP_LOCAL[n] for n in OP_NAMES)

# Pillow's RGB -> L weights (16-bit fixed point), used by Color and Contrast.
_L_WEIGHTS = (19595, 38470, 7471)


# Plain TF ops with no tensor-dependent Python control flow: skipping
# AutoGraph's conversion saves seconds each time tf.data traces a map.
_no_autograph = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How the training input is augmented.

    Attributes:
      kind: "randaugment" (ours, the paper's ops), "keras_cv"
        (keras_cv.layers.RandAugment) or "none".
      num_layers: N, ops applied in sequence to each image (paper: 2).
      magnitude: M on the 0..10 level scale; > 10 extrapolates (B7: 27).
      cutout: Include Cutout among the ops (official `--cutout_op`).
      translate_frac: Translation at level 10 as a fraction of the image side
        (official: 100 px at 224 px).
      cutout_frac: Cutout half-side at level 10 as a fraction of min(H, W)
        (official: 40 px at 224 px).
      extra_cutout_frac: If > 0, one more cutout of half-side
        `extra_cutout_frac * min(H, W)` on every image after the N layers
        (the official small-image recipe uses 1/4).
      ops: Restrict the op list to these names (None: all of OP_NAMES, less
        Cutout when `cutout` is False).
      fill_value: Pixel value for areas uncovered by geometric ops and cutout.
    """
    kind: str = "randaugment"
    num_layers: int = 2
    magnitude: float = 10.0
    cutout: bool = True
    translate_frac: float = TRANSLATE_FRAC
    cutout_frac: float = CUTOUT_FRAC
    extra_cutout_frac: float = 0.0
    ops: Optional[Tuple[str, ...]] = None
    fill_value: int = FILL_VALUE


# ----------------------------------------------------------------------------
# Level -> argument mapping (vectorised: `level` is a float32 tensor [B]).


def _ratio(level):
    """level / 10 in float64, the Python float arithmetic of the official
    code, so that int() truncations land on the same integers."""
    return tf.cast(level, tf.float64) / MAX_LEVEL


def enhance_factor(level):
    """Blend factor of Color/Contrast/Brightness/Sharpness: 0.1 + 1.8 L/10."""
    # Rounded to float32 once, as Pillow receives a Python float.
    return tf.cast(_ratio(level) * 1.8 + 0.1, tf.float32)


def posterize_bits(level):
    """Bits kept by Posterize: clip(int(4 L/10), 1, 8) (see module notes)."""
    bits = tf.floor(_ratio(level) * 4.0)
    return tf.cast(tf.clip_by_value(bits, 1.0, 8.0), tf.int32)


def solarize_threshold(level):
    """Solarize inverts pixels >= this: clip(int(256 L/10), 0, 256)."""
    thr = tf.floor(_ratio(level) * 256.0)
    return tf.cast(tf.clip_by_value(thr, 0.0, 256.0), tf.int32)


def solarize_addition(level):
    """SolarizeAdd adds this to pixels < 128: int(110 L/10), at most 255."""
    add = tf.floor(_ratio(level) * 110.0)
    return tf.cast(tf.clip_by_value(add, 0.0, 255.0), tf.int32)


# ----------------------------------------------------------------------------
# Group routines. Each takes a batch `x` uint8 [b, H, W, C] (b may be 0) and
# per-image parameters, and returns a uint8 batch of the same shape.


def _blend(degenerate, image, factor):
    """Pillow's Image.blend(degenerate, image, factor) on float32 tensors.

    Pillow (and the official code) compute `d + f * (x - d)` in float32, clip
    to 0..255 and truncate; `tf.cast` truncates the same way.
    """
    out = degenerate + factor * (image - degenerate)
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grey(x):
    """Pillow's RGB -> L conversion, rounded, as float32 [b, H, W, 1]."""
    if x.shape[-1] == 1:
        return tf.cast(x, tf.float32)
    # Pillow: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16. Every product and
    # partial sum stays below 2**24, so float32 computes it exactly.
    weights = tf.constant([[w] for w in _L_WEIGHTS], tf.float32)
    total = tf.tensordot(tf.cast(x, tf.float32), weights, axes=1)
    return tf.floor((total + 32768.0) * (1.0 / 65536.0))


def _point_luts(hist, local, level, channels):
    """Per-image, per-channel 256-entry tables for the eight point ops.

    Args:
      hist: int32 [b, C, 256] per-channel histograms (or None when no image
        needs one: then AutoContrast/Equalize/Contrast tables are not built).
      local: int32 [b], the op's position in `_LUT_OPS`.
      level: float32 [b].
      channels: C.

    Returns:
      uint8 [b, C, 256].
    """
    b = tf.shape(local)[0]
    v = tf.range(256, dtype=tf.int32)[tf.newaxis, tf.newaxis, :]  # [1,1,256]
    vf = tf.cast(v, tf.float32)
    ones = tf.ones([b, channels, 1], tf.int32)
    col = lambda t: tf.reshape(t, [-1, 1, 1])  # [b] -> [b, 1, 1]

    identity = v * ones
    invert = (255 - v) * ones
    shift = 8 - posterize_bits(level)
    mask = col(tf.bitwise.bitwise_xor(
        255, tf.bitwise.left_shift(1, shift) - 1))
    posterize = tf.bitwise.bitwise_and(v, mask)
    thr = col(solarize_threshold(level))
    solarize = tf.where(v < thr, v, 255 - v)
    add = col(solarize_addition(level))
    solarize_add = tf.where(v < 128, tf.minimum(v + add, 255), v)
    factor = col(enhance_factor(level))
    # Brightness blends with black: trunc(clip(0 + f * (v - 0))).
    brightness = tf.cast(_blend(tf.zeros_like(vf), vf, factor),
                         tf.int32) * ones

    if hist is None:
        autocontrast = equalize = contrast = identity
    else:
        autocontrast = _autocontrast_lut(hist)
        equalize = _equalize_lut(hist)
        contrast = _contrast_lut(hist, factor, channels)
    table = {
        "AutoContrast": autocontrast, "Equalize": equalize,
        "Invert": invert, "Posterize": posterize * ones,
        "Solarize": solarize * ones, "SolarizeAdd": solarize_add * ones,
        "Brightness": brightness, "Contrast": contrast,
    }
    stacked = tf.stack([table[n] for n in _LUT_OPS], axis=1)  # [b,8,C,256]
    luts = tf.gather(stacked, local, axis=1, batch_dims=1)
    return tf.cast(luts, tf.uint8)


def _autocontrast_lut(hist):
    """Pillow's ImageOps.autocontrast(cutoff=0) per channel."""
    present = hist > 0
    lo = tf.argmax(tf.cast(present, tf.int32), axis=-1, output_type=tf.int32)
    hi = 255 - tf.argmax(tf.cast(present[..., ::-1], tf.int32), axis=-1,
                         output_type=tf.int32)
    lo = tf.cast(lo, tf.float64)[..., tf.newaxis]
    hi = tf.cast(hi, tf.float64)[..., tf.newaxis]
    v = tf.cast(tf.range(256), tf.float64)
    # Pillow computes the table in Python floats (double) and truncates.
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    lut = tf.clip_by_value(tf.floor(v * scale - lo * scale), 0.0, 255.0)
    lut = tf.where(hi > lo, lut, v)
    return tf.cast(lut, tf.int32)


def _equalize_lut(hist):
    """Pillow's ImageOps.equalize table per channel (exact integer rule)."""
    present = hist > 0
    last = 255 - tf.argmax(tf.cast(present[..., ::-1], tf.int32), axis=-1,
                           output_type=tf.int32)
    last_count = tf.gather(hist, last[..., tf.newaxis], batch_dims=2)
    step = (tf.reduce_sum(hist, -1, keepdims=True) - last_count) // 255
    # Pillow: lut[i] = (step // 2 + sum(hist[:i])) // step.
    lut = (step // 2 + tf.cumsum(hist, axis=-1, exclusive=True)) // tf.maximum(
        step, 1)
    v = tf.range(256, dtype=tf.int32)
    # step == 0 also covers single-valued channels (Pillow keeps them).
    return tf.where(step > 0, tf.minimum(lut, 255), v)


def _contrast_lut(hist, factor, channels):
    """Pillow's ImageEnhance.Contrast: blend with the mean grey level."""
    v = tf.range(256, dtype=tf.float32)
    counts = tf.cast(tf.reduce_sum(hist, -1), tf.float32)  # [b, C]
    means = tf.reduce_sum(tf.cast(hist, tf.float32) * v, -1) / tf.maximum(
        counts, 1.0)
    if channels == 3:
        # Mean of L from the channel means; Pillow averages the rounded L of
        # each pixel, which differs by < 0.5 before its own rounding.
        w = tf.constant(_L_WEIGHTS, tf.float32) / 65536.0
        grey_mean = tf.reduce_sum(means * w, -1)
    else:
        grey_mean = means[:, 0]
    mean = tf.floor(grey_mean + 0.5)[:, tf.newaxis, tf.newaxis]
    lut = _blend(mean, v, factor)
    return tf.cast(lut, tf.int32) * tf.ones([1, channels, 1], tf.int32)


def _apply_lut_group(x, op_id, level):
    """Applies each image's point op with one table lookup."""
    channels = x.shape[-1]
    b = tf.shape(x)[0]
    local = tf.gather(tf.constant(_LOCAL_OF_ID, tf.int32), op_id)
    height, width = _spatial(x)
    offsets = tf.reshape(tf.range(b * channels, dtype=tf.int32) * 256,
                         [b, 1, 1, channels])
    # Index of each pixel's entry in the flattened [b, C, 256] tables. An
    # explicit tile then add is ~2x faster than a broadcasting add here.
    flat = tf.cast(x, tf.int32) + tf.tile(offsets, [1, height, width, 1])
    needs_hist = [_OP_LOCAL[n] for n in ("AutoContrast", "Equalize",
                                         "Contrast")]
    need = tf.reduce_any(tf.equal(local[:, tf.newaxis], needs_hist))

    def with_hist():
        size = b * channels * 256
        hist = tf.math.bincount(tf.reshape(flat, [-1]), minlength=size,
                                maxlength=size, dtype=tf.int32)
        return _point_luts(tf.reshape(hist, [b, channels, 256]), local,
                           level, channels)

    def without_hist():
        return _point_luts(None, local, level, channels)

    luts = tf.cond(need, with_hist, without_hist)
    # gather_nd is ~2x faster than gather for this one-element lookup.
    return tf.gather_nd(tf.reshape(luts, [-1]), flat[..., tf.newaxis])


def _geo_matrices(op_id, level, sign, height, width, translate_frac):
    """Projective matrices [b, 8] (output -> input coordinates) per image."""
    local = tf.gather(tf.constant(_LOCAL_OF_ID, tf.int32), op_id)
    r = tf.cast(_ratio(level), tf.float32) * sign
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    zeros = tf.zeros_like(r)
    ones = tf.ones_like(r)
    # Rotate about the centre by 30 * r degrees.
    theta = r * (30.0 * math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    rotate = tf.stack([cos, -sin, x_off, sin, cos, y_off, zeros, zeros], 1)
    shear = r * 0.3
    shear_x = tf.stack([ones, shear, zeros, zeros, ones, zeros, zeros, zeros],
                       1)
    shear_y = tf.stack([ones, zeros, zeros, shear, ones, zeros, zeros, zeros],
                       1)
    tx = r * (translate_frac * w)
    ty = r * (translate_frac * h)
    translate_x = tf.stack([ones, zeros, tx, zeros, ones, zeros, zeros,
                            zeros], 1)
    translate_y = tf.stack([ones, zeros, zeros, zeros, ones, ty, zeros,
                            zeros], 1)
    table = {"Rotate": rotate, "ShearX": shear_x, "ShearY": shear_y,
             "TranslateX": translate_x, "TranslateY": translate_y}
    stacked = tf.stack([table[n] for n in _GEO_OPS], axis=1)  # [b, 5, 8]
    return tf.gather(stacked, local, axis=1, batch_dims=1)


def _apply_geo_group(x, op_id, level, sign, translate_frac, fill_value):
    height, width = _spatial(x)
    matrices = _geo_matrices(op_id, level, sign, height, width,
                             translate_frac)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=matrices,
        output_shape=tf.stack([height, width]),
        fill_value=tf.cast(fill_value, tf.float32),
        interpolation="NEAREST", fill_mode="CONSTANT")
    return tf.ensure_shape(out, x.shape)


def _apply_color_group(x, level):
    if x.shape[-1] == 1:
        return x  # A grey image has no colour to change.
    factor = tf.reshape(enhance_factor(level), [-1, 1, 1, 1])
    return _blend(_grey(x), tf.cast(x, tf.float32), factor)


def _apply_sharpness_group(x, level):
    """Pillow's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image.

    The 3x3 SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 is applied to the
    interior; the one-pixel border keeps the original values (Pillow and the
    official code both do so), so the border is unchanged by the blend.
    """
    channels = x.shape[-1]

    def sharpen():
        xf = tf.cast(x, tf.float32)
        kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)
        kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis],
                         [1, 1, channels, 1])
        # Integer sums (exact in float32); Pillow rounds sum / 13 to the
        # nearest integer, and sum / 13 is never exactly halfway.
        total = tf.nn.depthwise_conv2d(xf, kernel, [1, 1, 1, 1], "VALID")
        smooth = tf.floor(total / 13.0 + 0.5)
        factor = tf.reshape(enhance_factor(level), [-1, 1, 1, 1])
        inner = _blend(smooth, xf[:, 1:-1, 1:-1, :], factor)
        middle = tf.concat([x[:, 1:-1, :1], inner, x[:, 1:-1, -1:]], axis=2)
        return tf.concat([x[:, :1], middle, x[:, -1:]], axis=1)

    # depthwise_conv2d returns a wrongly shaped result for an empty batch,
    # and a group is often empty.
    return tf.cond(tf.shape(x)[0] > 0, sharpen, lambda: x)


def _cutout(x, pad, center_y, center_x, fill_value):
    """Fills rows [cy - pad, cy + pad) x cols [cx - pad, cx + pad) (clipped).

    Args:
      x: uint8 [b, H, W, C].
      pad: int32 [b], half-side of the square (0: no cutout).
      center_y, center_x: int32 [b], centres in [0, H) and [0, W).
      fill_value: the fill.
    """
    height, width = _spatial(x)
    rows = tf.range(height)[tf.newaxis, :]
    cols = tf.range(width)[tf.newaxis, :]
    p = pad[:, tf.newaxis]
    in_rows = (rows >= center_y[:, tf.newaxis] - p) & (
        rows < center_y[:, tf.newaxis] + p)
    in_cols = (cols >= center_x[:, tf.newaxis] - p) & (
        cols < center_x[:, tf.newaxis] + p)
    mask = in_rows[:, :, tf.newaxis] & in_cols[:, tf.newaxis, :]
    fill = tf.cast(fill_value, tf.uint8)
    return tf.where(mask[..., tf.newaxis], fill, x)


def _cutout_pad(level, height, width, cutout_frac):
    side = tf.cast(tf.minimum(height, width), tf.float64)
    # The 1e-9 absorbs the rounding of cutout_frac (40 / 224 * 224 must
    # give the official 40 px).
    pad = tf.floor(_ratio(level) * cutout_frac * side + 1e-9)
    return tf.cast(pad, tf.int32)


def _spatial(x):
    """(H, W) as Python ints when static, else as scalar tensors."""
    height, width = x.shape[1], x.shape[2]
    dynamic = tf.shape(x)
    return (height if height is not None else dynamic[1],
            width if width is not None else dynamic[2])


# ----------------------------------------------------------------------------
# Applying a per-image op choice to a batch.


def _apply_group(name, x, op_id, level, sign, center_y, center_x,
                 translate_frac, cutout_frac, fill_value):
    """Runs group `name`'s routine on `x` (every image is in that group)."""
    if name == "lut":
        return _apply_lut_group(x, op_id, level)
    if name == "geo":
        return _apply_geo_group(x, op_id, level, sign, translate_frac,
                                fill_value)
    if name == "color":
        return _apply_color_group(x, level)
    if name == "sharpness":
        return _apply_sharpness_group(x, level)
    if name == "cutout":
        height, width = _spatial(x)
        pad = _cutout_pad(level, height, width, cutout_frac)
        return _cutout(x, pad, center_y, center_x, fill_value)
    return x


def _apply_ops(x, op_id, level, sign, center_y, center_x, translate_frac,
               cutout_frac, fill_value, groups):
    """Applies op `op_id[i]` to image i of `x`.

    Args:
      x: uint8 [B, H, W, C].
      op_id: int32 [B], indices into OP_NAMES.
      level: float32 [B].
      sign: float32 [B] of +-1 (geometric ops).
      center_y, center_x: int32 [B] cutout centres.
      translate_frac, cutout_frac, fill_value: see AugmentConfig.
      groups: the group indices that `op_id` can hold.

    Returns:
      uint8 [B, H, W, C].
    """
    consts = (translate_frac, cutout_frac, fill_value)
    if len(groups) == 1:
        # Every image is in the same group: no partition needed.
        name = _GROUPS[next(iter(groups))][0]
        out = _apply_group(name, x, op_id, level, sign, center_y, center_x,
                           *consts)
        return tf.ensure_shape(out, x.shape)
    num_groups = len(_GROUPS)
    group = tf.gather(tf.constant(_GROUP_OF_ID, tf.int32), op_id)
    if x.shape[0] == 1:
        # One image (per-image tf.data maps): run only its group's branch,
        # which is cheaper than partitioning a batch of one.
        def branch(name):
            return lambda: _apply_group(name, x, op_id, level, sign, center_y,
                                        center_x, *consts)
        branches = {g: branch(_GROUPS[g][0]) for g in sorted(groups)}
        out = tf.switch_case(group[0], branches)
        return tf.ensure_shape(out, x.shape)
    batch = tf.shape(x)[0]
    parts = tf.dynamic_partition(x, group, num_groups)
    ids = tf.dynamic_partition(op_id, group, num_groups)
    levels = tf.dynamic_partition(level, group, num_groups)
    signs = tf.dynamic_partition(sign, group, num_groups)
    cys = tf.dynamic_partition(center_y, group, num_groups)
    cxs = tf.dynamic_partition(center_x, group, num_groups)
    positions = tf.dynamic_partition(tf.range(batch), group, num_groups)
    outs = []
    for g, (name, _) in enumerate(_GROUPS):
        part = tf.ensure_shape(parts[g], [None] + x.shape[1:].as_list())
        if g in groups:
            part = _apply_group(name, part, ids[g], levels[g], signs[g],
                                cys[g], cxs[g], *consts)
        outs.append(part)
    out = tf.dynamic_stitch(positions, outs)
    return tf.ensure_shape(out, x.shape)


def _as_batch(images):
    """Validates `images` and returns (uint8 [B,H,W,C] tensor, was_single)."""
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise ValueError("Expected uint8 images. Received: "
                         f"images.dtype={images.dtype.name}")
    rank = images.shape.rank
    if rank not in (3, 4):
        raise ValueError("Expected images of shape [H, W, C] or [B, H, W, C]. "
                         f"Received: images.shape={images.shape}")
    if images.shape[-1] not in (1, 3):
        raise ValueError("Expected 1 or 3 channels. Received: "
                         f"images.shape={images.shape}")
    if rank == 3:
        return images[tf.newaxis], True
    return images, False


def _seed_tensor(seed):
    """A [2] int32 stateless seed from None, an int or a [2] tensor."""
    if seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int32)
    if isinstance(seed, int):
        return tf.constant([seed % (2**31 - 1), 0], tf.int32)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int32)
    if seed.shape.rank == 0:
        return tf.stack([seed, 0])
    return tf.ensure_shape(seed, [2])


def _random_params(batch, seed, height, width):
    """Per-image random sign and cutout centre from a stateless seed."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    sign = tf.where(tf.random.stateless_uniform([batch], seeds[0]) < 0.5,
                    -1.0, 1.0)
    center_y = tf.random.stateless_uniform([batch], seeds[1], 0, height,
                                           dtype=tf.int32)
    center_x = tf.random.stateless_uniform([batch], seeds[2], 0, width,
                                           dtype=tf.int32)
    return sign, center_y, center_x


@_no_autograph
def apply_op(name, images, level, seed=None, *,
             translate_frac=TRANSLATE_FRAC, cutout_frac=CUTOUT_FRAC,
             fill_value=FILL_VALUE):
    """Applies one named op at `level` to an image or a batch.

    Args:
      name: One of OP_NAMES.
      images: uint8 [H, W, C] or [B, H, W, C], C in {1, 3}.
      level: Scalar level on the 0..10 scale (> 10 extrapolates), or a [B]
        tensor of per-image levels.
      seed: Int, [2] int tensor or None (random): drives the random sign of
        Rotate/Shear/Translate and the cutout centre.
      translate_frac, cutout_frac, fill_value: See AugmentConfig.

    Returns:
      uint8 tensor shaped like `images`.
    """
    if name not in OP_NAMES:
        raise ValueError(f"Expected an op in {OP_NAMES}. Received: "
                         f"name={name!r}")
    x, single = _as_batch(images)
    batch = tf.shape(x)[0]
    height, width = _spatial(x)
    level = tf.broadcast_to(tf.cast(level, tf.float32), [batch])
    op_id = tf.fill([batch], OP_NAMES.index(name))
    sign, cy, cx = _random_params(batch, _seed_tensor(seed), height, width)
    out = _apply_ops(x, op_id, level, sign, cy, cx, translate_frac,
                     cutout_frac, fill_value, {_OP_GROUP[name]})
    return out[0] if single else out


OPS = {name: functools.partial(apply_op, name) for name in OP_NAMES}
"""Name -> fn(images, level, seed=None, **consts), for each of the 16 ops."""


@_no_autograph
def randaugment(images, num_layers=2, magnitude=10.0, seed=None, *,
                cutout=True, ops=None, translate_frac=TRANSLATE_FRAC,
                cutout_frac=CUTOUT_FRAC, extra_cutout_frac=0.0,
                fill_value=FILL_VALUE):
    """The paper's RandAugment on an image or a batch, one op draw per image.

    Each of the `num_layers` layers picks, independently for every image, one
    op uniformly from the op list and applies it at level `magnitude` (always:
    see the module notes on the official `prob`).

    Args:
      images: uint8 [H, W, C] or [B, H, W, C], C in {1, 3}.
      num_layers: N >= 0.
      magnitude: M >= 0 on the 0..10 scale (> 10 extrapolates).
      seed: Int, [2] int tensor, or None (a fresh random seed). The same seed
        and input give the same output.
      cutout: Include Cutout in the op list.
      ops: Restrict the op list to these names (overrides `cutout`).
      translate_frac, cutout_frac, extra_cutout_frac, fill_value: See
        AugmentConfig.

    Returns:
      uint8 tensor shaped like `images`.
    """
    op_names = _resolve_ops(ops, cutout)
    _check_numbers(num_layers, magnitude)
    x, single = _as_batch(images)
    batch = tf.shape(x)[0]
    height, width = _spatial(x)
    level = tf.fill([batch], tf.cast(magnitude, tf.float32))
    op_table = tf.constant([OP_NAMES.index(n) for n in op_names], tf.int32)
    groups = {_OP_GROUP[n] for n in op_names}
    seeds = tf.random.experimental.stateless_split(_seed_tensor(seed),
                                                   num_layers + 1)
    for layer in range(num_layers):
        choice_seed, param_seed = tf.unstack(
            tf.random.experimental.stateless_split(seeds[layer], 2))
        pick = tf.random.stateless_uniform([batch], choice_seed, 0,
                                           len(op_names), dtype=tf.int32)
        op_id = tf.gather(op_table, pick)
        sign, cy, cx = _random_params(batch, param_seed, height, width)
        x = _apply_ops(x, op_id, level, sign, cy, cx, translate_frac,
                       cutout_frac, fill_value, groups)
    if extra_cutout_frac > 0:
        _, cy, cx = _random_params(batch, seeds[num_layers], height, width)
        side = tf.cast(tf.minimum(height, width), tf.float32)
        pad = tf.fill([batch], tf.cast(extra_cutout_frac * side, tf.int32))
        x = _cutout(x, pad, cy, cx, fill_value)
    return x[0] if single else x


def _resolve_ops(ops, cutout):
    if ops is None:
        return tuple(n for n in OP_NAMES if cutout or n != "Cutout")
    ops = tuple(ops)
    unknown = [n for n in ops if n not in OP_NAMES]
    if unknown or not ops:
        raise ValueError(f"Expected a non-empty list of ops from {OP_NAMES}. "
                         f"Received: ops={ops}")
    return ops


def _check_numbers(num_layers, magnitude):
    if not isinstance(num_layers, numbers.Integral) or num_layers < 0:
        raise ValueError("Expected num_layers to be an int >= 0. Received: "
                         f"num_layers={num_layers!r}")
    if not isinstance(magnitude, numbers.Real) or magnitude < 0:
        raise ValueError("Expected magnitude >= 0 on the 0..10 level scale. "
                         f"Received: magnitude={magnitude!r}")


# ----------------------------------------------------------------------------
# The entry point used by the input pipeline.


def keras_cv_magnitude(magnitude):
    """Maps M on the 0..10+ level scale to keras_cv's 0..1 magnitude.

    keras_cv's magnitude 1.0 is each of its ops' strongest setting, which we
    align with level 10 (the paper's scale maximum): min(M, 10) / 10. Levels
    above 10 saturate at 1.0 since keras_cv clips its magnitudes to [0, 1].
    """
    return min(float(magnitude), MAX_LEVEL) / MAX_LEVEL


class Augmenter:
    """Callable augmenter: `augmenter(images, seed=None)` -> uint8 images.

    Built by `make_augmenter`. `images` is uint8 [H, W, C] or [B, H, W, C]. A
    `seed` ([2] int tensor) given to the call makes that call reproducible
    (kind "randaugment"); without one, seeds come from a
    tf.random.Generator seeded by `make_augmenter(seed=...)`, so a sequence
    of calls is reproducible when they run in order (eagerly, or in a
    `dataset.map` without parallel calls). For parallel pipelines use
    `augment_dataset`, which derives each element's seed from its index.
    Kind "keras_cv" draws from its own layer's seed and ignores `seed`.
    """

    def __init__(self, config: AugmentConfig, seed: Optional[int] = None):
        self.config = config
        self.seed = seed
        if config.kind == "randaugment":
            self._op_names = _resolve_ops(config.ops, config.cutout)
            _check_numbers(config.num_layers, config.magnitude)
        self._keras_cv_layer = None
        if config.kind == "keras_cv":
            import keras_cv  # pylint: disable=g-import-not-at-top

            # rate=1.0: the official RandAugment always applies its chosen op
            # (keras_cv's default 10/11 mimics an extra identity op).
            # magnitude_stddev=0: the official magnitude is fixed.
            self._keras_cv_layer = keras_cv.layers.RandAugment(
                value_range=(0, 255),
                augmentations_per_image=config.num_layers,
                magnitude=keras_cv_magnitude(config.magnitude),
                magnitude_stddev=0.0, rate=1.0, seed=seed)
        self._generator = None
        if config.kind == "randaugment":
            # Created here, once, so that calls inside tf.data share it.
            if seed is not None:
                self._generator = tf.random.Generator.from_seed(seed)
            else:
                self._generator = (
                    tf.random.Generator.from_non_deterministic_state())

    # Not @_no_autograph: keras_cv's layers need AutoGraph in tf.data; the
    # randaugment() this calls opts out itself.
    def __call__(self, images, seed=None):
        """Augments `images` (uint8 [H,W,C] or [B,H,W,C]); returns uint8."""
        kind = self.config.kind
        if kind == "none":
            x, _ = _as_batch(images)  # validates
            del x
            return tf.convert_to_tensor(images)
        if kind == "keras_cv":
            x, single = _as_batch(images)
            out = self._keras_cv_layer(tf.cast(x, tf.float32), training=True)
            out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0),
                          tf.uint8)
            out = tf.ensure_shape(out, x.shape)
            return out[0] if single else out
        if seed is None:
            seed = self._generator.make_seeds(1)[:, 0]
        c = self.config
        return randaugment(
            images, c.num_layers, c.magnitude, seed, ops=self._op_names,
            translate_frac=c.translate_frac, cutout_frac=c.cutout_frac,
            extra_cutout_frac=c.extra_cutout_frac, fill_value=c.fill_value)


def make_augmenter(kind: str = "randaugment", num_layers: int = 2,
                   magnitude: float = 10.0, cutout: bool = True,
                   seed: Optional[int] = None, **options) -> Augmenter:
    """Builds the training-input augmenter the pipeline uses.

    Args:
      kind: "randaugment" (ours: the paper's 16 ops), "keras_cv"
        (keras_cv.layers.RandAugment with magnitude `keras_cv_magnitude(M)`,
        value_range (0, 255), no magnitude noise, rate 1.0; it has its own op
        list and ignores `cutout`/`options`), or "none" (identity).
      num_layers: N, ops per image (paper: 2).
      magnitude: M on the 0..10 level scale, > 10 allowed (B7 used 27).
      cutout: Include Cutout among the ops.
      seed: Int seed of the augmenter's random stream, or None.
      **options: Other AugmentConfig fields (translate_frac, cutout_frac,
        extra_cutout_frac, ops, fill_value).

    Returns:
      An `Augmenter`: `augmenter(images, seed=None)` -> uint8 images.

    Raises:
      ValueError: unknown kind, bad numbers, unknown op or option.
    """
    if kind not in AUGMENT_KINDS:
        raise ValueError(f"Expected augment kind in {AUGMENT_KINDS}. "
                         f"Received: kind={kind!r}")
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"Expected options among {sorted(fields)}. "
                         f"Received: {unknown}")
    if options.get("ops") is not None:
        options["ops"] = tuple(options["ops"])
    config = AugmentConfig(kind=kind, num_layers=num_layers,
                           magnitude=magnitude, cutout=cutout, **options)
    return make_augmenter_from_config(config, seed)


def make_augmenter_from_config(config: AugmentConfig,
                               seed: Optional[int] = None) -> Augmenter:
    """`make_augmenter` from a frozen AugmentConfig.

    Args:
      config: The augmentation's settings (kind, N, M, cutout, ops).
      seed: Optional integer seed of the per-image random choices.

    Returns:
      An `Augmenter`: uint8 [H, W, C] image -> uint8 image of the same shape.

    Raises:
      ValueError: for a kind outside AUGMENT_KINDS.
    """
    if config.kind not in AUGMENT_KINDS:
        raise ValueError(f"Expected augment kind in {AUGMENT_KINDS}. "
                         f"Received: kind={config.kind!r}")
    return Augmenter(config, seed)


def augment_dataset(dataset: tf.data.Dataset, augmenter: Callable,
                    seed: Optional[int] = None, image_key: str = "image",
                    num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic: Optional[bool] = None,
                    start_index: int = 0) -> tf.data.Dataset:
    """Maps `augmenter` over the images of `dataset`, reproducibly if seeded.

    With `seed`, element i (counted from the start of `dataset`) is augmented
    with the stateless seed [seed, i], so the output does not depend on the
    map's parallelism or on thread timing. Works on batched or unbatched
    elements, dicts (the image under `image_key`) or bare image tensors.

    Args:
      dataset: Elements are uint8 images or dicts holding them.
      augmenter: An `Augmenter` (or any fn(images, seed=None)).
      seed: Int base seed, or None for the augmenter's own random stream.
      image_key: Key of the image in dict elements.
      num_parallel_calls: Passed to `Dataset.map`.
      deterministic: Passed to `Dataset.map`.
      start_index: Index i of the first element (a stream resumed after
        start_index elements gets the seeds it would have got).

    Returns:
      The mapped dataset.
    """
    def augment(element, element_seed):
        if isinstance(element, dict):
            out = dict(element)
            out[image_key] = augmenter(element[image_key], seed=element_seed)
            return out
        return augmenter(element, seed=element_seed)

    if seed is None:
        return dataset.map(lambda e: augment(e, None),
                           num_parallel_calls=num_parallel_calls,
                           deterministic=deterministic)
    base = tf.constant(seed, tf.int64)

    def seeded(index, element):
        element_seed = tf.cast(tf.stack([base, index]) % (2**31 - 1),
                               tf.int32)
        return augment(element, element_seed)

    return dataset.enumerate(start_index).map(seeded,
                                   num_parallel_calls=num_parallel_calls,
                                   deterministic=deterministic)
