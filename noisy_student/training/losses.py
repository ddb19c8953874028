"""Losses of the Noisy Student training step.

The student's loss (paper Sec. 2, step 3; google-research/noisystudent main.py) is

    (labeled_CE * n_lab + unlabeled_CE * n_unl) / n_lab
      = mean labeled CE + unlabel_ratio * mean unlabeled CE,

i.e. the sum of every per-example cross-entropy in the global batch divided by
the number of *labeled* images in the global batch. Label smoothing applies
to the labeled part only; the unlabeled targets are already probability
vectors (soft) or one-hot (hard). A teacher's loss is the labeled term alone.

`labeled_loss_weight` w (not in the paper; 1 is the paper's loss) scales the
labeled sum only: (w * labeled_CE_sum + unlabeled_CE_sum) / n_lab, so the
pseudo-labeled term keeps its scale. w = 0 trains on the pseudo-labels alone
(the labeled images are still forwarded, so batch norm and the compute stay
the same): the ablation of the paper's argument that a student which only
sees its teacher's pseudo-labels needs noise to learn anything new.

Every per-replica sum here is divided by the *global* labeled batch size, so
that adding the replicas' losses (what tf.distribute does to gradients) gives
the loss of the global batch.
"""

import keras
import tensorflow as tf

from noisy_student.model import layers


def smoothed_cross_entropy(labels, logits, label_smoothing=0.0):
    """Per-example cross-entropy against smoothed one-hot labels.

    The target is `one_hot * (1 - s) + s / num_classes`, as
    tf.compat.v1.losses.softmax_cross_entropy(label_smoothing=s) does.

    Args:
      labels: int [B] class indices.
      logits: float [B, C] logits.
      label_smoothing: s in [0, 1].

    Returns:
      float32 [B] cross-entropies.
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    targets = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    if label_smoothing:
        targets = (targets * (1.0 - label_smoothing)
                   + label_smoothing / tf.cast(num_classes, tf.float32))
    return tf.nn.softmax_cross_entropy_with_logits(labels=targets,
                                                   logits=logits)


def soft_cross_entropy(targets, logits):
    """Per-example cross-entropy -sum_c target_c * log softmax(logits)_c.

    Args:
      targets: float [B, C] probability vectors (soft) or one-hot (hard)
        pseudo-labels. No gradient flows into them.
      logits: float [B, C] logits.

    Returns:
      float32 [B] cross-entropies.
    """
    targets = tf.stop_gradient(tf.cast(targets, tf.float32))
    return tf.nn.softmax_cross_entropy_with_logits(
        labels=targets, logits=tf.cast(logits, tf.float32))


def noisy_student_loss(labels, labeled_logits, global_labeled_batch,
                       targets=None, unlabeled_logits=None,
                       label_smoothing=0.0, labeled_loss_weight=1.0):
    """This replica's share of the global-batch Noisy Student loss.

    Args:
      labels: int [b] labels of this replica's labeled images.
      labeled_logits: [b, C] logits of those images.
      global_labeled_batch: Labeled images in the global batch (all replicas).
      targets: float [u, C] pseudo-label targets of this replica's unlabeled
        images, or None for a teacher.
      unlabeled_logits: [u, C] logits of those images, or None.
      label_smoothing: Smoothing of the labeled targets.
      labeled_loss_weight: w >= 0 multiplying the labeled sum (1: the
        paper's loss; 0: pseudo-labels only, for a student).

    Returns:
      (loss, labeled_ce, unlabeled_ce): the scalar loss of this replica's share
      (summed over replicas it is the global loss), and the per-example
      labeled and unlabeled cross-entropies ([b] and [u]; [0] for a teacher),
      unweighted.
    """
    labeled_ce = smoothed_cross_entropy(labels, labeled_logits,
                                        label_smoothing)
    total = tf.reduce_sum(labeled_ce)
    if labeled_loss_weight != 1.0:
        # Multiplying by 0 also zeroes the labels' gradient.
        total *= float(labeled_loss_weight)
    if targets is not None:
        unlabeled_ce = soft_cross_entropy(targets, unlabeled_logits)
        total += tf.reduce_sum(unlabeled_ce)
    else:
        unlabeled_ce = tf.zeros([0], tf.float32)
    return total / float(global_labeled_batch), labeled_ce, unlabeled_ce


def batch_norm_variables(model):
    """All variables (gamma, beta, moving statistics) of BN layers."""
    result = []
    for layer in layers.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            result.extend(layer.weights)
    return result


def weight_decay_variables(model):
    """The trainable variables that get L2 weight decay: all but BN's.

    Like the official EfficientNet code, which decays every trainable
    variable whose name lacks `batch_normalization` (kernels and biases,
    not BN's gamma and beta).
    """
    excluded = {id(v) for v in batch_norm_variables(model)}
    return [v for v in model.trainable_variables if id(v) not in excluded]


def l2_weight_decay(variables, weight_decay):
    """`weight_decay * sum(||v||^2) / 2` over `variables` (tf.nn.l2_loss).

    Args:
      variables: The decayed variables (batch norm's excluded by the
        caller, as in the official code).
      weight_decay: The coefficient (official code: 1e-5); 0 or None
        gives 0.

    Returns:
      A float32 scalar.
    """
    if not weight_decay or not variables:
        return tf.constant(0.0, tf.float32)
    return weight_decay * tf.add_n(
        [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables])
