"""StochasticDepth and PixelNormalization layers."""

import keras
import numpy as np
import pytest

from noisy_student import layers


def test_stochastic_depth_is_identity_at_inference():
    x = np.random.default_rng(0).normal(size=(64, 4, 4, 3)).astype("float32")
    layer = layers.StochasticDepth(0.5)
    np.testing.assert_array_equal(layer(x, training=False), x)
    np.testing.assert_array_equal(layer(x), x)


def test_stochastic_depth_drops_or_scales_whole_samples():
    rate = 0.3
    x = np.random.default_rng(1).uniform(1, 2, (256, 3, 3, 2)).astype(
        "float32")
    y = np.asarray(layers.StochasticDepth(rate, seed=3)(x, training=True))
    dropped = np.all(y == 0, axis=(1, 2, 3))
    kept = np.all(np.isclose(y, x / (1 - rate), rtol=1e-6), axis=(1, 2, 3))
    assert np.all(dropped | kept)
    assert 0 < dropped.sum() < len(x)


def test_stochastic_depth_preserves_the_mean_statistically():
    rate = 0.2
    x = np.ones((20000, 1), np.float32)
    y = np.asarray(layers.StochasticDepth(rate, seed=0)(x, training=True))
    # Mean of 20,000 Bernoulli(0.8)/0.8 draws: standard error ~0.0035.
    assert abs(y.mean() - 1.0) < 0.015
    assert abs((y == 0).mean() - rate) < 0.015


def test_stochastic_depth_inside_a_compiled_function():
    layer = layers.StochasticDepth(0.5, seed=1)
    import tensorflow as tf
    fn = tf.function(lambda x: layer(x, training=True))
    y = fn(tf.ones((128, 2)))
    assert set(np.unique(y.numpy())) <= {0.0, 2.0}


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_stochastic_depth_rejects_rate_out_of_range(rate):
    with pytest.raises(ValueError, match=f"Received: rate={rate}"):
        layers.StochasticDepth(rate)


def test_layers_round_trip_their_config():
    sd = layers.StochasticDepth(0.25, seed=7, name="sd")
    clone = layers.StochasticDepth.from_config(sd.get_config())
    assert (clone.rate, clone.seed, clone.name) == (0.25, 7, "sd")
    norm = layers.PixelNormalization((1.0, 2.0), (3.0, 4.0))
    clone = keras.layers.deserialize(keras.layers.serialize(norm))
    np.testing.assert_allclose(
        clone(np.array([[4.0, 6.0]], np.float32)), [[1.0, 1.0]])
