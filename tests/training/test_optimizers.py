"""Tests for noisy_student.training.optimizers: schedules, fused RMSprop, weight EMA."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.training import optimizers as optim
from noisy_student.training import strategy as strategy_lib
from noisy_student.training import config as train_config
from noisy_student.training import state


def _lr(schedule, step):
    return float(schedule(tf.constant(step)))


def test_warmup_then_exponential_staircase():
    # 1,000 labeled images, batch 100: 10 steps per epoch; 5 warm-up epochs
    # are 50 steps, and x0.97 every 2.4 epochs is every 24 steps.
    config = train_config.TrainConfig.from_fields(
        width=0.25, depth=0.25, image_size=16, batch_size=100,
        images_per_epoch=1000, train_steps=500)
    peak = 0.016 * 100 / 256
    assert config.peak_lr == pytest.approx(peak)
    schedule = state.learning_rate_schedule(config)
    assert _lr(schedule, 0) == pytest.approx(peak / 50, rel=1e-5)
    assert _lr(schedule, 24) == pytest.approx(peak * 25 / 50, rel=1e-5)
    assert _lr(schedule, 49) == pytest.approx(peak, rel=1e-5)
    # After warm-up: staircase decay counted from step 0, as the official code.
    assert _lr(schedule, 50) == pytest.approx(peak * 0.97 ** 2, rel=1e-5)
    assert _lr(schedule, 71) == pytest.approx(peak * 0.97 ** 2, rel=1e-5)
    assert _lr(schedule, 72) == pytest.approx(peak * 0.97 ** 3, rel=1e-5)
    assert _lr(schedule, 480) == pytest.approx(peak * 0.97 ** 20, rel=1e-5)
    lrs = [_lr(schedule, s) for s in range(0, 500, 7)]
    peak_index = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak_index], lrs[1:peak_index]))
    assert all(a >= b for a, b in zip(lrs[peak_index:], lrs[peak_index + 1:]))


def test_cosine_schedule_and_explicit_warmup_steps():
    schedule = optim.WarmupDecaySchedule(0.1, warmup_steps=10, decay="cosine",
                                         total_steps=100)
    assert _lr(schedule, 4) == pytest.approx(0.05, rel=1e-5)
    assert _lr(schedule, 50) == pytest.approx(0.05, rel=1e-5)
    assert _lr(schedule, 25) == pytest.approx(
        0.05 * (1 + math.cos(math.pi * 0.25)), rel=1e-5)
    assert _lr(schedule, 100) == pytest.approx(0.0, abs=1e-7)
    assert _lr(schedule, 150) == pytest.approx(0.0, abs=1e-7)
    constant = optim.WarmupDecaySchedule(0.1, decay="constant")
    assert _lr(constant, 0) == _lr(constant, 10 ** 6) == pytest.approx(0.1)
    # Round trip through its config (Keras serialisation).
    again = optim.WarmupDecaySchedule(**schedule.get_config())
    assert _lr(again, 25) == _lr(schedule, 25)


def _apply_fn(optimizer, weights):
    @tf.function
    def apply(grads):
        optimizer.apply_gradients(zip(grads, weights))
    return apply


def test_fused_rmsprop_matches_keras_rmsprop():
    rng = np.random.default_rng(0)
    init = [rng.normal(size=(3, 4)).astype("float32"),
            rng.normal(size=(4,)).astype("float32")]
    grads = [[rng.normal(size=w.shape).astype("float32") for w in init]
             for _ in range(4)]
    results = []
    for cls in (keras.optimizers.RMSprop, optim.FusedRMSprop):
        weights = [keras.Variable(w) for w in init]
        opt = cls(0.01, rho=0.9, momentum=0.9, epsilon=1e-3)
        opt.build(weights)
        step = _apply_fn(opt, weights)
        for g in grads:
            step(g)
        results.append([w.numpy() for w in weights])
    # ... through TF's fused kernel, not Keras' dozen ops per weight.
    op_types = {op.type for op in step.get_concrete_function(
        grads[0]).graph.get_operations()}
    assert "ResourceApplyRMSProp" in op_types
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(fused_value, keras_value, rtol=1e-5,
                                   atol=1e-6)
    assert not np.allclose(results[1][0], init[0])


def test_ema_update_warmup_and_swap():
    assert float(optim.ema_decay_at(0.9999, 1)) == pytest.approx(2 / 11)
    assert float(optim.ema_decay_at(0.9999, 10 ** 6)) == pytest.approx(0.9999)
    assert float(optim.ema_decay_at(0.5, 1, warmup=False)) == 0.5
    weights = [tf.Variable([1.0, 2.0]), tf.Variable([[4.0]])]
    ema = optim.ExponentialMovingAverage(weights, decay=0.5, warmup=False)
    weights[0].assign([3.0, 6.0])
    weights[1].assign([[0.0]])
    ema.update(1)
    np.testing.assert_allclose(ema.averages[0].numpy(), [2.0, 4.0])
    np.testing.assert_allclose(ema.averages[1].numpy(), [[2.0]])
    ema.update(2)
    np.testing.assert_allclose(ema.averages[0].numpy(), [2.5, 5.0])
    # With the warm-up, update n uses min(decay, (1 + n) / (10 + n)).
    warm = optim.ExponentialMovingAverage([tf.Variable(0.0)], decay=0.9999)
    warm.sources[0].assign(11.0)
    warm.update(1)
    assert float(warm.averages[0]) == pytest.approx(11.0 * 9 / 11, rel=1e-6)
    # Swap exchanges weights and averages; swapping again restores both.
    ema.swap()
    np.testing.assert_allclose(weights[0].numpy(), [2.5, 5.0])
    np.testing.assert_allclose(ema.averages[0].numpy(), [3.0, 6.0])
    ema.swap()
    np.testing.assert_allclose(weights[0].numpy(), [3.0, 6.0])


def test_ema_under_mirrored_strategy_updates_every_replica():
    strategy = strategy_lib.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        weight = tf.Variable(
            [0.0, 0.0], aggregation=tf.VariableAggregation.MEAN)
        ema = optim.ExponentialMovingAverage([weight], decay=0.75,
                                             warmup=False)

    @tf.function
    def step():
        def replica_fn():
            weight.assign_add([4.0, 8.0])
            ema.update(1)
        strategy.run(replica_fn)

    step()
    for value in strategy.experimental_local_results(ema.averages[0]):
        np.testing.assert_allclose(value.numpy(), [1.0, 2.0])


def test_ema_sources_are_weights_and_bn_statistics():
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=10, dropout_rate=0.2, stochastic_depth_rate=0.2)
    sources = optim.ema_source_variables(model)
    paths = [v.path for v in sources]
    assert "stem_bn/moving_mean" in paths
    assert "stem_bn/moving_variance" in paths
    assert "stem_conv/kernel" in paths
    assert not any("seed_generator" in p for p in paths)
    assert len(sources) == len(model.trainable_variables) + 2 * len(
        [l for l in model.layers
         if isinstance(l, keras.layers.BatchNormalization)])
    frozen = efficientnet.freeze_blocks(model, 1)
    assert "stem_conv" in frozen and "block1a_dwconv" in frozen
    paths = [v.path for v in optim.ema_source_variables(model)]
    assert "stem_bn/moving_mean" not in paths
    assert "stem_conv/kernel" not in paths
    assert "block2a_expand_conv/kernel" in paths
