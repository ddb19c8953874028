"""Tests for noisy_student.training.losses: smoothing, soft targets, weighting, decay."""

import numpy as np
import pytest
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.training import losses


def _log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_label_smoothing_matches_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32")
    labels = np.array([0, 1, 2, 3, 4, 0])
    s = 0.1
    targets = np.eye(5)[labels] * (1 - s) + s / 5
    expected = -(targets * _log_softmax(logits)).sum(-1)
    got = losses.smoothed_cross_entropy(labels, logits, s).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # No smoothing is plain sparse cross-entropy, and smoothing changes it.
    plain = losses.smoothed_cross_entropy(labels, logits, 0.0).numpy()
    np.testing.assert_allclose(
        plain, -_log_softmax(logits)[np.arange(6), labels], rtol=1e-5)
    assert not np.allclose(plain, got)


def test_soft_target_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3)).astype("float32")
    targets = rng.dirichlet(np.ones(3), size=4).astype("float32")
    expected = -(targets * _log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(
        losses.soft_cross_entropy(targets, logits).numpy(), expected,
        rtol=1e-5)
    # Hard (one-hot) targets give the sparse cross-entropy.
    labels = np.array([2, 0, 1, 1])
    np.testing.assert_allclose(
        losses.soft_cross_entropy(np.eye(3)[labels], logits).numpy(),
        losses.smoothed_cross_entropy(labels, logits).numpy(), rtol=1e-6)
    # Targets are constants: no gradient flows into the teacher's labels.
    targets_var = tf.Variable(targets)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(losses.soft_cross_entropy(targets_var, logits))
    assert tape.gradient(loss, targets_var) is None


def test_loss_weighting_is_sum_over_labeled_count():
    rng = np.random.default_rng(2)
    n_lab, ratio, classes = 4, 3, 5
    lab_logits = rng.normal(size=(n_lab, classes)).astype("float32")
    unl_logits = rng.normal(size=(n_lab * ratio, classes)).astype("float32")
    labels = rng.integers(0, classes, n_lab)
    targets = rng.dirichlet(np.ones(classes), n_lab * ratio).astype("float32")
    loss, lab_ce, unl_ce = losses.noisy_student_loss(
        labels, lab_logits, n_lab, targets=targets,
        unlabeled_logits=unl_logits, label_smoothing=0.1)
    lab_mean = float(np.mean(lab_ce))
    unl_mean = float(np.mean(unl_ce))
    n_unl = n_lab * ratio
    # The official loss: (labeled_CE * n_lab + unlabeled_CE * n_unl) / n_lab.
    assert float(loss) == pytest.approx(
        (lab_mean * n_lab + unl_mean * n_unl) / n_lab, rel=1e-5)
    assert float(loss) == pytest.approx(lab_mean + ratio * unl_mean, rel=1e-5)
    # Split over two "replicas", each dividing by the global labeled batch,
    # the shares add up to the global loss.
    shares = [
        losses.noisy_student_loss(
            labels[i * 2:(i + 1) * 2], lab_logits[i * 2:(i + 1) * 2], n_lab,
            targets=targets[i * 6:(i + 1) * 6],
            unlabeled_logits=unl_logits[i * 6:(i + 1) * 6],
            label_smoothing=0.1)[0] for i in range(2)]
    assert float(shares[0] + shares[1]) == pytest.approx(float(loss), rel=1e-5)
    # A teacher's loss is the labeled mean alone.
    teacher_loss, _, unl = losses.noisy_student_loss(labels, lab_logits, n_lab,
                                                     label_smoothing=0.1)
    assert float(teacher_loss) == pytest.approx(lab_mean, rel=1e-5)
    assert unl.shape == (0,)


def _student_batch(seed=3, n_lab=4, ratio=2, classes=5):
    rng = np.random.default_rng(seed)
    return dict(
        labels=rng.integers(0, classes, n_lab),
        labeled_logits=rng.normal(size=(n_lab, classes)).astype("float32"),
        global_labeled_batch=n_lab,
        targets=rng.dirichlet(np.ones(classes), n_lab * ratio).astype(
            "float32"),
        unlabeled_logits=rng.normal(size=(n_lab * ratio, classes)).astype(
            "float32"),
        label_smoothing=0.1)


def test_labeled_loss_weight_scales_only_the_labeled_term():
    batch = _student_batch()
    default, lab_ce, unl_ce = losses.noisy_student_loss(**batch)
    n_lab = batch["global_labeled_batch"]
    lab_sum, unl_sum = float(np.sum(lab_ce)), float(np.sum(unl_ce))
    # Weight 1 is today's loss.
    one = losses.noisy_student_loss(**batch, labeled_loss_weight=1.0)[0]
    assert float(one) == pytest.approx(float(default), rel=1e-6)
    # Any weight: (w * labeled sum + unlabeled sum) / labeled batch, so the
    # pseudo-labeled term keeps its scale (unlabel_ratio * its mean).
    half = losses.noisy_student_loss(**batch, labeled_loss_weight=0.5)[0]
    assert float(half) == pytest.approx((0.5 * lab_sum + unl_sum) / n_lab,
                                        rel=1e-5)
    zero, zero_lab_ce, _ = losses.noisy_student_loss(
        **batch, labeled_loss_weight=0.0)
    assert float(zero) == pytest.approx(unl_sum / n_lab, rel=1e-5)
    # The per-example labeled cross-entropies are still reported.
    np.testing.assert_allclose(zero_lab_ce, lab_ce, rtol=1e-6)


def test_labeled_loss_weight_zero_learns_nothing_from_the_labels():
    """Pseudo-labels only: neither the loss nor its gradient depends on
    the labeled images' labels or logits."""
    batch = _student_batch()
    other = dict(batch, labels=(batch["labels"] + 1) % 5)
    lab_logits = tf.Variable(batch["labeled_logits"])
    gradients = []
    for b in (batch, other):
        with tf.GradientTape() as tape:
            loss = losses.noisy_student_loss(
                **dict(b, labeled_logits=lab_logits),
                labeled_loss_weight=0.0)[0]
        gradients.append(tape.gradient(loss, lab_logits))
    for g in gradients:
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    # With weight 1 the labels drive the gradient.
    with tf.GradientTape() as tape:
        loss = losses.noisy_student_loss(**dict(batch,
                                                labeled_logits=lab_logits))[0]
    assert np.abs(tape.gradient(loss, lab_logits).numpy()).max() > 0.01


def test_weight_decay_skips_batch_norm():
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=10)
    decayed = losses.weight_decay_variables(model)
    paths = [v.path for v in decayed]
    bn = losses.batch_norm_variables(model)
    assert bn and not any(v is b for v in decayed for b in bn)
    assert not any(p.endswith(("gamma", "beta")) for p in paths)
    assert "stem_conv/kernel" in paths and "predictions/bias" in paths
    # Everything trainable outside BN is decayed.
    assert len(decayed) + len([v for v in bn if v.trainable]) == len(
        model.trainable_variables)
    wd = 1e-5
    expected = wd * sum(float(np.sum(v.numpy() ** 2)) / 2 for v in decayed)
    assert float(losses.l2_weight_decay(decayed, wd)) == pytest.approx(
        expected, rel=1e-5)
    # The decay's gradient is wd * w on a kernel and absent on BN's gamma.
    gamma = model.get_layer("stem_bn").gamma
    kernel = model.get_layer("stem_conv").kernel
    with tf.GradientTape(persistent=True) as tape:
        term = losses.l2_weight_decay(decayed, wd)
    np.testing.assert_allclose(tape.gradient(term, kernel.value),
                               wd * kernel.numpy(), rtol=1e-5)
    assert tape.gradient(term, gamma.value) is None
    assert float(losses.l2_weight_decay(decayed, 0.0)) == 0.0
