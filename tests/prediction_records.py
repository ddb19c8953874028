"""Prediction folders made in tests, as the predict stage writes them."""

import numpy as np
import tensorflow as tf

from noisy_student.pseudo_labels import records
from noisy_student.utils import storage


def image_of(index):
    """A tiny image that encodes its index (to check the reader)."""
    return np.array([[[index % 256], [index // 256]]], np.uint8)  # [1, 2, 1]


def write_predictions(pred_dir, probs, records_per_file=64):
    """Writes a prediction folder for given probabilities, as predict does."""
    probs = np.asarray(probs, np.float32)
    labels = probs.argmax(axis=1)
    confidences = probs.max(axis=1)
    num = len(probs)
    for block in range(-(-num // records_per_file)):
        rows = np.arange(block * records_per_file,
                         min(num, (block + 1) * records_per_file))
        writer = records.BlockWriter(pred_dir, block, probs.shape[1],
                                records.DEFAULT_NUM_BINS)
        pngs = [tf.io.encode_png(image_of(i)).numpy() for i in rows]
        writer.write_batch(pngs, probs[rows], labels[rows], confidences[rows],
                           rows)
        writer.close()
    storage.write_json(storage.join(pred_dir, records.PREDICT_CONFIG), {
        "num_classes": probs.shape[1], "records_per_file": records_per_file,
        "num_bins": records.DEFAULT_NUM_BINS, "channels": 1})
    storage.write_json(storage.join(pred_dir, records.done_name(0, 1)),
                        {"num_images": num})
    return labels, confidences


def probs_for(labels, confidences, num_classes):
    """Probability vectors with the given argmax and top probability."""
    confidences = np.asarray(confidences, np.float32)
    probs = np.repeat(((1 - confidences) / (num_classes - 1))[:, None],
                      num_classes, axis=1)
    probs[np.arange(len(labels)), labels] = confidences
    return probs
