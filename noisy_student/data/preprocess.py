"""The one per-image preprocessing of training, evaluation and serving.

Every stage that turns a user's image into model pixels calls this module:
training (`train_image`), the training run's validation, ns-eval, ns-predict
(`eval_image`) and the exported SavedModel's signatures (`decode_image` and
`eval_image`, traced into the serving graph). So "the same image" means the
same pixels everywhere, whatever the storage (folder, npz, TFDS, bytes).

What happens to one image, in order:

1. Decode (`decode_image`, files and serving bytes only): JPEG, PNG, GIF
   (first frame), BMP, WebP or JPEG XL by `tf.io.decode_image`, in the file's own channels
   (grey 1, grey+alpha 2, RGB or palette 3, RGBA 4; CMYK JPEGs come out as
   RGB). A JPEG's EXIF orientation (tag 0x0112 of its APP1 segment, values
   1-8) is applied by flips and quarter turns, as Pillow's
   `ImageOps.exif_transpose` does, so the image is upright. EXIF in PNG
   (eXIf chunks) is not read.
2. Channels (`to_channels`), to the model's: grey is repeated to RGB; RGB
   becomes grey by `tf.image.rgb_to_grayscale` (ITU-R 601 weights); alpha is
   dropped (not composited).
3. Crop, chosen per image by its own size (not by the source type):
   - small images, at most `Recipe.small_image_max` (64) pixels on their
     longer side (digits, MNIST, CIFAR, SVHN, icons): the whole image, as
     the official CIFAR/SVHN code feeds them;
   - larger images: evaluation takes the central square of
     size / (size + `Recipe.crop_padding`) of the shorter side (224/256 at
     224 px), as the official EfficientNet code; at least 1 pixel, so 1x1
     or 1x500 images go through. Training takes an Inception-style random
     crop (8%-100% of the area, aspect 3/4-4/3).
4. Resize to the model's square side: bilinear with anti-aliasing
   (`tf.image.resize(..., antialias=True)`, which only matters when
   shrinking), rounded to uint8. Training then pads small images by an
   eighth of a side (reflection) and crops back at random (the CIFAR/SVHN
   convention), and flips when allowed.

Pixels stay uint8 in [0, 255]: the model normalises inside, and the
augmentation ops work on uint8.

The two numbers of the recipe are recorded with each trained model
(`preprocess.json` in its model_dir, copied into its SavedModel), so
evaluation and export read them from the model, not from flags.
"""

import dataclasses

import tensorflow as tf

from noisy_student.utils import storage

SMALL_IMAGE_MAX = 64
CROP_PADDING = 32
RECIPE_FILE = "preprocess.json"
# EXIF lives in the APP1 segment near the start of a JPEG; an APP1 segment
# is at most 64 KiB, and a few segments (APP0, ICC) may come first.
_EXIF_SCAN_BYTES = 1 << 17
_EXIF_MAX_ENTRIES = 64
_ORIENTATION_TAG = 0x0112
# The file's own channels, first frame of an animation (GIF, WebP): what
# `decode_image` and the folder sources' scan (image_scan) decode with.
DECODE_ARGS = {"channels": 0, "expand_animations": False}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The recipe choices of the eval and train transforms.

    Attributes:
      small_image_max: Images whose longer side is at most this many pixels
        are used whole (no crop); larger ones are centre-cropped for
        evaluation. 64 as the official code's CIFAR/SVHN vs ImageNet split.
      crop_padding: Evaluation crops size / (size + crop_padding) of the
        shorter side of a large image (32: 224 of 256, the official code).
    """
    small_image_max: int = SMALL_IMAGE_MAX
    crop_padding: int = CROP_PADDING

    def __post_init__(self):
        for name in ("small_image_max", "crop_padding"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected an integer {name} >= 0. "
                                 f"Received: {name}={value!r}")


DEFAULT_RECIPE = Recipe()
# Every image used whole (resized, never cropped): for benchmark images that
# already are a centre crop (ImageNet-C's 224 x 224).
WHOLE_IMAGE_RECIPE = Recipe(small_image_max=2**31 - 1)


def write_recipe(folder, recipe=DEFAULT_RECIPE):
    """Writes folder/preprocess.json (atomically).

    Args:
      folder: The model's folder, local or gs://.
      recipe: The `Recipe` the model was trained with.
    """
    storage.write_json(storage.join(folder, RECIPE_FILE),
                        dataclasses.asdict(recipe))


def read_recipe(model_path):
    """The recipe recorded with a model, or the default one.

    Args:
      model_path: A model_dir, a SavedModel folder or a .keras file (its
        folder is searched). Local or gs://.

    Returns:
      A `Recipe`.

    Raises:
      ValueError: if the recorded file holds unknown or bad values.
    """
    recipe_path, values = storage.read_beside_model(model_path, RECIPE_FILE)
    if values is None:
        return DEFAULT_RECIPE
    names = {f.name for f in dataclasses.fields(Recipe)}
    if not isinstance(values, dict) or set(values) - names:
        raise ValueError(f"Expected a preprocessing recipe with keys "
                         f"{sorted(names)}. Received: {recipe_path}: {values}")
    return Recipe(**values)


def to_uint8(image):
    """Rounds and clips a float image to uint8."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# --------------------------------------------------------------------------
# Decoding and orientation.


def _byte_reader(data):
    """(byte(i) -> int32, n) over the first bytes of a string scalar.

    Indices outside the data read 0, so a truncated or garbage header gives
    a wrong tag value (then ignored), never an error.
    """
    raw = tf.io.decode_raw(tf.strings.substr(data, 0, _EXIF_SCAN_BYTES),
                           tf.uint8)
    n = tf.size(raw)
    padded = tf.concat([tf.cast(raw, tf.int32), tf.zeros([1], tf.int32)], 0)

    def byte(index):
        inside = tf.logical_and(index >= 0, index < n)
        return tf.where(inside, tf.gather(padded, tf.where(inside, index, n)),
                        0)

    return byte, n


def exif_orientation(data):
    """The EXIF orientation of an encoded JPEG, int32 [] in 1..8.

    Walks the JPEG's marker segments up to the image data, finds the APP1
    "Exif" segment and reads tag 0x0112 of its first IFD (TIFF layout, either
    byte order). 1 (upright) when the data is not a JPEG, has no EXIF or no
    valid orientation.

    Args:
      data: string [] holding the encoded image.

    Returns:
      int32 [].
    """
    byte, n = _byte_reader(data)
    is_jpeg = tf.logical_and(
        n >= 4, tf.logical_and(tf.equal(byte(0), 0xFF),
                               tf.equal(byte(1), 0xD8)))
    exif_id = tf.constant([ord(c) for c in "Exif"] + [0, 0], tf.int32)

    def more(pos, tiff):
        marker = byte(pos + 1)
        return tf.logical_and(
            tf.logical_and(pos + 4 <= n, tiff < 0),
            tf.logical_and(tf.equal(byte(pos), 0xFF),
                           tf.logical_and(tf.not_equal(marker, 0xDA),
                                          tf.not_equal(marker, 0xD9))))

    def step(pos, tiff):
        length = byte(pos + 2) * 256 + byte(pos + 3)
        header = byte(pos + 4 + tf.range(6))
        found = tf.logical_and(tf.equal(byte(pos + 1), 0xE1),
                               tf.reduce_all(tf.equal(header, exif_id)))
        tiff = tf.where(found, pos + 10, tiff)
        # A length below 2 is corrupt: stop instead of looping.
        pos = tf.where(length < 2, n, pos + 2 + length)
        return pos, tiff

    start = tf.where(is_jpeg, 2, n)
    _, tiff = tf.while_loop(more, step, (start, tf.constant(-1)),
                            maximum_iterations=256)
    little = tf.equal(byte(tiff), 0x49)  # "II" little-endian, "MM" big.

    def u16(offset):
        lo_first = byte(offset) + byte(offset + 1) * 256
        hi_first = byte(offset) * 256 + byte(offset + 1)
        return tf.where(little, lo_first, hi_first)

    def u32(offset):
        return tf.where(little, u16(offset) + u16(offset + 2) * 65536,
                        u16(offset) * 65536 + u16(offset + 2))

    ifd = tiff + u32(tiff + 4)
    count = u16(ifd)
    index = tf.range(_EXIF_MAX_ENTRIES)
    entry = ifd + 2 + 12 * index
    match = tf.logical_and(index < count,
                           tf.equal(u16(entry), _ORIENTATION_TAG))
    values = tf.where(match, u16(entry + 8), 0)
    orientation = tf.reduce_max(values)  # 0 when no entry matched
    valid = tf.logical_and(tiff >= 0, tf.logical_and(orientation >= 1,
                                                     orientation <= 8))
    return tf.where(valid, orientation, 1)


def apply_orientation(image, orientation):
    """Turns an image stored with EXIF `orientation` upright.

    The flips and turns of Pillow's `ImageOps.exif_transpose`: 2 mirror,
    3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise, 7 transverse,
    8 quarter turn counter-clockwise; 1 (or anything else) unchanged.

    Args:
      image: [H, W, C] of any dtype.
      orientation: int32 [].

    Returns:
      [H', W', C] (H and W swapped for 5-8).
    """
    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,
        lambda: image[:, ::-1],
        lambda: image[::-1, ::-1],
        lambda: image[::-1],
        lambda: transpose(image),
        lambda: tf.image.rot90(image, k=3),
        lambda: transpose(image)[::-1, ::-1],
        lambda: tf.image.rot90(image, k=1),
    ]
    index = tf.where(tf.logical_and(orientation >= 1, orientation <= 8),
                     orientation - 1, 0)
    return tf.switch_case(index, branches)


def decode_image(data, channels=None):
    """Decodes an encoded image upright, uint8 [H, W, C].

    Args:
      data: string [], a JPEG, PNG, GIF (first frame), BMP, WebP or
        JPEG XL of any size.
      channels: 1 or 3 to convert to (see `to_channels`); None keeps the
        file's own (1-4).

    Returns:
      uint8 [H, W, channels], EXIF orientation applied (JPEG).

    Raises:
      tf.errors.InvalidArgumentError (when run): undecodable data.
    """
    image = tf.io.decode_image(data, **DECODE_ARGS)
    image = apply_orientation(image, exif_orientation(data))
    if channels:
        image = to_channels(image, channels)
    return image


def _grey_of(image):
    """Grey [..., 1] of an image whose channels are 1, 2, 3 or 4."""
    have = image.shape[-1]
    if have is not None and have < 3:
        return image[..., :1]
    rgb = image[..., :3]
    rgb.set_shape(image.shape[:-1].concatenate([3]))
    return tf.image.rgb_to_grayscale(rgb)


def _rgb_of(image):
    """RGB [..., 3] of an image whose channels are 1, 2, 3 or 4."""
    have = image.shape[-1]
    if have is not None and have < 3:
        return tf.repeat(image[..., :1], 3, axis=-1)
    rgb = image[..., :3]
    rgb.set_shape(image.shape[:-1].concatenate([3]))
    return rgb


def to_channels(image, channels):
    """Converts an image of 1-4 channels to `channels` (1 or 3).

    Grey (1) and grey+alpha (2) are repeated to RGB; RGB (3) and RGBA (4)
    become grey by `tf.image.rgb_to_grayscale`; alpha is dropped. The input's
    channel count may be known only when the graph runs (serving).

    Args:
      image: uint8 [..., C] with C in 1..4.
      channels: 1 or 3; None returns the image unchanged.

    Returns:
      uint8 [..., channels].

    Raises:
      ValueError: channels not in (None, 1, 3).
    """
    if channels is None:
        return image
    if channels not in (1, 3):
        raise ValueError(
            f"Expected channels 1 or 3. Received: channels={channels}")
    image = tf.convert_to_tensor(image)
    convert = _grey_of if channels == 1 else _rgb_of
    have = image.shape[-1]
    if have is not None:
        if have == channels:
            return image
        return convert(image)
    is_grey = tf.shape(image)[-1] < 3

    def from_grey():
        grey = image[..., :1]
        grey.set_shape(image.shape[:-1].concatenate([1]))
        return convert(grey)

    def from_colour():
        rgb = image[..., :3]
        rgb.set_shape(image.shape[:-1].concatenate([3]))
        return convert(rgb)

    return tf.cond(is_grey, from_grey, from_colour)


# --------------------------------------------------------------------------
# The transforms.


def _resize(image, size):
    return to_uint8(tf.image.resize(image, (size, size), antialias=True))


def _is_small(shape, recipe):
    return tf.maximum(shape[0], shape[1]) <= recipe.small_image_max


def eval_image(image, size, channels=None, recipe=None):
    """The eval transform: the model's pixels of one image, uint8 [S, S, C].

    Channels converted to `channels`; a small image (longer side <=
    recipe.small_image_max) resized whole; a larger one centre-cropped to
    size / (size + recipe.crop_padding) of its shorter side (at least 1
    pixel) and resized (bilinear, anti-aliased, rounded).

    Args:
      image: uint8 [H, W, C] of any H, W >= 1 and C in 1..4.
      size: The model's input side in pixels.
      channels: The model's input channels (1 or 3); None keeps C.
      recipe: A `Recipe` (default: `DEFAULT_RECIPE`).

    Returns:
      uint8 [size, size, channels].
    """
    recipe = recipe or DEFAULT_RECIPE
    image = to_channels(image, channels)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.cast(size / (size + recipe.crop_padding)
                   * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    small = _is_small(shape, recipe)
    crop_h = tf.where(small, height, side)
    crop_w = tf.where(small, width, side)
    top = (height - crop_h + 1) // 2
    left = (width - crop_w + 1) // 2
    image = image[top:top + crop_h, left:left + crop_w]
    return tf.ensure_shape(_resize(image, size),
                           (size, size, image.shape[-1]))


def eval_images(images, size, channels=None, recipe=None):
    """`eval_image` of every image of a batch, uint8 [B, S, S, channels].

    Args:
      images: uint8 [B, H, W, C] (one size per batch; C in 1..4).
      size, channels, recipe: As in `eval_image`.
    """
    out_channels = channels or images.shape[-1]
    return tf.map_fn(
        lambda image: eval_image(image, size, channels, recipe), images,
        fn_output_signature=tf.TensorSpec([size, size, out_channels],
                                          tf.uint8))


def _pad_and_crop(image, size, seed):
    channels = image.shape[-1]
    image = _resize(image, size)
    pad = max(1, size // 8)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(padded, (size, size, channels),
                                          seed=seed)


def _inception_crop(image, size, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4)), seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return _resize(tf.slice(image, begin, crop_size), size)


def train_image(image, size, *, flip, seed, recipe=None):
    """The train transform: a random crop (and flip), uint8 [size, size, C].

    Small images (longer side <= recipe.small_image_max) are resized whole,
    padded by an eighth of a side and randomly cropped back; larger ones
    get an Inception-style random crop, resized. Chosen per image.

    Args:
      image: uint8 [H, W, C] (C known statically).
      size: Output side in pixels.
      flip: Whether to flip left-right with probability 1/2.
      seed: int [2] seed of the stateless random ops: the same seed gives
        the same crop, whatever thread runs it.
      recipe: A `Recipe` (default: `DEFAULT_RECIPE`).

    Returns:
      uint8 [size, size, C].
    """
    recipe = recipe or DEFAULT_RECIPE
    channels = image.shape[-1]
    image = tf.cond(_is_small(tf.shape(image), recipe),
                    lambda: _pad_and_crop(image, size, seed),
                    lambda: _inception_crop(image, size, seed))
    if flip:
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(image, (size, size, channels))


def uses_small_image_augment(image_size):
    """Whether RandAugment takes the small-image sizes at this resolution.

    Augmentation runs on the model's pixels, so its translate and cutout
    sizes follow the model's side (an eighth of it at 64 px or less).
    """
    return image_size <= SMALL_IMAGE_MAX
