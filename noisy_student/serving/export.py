"""SavedModel export for serving (the library behind `ns-export`).

The SavedModel holds the model's weights as loaded (for a training run's
`model.keras`, the EMA weights) and these signatures, which apply the eval
transform of ns-eval (`noisy_student.data.preprocess`, traced into the
graph), so a served image gets the pixels ns-eval gives the same file:

- `serve_bytes`: `image_bytes`, string [None], each an encoded JPEG, PNG,
  GIF (first frame), BMP, WebP or JPEG XL of any size. Per image: decoded with
  `tf.io.decode_image` in its own channels (CMYK JPEG -> RGB); a JPEG's
  EXIF orientation (tag 0x0112, 1-8) applied by flips and quarter turns as
  Pillow's `ImageOps.exif_transpose` (EXIF in PNG is not read); then as
  `serve_images`. An image that cannot be decoded (empty, another format,
  corrupt or truncated: TensorFlow 2.21 refused every prefix of the JPEG,
  PNG, BMP and WebP files tried, and of a GIF decoded only the one missing
  its trailer byte) does not fail the request: its row is marked invalid
  (below) and the other images get what they get in a request without it,
  bit for bit (the model runs on the good ones as one batch; in a request
  of another size a row can differ by float rounding, ~1e-7).
- `serving_default` and `serve_images`: `images`, uint8 [None, None, None,
  None], any height and width (one size per request) and 1 (grey), 2
  (grey+alpha), 3 (RGB) or 4 (RGBA) channels. Per image: channels
  converted to the model's (grey repeated; RGB -> grey by
  `tf.image.rgb_to_grayscale`; alpha dropped); an image of at most
  `Recipe.small_image_max` (64) px on its longer side used whole, a larger
  one centre-cropped to size / (size + `Recipe.crop_padding`) (32) of its
  shorter side, at least 1 px; resized to the model's side, bilinear with
  anti-aliasing, rounded to uint8. Every image is valid unless they have
  no pixel (height or width 0: every row invalid, "empty image (0
  pixels)", the model not run); more than 4 channels fails the request
  (InvalidArgumentError).

each returning, for N images and K classes, {"probabilities": float32 [N,
K], "top_k_classes": int32 [N, k], "top_k_scores": float32 [N, k],
"top_k_names": string [N, k], "valid": bool [N], "error": string [N],
"class_names": string [K]}. A valid row has `error` "" and the model's
answer; an invalid row has `error` "empty input", "undecodable image:
unknown format (not JPEG, PNG, GIF, BMP, WebP or JPEG XL)" or
"undecodable image: corrupt or truncated JPEG" (or PNG, ...; TensorFlow's
own message cannot be caught inside the graph), probabilities and
top_k_scores 0, top_k_classes -1 and top_k_names "". An empty request
(N = 0) returns outputs with 0 rows. The recipe and class names come from
the model's folder (preprocess.json, class_names.json, written by training)
and are copied into the SavedModel folder.

Also saved (not serving signatures): `serve_logits(images float32 [None, S,
S, C] in [0, 255]) -> logits` and the variables `image_size`,
`num_classes`, `channels`, `class_names`, `small_image_max`,
`crop_padding`, which `noisy_student.model.loading.load_model` uses to load a
SavedModel like a Keras model (to evaluate it, or as a teacher). The
optional `model.tflite` takes the model's pixels, uint8 [1, S, S, C],
already through the eval transform.

Atomicity: the SavedModel (and the optional `model.tflite`) is written to a
temporary folder beside `out_dir`, which is then renamed. On file systems
without directory rename (gs://), the files are copied into `out_dir` with
`saved_model.pb` last, so a reader that waits for `saved_model.pb` never sees
a partial model.
"""

import dataclasses
import shutil
import tempfile

import tensorflow as tf
# Freezes variables for TFLite; there is no public API for it.
from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-direct-tensorflow-import

from noisy_student.data import preprocess
from noisy_student.model import info
from noisy_student.model import loading
from noisy_student.utils import storage

SAVED_MODEL_FILE = "saved_model.pb"
TFLITE_FILE = "model.tflite"
SIGNATURES = ("serving_default", "serve_images", "serve_bytes")

# The leading bytes by which tf.io.decode_image tells its formats apart
# (decode_image_op.cc): (name, [(offset, bytes), ...]). Only used to word the
# error of a file that failed to decode; whether it decodes is decided by
# decoding it.
_MAGIC = (("JPEG", [(0, b"\xff\xd8\xff")]),
          ("PNG", [(0, b"\x89PNG\r\n\x1a\n")]),
          ("GIF", [(0, b"GIF8")]),
          ("BMP", [(0, b"BM")]),
          ("WebP", [(0, b"RIFF"), (8, b"WEBP")]),
          ("JPEG XL", [(0, b"\xff\x0a")]),
          ("JPEG XL", [(0, b"\x00\x00\x00\x0cJXL \r\n\x87\n")]))
_UNKNOWN_FORMAT = ("undecodable image: unknown format (not JPEG, PNG, GIF, "
                   "BMP, WebP or JPEG XL)")


def _decode_errors(image_bytes):
    """The `error` of each image, string [N], as if none had decoded.

    "empty input", "undecodable image: corrupt or truncated JPEG" (the
    format its first bytes claim) or `_UNKNOWN_FORMAT`.
    """
    # Padded so that substr never reads past the end (it raises there).
    head = tf.strings.join([image_bytes, b"\0" * 16])
    error = tf.fill(tf.shape(image_bytes), _UNKNOWN_FORMAT)
    for name, parts in reversed(_MAGIC):  # the first match wins
        match = tf.reduce_all(
            [tf.strings.substr(head, offset, len(magic)) == magic
             for offset, magic in parts], axis=0)
        error = tf.where(
            match, f"undecodable image: corrupt or truncated {name}", error)
    return tf.where(tf.strings.length(image_bytes) == 0, "empty input",
                    error)


class ExportDirExistsError(FileExistsError, ValueError):
    """The export folder exists and overwrite was not asked for."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Arguments of `export_from_config` (the ns-export command).

    Raises:
      ValueError: for an empty path, image_size <= 0 or top_k < 1.

    Attributes:
      model_path: model.keras, a model_dir holding it, or a SavedModel.
      out_dir: SavedModel folder to create (local or gs://).
      overwrite: Replace an existing out_dir.
      image_size: Serving resolution; default: the model's input side.
      top_k: How many classes `top_k_classes` returns.
      tflite: Also write out_dir/model.tflite (uint8 [1, S, S, C] model
        pixels -> probabilities).
    """
    model_path: str
    out_dir: str
    overwrite: bool = False
    image_size: int | None = None
    top_k: int = 5
    tflite: bool = False

    def __post_init__(self):
        # Checked when built: the pipeline builds its export config before
        # the teacher trains.
        for name in ("model_path", "out_dir"):
            if not getattr(self, name):
                raise ValueError(f"Expected a path {name}. Received: "
                                 f"{name}={getattr(self, name)!r}")
        if self.image_size is not None and not self.image_size > 0:
            raise ValueError("Expected None or an image_size > 0. Received: "
                             f"image_size={self.image_size!r}")
        if not self.top_k >= 1:
            raise ValueError(f"Expected top_k >= 1. Received: "
                             f"top_k={self.top_k}")


class _ServingModule(tf.Module):
    """Serving functions around a Keras classifier that returns logits."""

    def __init__(self, model, image_size, num_classes, channels, top_k,
                 class_names, recipe):
        super().__init__(name="serving")
        self.model = model
        self._size = image_size
        self._channels = channels
        self._num_classes = num_classes
        self._top_k = top_k
        self._recipe = recipe
        # Saved as variables so a loader can read them without the project.
        self.image_size = tf.Variable(image_size, trainable=False,
                                      name="image_size")
        self.num_classes = tf.Variable(num_classes, trainable=False,
                                       name="num_classes")
        self.channels = tf.Variable(channels, trainable=False,
                                    name="channels")
        self.class_names = tf.Variable(list(class_names), trainable=False,
                                       name="class_names")
        self.small_image_max = tf.Variable(recipe.small_image_max,
                                           trainable=False,
                                           name="small_image_max")
        self.crop_padding = tf.Variable(recipe.crop_padding, trainable=False,
                                        name="crop_padding")
        spec = tf.TensorSpec([None, image_size, image_size, channels],
                             tf.float32, name="images")
        self.serve_logits = tf.function(self._logits, input_signature=[spec])
        self.serve_images = tf.function(
            self._serve_images,
            input_signature=[tf.TensorSpec([None, None, None, None],
                                           tf.uint8, name="images")])
        self.serve_bytes = tf.function(
            self._serve_bytes,
            input_signature=[tf.TensorSpec([None], tf.string,
                                           name="image_bytes")])

    def _logits(self, images):
        return tf.cast(self.model(images, training=False), tf.float32)

    def _eval_image(self, image):
        """The eval transform of ns-eval: uint8 [S, S, channels]."""
        return preprocess.eval_image(image, self._size, self._channels,
                                     self._recipe)

    def _predict(self, pixels):
        """Probabilities and top k of uint8 [M, S, S, C] eval pixels."""
        probabilities = tf.nn.softmax(
            self._logits(tf.cast(pixels, tf.float32)), axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=self._top_k)
        return {"probabilities": probabilities,
                "top_k_classes": tf.cast(classes, tf.int32),
                "top_k_scores": scores,
                "top_k_names": tf.gather(self.class_names, classes)}

    def _outputs(self, indices, pixels, errors):
        """The outputs of a request of N images, M of them valid.

        Args:
          indices: int32 [M], the rows of the valid images, ascending.
          pixels: uint8 [M, S, S, C], their eval pixels.
          errors: string [N], the error of each row were it invalid.
        """
        n = tf.shape(errors)[0]
        k = self._top_k
        # The model runs on the valid images only, as one batch in request
        # order: each gets the same numbers as in a request without the
        # invalid ones. Never on zero images: the stem's batch norm was
        # seen to crash on an empty batch.
        predicted = tf.cond(
            tf.size(indices) > 0, lambda: self._predict(pixels),
            self._predict_nothing)
        fills = {"probabilities": tf.zeros([n, self._num_classes]),
                 "top_k_classes": tf.fill([n, k], -1),
                 "top_k_scores": tf.zeros([n, k]),
                 "top_k_names": tf.fill([n, k], "")}
        rows = indices[:, None]
        out = {key: tf.tensor_scatter_nd_update(fill, rows, predicted[key])
               for key, fill in fills.items()}
        out["valid"] = tf.tensor_scatter_nd_update(
            tf.zeros([n], tf.bool), rows, tf.ones_like(indices, tf.bool))
        out["error"] = tf.where(out["valid"], "", errors)
        out["class_names"] = tf.identity(self.class_names)
        return out

    def _predict_nothing(self):
        """What `_predict` returns for no image, without running the model."""
        k = self._top_k
        return {"probabilities": tf.zeros([0, self._num_classes]),
                "top_k_classes": tf.zeros([0, k], tf.int32),
                "top_k_scores": tf.zeros([0, k]),
                "top_k_names": tf.zeros([0, k], tf.string)}

    def _serve_images(self, images):
        channels = tf.shape(images)[-1]
        check = tf.debugging.assert_less_equal(
            channels, 4, message="Expected images with 1 (grey), 2 (grey + "
            "alpha), 3 (RGB) or 4 (RGBA) channels")
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        n, height, width = tf.unstack(tf.shape(images)[:3])
        # Images of no pixel (one size per request: all of them) have no
        # answer: every row invalid, the model not run.
        empty = tf.logical_or(height == 0, width == 0)
        indices = tf.cond(empty, lambda: tf.zeros([0], tf.int32),
                          lambda: tf.range(n))
        pixels = tf.cond(
            empty, lambda: tf.zeros([0, self._size, self._size,
                                     self._channels], tf.uint8),
            lambda: tf.map_fn(self._eval_image, images,
                              fn_output_signature=tf.TensorSpec(
                                  [self._size, self._size, self._channels],
                                  tf.uint8)))
        return self._outputs(indices, pixels,
                             tf.fill([n], "empty image (0 pixels)"))

    def _serve_bytes(self, image_bytes):
        n = tf.size(image_bytes)
        # Decoded one by one in a tf.data pipeline: ignore_errors drops an
        # image whose decode (or transform) fails where tf.map_fn would fail
        # the whole request, and the index kept with each image says which
        # ones are left. Sequential map: the survivors stay in request order.
        images = tf.data.Dataset.from_tensor_slices((tf.range(n), image_bytes))
        images = images.map(lambda i, data: (i, self._eval_image(
            preprocess.decode_image(data))))
        images = images.ignore_errors().batch(
            tf.maximum(tf.cast(n, tf.int64), 1))
        # One batch holds all survivors; the initial state is the answer when
        # none survives (the dataset is then empty).
        empty = (tf.zeros([0], tf.int32),
                 tf.zeros([0, self._size, self._size, self._channels],
                          tf.uint8))
        indices, pixels = images.reduce(empty, lambda _, batch: batch)
        return self._outputs(indices, pixels, _decode_errors(image_bytes))

    def tflite_bytes(self):
        """A TFLite flatbuffer: uint8 [1, S, S, C] model pixels -> outputs.

        The input is the eval transform's output (see
        `noisy_student.data.preprocess.eval_image`): TFLite gets no decoder
        or crop. The weights are frozen into constants first: converted as
        resource variables (Keras 3 variables), they come out uninitialised
        in TFLite.
        """
        spec = tf.TensorSpec([1, self._size, self._size, self._channels],
                             tf.uint8, name="images")
        keys = sorted(("probabilities", "top_k_classes", "top_k_scores"))

        def numeric(images):
            out = self._predict(images)
            return {key: out[key] for key in keys}

        outputs = tf.function(numeric, input_signature=[spec])
        frozen = convert_to_constants.convert_variables_to_constants_v2(
            outputs.get_concrete_function())

        @tf.function(input_signature=[spec])
        def serve(images):
            # A dict output gives the TFLite model a signature with named
            # outputs (get_signature_runner()).
            return dict(zip(keys, frozen(images)))

        holder = tf.Module()
        holder.serve = serve
        # Converting from a SavedModel keeps the signature and its names.
        folder = tempfile.mkdtemp(prefix="ns-tflite-")
        try:
            # No gradients are needed, and the frozen swish's custom gradient
            # cannot be saved.
            tf.saved_model.save(
                holder, folder, signatures={"serving_default": serve},
                options=tf.saved_model.SaveOptions(
                    experimental_custom_gradients=False))
            converter = tf.lite.TFLiteConverter.from_saved_model(folder)
            return converter.convert()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _exists(path):
    return tf.io.gfile.exists(path)


def _check_out_dir(out_dir, overwrite):
    if _exists(out_dir) and not overwrite:
        raise ExportDirExistsError(
            "Expected a new export folder, or --overwrite (overwrite=True) "
            f"to replace it. Received: --out_dir={out_dir} (exists)")


def _copy_tree(src, dst):
    """Copies a folder file by file, saved_model.pb last."""
    last = []
    for folder, _, files in tf.io.gfile.walk(src):
        rel = folder[len(src):].lstrip("/")
        target = f"{dst}/{rel}" if rel else dst
        tf.io.gfile.makedirs(target)
        for name in files:
            pair = (f"{folder}/{name}", f"{target}/{name}")
            if name == SAVED_MODEL_FILE and not rel:
                last.append(pair)
            else:
                tf.io.gfile.copy(*pair, overwrite=True)
    for pair in last:
        tf.io.gfile.copy(*pair, overwrite=True)


def _move_into_place(tmp, out_dir):
    """Renames tmp to out_dir, replacing an existing out_dir."""
    trash = None
    if _exists(out_dir):
        trash = storage.temp_path(out_dir)
        tf.io.gfile.rename(out_dir, trash)
    try:
        tf.io.gfile.rename(tmp, out_dir)
    except (tf.errors.UnimplementedError, tf.errors.FailedPreconditionError,
            tf.errors.PermissionDeniedError, NotImplementedError):
        # Object stores cannot rename folders: copy, saved_model.pb last.
        _copy_tree(tmp, out_dir)
        tf.io.gfile.rmtree(tmp)
    if trash is not None:
        tf.io.gfile.rmtree(trash)


def export(model, out_dir, *, overwrite=False, image_size=None, top_k=5,
           tflite=False, class_names=None, recipe=None):
    """Writes a serving SavedModel of a classifier (atomically).

    Args:
      model: A `keras.Model` taking float pixels in [0, 255] and returning
        logits (its current weights are exported: load the EMA ones).
      out_dir: SavedModel folder to create (local or gs://).
      overwrite: Replace an existing out_dir.
      image_size: Serving resolution; default: the model's input side.
      top_k: Classes returned by `top_k_classes` (capped at the class count).
      tflite: Also write `out_dir/model.tflite`.
      class_names: Names of the classes in label order (default: "0",
        "1", ...), returned by the signatures and kept in
        out_dir/class_names.json.
      recipe: The model's `preprocess.Recipe` (default: the default one),
        applied inside the signatures and kept in out_dir/preprocess.json.

    Returns:
      out_dir.

    Raises:
      ExportDirExistsError (a FileExistsError and a ValueError): out_dir
        exists and overwrite is False.
      ValueError: no image size is known, top_k < 1, or the class names
        do not match the class count.
    """
    out_dir = str(out_dir).rstrip("/")
    _check_out_dir(out_dir, overwrite)
    if top_k < 1:
        raise ValueError(f"Expected top_k >= 1. Received: top_k={top_k}")
    size = image_size or loading.image_size(model)
    if not size:
        raise ValueError(
            "Expected image_size for a model without a fixed input side. "
            f"Received: image_size={image_size}")
    num_classes = loading.num_classes(model)
    channels = loading.channels(model)
    if channels not in (1, 3):
        raise ValueError(
            f"Expected a model with 1 or 3 input channels. Received: "
            f"channels={channels}")
    names = (tuple(str(n) for n in class_names) if class_names
             else tuple(str(i) for i in range(num_classes)))
    if len(names) != num_classes:
        raise ValueError(
            f"Expected {num_classes} class names for a model with "
            f"{num_classes} classes. Received: {len(names)} class_names")
    recipe = recipe or preprocess.DEFAULT_RECIPE
    module = _ServingModule(model, int(size), num_classes, channels,
                            min(int(top_k), num_classes), names, recipe)
    tmp = storage.temp_path(out_dir)
    try:
        # A full disk is named as the export, not its temporary folder.
        with storage.naming_full_disk(f"the SavedModel into {out_dir}"):
            tf.saved_model.save(
                module, tmp,
                signatures={"serving_default": module.serve_images,
                            "serve_images": module.serve_images,
                            "serve_bytes": module.serve_bytes})
            # Read back by model.info / preprocess when the SavedModel is
            # used as a teacher or evaluated.
            preprocess.write_recipe(tmp, recipe)
            info.write_class_names(tmp, names)
            if tflite:
                storage.atomic_write(f"{tmp}/{TFLITE_FILE}",
                                      module.tflite_bytes())
            # Checked again: another process may have created it meanwhile.
            _check_out_dir(out_dir, overwrite)
            _move_into_place(tmp, out_dir)
    finally:
        if _exists(tmp):
            tf.io.gfile.rmtree(tmp)
    return out_dir


def export_from_config(config):
    """Loads config.model_path (EMA weights) and exports it.

    The class names and preprocessing recipe recorded in the model's folder
    (class_names.json, preprocess.json) go into the SavedModel.

    Args:
      config: An `ExportConfig`.

    Returns:
      The SavedModel folder.
    """
    _check_out_dir(str(config.out_dir).rstrip("/"), config.overwrite)
    model = loading.load_model(config.model_path)
    if isinstance(model, loading.SavedModelClassifier):
        raise ValueError(
            "Expected a Keras model (model.keras or a model_dir) to export. "
            f"Received: model_path={config.model_path} (a SavedModel)")
    return export(model, config.out_dir, overwrite=config.overwrite,
                  image_size=config.image_size, top_k=config.top_k,
                  tflite=config.tflite,
                  class_names=info.read_class_names(config.model_path),
                  recipe=preprocess.read_recipe(config.model_path))
