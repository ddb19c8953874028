"""Common image corruptions at 5 severities, in TensorFlow, for any data set.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019) ships pre-corrupted ImageNet
validation images. For other data sets (SVHN, CIFAR, digits, a folder of
photos) this module applies the same kinds of corruption on the fly, so a small
data set gets a "-C style" score (per-corruption error and the mean, see
`noisy_student.evaluation.imagenet_c.evaluate_corruptions`).

Each corruption maps one image, uint8 (or float in [0, 255]) of shape
[H, W, C], to a uint8 image of the same shape, runs eagerly and inside
`tf.data` (graph mode), and moves the image further from the original as the
severity grows from 1 to 5.

The constants start from Hendrycks' CIFAR-10-C constants (his own set for
32x32 images, `make_cifar_c.py` in github.com/hendrycks/robustness), not the
ImageNet-C ones, which would destroy a 32 px image at severity 1. Where ours
differ, the reason is given:

  gaussian_noise    std of additive noise on the [0, 1] scale
                    .04 .06 .08 .09 .10
  shot_noise        Poisson photon count at full intensity
                    500 250 100 75 50
  impulse_noise     fraction of values set to 0 or 1 (salt and pepper, each
                    channel value independently) .01 .02 .03 .05 .07
  defocus_blur      (disk radius, anti-alias sigma) in pixels
                    (.3,.4) (.4,.5) (.5,.6) (1,.6) (1.5,.6)
                    CIFAR-10-C's sigmas .2 and .1 at severities 4-5 were for
                    OpenCV's 3x3 anti-alias blur; with our soft disk they make
                    severity 4 milder than 3, so the sigma stays at .6.
  motion_blur       (trail length, sigma) in pixels, random angle in
                    [-45, 45] degrees: (6,1) (6,1.5) (6,2) (8,2.25) (9,2.5)
                    (CIFAR-10-C's (8,2) at severity 4 is barely stronger than
                    (6,2): points beyond 3 sigma weigh almost nothing.)
  brightness        added to the HSV value channel .05 .1 .15 .2 .3
  contrast          factor on the distance to the per-channel mean
                    .75 .5 .4 .3 .15
  pixelate          fraction of the side kept before upsampling back (area
                    down, nearest up) .75 .6 .5 .4 .3, between CIFAR-10-C's
                    (.95 ... .65) and ImageNet-C's (.6 ... .25): at 16-32 px
                    CIFAR-10-C's sides (15, 14, 13, ...) resample by
                    non-integer factors whose error is not monotone.
  jpeg_compression  JPEG quality 80 65 58 50 40

Spatial constants (defocus and motion blur lengths) are for 32 px images; for
larger images they are multiplied by side / 32 (a 224 px image gets a
severity-5 defocus radius of 10.5 pixels, ImageNet-C's is 10) and they are
never shrunk below the 32 px values, since a sub-pixel blur on a 16 px image
would be the identity.

The mean absolute error to the original grows strictly with the severity on
natural photos at 16, 32 and 224 px and on digits at 32 px (measured; the
tests check photos at 16 and 32 px and digits at 32 px). One exception by
construction: an image upscaled from a smaller native resolution (e.g. 8 px
digits shown at 16 px) loses nothing when pixelate shrinks it back to that
resolution.

Implementation notes (our own, not a port of Hendrycks' numpy/OpenCV/
ImageMagick code): the defocus kernel is a "soft disk" (flat inside the radius
r, Gaussian fall-off with the anti-alias sigma outside); the motion-blur kernel
is a one-sided line of Gaussian-weighted points, bilinearly splatted onto the
pixel grid, as ImageMagick's motion blur draws it; blurs pad by reflection.

Randomness: pass `seed` (two integers) for reproducible, stateless noise; with
`seed=None` a fresh seed is drawn from TensorFlow's global generator.
"""

import math

import tensorflow as tf

SEVERITIES = (1, 2, 3, 4, 5)
# Side length (pixels) the spatial constants are tuned for (CIFAR-10-C).
REFERENCE_SIDE = 32

GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE = (500.0, 250.0, 100.0, 75.0, 50.0)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.6), (1.5, 0.6))
MOTION_BLUR = ((6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.25), (9.0, 2.5))
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
PIXELATE = (0.75, 0.6, 0.5, 0.4, 0.3)
JPEG_QUALITY = (80, 65, 58, 50, 40)


def _check_severity(severity):
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(
            f"Expected a severity in {SEVERITIES}. Received: "
            f"severity={severity!r}")
    return severity - 1


def _seed(seed):
    """A stateless seed: the given pair, or a fresh one from the global RNG."""
    if seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    return seed


def _to_unit(image):
    """uint8 / [0, 255] float -> float32 in [0, 1]."""
    return tf.cast(image, tf.float32) / 255.0


def _from_unit(image):
    """[0, 1] float -> uint8, rounded and clipped."""
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0),
                   tf.uint8)


def _spatial_scale(image):
    """Factor on the spatial constants: max(1, min(H, W) / 32)."""
    shape = tf.shape(image)
    side = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    return tf.maximum(1.0, side / REFERENCE_SIDE)


def _filter(image, kernel):
    """Convolves every channel of a [H, W, C] float image with [k, k]."""
    half = tf.shape(kernel)[0] // 2
    channels = tf.shape(image)[-1]
    # SYMMETRIC allows padding up to the image side (REFLECT needs less).
    padded = tf.pad(image[None], [[0, 0], [half, half], [half, half], [0, 0]],
                    mode="SYMMETRIC")
    depthwise = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    return tf.nn.depthwise_conv2d(padded, depthwise, [1, 1, 1, 1],
                                  "VALID")[0]


def gaussian_noise(image, severity, seed=None):
    """Adds zero-mean Gaussian noise (std on the [0, 1] scale).

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: noise std .04-.10 on the [0, 1] scale (GAUSSIAN_NOISE).
      seed: Optional [2] integer seed of the stateless random draw.

    Returns:
      The noisy uint8 image [H, W, C].
    """
    c = GAUSSIAN_NOISE[_check_severity(severity)]
    x = _to_unit(image)
    noise = tf.random.stateless_normal(tf.shape(x), _seed(seed), stddev=c)
    return _from_unit(x + noise)


def shot_noise(image, severity, seed=None):
    """Poisson (photon) noise: x ~ Poisson(x * c) / c.

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: photon count at full intensity, 500-50 (SHOT_NOISE).
      seed: Optional [2] integer seed of the stateless random draw.

    Returns:
      The noisy uint8 image [H, W, C].
    """
    c = SHOT_NOISE[_check_severity(severity)]
    x = _to_unit(image)
    counts = tf.random.stateless_poisson(tf.shape(x), _seed(seed), x * c,
                                         dtype=tf.float32)
    return _from_unit(counts / c)


def impulse_noise(image, severity, seed=None):
    """Salt and pepper: a fraction c of the values become 0 or 1.

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: fraction of values hit, .01-.07 (IMPULSE_NOISE).
      seed: Optional [2] integer seed of the stateless random draw.

    Returns:
      The speckled uint8 image [H, W, C].
    """
    c = IMPULSE_NOISE[_check_severity(severity)]
    x = _to_unit(image)
    u = tf.random.stateless_uniform(tf.shape(x), _seed(seed))
    x = tf.where(u < c / 2, 0.0, x)
    x = tf.where(u > 1.0 - c / 2, 1.0, x)
    return _from_unit(x)


def defocus_kernel(radius, alias_sigma):
    """A normalised soft-disk kernel (tensors or floats).

    Args:
      radius: Disk radius in pixels.
      alias_sigma: Std of the Gaussian edge (anti-aliasing) in pixels.

    Returns:
      float32 [k, k] summing to 1, k = 2 * ceil(radius + 3 sigma) + 1.
    """
    radius = tf.cast(radius, tf.float32)
    alias_sigma = tf.cast(alias_sigma, tf.float32)
    half = tf.cast(tf.math.ceil(radius + 3.0 * alias_sigma), tf.int32)
    half = tf.maximum(half, 1)
    grid = tf.cast(tf.range(-half, half + 1), tf.float32)
    yy, xx = tf.meshgrid(grid, grid, indexing="ij")
    outside = tf.nn.relu(tf.sqrt(xx**2 + yy**2) - radius)
    kernel = tf.exp(-outside**2 / (2.0 * alias_sigma**2))
    return kernel / tf.reduce_sum(kernel)


def defocus_blur(image, severity, seed=None):
    """Blurs with a soft disk (an out-of-focus lens).

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: disk radius .3-1.5 px at 32 px (DEFOCUS_BLUR).
      seed: Unused (the corruption is deterministic); for a common signature.

    Returns:
      The blurred uint8 image [H, W, C].
    """
    del seed  # Deterministic.
    radius, alias = DEFOCUS_BLUR[_check_severity(severity)]
    scale = _spatial_scale(image)
    kernel = defocus_kernel(radius * scale, alias * scale)
    return _from_unit(_filter(_to_unit(image), kernel))


def motion_kernel(length, sigma, angle):
    """A normalised one-sided line kernel (a motion trail).

    Args:
      length: Trail length in pixels.
      sigma: Std in pixels of the Gaussian weight along the trail.
      angle: Direction in radians.

    Returns:
      float32 [k, k] summing to 1, k = 2 * (ceil(length) + 1) + 1.
    """
    length = tf.cast(length, tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    angle = tf.cast(angle, tf.float32)
    half = tf.cast(tf.math.ceil(length), tf.int32) + 1
    grid = tf.cast(tf.range(-half, half + 1), tf.float32)
    yy, xx = tf.meshgrid(grid, grid, indexing="ij")
    # Points along the trail every half pixel, weighted by a Gaussian of their
    # distance from the pixel itself.
    steps = tf.range(0.0, length + 0.25, 0.5)
    weights = tf.exp(-steps**2 / (2.0 * sigma**2))
    px = steps * tf.cos(angle)
    py = steps * tf.sin(angle)
    # Bilinear splat of every point onto the grid.
    wx = tf.nn.relu(1.0 - tf.abs(xx[None] - px[:, None, None]))
    wy = tf.nn.relu(1.0 - tf.abs(yy[None] - py[:, None, None]))
    kernel = tf.reduce_sum(weights[:, None, None] * wx * wy, axis=0)
    return kernel / tf.reduce_sum(kernel)


def motion_blur(image, severity, seed=None):
    """Blurs along a random direction in [-45, 45] degrees (camera shake).

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: trail length 6-9 px at 32 px (MOTION_BLUR).
      seed: Optional [2] integer seed of the stateless random draw.

    Returns:
      The smeared uint8 image [H, W, C].
    """
    length, sigma = MOTION_BLUR[_check_severity(severity)]
    scale = _spatial_scale(image)
    angle = tf.random.stateless_uniform(
        [], _seed(seed), -math.pi / 4, math.pi / 4)
    kernel = motion_kernel(length * scale, sigma * scale, angle)
    return _from_unit(_filter(_to_unit(image), kernel))


def brightness(image, severity, seed=None):
    """Raises the HSV value channel (grey images: the intensity) by c.

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: value added, .05-.3 on the [0, 1] scale (BRIGHTNESS).
      seed: Unused (the corruption is deterministic); for a common signature.

    Returns:
      The brightened uint8 image [H, W, C].
    """
    del seed
    c = BRIGHTNESS[_check_severity(severity)]
    x = _to_unit(image)
    if x.shape[-1] == 3:
        hsv = tf.image.rgb_to_hsv(x)
        value = tf.clip_by_value(hsv[..., 2:] + c, 0.0, 1.0)
        x = tf.image.hsv_to_rgb(tf.concat([hsv[..., :2], value], axis=-1))
    elif x.shape[-1] == 1:
        x = x + c
    else:
        raise ValueError(
            "Expected an image with 1 or 3 channels for brightness. Received: "
            f"shape={x.shape}")
    return _from_unit(x)


def contrast(image, severity, seed=None):
    """Shrinks every pixel towards its channel's mean by the factor c.

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: factor on the distance to the mean, .75-.15 (CONTRAST).
      seed: Unused (the corruption is deterministic); for a common signature.

    Returns:
      The flattened uint8 image [H, W, C].
    """
    del seed
    c = CONTRAST[_check_severity(severity)]
    x = _to_unit(image)
    mean = tf.reduce_mean(x, axis=[0, 1], keepdims=True)
    return _from_unit((x - mean) * c + mean)


def pixelate(image, severity, seed=None):
    """Downsamples (area) to c x the side, then upsamples (nearest).

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: fraction of the side kept, .75-.3 (PIXELATE).
      seed: Unused (the corruption is deterministic); for a common signature.

    Returns:
      The blocky uint8 image [H, W, C].
    """
    del seed
    c = PIXELATE[_check_severity(severity)]
    x = tf.cast(image, tf.float32)
    size = tf.shape(x)[:2]
    small = tf.maximum(1, tf.cast(tf.cast(size, tf.float32) * c, tf.int32))
    x = tf.image.resize(x, small, method="area")
    x = tf.image.resize(x, size, method="nearest")
    return _from_unit(x / 255.0)


def jpeg_compression(image, severity, seed=None):
    """Encodes and decodes as JPEG at quality c (1 or 3 channels).

    Args:
      image: uint8 (or float in [0, 255]) image [H, W, C].
      severity: 1-5: JPEG quality 80-40 (JPEG_QUALITY).
      seed: Unused (the corruption is deterministic); for a common signature.

    Returns:
      The recompressed uint8 image [H, W, C].
    """
    del seed
    quality = JPEG_QUALITY[_check_severity(severity)]
    x = image
    if x.dtype != tf.uint8:
        x = _from_unit(_to_unit(x))
    return tf.image.adjust_jpeg_quality(x, quality)


CORRUPTIONS = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "brightness": brightness,
    "contrast": contrast,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
CORRUPTION_NAMES = tuple(CORRUPTIONS)


def get_corruption(name):
    """Returns the corruption function called `name`.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in CORRUPTIONS:
        raise ValueError(
            f"Expected a corruption in {list(CORRUPTION_NAMES)}. Received: "
            f"corruption={name!r}")
    return CORRUPTIONS[name]


def corrupt(image, name, severity, seed=None):
    """Applies corruption `name` at `severity` to one image.

    Args:
      image: uint8 (or float in [0, 255]) tensor [H, W, C].
      name: One of `CORRUPTION_NAMES`.
      severity: Integer 1..5.
      seed: Optional pair of integers (stateless randomness) or None.

    Returns:
      A uint8 tensor of the same shape.

    Raises:
      ValueError: for an unknown name, a bad severity or a non-3D image.
    """
    fn = get_corruption(name)
    _check_severity(severity)
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3:
        raise ValueError(
            "Expected one image of shape [H, W, C]. Received: "
            f"shape={image.shape}")
    out = fn(image, severity, seed=seed)
    out.set_shape(image.shape)
    return tf.ensure_shape(out, image.shape)


def corrupt_dataset(dataset, name, severity, seed=0):
    """Corrupts the "image" of every element of an unbatched dataset.

    Element i gets the stateless seed (seed, i), so the corrupted data set is
    the same on every pass and every machine.

    Args:
      dataset: A `tf.data.Dataset` of dicts with an "image" [H, W, C].
      name: One of `CORRUPTION_NAMES`.
      severity: Integer 1..5.
      seed: Integer base seed.

    Returns:
      A dataset of the same dicts with "image" corrupted (uint8).
    """
    get_corruption(name)
    _check_severity(severity)

    def apply(index, element):
        element = dict(element)
        element["image"] = corrupt(
            element["image"], name, severity,
            seed=tf.stack([tf.constant(seed, tf.int64), index]))
        return element

    return dataset.enumerate().map(apply,
                                   num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
