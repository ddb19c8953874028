"""Image files made in tests: smooth (JPEG-friendly) arrays and their bytes."""

import io

import numpy as np
from PIL import Image
import tensorflow as tf


def smooth(height, width, channels=3, seed=0):
    """Smooth random uint8 [height, width, channels] (JPEG-friendly)."""
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(0, 255, (3, 3, channels)).astype(np.float32)
    image = tf.image.resize(coarse, (height, width)).numpy()
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def encode(image, fmt="PNG", **kwargs):
    """The bytes of a PIL image saved in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def exif_jpeg(array, orientation):
    """A JPEG of `array` (stored as is) tagged with an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(array), "JPEG", quality=95, exif=exif)
