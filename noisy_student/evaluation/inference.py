"""Model inference for evaluation: the eval transform, batches, logits.

A model here is anything called as `model(images, training=False)` on float32
pixels in [0, 255] of shape [B, S, S, C] that returns logits [B, K]: the
`keras.Model` from `noisy_student.model.efficientnet` (EMA weights, as training
saves them in `model_dir/model.keras`) or a SavedModel loaded with
`noisy_student.model.loading.load_model`. A data set is a `tf.data.Dataset` of
{"image": uint8 [H, W, C], "label": int32 []} (unbatched; a batched one, image
rank 4, is accepted too).

Every evaluator (clean, ImageNet-C/A/P, corruptions, adversarial) reaches
the model through `logits_function` / `predict_logits`, so the model is
traced once per input signature, never with XLA (slower on CPU).
"""

from collections.abc import Mapping
import weakref

import numpy as np
import tensorflow as tf

from noisy_student.data import preprocess as preprocess_lib
from noisy_student.model import loading


def default_preprocess(model, recipe=None):
    """The model's eval transform as a per-image function.

    `noisy_student.data.preprocess.eval_image` at the model's side and
    channels (small images whole, larger ones centre-cropped, bilinear
    anti-aliased resize), as float32: the one eval transform of training,
    ns-eval, ns-predict and the SavedModel.

    Args:
      model: A model (see the module docstring).
      recipe: The model's `preprocess.Recipe` (default: the default one).

    Returns:
      A function uint8 [H, W, C] -> float32 [S, S, channels].
    """
    size = loading.image_size(model)
    channels = loading.channels(model)

    def transform(image):
        return tf.cast(
            preprocess_lib.eval_image(image, size, channels, recipe),
            tf.float32)

    return transform


def as_model_pixels(image):
    """float32 of images already through the eval transform."""
    return tf.cast(image, tf.float32)


def model_pixels(dataset, model, recipe=None):
    """The dataset with its images through the model's eval transform.

    Args:
      dataset: {"image": uint8 [H, W, C] (or batched [B, H, W, C]), ...}.
      model: A model (its side and channels are used).
      recipe: A `preprocess.Recipe` (default: the default one).

    Returns:
      The same dicts with "image" uint8 [(B,) S, S, channels].
    """
    size = loading.image_size(model)
    channels = loading.channels(model)
    batched = dataset.element_spec["image"].shape.rank == 4
    transform = (preprocess_lib.eval_images if batched
                 else preprocess_lib.eval_image)

    def apply(element):
        return {**element,
                "image": transform(element["image"], size, channels, recipe)}

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE)


def eval_batches(dataset, batch_size, preprocess):
    """Batches of {"image": float32, "label": int32}, all examples kept.

    Args:
      dataset: Labeled data set, unbatched or batched (image rank 4).
      batch_size: Batch size for an unbatched data set.
      preprocess: Function image -> float32 [S, S, C].

    Returns:
      A batched `tf.data.Dataset`.

    Raises:
      ValueError: if the elements are not {"image", "label"} dicts.
    """
    spec = dataset.element_spec
    if not isinstance(spec, Mapping) or not {"image", "label"} <= set(spec):
        raise ValueError(
            'Expected a labeled data set of {"image", "label"} dicts. '
            f"Received: element_spec={spec}")
    batched = spec["image"].shape.rank == 4
    if batched:
        def fix(element):
            images = tf.map_fn(preprocess, element["image"],
                               fn_output_signature=tf.float32)
            return {"image": images,
                    "label": tf.cast(element["label"], tf.int32)}
        return dataset.map(fix)

    def fix_one(element):
        return {"image": preprocess(element["image"]),
                "label": tf.cast(element["label"], tf.int32)}
    # No drop_remainder: evaluation must count every example.
    return (dataset.map(fix_one, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


_FUNCTIONS = weakref.WeakKeyDictionary()


def input_spec(model):
    """float32 [None, S, S, C] (None sides when the model takes any)."""
    if isinstance(model, loading.SavedModelClassifier):
        return tf.TensorSpec([None, model.image_size, model.image_size,
                              model.channels], tf.float32)
    return tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)


def logits_function(model):
    """model(x, training=False) compiled once per model (never with XLA)."""
    if isinstance(model, loading.SavedModelClassifier):
        return model
    fn = _FUNCTIONS.get(model)
    if fn is None:
        # A fixed signature with a free batch size: the last, smaller batch
        # reuses the trace. No jit_compile: XLA is slower on CPU.
        # A weak reference, so the cache does not keep the model alive.
        ref = weakref.ref(model)
        fn = tf.function(lambda x: ref()(x, training=False),
                         input_signature=[input_spec(model)])
        _FUNCTIONS[model] = fn
    return fn


def predict_logits(model, dataset, batch_size=64, preprocess=None):
    """Runs the model (training=False) over a labeled data set.

    Args:
      model: A model (see the module docstring).
      dataset: A `tf.data.Dataset` of {"image", "label"} dicts.
      batch_size: Batch size for unbatched data sets.
      preprocess: Optional function image -> float32 [S, S, C]; by default
        the model's eval transform (`default_preprocess`).

    Returns:
      (logits float32 [N, K], labels int64 [N]) as numpy arrays.
    """
    if preprocess is None:
        preprocess = default_preprocess(model)
    fn = logits_function(model)
    logits, labels = [], []
    for batch in eval_batches(dataset, batch_size, preprocess):
        logits.append(np.asarray(fn(batch["image"]), np.float32))
        labels.append(batch["label"].numpy())
    if not logits:
        raise ValueError("Expected a non-empty data set. Received: 0 examples")
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)

