"""Clean evaluation: accuracy, calibration, predictions and figures.

`evaluate_clean` runs the model once over a labeled data set and returns
`metrics.classification_metrics` plus the most confident mistakes; it can
write the per-image probabilities (predictions.npz), the row-normalised
confusion matrix (PNG) and, with `mistakes_png`, a contact sheet of the
mistakes. Figures are drawn through `noisy_student.utils.reports`.
"""

import io

import numpy as np
import tensorflow as tf

from noisy_student.evaluation import inference
from noisy_student.evaluation import metrics
from noisy_student.model import loading
from noisy_student.utils import contact_sheet
from noisy_student.utils import reports
from noisy_student.utils import storage


def confusion_matrix_png(matrix, class_names=None, title=None):
    """A row-normalised confusion matrix drawn as a PNG.

    Args:
      matrix: Counts [K, K] (row = true class).
      class_names: Optional K names for the axes (shown when K <= 40 and
        an installed font draws them; ids otherwise, with a note naming
        results.json). Counts are printed in the cells when K <= 20.
      title: Optional title.

    Returns:
      PNG bytes (100 dpi, at most 12 x 12 inches).
    """
    matrix = np.asarray(matrix, np.float64)
    num_classes = matrix.shape[0]
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 3.0 + 0.3 * num_classes)
    fig = reports.new_figure(side, side)
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if num_classes <= 40:
        label = reports.class_labels(class_names, "results.json")
        names = [label(c) for c in range(num_classes)]
        ax.set_xticks(range(num_classes), names, rotation=90, **label.font)
        ax.set_yticks(range(num_classes), names, **label.font)
        reports.add_note(fig, label.note)
        if num_classes <= 20:
            for (i, j), count in np.ndenumerate(matrix):
                if count:
                    ax.text(j, i, int(count), ha="center", va="center",
                            fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (row-normalised)")
    return reports.figure_png(fig, dpi=100)


def evaluate_clean(model, dataset, *, num_classes=None, batch_size=64,
                   top_k=5, ece_bins=metrics.ECE_BINS, confusion_png=None,
                   class_names=None, preprocess=None, predictions_path=None,
                   paths=None):
    """Clean accuracy, calibration and confusion matrix on a data set.

    Args:
      model: A model (see `noisy_student.evaluation.inference`).
      dataset: Labeled `tf.data.Dataset`.
      num_classes: The data set's class count; must equal the model's.
      batch_size: Evaluation batch size.
      top_k: The k of the top-k accuracy (5 as in the paper).
      ece_bins: Bins of the expected calibration error (15).
      confusion_png: Optional path of the confusion-matrix PNG.
      class_names: Optional class names for the PNG.
      preprocess: Optional per-image function (see
        `inference.predict_logits`).
      predictions_path: Optional .npz path for the per-image results, in
        data set order: `probabilities` float32 [N, K] (softmax),
        `labels` int64 [N], `predictions` int64 [N], and with `paths`
        `paths` str [N].
      paths: Optional file path of every image, in data set order: saved
        with the predictions and named in the mistakes.

    Returns:
      The dict of `metrics.classification_metrics`, plus
      "most_confident_mistakes" (see `metrics.most_confident_mistakes`;
      each with its "path" when `paths` is given).

    Raises:
      ValueError: if num_classes differs from the model's class count, a
        label is outside the model's classes, or `paths` is not one per
        image.
    """
    model_classes = loading.check_num_classes(model, num_classes)
    logits, labels = inference.predict_logits(model, dataset, batch_size,
                                              preprocess)
    results = metrics.classification_metrics(logits, labels, model_classes,
                                             top_k, ece_bins)
    mistakes = metrics.most_confident_mistakes(logits, labels)
    if paths is not None:
        if len(paths) != len(labels):
            raise ValueError(f"Expected a path per image ({len(labels)}). "
                             f"Received: {len(paths)} paths")
        for mistake in mistakes:
            mistake["path"] = paths[mistake["index"]]
    results["most_confident_mistakes"] = mistakes
    if predictions_path:
        buffer = io.BytesIO()
        probabilities = np.asarray(tf.nn.softmax(logits, axis=-1))
        extra = {} if paths is None else {"paths": np.asarray(paths, str)}
        np.savez(buffer, probabilities=probabilities, labels=labels,
                 predictions=logits.argmax(axis=1), **extra)
        storage.atomic_write(predictions_path, buffer.getvalue())
    if confusion_png:
        storage.atomic_write(confusion_png, confusion_matrix_png(
            results["confusion_matrix"], class_names))
    return results


def mistakes_png(dataset, mistakes, class_names=None, per_row=8):
    """A contact sheet of the given mistakes, drawn from `dataset`.

    Args:
      dataset: The evaluated data set ({"image": uint8 [S, S, C], ...}, the
        model's pixels), in the order the indices refer to.
      mistakes: The list of `metrics.most_confident_mistakes`.
      class_names: Names in label order, or None (ids are shown; also when
        no installed font draws the names, with a note).
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
    name = reports.class_labels(class_names, "results.json")
    cells = [(images[m["index"]],
              f"true {name(m['label'])}\npred {name(m['predicted'])} "
              f"{m['confidence']:.2f}") for m in mistakes]
    rows = []
    for start in range(0, len(cells), per_row):
        row = cells[start:start + per_row]
        rows.append((f"#{start + 1}-{start + len(row)}", row))
    return contact_sheet.contact_sheet_png(
        rows, title="most confident mistakes (true class, predicted class, "
        "confidence)", labels=name)

