"""Loading a trained model, and what its shapes say about it.

The one loader of "a trained model" for every stage that needs one (predict,
evaluate, export). A model here is anything called as
`model(images, training=False)` on float32 pixels in [0, 255] of shape
[B, S, S, C] that returns logits [B, K]:

- the `keras.Model` of `noisy_student.model.efficientnet`, as a training run saves
  it in `model_dir/model.keras` (EMA weights);
- a SavedModel, wrapped in a `SavedModelClassifier`: one written by
  `noisy_student.serving.export.export` (used through its `serve_logits` function,
  so its dict-returning serving signatures do not matter), a
  `keras.Model.export` artifact (its `serve` endpoint), or any SavedModel
  whose serving_default signature has one input and one output (logits).

Paths are local or gs:// (everything goes through tf.io.gfile).
"""

import hashlib

import keras
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.model import layers  # noqa: F401  (registers layers)
from noisy_student.utils import storage

KERAS_FILE = "model.keras"
SAVED_MODEL_FILE = "saved_model.pb"


class SavedModelClassifier:
    """A SavedModel used like the Keras model: `__call__` returns logits.

    Works on SavedModels written by `noisy_student.serving.export.export` (its
    `serve_logits` function), on `keras.Model.export` artifacts (their
    `serve` endpoint, which returns what the model returns: logits for ours),
    and on SavedModels whose serving_default signature has one input and one
    output (taken as logits).

    Attributes:
      path: The SavedModel folder.
      image_size: Input side in pixels (None if unknown).
      num_classes: Number of logits.
      channels: Input channels (None if unknown).
    """

    def __init__(self, path, what="model"):
        """Loads the SavedModel.

        Args:
          path: The SavedModel folder.
          what: What the model is for ("model", "teacher"), for messages.

        Raises:
          ValueError: if the SavedModel has no usable function.
        """
        self.path = path
        self._loaded = tf.saved_model.load(path)  # Keeps the variables alive.
        loaded = self._loaded
        if hasattr(loaded, "serve_logits"):
            self._fn = loaded.serve_logits
            self.image_size = int(loaded.image_size.numpy())
            self.num_classes = int(loaded.num_classes.numpy())
            self.channels = int(loaded.channels.numpy())
            return
        concrete = loaded.signatures.get("serve")
        if hasattr(loaded, "serve") and concrete is not None:
            self._fn = loaded.serve
            out = concrete.structured_outputs
            out = next(iter(out.values())) if isinstance(out, dict) else out
        else:
            concrete = loaded.signatures.get("serving_default")
            if concrete is None:
                raise ValueError(
                    "Expected a SavedModel with a `serve_logits` or `serve` "
                    f"function or a serving_default signature. Received: "
                    f"{what}={path} (signatures: {list(loaded.signatures)})")
            kwargs = concrete.structured_input_signature[1]
            outputs = concrete.structured_outputs
            # Several outputs (probabilities, top-k ...) would leave us to
            # guess which one holds the logits.
            if len(kwargs) != 1 or len(outputs) != 1:
                raise ValueError(
                    "Expected a serving signature with one input and one "
                    f"output (logits). Received: {what}={path} "
                    f"inputs={list(kwargs)} outputs={list(outputs)}")
            (input_name, input_spec), = kwargs.items()
            (output_name, out), = outputs.items()
            # Signature functions take keyword arguments of their own dtype.
            self._fn = lambda x: concrete(
                **{input_name: tf.cast(x, input_spec.dtype)})[output_name]
        specs = concrete.structured_input_signature[1]
        (spec,) = specs.values() if isinstance(specs, dict) else specs
        self.image_size = spec.shape[1]
        self.channels = spec.shape[-1]
        self.num_classes = int(out.shape[-1])

    def __call__(self, images, training=False):
        del training  # A SavedModel is always in inference mode.
        return self._fn(tf.cast(images, tf.float32))


def load_model(path, what="model"):
    """Loads a trained model.

    Args:
      path: `model.keras` (keras.saving format), a folder holding
        `model.keras` (a training run's model_dir: EMA weights), or a
        SavedModel folder. Local or gs://.
      what: What the model is for ("model", "teacher" ...): the argument
        name in error messages ("Received: teacher=...").

    Returns:
      A `keras.Model` or a `SavedModelClassifier`; both are called as
      `model(images, training=False)` and return logits.

    Raises:
      FileNotFoundError: if `path` is none of these.
      ValueError: if the model file or SavedModel cannot be read.
    """
    path = str(path)
    if tf.io.gfile.isdir(path):
        keras_path = storage.join(path, KERAS_FILE)
        if tf.io.gfile.exists(keras_path):
            return _load_keras(keras_path, what)
        if tf.io.gfile.exists(storage.join(path, SAVED_MODEL_FILE)):
            try:
                return SavedModelClassifier(path, what=what)
            except ValueError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                raise ValueError(
                    f"Expected a readable SavedModel. Received: {what}={path} "
                    f"({type(e).__name__}: {e})") from e
    elif tf.io.gfile.exists(path):
        return _load_keras(path, what)
    raise FileNotFoundError(
        "Expected model.keras, a folder holding model.keras, or a SavedModel "
        "folder (pretrained TF1 or .h5 checkpoints: convert them with "
        f"ns-convert first). Received: {what}={path}")


def content_hash(path):
    """What identifies a trained model wherever it lies: a hash of its files.

    Args:
      path: As `load_model`: model.keras, a folder holding it, or a
        SavedModel folder (every file under it). Local or gs://.

    Returns:
      The first 16 hex digits of the SHA-256 of the files' names (relative
      to the model) and bytes, read in 1 MiB chunks (about 1 s per GB).

    Raises:
      FileNotFoundError: if `path` holds none of these.
    """
    path = str(path).rstrip("/")
    if tf.io.gfile.exists(keras_path(path)):
        files = [keras_path(path)]
    elif tf.io.gfile.exists(storage.join(path, SAVED_MODEL_FILE)):
        files = sorted(storage.join(root, name)
                       for root, _, names in tf.io.gfile.walk(path)
                       for name in names)
    else:
        raise FileNotFoundError(
            "Expected model.keras, a folder holding model.keras, or a "
            f"SavedModel folder. Received: {path}")
    digest = hashlib.sha256()
    for name in files:
        digest.update(name[len(path):].encode("utf-8"))
        with tf.io.gfile.GFile(name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def keras_path(path):
    """Where a training run keeps its model: `path/model.keras`, or `path`
    itself when it names a .keras file (local or gs://)."""
    path = str(path)
    if path.endswith(".keras"):
        return path
    return storage.join(path, KERAS_FILE)


def _load_keras(path, what):
    try:
        with efficientnet.deep_graph_recursion():
            return keras.saving.load_model(path, compile=False)
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(
            f"Expected a readable Keras model file. Received: {what}={path} "
            f"({type(e).__name__}: {e})") from e


def num_classes(model):
    """Number of logits the model returns."""
    if isinstance(model, SavedModelClassifier):
        return model.num_classes
    return int(model.output_shape[-1])


def image_size(model):
    """The model's input side in pixels, or None when it takes any size.

    None too for a model whose static input is not square (there is no one
    side to resize to).
    """
    if isinstance(model, SavedModelClassifier):
        return model.image_size
    shape = model.input_shape
    if shape[1] is not None and shape[1] != shape[2]:
        return None
    return shape[1]


def channels(model):
    """The model's input channels, or None when unknown."""
    if isinstance(model, SavedModelClassifier):
        return model.channels
    value = model.input_shape[-1]
    return None if value is None else int(value)


# check_num_classes's argument `num_classes` hides the function.
_model_num_classes = num_classes


def check_num_classes(model, num_classes, name="num_classes"):  # pylint: disable=redefined-outer-name
    """Checks the model's class count.

    Args:
      model: A Keras model or a `SavedModelClassifier`.
      num_classes: Expected class count; None checks nothing.
      name: The setting named in the error (a flag or field).

    Returns:
      The model's class count.

    Raises:
      ValueError: if it differs from `num_classes`.
    """
    model_classes = _model_num_classes(model)
    if num_classes is not None and int(num_classes) != model_classes:
        raise ValueError(
            f"Expected the data set's class count to match the model's "
            f"{model_classes} classes. Received: {name}={num_classes}")
    return model_classes
