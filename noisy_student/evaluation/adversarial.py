"""White-box adversarial robustness: FGSM and PGD accuracy.

The Noisy Student paper (Sec. 4, Fig. 7) reports accuracy under FGSM at
several epsilons on the model that takes raw pixels; here the attacks work on
the model as saved (float pixels in [0, 255], normalised inside), with
`training=False` (EMA weights, batch-norm moving statistics, no dropout or
stochastic depth).

Units: epsilon is in pixel units of the [0, 255] scale (epsilon = 16 means
each pixel may move by 16 grey levels, 16/255 ~ 0.063 of the range, the
paper's largest setting). To use a fraction f of the range, pass f * 255.
Adversarial images are clipped to [0, 255] and are not rounded to integers.

- FGSM (Goodfellow et al., 2015): x' = clip(x + eps * sign(grad_x L)), with L
  the cross-entropy of the true label.
- PGD-k (Madry et al., 2018), L-infinity: a uniform random start in the
  eps-ball, then k steps x <- proj(x + alpha * sign(grad_x L)), projected on
  the eps-ball around x and on [0, 255]; alpha = 2.5 * eps / k by default.
"""

import weakref

import numpy as np
import tensorflow as tf

from noisy_student.evaluation import inference
from noisy_student.evaluation import metrics
from noisy_student.model import loading

ATTACKS = ("fgsm", "pgd")


def _loss_gradient(model, images, labels):
    """Gradient of the summed cross-entropy with respect to the pixels."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = tf.cast(model(images, training=False), tf.float32)
        loss = tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    return tape.gradient(loss, images)


_GRADIENTS = weakref.WeakKeyDictionary()


def _gradient_function(model):
    """`_loss_gradient` compiled once per model.

    The signature leaves the batch size free so the last, smaller batch
    reuses the trace; no jit_compile (XLA is slower on CPU).
    """
    try:
        return _GRADIENTS[model]
    except (KeyError, TypeError):
        pass
    ref = weakref.ref(model)  # The cache must not keep the model alive.
    fn = tf.function(
        lambda x, y: _loss_gradient(ref(), x, y),
        input_signature=[inference.input_spec(model),
                         tf.TensorSpec([None], tf.int32)])
    try:
        _GRADIENTS[model] = fn
    except TypeError:  # Not weak-referenceable: compile per call.
        pass
    return fn


def _check_epsilon(epsilon):
    if not epsilon >= 0:
        raise ValueError(
            f"Expected epsilon >= 0 (pixels of [0, 255]). Received: "
            f"epsilon={epsilon!r}")


def fgsm(model, images, labels, epsilon):
    """Fast gradient sign method.

    Args:
      model: Called as model(images, training=False) -> logits.
      images: float [B, H, W, C] in [0, 255].
      labels: int [B].
      epsilon: Step in pixels of the [0, 255] scale.

    Returns:
      float32 adversarial images in [0, 255].
    """
    _check_epsilon(epsilon)
    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    grad = _loss_gradient(model, images, labels)
    return tf.clip_by_value(images + epsilon * tf.sign(grad), 0.0, 255.0)


def pgd(model, images, labels, epsilon, steps=10, step_size=None,
        random_start=True, seed=0):
    """Projected gradient descent (L-infinity), Madry et al. (2018).

    Args:
      model: Called as model(images, training=False) -> logits.
      images: float [B, H, W, C] in [0, 255].
      labels: int [B].
      epsilon: Radius of the ball in pixels of the [0, 255] scale.
      steps: Number of gradient steps k.
      step_size: Pixels per step; default 2.5 * epsilon / steps.
      random_start: Start at a uniform random point of the ball.
      seed: Seed of the random start (stateless; pass different seeds for
        different batches).

    Returns:
      float32 adversarial images in [0, 255].
    """
    _check_epsilon(epsilon)
    if steps < 1:
        raise ValueError(f"Expected steps >= 1. Received: steps={steps}")
    return _pgd(lambda x, y: _loss_gradient(model, x, y), images, labels,
                epsilon, steps, step_size, random_start, seed)


def _pgd(grad_fn, images, labels, epsilon, steps, step_size, random_start,
         seed):
    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    alpha = 2.5 * epsilon / steps if step_size is None else step_size
    adv = images
    if random_start and epsilon > 0:
        noise = tf.random.stateless_uniform(
            tf.shape(images), tf.constant([seed, 0], tf.int64), -epsilon,
            epsilon)
        adv = tf.clip_by_value(images + noise, 0.0, 255.0)
    for _ in range(steps):
        grad = grad_fn(adv, labels)
        adv = adv + alpha * tf.sign(grad)
        adv = tf.clip_by_value(adv, images - epsilon, images + epsilon)
        adv = tf.clip_by_value(adv, 0.0, 255.0)
    return adv


def adversarial_accuracy(model, dataset, epsilons, *, attack="fgsm",
                         steps=10, step_size=None, batch_size=64,
                         num_classes=None, seed=0, preprocess=None):
    """Top-1 accuracy under attack at each epsilon.

    Args:
      model: A model (see `noisy_student.evaluation.inference`).
      dataset: Labeled `tf.data.Dataset` of {"image", "label"}.
      epsilons: Epsilons in pixels of the [0, 255] scale.
      attack: "fgsm" or "pgd".
      steps: PGD steps.
      step_size: PGD step (default 2.5 * eps / steps).
      batch_size: Batch size.
      num_classes: The data set's class count (checked against the model).
      seed: Seed of PGD's random start.
      preprocess: Per-image function to the model's pixels (default: the
        model's eval transform); the attack works on its output.

    Returns:
      {"attack", "epsilon_units", "steps" (PGD), "num_examples",
      "accuracy": {str(epsilon): accuracy}}. At epsilon 0, FGSM leaves the
      images unchanged, so its accuracy is the clean accuracy.

    Raises:
      ValueError: for an unknown attack, a negative epsilon, a class-count
        mismatch or labels outside the model's classes.
    """
    if attack not in ATTACKS:
        raise ValueError(f"Expected attack in {ATTACKS}. Received: "
                         f"attack={attack!r}")
    if attack == "pgd" and steps < 1:
        raise ValueError(f"Expected steps >= 1. Received: steps={steps}")
    epsilons = [float(e) for e in epsilons]
    for epsilon in epsilons:
        _check_epsilon(epsilon)
    model_classes = loading.check_num_classes(model, num_classes)
    if preprocess is None:
        preprocess = inference.default_preprocess(model)
    grad_fn = _gradient_function(model)
    logits_fn = inference.logits_function(model)
    correct = np.zeros(len(epsilons))
    total = 0
    for index, batch in enumerate(
            inference.eval_batches(dataset, batch_size, preprocess)):
        images, labels = batch["image"], batch["label"]
        metrics.check_labels(labels.numpy(), model_classes)
        if attack == "fgsm":
            # One gradient serves every epsilon.
            grad_sign = tf.sign(grad_fn(images, labels))
        for i, epsilon in enumerate(epsilons):
            if attack == "fgsm":
                adv = tf.clip_by_value(images + epsilon * grad_sign, 0.0,
                                       255.0)
            else:
                adv = _pgd(grad_fn, images, labels, epsilon, steps,
                           step_size, True, seed * 1_000_003 + index)
            logits = logits_fn(adv)
            predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
            correct[i] += int(tf.reduce_sum(
                tf.cast(predictions == labels, tf.int32)))
        total += int(labels.shape[0])
    results = {
        "attack": attack,
        "epsilon_units": "pixels of the [0, 255] scale",
        "num_examples": total,
        "accuracy": {str(e): float(c / total)
                     for e, c in zip(epsilons, correct)},
    }
    if attack == "pgd":
        results["steps"] = int(steps)
    return results
