"""ImageNet-P (Hendrycks & Dietterich, ICLR 2019): flip probability.

For sequences of perturbed frames, how often the top-1 prediction changes
between frames; the paper reports the mean flip rate (mFR), the flip
probability relative to AlexNet's.
"""

import numpy as np
import tensorflow as tf

from noisy_student.evaluation import inference
from noisy_student.model import loading

# ImageNet-P perturbations whose frames are independent noise draws: each
# frame is compared with the first, not with the previous one.
IMAGENET_P_NOISE_PERTURBATIONS = ("gaussian_noise", "shot_noise",
                                  "speckle_noise")



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
    fn = inference.logits_function(model)
    size = loading.image_size(model)
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

