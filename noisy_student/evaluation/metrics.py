"""Classification metrics on numpy arrays (no model, no TensorFlow).

- top-k accuracy with ties counted in the label's favour, as
  `tf.math.in_top_k`;
- the confusion matrix (row = true class) and per-class accuracy;
- the expected calibration error (ECE) of Guo et al. (ICML 2017): the
  softmax confidence (top probability) is binned into ECE_BINS = 15
  equal-width bins (i/15, (i+1)/15] (their paper's setting), and
  ECE = sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|, a fraction
  in [0, 1];
- the most confident mistakes, for results.json and mistakes.png.
"""

import numpy as np

ECE_BINS = 15
# Most confident mistakes listed in results.json and drawn in mistakes.png.
NUM_MISTAKES_SHOWN = 16


def check_labels(labels, num_classes, what="model"):
    """Checks that every label is a class of the model.

    Args:
      labels: int numpy array [N] (any integer dtype).
      num_classes: The model's class count K.
      what: What has K classes, for the message ("model", "teacher").

    Raises:
      ValueError: if a label is outside [0, K), naming the range found.
    """
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Expected labels in [0, {num_classes}) for a {what} with "
            f"{num_classes} classes. Received: labels in "
            f"[{labels.min()}, {labels.max()}]")


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
    """The confusion matrix of integer predictions.

    Args:
      labels: int [N] true classes in [0, K).
      predictions: int [N] predicted classes in [0, K).
      num_classes: K.

    Returns:
      int64 counts [K, K]: row = true class, column = predicted class.
    """
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64),
                       np.asarray(predictions, np.int64)), 1)
    return matrix


def per_class_accuracy(labels, predictions, num_classes):
    """Accuracy of each true class.

    Args:
      labels: As in `confusion_matrix`.
      predictions: As in `confusion_matrix`.
      num_classes: K.

    Returns:
      A list of K floats in [0, 1], None for a class absent from `labels`.
    """
    matrix = confusion_matrix(labels, predictions, num_classes)
    totals = matrix.sum(axis=1)
    return [float(matrix[c, c] / totals[c]) if totals[c] else None
            for c in range(num_classes)]


def calibration_bins(probabilities, labels, num_bins=ECE_BINS):
    """Per-bin (count, accuracy, mean confidence) of the top probability.

    Bin b covers confidences in (b / num_bins, (b + 1) / num_bins]; empty
    bins have accuracy and confidence 0.

    Args:
      probabilities: float [N, K] softmax outputs.
      labels: int [N] true classes.
      num_bins: Number of equal-width bins over (0, 1] (default 15, Guo et
        al. 2017).

    Returns:
      (counts int64 [num_bins], accuracy float64 [num_bins], mean
      confidence float64 [num_bins]).
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



def classification_metrics(logits, labels, num_classes=None, top_k=5,
                           ece_bins=ECE_BINS):
    """Clean metrics from logits and labels (numpy).

    Args:
      logits: float [N, K].
      labels: int [N] true classes.
      num_classes: K (default: the logits' last axis); must equal it.
      top_k: The k of the top-k accuracy (5, as the paper reports).
      ece_bins: Bins of the expected calibration error (15).

    Returns:
      A JSON-ready dict: num_examples, num_classes, top1, top{k}, error
      (1 - top1), ece, ece_bins, per_class_accuracy, confusion_matrix (all
      accuracies and errors as fractions in [0, 1]).

    Raises:
      ValueError: if the logits do not have K classes or a label is outside
        [0, K).
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

