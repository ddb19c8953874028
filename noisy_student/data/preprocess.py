"""Per-image preprocessing for training and evaluation.

Pixels stay uint8 in [0, 255]: the model normalises inside, and the
augmentation ops work on uint8. Images of at most `SMALL_IMAGE_MAX` pixels a
side (digits, MNIST, CIFAR, SVHN) are resized to the model's resolution and,
for training, padded by an eighth of a side and randomly cropped back (the
CIFAR/SVHN convention). Larger images follow the official EfficientNet code:
an Inception-style random crop for training and a centre crop of
size / (size + 32) of the shorter side for evaluation.
"""

import tensorflow as tf

SMALL_IMAGE_MAX = 64
CROP_PADDING = 32


def to_uint8(image):
    """Rounds and clips a float image to uint8."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _resize(image, size):
    return to_uint8(tf.image.resize(image, (size, size), antialias=True))


def train_image(image, size, *, flip, small, seed):
    """Random crop (and flip, when `flip`) of one image, uint8 [size, size, C].

    Args:
      image: uint8 [H, W, C].
      size: Output side in pixels.
      flip: Whether to flip left-right with probability 1/2.
      small: Use the pad-and-crop of small images instead of a random
        resized crop.
      seed: int [2] seed of the stateless random ops: the same seed gives
        the same crop, whatever thread runs it.

    Returns:
      uint8 [size, size, C].
    """
    channels = image.shape[-1]
    if small:
        image = _resize(image, size)
        pad = max(1, size // 8)
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]],
                        mode="REFLECT")
        image = tf.image.stateless_random_crop(padded, (size, size, channels),
                                               seed=seed)
    else:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros((1, 0, 4)), seed, min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        image = _resize(tf.slice(image, begin, crop_size), size)
    if flip:
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(image, (size, size, channels))


def eval_image(image, size, *, small):
    """Deterministic resize (small images) or centre crop, uint8 [size, size, C].

    Args:
      image: uint8 [H, W, C].
      size: Output side in pixels.
      small: Resize the whole image instead of centre-cropping it.

    Returns:
      uint8 [size, size, C].
    """
    channels = image.shape[-1]
    if not small:
        shape = tf.shape(image)
        side = tf.cast(
            size / (size + CROP_PADDING)
            * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32), tf.int32)
        top = (shape[0] - side + 1) // 2
        left = (shape[1] - side + 1) // 2
        image = image[top:top + side, left:left + side]
    return tf.ensure_shape(_resize(image, size), (size, size, channels))


def is_small(image_shape):
    """Whether a source's images take the small-image path."""
    return image_shape is not None and max(image_shape[:2]) <= SMALL_IMAGE_MAX
