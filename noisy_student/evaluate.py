"""Evaluation: clean accuracy and calibration, ImageNet-C/A/P, corruptions.

A model here is anything called as `model(images, training=False)` on float32
pixels in [0, 255] of shape [B, S, S, C] that returns logits [B, K]: the
`keras.Model` from `noisy_student.efficientnet` (EMA weights, as training
saves them in `model_dir/model.keras`) or a SavedModel loaded with
`noisy_student.model_io.load_model`. A data set is a `tf.data.Dataset` of
{"image": uint8 [H, W, C], "label": int32 []} (unbatched; a batched one, image
rank 4, is accepted too).

What is computed, and how:
- Clean: top-1, top-k, per-class accuracy, a confusion matrix (PNG), and the
  expected calibration error (ECE) of Guo et al. (2017): the softmax
  confidence (top probability) is binned into 15 equal-width bins
  (i/15, (i+1)/15], and ECE = sum_b |B_b| / n * |accuracy(B_b) -
  mean confidence(B_b)|, as a fraction in [0, 1].
- ImageNet-C (Hendrycks & Dietterich, ICLR 2019): for each corruption c the
  error E_{s,c} at severities s = 1..5; the corruption error
  CE_c = sum_s E_{s,c} / sum_s E_{s,c}^AlexNet; mCE = mean_c CE_c over the 15
  benchmark corruptions; relative CE_c = sum_s (E_{s,c} - E_clean) /
  sum_s (E_{s,c}^AlexNet - E_clean^AlexNet), relative mCE its mean. All in
  percent (AlexNet itself scores 100).
- ImageNet-A (Hendrycks et al., 2021): top-1 accuracy over its 200 classes,
  logits restricted to those 200 of ImageNet's 1000 before the argmax.
- ImageNet-P: the flip probability of Hendrycks & Dietterich (see
  `flip_probability`) per perturbation and its mean.
- On-the-fly corruptions (`noisy_student.corruptions`): per-corruption error
  at each severity, its mean, and the mean over corruptions.
- Adversarial robustness: `noisy_student.adversarial`.
"""

import dataclasses
import io
import math
import weakref
from collections.abc import Mapping

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student import contact_sheet
from noisy_student import corruptions as ns_corruptions
from noisy_student import io_utils
from noisy_student import model_io
from noisy_student.data import preprocess as preprocess_lib

SEVERITIES = (1, 2, 3, 4, 5)
ECE_BINS = 15
# Most confident mistakes listed in results.json and drawn in mistakes.png.
NUM_MISTAKES_SHOWN = 16
# run_evaluation keeps the confusion matrix in results.json up to this many
# classes.
MAX_JSON_CONFUSION_CLASSES = 100

# The 15 ImageNet-C benchmark corruptions, in the paper's order.
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)

# AlexNet's top-1 error on ImageNet-C at severities 1..5, as fractions, as
# published for Hendrycks & Dietterich (2019) and used to normalise the CE.
# Source: the per-severity table in timm (huggingface/pytorch-image-models,
# timm/utils, `imagenetc_alexnet_error_rates_list`); its per-corruption means
# equal the AlexNet CE table of the paper's code (e.g. gaussian_noise
# 0.886428, jpeg_compression 0.606500, as in mmpretrain's `get_ce_alexnet`).
ALEXNET_IMAGENET_C_ERRORS = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# AlexNet's clean top-1 error on the ImageNet validation set: the torchvision
# AlexNet that Hendrycks evaluated (56.522% top-1, pytorch.org/vision model
# card); the paper's table rounds it to 43.5%.
ALEXNET_CLEAN_ERROR = 0.43478

# ImageNet-A's 200 classes as indices into ImageNet's 1000 (sorted wnids, the
# order of TFDS `imagenet2012` / `imagenet_a` labels). Source: the
# `thousand_k_to_200` map of eval.py in
# github.com/hendrycks/natural-adv-examples.
IMAGENET_A_CLASS_INDICES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79,
    89, 90, 94, 96, 97, 99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143,
    144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301, 306,
    307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330,
    334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407,
    411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470,
    472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552,
    557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627,
    640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746,
    749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802,
    803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862,
    870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943,
    945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
)

# ImageNet-P perturbations whose frames are independent noise draws: each
# frame is compared with the first, not with the previous one.
IMAGENET_P_NOISE_PERTURBATIONS = ("gaussian_noise", "shot_noise",
                                  "speckle_noise")



# --------------------------------------------------------------------------
# Prediction.


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
    size = model_io.image_size(model)
    channels = model_io.channels(model)

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
    size = model_io.image_size(model)
    channels = model_io.channels(model)
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
    if isinstance(model, model_io.SavedModelClassifier):
        return tf.TensorSpec([None, model.image_size, model.image_size,
                              model.channels], tf.float32)
    return tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)


def logits_function(model):
    """model(x, training=False) compiled once per model (never with XLA)."""
    if isinstance(model, model_io.SavedModelClassifier):
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


def check_labels(labels, num_classes, what="model"):
    """Raises ValueError if a label is outside [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Expected labels in [0, {num_classes}) for a {what} with "
            f"{num_classes} classes. Received: labels in "
            f"[{labels.min()}, {labels.max()}]")


# --------------------------------------------------------------------------
# Metrics on arrays (numpy).


def softmax(logits):
    """Numerically stable softmax over the last axis (numpy)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k_accuracy(scores, labels, k=1):
    """Fraction of examples whose label is among the k highest scores.

    Ties count in the label's favour, as in `tf.math.in_top_k`: the label is
    in the top k when fewer than k classes score strictly higher.

    Args:
      scores: Logits or probabilities [N, K].
      labels: Integer labels [N].
      k: How many top classes count; capped at K.

    Returns:
      Accuracy as a float in [0, 1].
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels).astype(np.int64)
    if k < 1:
        raise ValueError(f"Expected k >= 1. Received: k={k}")
    label_scores = scores[np.arange(len(labels)), labels]
    higher = (scores > label_scores[:, None]).sum(axis=1)
    return float(np.mean(higher < k))


def confusion_matrix(labels, predictions, num_classes):
    """Counts [K, K]: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64),
                       np.asarray(predictions, np.int64)), 1)
    return matrix


def per_class_accuracy(labels, predictions, num_classes):
    """Accuracy of each true class (None for classes absent from labels)."""
    matrix = confusion_matrix(labels, predictions, num_classes)
    totals = matrix.sum(axis=1)
    return [float(matrix[c, c] / totals[c]) if totals[c] else None
            for c in range(num_classes)]


def calibration_bins(probabilities, labels, num_bins=ECE_BINS):
    """Per-bin (count, accuracy, mean confidence) of the top probability.

    Bin b covers confidences in (b / num_bins, (b + 1) / num_bins]; empty
    bins have accuracy and confidence 0.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1,
                    0, num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    hits = np.bincount(index, weights=correct, minlength=num_bins)
    conf = np.bincount(index, weights=confidence, minlength=num_bins)
    safe = np.maximum(counts, 1)
    return counts, hits / safe, conf / safe


def expected_calibration_error(probabilities, labels, num_bins=ECE_BINS):
    """ECE with `num_bins` equal-width confidence bins (Guo et al., 2017).

    Args:
      probabilities: Softmax outputs [N, K].
      labels: Integer labels [N].
      num_bins: Number of equal-width bins over (0, 1] (default 15).

    Returns:
      sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|, in [0, 1].
    """
    if num_bins < 1:
        raise ValueError(f"Expected num_bins >= 1. Received: "
                         f"num_bins={num_bins}")
    counts, accuracy, confidence = calibration_bins(probabilities, labels,
                                                    num_bins)
    total = counts.sum()
    return float(np.sum(counts / total * np.abs(accuracy - confidence)))


def save_confusion_matrix_png(matrix, path, class_names=None, title=None):
    """Writes a row-normalised confusion matrix as a PNG (atomically).

    Args:
      matrix: Counts [K, K] (row = true class).
      path: Destination .png, local or gs://.
      class_names: Optional K names for the axes (shown when K <= 40;
        ids otherwise).
      title: Optional title.
    """
    # The object API: no global backend switch, no pyplot state.
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top

    matrix = np.asarray(matrix, np.float64)
    num_classes = matrix.shape[0]
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 3.0 + 0.3 * num_classes)
    fig = figure.Figure(figsize=(side, side))
    backend_agg.FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if num_classes <= 40:
        names = (list(class_names) if class_names is not None
                 else [str(i) for i in range(num_classes)])
        ax.set_xticks(range(num_classes), names, rotation=90)
        ax.set_yticks(range(num_classes), names)
        if num_classes <= 20:
            for (i, j), count in np.ndenumerate(matrix):
                if count:
                    ax.text(j, i, int(count), ha="center", va="center",
                            fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    io_utils.atomic_write(path, buffer.getvalue())


def classification_metrics(logits, labels, num_classes=None, top_k=5,
                           ece_bins=ECE_BINS):
    """Clean metrics from logits and labels (numpy).

    Returns:
      A JSON-ready dict: num_examples, top1, top{k}, error, ece, ece_bins,
      per_class_accuracy, confusion_matrix.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, np.int64)
    num_classes = num_classes or logits.shape[-1]
    if logits.shape[-1] != num_classes:
        raise ValueError(
            f"Expected logits with {num_classes} classes. Received: "
            f"logits.shape={logits.shape}")
    check_labels(labels, num_classes)
    predictions = logits.argmax(axis=1)
    top1 = top_k_accuracy(logits, labels, 1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    return {
        "num_examples": int(len(labels)),
        "num_classes": int(num_classes),
        "top1": top1,
        f"top{top_k}": top_k_accuracy(logits, labels, top_k),
        "error": 1.0 - top1,
        "ece": expected_calibration_error(softmax(logits), labels, ece_bins),
        "ece_bins": int(ece_bins),
        "per_class_accuracy": per_class_accuracy(labels, predictions,
                                                 num_classes),
        "confusion_matrix": matrix.tolist(),
    }


def evaluate_clean(model, dataset, *, num_classes=None, batch_size=64,
                   top_k=5, ece_bins=ECE_BINS, confusion_png=None,
                   class_names=None, preprocess=None, predictions_path=None):
    """Clean accuracy, calibration and confusion matrix on a data set.

    Args:
      model: A model (see the module docstring).
      dataset: Labeled `tf.data.Dataset`.
      num_classes: The data set's class count; must equal the model's.
      batch_size: Evaluation batch size.
      top_k: The k of the top-k accuracy (5 as in the paper).
      ece_bins: Bins of the expected calibration error (15).
      confusion_png: Optional path of the confusion-matrix PNG.
      class_names: Optional class names for the PNG.
      preprocess: Optional per-image function (see `predict_logits`).
      predictions_path: Optional .npz path for the per-image results, in
        data set order: `probabilities` float32 [N, K] (softmax),
        `labels` int64 [N], `predictions` int64 [N].

    Returns:
      The dict of `classification_metrics`, plus "most_confident_mistakes"
      (see `most_confident_mistakes`).

    Raises:
      ValueError: if num_classes differs from the model's class count or a
        label is outside the model's classes.
    """
    model_classes = model_io.check_num_classes(model, num_classes)
    logits, labels = predict_logits(model, dataset, batch_size, preprocess)
    results = classification_metrics(logits, labels, model_classes, top_k,
                                     ece_bins)
    results["most_confident_mistakes"] = most_confident_mistakes(
        logits, labels)
    if predictions_path:
        buffer = io.BytesIO()
        probabilities = np.asarray(tf.nn.softmax(logits, axis=-1))
        np.savez(buffer, probabilities=probabilities, labels=labels,
                 predictions=logits.argmax(axis=1))
        io_utils.atomic_write(predictions_path, buffer.getvalue())
    if confusion_png:
        save_confusion_matrix_png(np.asarray(results["confusion_matrix"]),
                                  confusion_png, class_names)
    return results


def most_confident_mistakes(logits, labels, n=NUM_MISTAKES_SHOWN):
    """The n wrong predictions with the highest confidence.

    Args:
      logits: float [N, K].
      labels: int [N].
      n: How many to return at most.

    Returns:
      A list of {"index" (position in the data set), "label", "predicted",
      "confidence" (softmax top probability)}, most confident first (ties:
      lower index first).
    """
    probabilities = softmax(np.asarray(logits, np.float64))
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.nonzero(predicted != np.asarray(labels))[0]
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    return [{"index": int(i), "label": int(labels[i]),
             "predicted": int(predicted[i]),
             "confidence": float(confidence[i])} for i in order]


def mistakes_png(dataset, mistakes, class_names=None, per_row=8):
    """A contact sheet of the given mistakes, drawn from `dataset`.

    Args:
      dataset: The evaluated data set ({"image": uint8 [S, S, C], ...}, the
        model's pixels), in the order the indices refer to.
      mistakes: The list of `most_confident_mistakes`.
      class_names: Names in label order, or None (ids are shown).
      per_row: Images per row.

    Returns:
      PNG bytes, or None when there are no mistakes.
    """
    if not mistakes:
        return None
    wanted = tf.constant([m["index"] for m in mistakes], tf.int64)
    found = dataset.enumerate().filter(
        lambda i, element: tf.reduce_any(tf.equal(i, wanted)))
    images = {int(i): element["image"].numpy() for i, element in found}

    def name(c):
        return class_names[c] if class_names else str(c)

    cells = [(images[m["index"]],
              f"true {name(m['label'])}\npred {name(m['predicted'])} "
              f"{m['confidence']:.2f}") for m in mistakes]
    rows = []
    for start in range(0, len(cells), per_row):
        row = cells[start:start + per_row]
        rows.append((f"#{start + 1}-{start + len(row)}", row))
    return contact_sheet.contact_sheet_png(
        rows, title="most confident mistakes (true class, predicted class, "
        "confidence)")


# --------------------------------------------------------------------------
# ImageNet-C arithmetic.


def _check_errors(errors, baseline, corruptions):
    for name in corruptions:
        if name not in baseline:
            raise ValueError(
                f"Expected a baseline error table with corruption {name!r}. "
                f"Received: baseline corruptions={sorted(baseline)}")
        if name not in errors:
            raise ValueError(
                f"Expected errors for every corruption; missing {name!r}. "
                f"Received: corruptions={sorted(errors)}")
        if len(errors[name]) != len(baseline[name]):
            raise ValueError(
                f"Expected {len(baseline[name])} severities for {name!r}. "
                f"Received: {len(errors[name])} error rates")


def corruption_errors(errors, baseline=None, corruptions=None):
    """Corruption errors CE_c and their mean (mCE), in percent.

    CE_c = 100 * sum_s E_{s,c} / sum_s B_{s,c}, with E the model's and B the
    baseline's (AlexNet's) top-1 error at each severity.

    Args:
      errors: {corruption: [error at severity 1..5]} as fractions.
      baseline: Same for the baseline model; AlexNet's ImageNet-C errors by
        default.
      corruptions: Which corruptions make up the mean; default: the 15
        ImageNet-C benchmark ones when the baseline is AlexNet's, else all of
        `errors`.

    Returns:
      {"ce": {corruption: CE}, "mce": mean CE}.

    Raises:
      ValueError: naming a corruption missing from `errors` or the baseline.
    """
    if baseline is None:
        baseline = ALEXNET_IMAGENET_C_ERRORS
        corruptions = corruptions or IMAGENET_C_CORRUPTIONS
    corruptions = tuple(corruptions or errors)
    _check_errors(errors, baseline, corruptions)
    ce = {name: 100.0 * float(np.sum(errors[name]) / np.sum(baseline[name]))
          for name in corruptions}
    return {"ce": ce, "mce": float(np.mean(list(ce.values())))}


def relative_corruption_errors(errors, clean_error, baseline=None,
                               baseline_clean_error=None, corruptions=None):
    """Relative corruption errors and relative mCE, in percent.

    Relative CE_c = 100 * sum_s (E_{s,c} - E_clean) /
    sum_s (B_{s,c} - B_clean): how much accuracy the model loses to the
    corruption, relative to how much the baseline loses.

    Args:
      errors: {corruption: [error at severity 1..5]} as fractions.
      clean_error: The model's clean top-1 error (fraction).
      baseline: The baseline's table (AlexNet's by default).
      baseline_clean_error: The baseline's clean error (AlexNet's 0.43478 by
        default).
      corruptions: As in `corruption_errors`.

    Returns:
      {"relative_ce": {corruption: value}, "relative_mce": mean}.
    """
    if baseline is None:
        baseline = ALEXNET_IMAGENET_C_ERRORS
        corruptions = corruptions or IMAGENET_C_CORRUPTIONS
        if baseline_clean_error is None:
            baseline_clean_error = ALEXNET_CLEAN_ERROR
    if baseline_clean_error is None:
        raise ValueError("Expected baseline_clean_error with a custom "
                         "baseline. Received: baseline_clean_error=None")
    corruptions = tuple(corruptions or errors)
    _check_errors(errors, baseline, corruptions)
    rel = {}
    for name in corruptions:
        model_drop = np.sum(np.asarray(errors[name]) - clean_error)
        base_drop = np.sum(np.asarray(baseline[name]) - baseline_clean_error)
        rel[name] = 100.0 * float(model_drop / base_drop)
    return {"relative_ce": rel,
            "relative_mce": float(np.mean(list(rel.values())))}


def imagenet_c_config_name(corruption, severity):
    """The TFDS config of one corruption and severity, e.g. `fog_3`."""
    return f"{corruption}_{severity}"


def load_imagenet_c(data_dir, corruptions=IMAGENET_C_CORRUPTIONS,
                    severities=SEVERITIES, split="validation"):
    """Opens every ImageNet-C config from TFDS `imagenet2012_corrupted`.

    Uses `download=False`, so a missing config fails in well under a second
    instead of retrying a download.

    Args:
      data_dir: TFDS data dir (local or gs://) holding the prepared configs.
      corruptions: Corruption names.
      severities: Severities.
      split: TFDS split ("validation").

    Returns:
      {(corruption, severity): dataset of {"image", "label"}}.

    Raises:
      FileNotFoundError: naming the first corruption and severity missing.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    datasets = {}
    for name in corruptions:
        for severity in severities:
            config = imagenet_c_config_name(name, severity)
            try:
                ds = tfds.load(f"imagenet2012_corrupted/{config}",
                               split=split, data_dir=data_dir,
                               download=False, shuffle_files=False)
            except Exception as error:  # pylint: disable=broad-except
                raise FileNotFoundError(
                    f"Expected ImageNet-C corruption {name!r} severity "
                    f"{severity} (TFDS imagenet2012_corrupted/{config}) in "
                    f"data_dir={data_dir}. Received: "
                    f"{type(error).__name__}: {error}") from error
            datasets[(name, severity)] = ds
    return datasets


def _lookup_source(source, name, severity):
    """One (corruption, severity) data set from a source, or None."""
    if callable(source) and not isinstance(source, Mapping):
        return source(name, severity)
    if (name, severity) in source:
        return source[(name, severity)]
    inner = source.get(name)
    if isinstance(inner, Mapping):
        return inner.get(severity)
    return None


def resolve_corruption_source(source, corruptions, severities):
    """Checks a source holds every (corruption, severity) before any work.

    Args:
      source: A TFDS data_dir (str), a mapping {(name, severity): dataset}
        or {name: {severity: dataset}}, or a function (name, severity) ->
        dataset.
      corruptions: Corruption names needed.
      severities: Severities needed.

    Returns:
      {(name, severity): dataset}.

    Raises:
      ValueError: naming a corruption/severity missing from a mapping.
      FileNotFoundError: naming one missing from a data_dir.
    """
    if isinstance(source, str):
        return load_imagenet_c(source, corruptions, severities)
    resolved = {}
    for name in corruptions:
        for severity in severities:
            ds = _lookup_source(source, name, severity)
            if ds is None:
                raise ValueError(
                    f"Expected the corruption source to hold corruption "
                    f"{name!r} at severity {severity}. Received: no data set "
                    f"for ({name!r}, {severity})")
            resolved[(name, severity)] = ds
    return resolved


def evaluate_imagenet_c(model, source, *, corruptions=IMAGENET_C_CORRUPTIONS,
                        severities=SEVERITIES, clean_error=None,
                        batch_size=64, baseline=None,
                        baseline_clean_error=None, preprocess=None):
    """Top-1 error on every ImageNet-C corruption and severity; CE and mCE.

    Args:
      model: A model with ImageNet's 1000 classes (or the source's).
      source: See `resolve_corruption_source`; every (corruption, severity)
        is checked before any evaluation starts.
      corruptions: The corruptions to score (the 15 benchmark ones).
      severities: The severities (1..5).
      clean_error: The model's clean error, for the relative mCE.
      batch_size: Evaluation batch size.
      baseline: Per-severity baseline errors (AlexNet's by default).
      baseline_clean_error: The baseline's clean error.
      preprocess: Optional per-image function (default: the eval
        transform with `preprocess.WHOLE_IMAGE_RECIPE`: ImageNet-C images
        already are the benchmark's 224 x 224 centre crop, so they are
        resized whole to the model's side, never cropped again).

    Returns:
      {"errors": {name: [E_1..E_5]}, "ce", "mce"} plus "relative_ce" and
      "relative_mce" when clean_error is given. CE and mCE need all five
      severities and a baseline for every corruption (AlexNet's covers the
      15 benchmark ones); otherwise only "errors" is returned.
    """
    datasets = resolve_corruption_source(source, corruptions, severities)
    num_classes = model_io.num_classes(model)
    if preprocess is None:
        preprocess = default_preprocess(model,
                                        preprocess_lib.WHOLE_IMAGE_RECIPE)
    errors = {}
    for name in corruptions:
        errors[name] = []
        for severity in severities:
            logits, labels = predict_logits(
                model, datasets[(name, severity)], batch_size, preprocess)
            check_labels(labels, num_classes)
            errors[name].append(1.0 - top_k_accuracy(logits, labels, 1))
    results = {"errors": errors}
    full = tuple(severities) == SEVERITIES
    if full and (baseline is not None or
                 set(corruptions) <= set(ALEXNET_IMAGENET_C_ERRORS)):
        results.update(corruption_errors(errors, baseline, corruptions))
        if clean_error is not None:
            results["clean_error"] = float(clean_error)
            results.update(relative_corruption_errors(
                errors, clean_error, baseline, baseline_clean_error,
                corruptions))
    return results


# --------------------------------------------------------------------------
# ImageNet-A.


def imagenet_a_predictions(logits):
    """ImageNet-1k class predicted among ImageNet-A's 200 classes.

    Args:
      logits: [N, 1000] ImageNet logits.

    Returns:
      int64 [N] ImageNet-1k indices (always one of the 200).
    """
    logits = np.asarray(logits)
    if logits.shape[-1] != 1000:
        raise ValueError(
            "Expected ImageNet logits with 1000 classes for ImageNet-A. "
            f"Received: logits.shape={logits.shape}")
    indices = np.asarray(IMAGENET_A_CLASS_INDICES)
    return indices[logits[:, indices].argmax(axis=1)]


def imagenet_a_accuracy(logits, labels):
    """Top-1 accuracy on ImageNet-A (labels are ImageNet-1k indices)."""
    labels = np.asarray(labels, np.int64)
    return float(np.mean(imagenet_a_predictions(logits) == labels))


def load_imagenet_a(data_dir, split="test"):
    """TFDS `imagenet_a` (download=False; fails fast when absent).

    Raises:
      FileNotFoundError: if the data set is not prepared in data_dir.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
        return tfds.load("imagenet_a", split=split, data_dir=data_dir,
                         download=False, shuffle_files=False)
    except Exception as error:  # pylint: disable=broad-except
        raise FileNotFoundError(
            f"Expected TFDS imagenet_a in data_dir={data_dir}. Received: "
            f"{type(error).__name__}: {error}") from error


def evaluate_imagenet_a(model, source, *, batch_size=64, preprocess=None):
    """ImageNet-A top-1 accuracy over its 200-class subset.

    Args:
      model: A model with ImageNet's 1000 classes.
      source: A TFDS data_dir (str) or a labeled dataset (labels are
        ImageNet-1k indices, as in TFDS).
      batch_size: Evaluation batch size.
      preprocess: Per-image function; default: the model's eval transform
        (`default_preprocess`: at 224 px a 224/256 = 87.5% centre crop).

    Returns:
      {"top1", "error", "num_examples"}.
    """
    if model_io.num_classes(model) != 1000:
        raise ValueError(
            "Expected a model with ImageNet's 1000 classes for ImageNet-A. "
            f"Received: num_classes={model_io.num_classes(model)}")
    dataset = load_imagenet_a(source) if isinstance(source, str) else source
    logits, labels = predict_logits(model, dataset, batch_size, preprocess)
    check_labels(labels, 1000)
    top1 = imagenet_a_accuracy(logits, labels)
    return {"top1": top1, "error": 1.0 - top1,
            "num_examples": int(len(labels))}


# --------------------------------------------------------------------------
# ImageNet-P.


def flip_probability(predictions, noise=False, step=1):
    """Flip probability of top-1 predictions over perturbation sequences.

    Hendrycks & Dietterich (2019), ImageNet-P: for a sequence of frames
    x_1..x_T, FP = mean over sequences of the fraction of frame pairs whose
    top-1 predictions differ. For noise perturbations (frames are
    independent noise draws of one image) every frame is compared with the
    first; for the others (translate, rotate, zoom, blur ...) each frame is
    compared with the previous one. With `step` > 1 (the "difficulty"),
    frames `step` apart are compared, along each of the `step` interleaved
    sub-sequences.

    Args:
      predictions: int [num_sequences, frames] top-1 classes.
      noise: Compare with the first frame (noise perturbations).
      step: Frame spacing (1 by default).

    Returns:
      The flip probability, a float in [0, 1].
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[1] < step + 1:
        raise ValueError(
            f"Expected predictions [num_sequences, frames > {step}]. "
            f"Received: shape={predictions.shape}")
    per_sequence = []
    for sequence in predictions:
        flips = []
        for start in range(step):
            frames = sequence[start::step]
            if noise:
                flips.extend(frames[1:] != frames[0])
            else:
                flips.extend(frames[1:] != frames[:-1])
        per_sequence.append(np.mean(flips))
    return float(np.mean(per_sequence))


def evaluate_imagenet_p(model, sequences, *, batch_size=64, step=1,
                        baseline_flip_probabilities=None):
    """Flip probabilities on ImageNet-P style perturbation sequences.

    Args:
      model: A model.
      sequences: {perturbation name: array [num_seq, frames, H, W, C]}
        (uint8 or [0, 255] floats). Names in
        `IMAGENET_P_NOISE_PERTURBATIONS` are scored against the first frame.
      batch_size: Frames per model call.
      step: Frame spacing (see `flip_probability`).
      baseline_flip_probabilities: Optional {name: FP} of a baseline (e.g.
        AlexNet) for the flip rate FR = FP / FP_baseline and its mean (mFR).

    Returns:
      {"flip_probability": {name: FP}, "mean_flip_probability"}, plus
      "flip_rate" and "mfr" (percent) when a baseline is given.
    """
    fn = logits_function(model)
    size = model_io.image_size(model)
    fps = {}
    for name, array in sequences.items():
        array = np.asarray(array)
        if array.ndim != 5:
            raise ValueError(
                f"Expected sequences [num_seq, frames, H, W, C] for {name!r}. "
                f"Received: shape={array.shape}")
        num_seq, frames = array.shape[:2]
        flat = array.reshape((-1,) + array.shape[2:])
        preds = []
        for start in range(0, len(flat), batch_size):
            images = tf.cast(flat[start:start + batch_size], tf.float32)
            if size is not None and images.shape[1:3] != (size, size):
                images = tf.image.resize(images, (size, size))
            preds.append(np.asarray(fn(images)).argmax(axis=1))
        preds = np.concatenate(preds).reshape(num_seq, frames)
        fps[name] = flip_probability(
            preds, noise=name in IMAGENET_P_NOISE_PERTURBATIONS, step=step)
    results = {"flip_probability": fps,
               "mean_flip_probability": float(np.mean(list(fps.values())))}
    if baseline_flip_probabilities:
        missing = [n for n in fps if n not in baseline_flip_probabilities]
        if missing:
            raise ValueError(
                "Expected a baseline flip probability for every perturbation. "
                f"Received: missing={missing}")
        rates = {n: 100.0 * fps[n] / baseline_flip_probabilities[n]
                 for n in fps}
        results["flip_rate"] = rates
        results["mfr"] = float(np.mean(list(rates.values())))
    return results


# --------------------------------------------------------------------------
# On-the-fly corruptions.


def evaluate_corruptions(model, dataset, *,
                         corruptions=ns_corruptions.CORRUPTION_NAMES,
                         severities=SEVERITIES, seed=0, batch_size=64,
                         num_classes=None, clean_error=None,
                         baseline_errors=None, baseline_clean_error=None,
                         preprocess=None):
    """Error under our on-the-fly corruptions (a -C style score).

    Args:
      model: A model.
      dataset: Labeled, unbatched `tf.data.Dataset` (uint8 images).
      corruptions: Names from `noisy_student.corruptions.CORRUPTION_NAMES`.
      severities: Severities (1..5).
      seed: Base seed; element i gets the stateless seed (seed, i), so the
        result is reproducible.
      batch_size: Evaluation batch size.
      num_classes: The data set's class count; must equal the model's.
      clean_error: Optional clean error, for the relative CE.
      baseline_errors: Optional {name: [E_1..E_5]} of a baseline model (e.g.
        the teacher) for CE / mCE (percent) as in ImageNet-C.
      baseline_clean_error: The baseline's clean error, for relative mCE.
      preprocess: Per-image function applied after the corruption
        (default: the model's eval transform; `as_model_pixels` when the
        images already are the model's pixels).

    Returns:
      {"errors": {name: [E_s]}, "mean_error": {name: mean_s E_s},
      "mean_corruption_error": mean over corruptions} and, with a baseline,
      "ce", "mce" (and "relative_ce", "relative_mce").
    """
    model_classes = model_io.check_num_classes(model, num_classes)
    for name in corruptions:
        ns_corruptions.get_corruption(name)
    errors = {}
    for name in corruptions:
        errors[name] = []
        for severity in severities:
            corrupted = ns_corruptions.corrupt_dataset(dataset, name,
                                                       severity, seed)
            logits, labels = predict_logits(model, corrupted, batch_size,
                                            preprocess)
            check_labels(labels, model_classes)
            errors[name].append(1.0 - top_k_accuracy(logits, labels, 1))
    mean_error = {name: float(np.mean(e)) for name, e in errors.items()}
    results = {
        "severities": list(severities),
        "errors": errors,
        "mean_error": mean_error,
        "mean_corruption_error": float(np.mean(list(mean_error.values()))),
    }
    if clean_error is not None:
        results["clean_error"] = float(clean_error)
    if baseline_errors is not None:
        results.update(corruption_errors(errors, baseline_errors,
                                         corruptions))
        if clean_error is not None and baseline_clean_error is not None:
            results.update(relative_corruption_errors(
                errors, clean_error, baseline_errors, baseline_clean_error,
                corruptions))
    return results


# --------------------------------------------------------------------------
# One call for the ns-eval command.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `run_evaluation` computes and where it writes.

    Attributes:
      model_path: model.keras, a model_dir holding it, or a SavedModel.
      output_dir: Where results.json and confusion_matrix.png go ('' = none).
      batch_size: Evaluation batch size.
      num_classes: The data set's class count (checked against the model).
      top_k: k of the top-k accuracy (paper: 5).
      ece_bins: Equal-width ECE bins (15).
      corruptions: On-the-fly corruptions to score ('()' = skip).
      severities: Their severities.
      corruption_seed: Base seed of the corruption noise.
      epsilons: Adversarial epsilons in pixels of [0, 255] ('()' = skip).
      attack: "fgsm" or "pgd".
      pgd_steps: PGD iterations.
      imagenet_c_dir: TFDS data_dir with imagenet2012_corrupted ('' = skip).
      imagenet_a_dir: TFDS data_dir with imagenet_a ('' = skip).
      class_names: Class names in label order, for results.json and the
        confusion-matrix PNG ('()' = ids only).
    """
    model_path: str = ""
    output_dir: str = ""
    batch_size: int = 64
    num_classes: int | None = None
    top_k: int = 5
    ece_bins: int = ECE_BINS
    corruptions: tuple = ()
    severities: tuple = SEVERITIES
    corruption_seed: int = 0
    epsilons: tuple = ()
    attack: str = "fgsm"
    pgd_steps: int = 10
    imagenet_c_dir: str = ""
    imagenet_a_dir: str = ""
    class_names: tuple = ()

    def __post_init__(self):
        # Checked when built: the pipeline builds every round's config
        # before any work.
        def fail(expected, name):
            raise ValueError(f"Expected {expected}. Received: "
                             f"{name}={getattr(self, name)!r}")

        for name in ("batch_size", "top_k", "ece_bins", "pgd_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                fail(f"an integer {name} >= 1", name)
        if self.num_classes is not None and not (
                isinstance(self.num_classes, (int, np.integer))
                and self.num_classes >= 2):
            fail("None or num_classes >= 2", "num_classes")
        if self.attack not in ("fgsm", "pgd"):
            fail("attack in ['fgsm', 'pgd']", "attack")
        unknown = [c for c in self.corruptions
                   if c not in ns_corruptions.CORRUPTION_NAMES]
        if unknown:
            raise ValueError(
                f"Expected corruptions among "
                f"{list(ns_corruptions.CORRUPTION_NAMES)}. Received: "
                f"{unknown}")
        if any(s not in SEVERITIES for s in self.severities):
            fail(f"severities in {SEVERITIES}", "severities")
        if any(not e >= 0 for e in self.epsilons):
            fail("epsilons >= 0 (pixels of [0, 255])", "epsilons")
        if self.class_names and self.num_classes is not None and len(
                self.class_names) != self.num_classes:
            fail(f"{self.num_classes} class_names", "class_names")


def run_evaluation(config, dataset=None, model=None, recipe=None):
    """Runs every evaluation the config asks for and writes results.json.

    The images go through the model's eval transform
    (`noisy_student.data.preprocess.eval_image`, the one the SavedModel
    applies) once; corruptions and attacks work on its output.

    Args:
      config: An `EvalConfig`.
      dataset: Labeled clean data set of user images of any size (None:
        skip clean, corruption and adversarial evaluation).
      model: An already loaded model; by default
        `model_io.load_model(model_path)`.
      recipe: The model's `preprocess.Recipe`; by default the one recorded
        with config.model_path.

    Returns:
      The results dict (also written to output_dir/results.json, with the
      per-image probabilities in output_dir/predictions.npz).
    """
    from noisy_student import adversarial  # pylint: disable=g-import-not-at-top
    if model is None:
        model = model_io.load_model(config.model_path)
    model_io.check_num_classes(model, config.num_classes)
    out = config.output_dir.rstrip("/") if config.output_dir else ""
    results = {"model_path": config.model_path,
               "config": dataclasses.asdict(config)}
    if config.class_names:
        results["class_names"] = list(config.class_names)
    clean_error = None
    if dataset is not None:
        if recipe is None and config.model_path:
            recipe = preprocess_lib.read_recipe(config.model_path)
        dataset = model_pixels(dataset, model, recipe)
        results["clean"] = evaluate_clean(
            model, dataset, num_classes=config.num_classes,
            batch_size=config.batch_size, top_k=config.top_k,
            ece_bins=config.ece_bins,
            confusion_png=f"{out}/confusion_matrix.png" if out else None,
            class_names=list(config.class_names) or None,
            preprocess=as_model_pixels,
            predictions_path=f"{out}/predictions.npz" if out else None)
        clean_error = results["clean"]["error"]
        if out:
            try:
                png = mistakes_png(dataset,
                                   results["clean"]["most_confident_mistakes"],
                                   list(config.class_names) or None)
                if png is not None:
                    io_utils.atomic_write(f"{out}/mistakes.png", png)
            except Exception as e:  # pylint: disable=broad-except
                # A picture is not worth failing an evaluation for.
                logging.warning("mistakes.png not written: %s", e)
        if results["clean"]["num_classes"] > MAX_JSON_CONFUSION_CLASSES:
            # 1000 x 1000 counts would make a multi-megabyte JSON; the PNG
            # still shows the matrix.
            del results["clean"]["confusion_matrix"]
        if config.corruptions:
            results["corruptions"] = evaluate_corruptions(
                model, dataset, corruptions=config.corruptions,
                severities=config.severities, seed=config.corruption_seed,
                batch_size=config.batch_size, clean_error=clean_error,
                preprocess=as_model_pixels)
        if config.epsilons:
            results["adversarial"] = adversarial.adversarial_accuracy(
                model, dataset, config.epsilons, attack=config.attack,
                steps=config.pgd_steps, batch_size=config.batch_size,
                preprocess=as_model_pixels)
    if config.imagenet_c_dir:
        results["imagenet_c"] = evaluate_imagenet_c(
            model, config.imagenet_c_dir, clean_error=clean_error,
            batch_size=config.batch_size)
    if config.imagenet_a_dir:
        results["imagenet_a"] = evaluate_imagenet_a(
            model, config.imagenet_a_dir, batch_size=config.batch_size)
    if out:
        io_utils.write_json(f"{out}/results.json", _jsonable(results))
    return results


def _jsonable(value):
    """Plain Python types (and None for NaN) so json.dumps writes valid JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    return value
