"""StochasticDepth, PixelNormalization and PointwiseConv2D layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.model import layers


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
    pointwise = layers.PointwiseConv2D(8, activation="sigmoid", name="pw")
    clone = keras.layers.deserialize(keras.layers.serialize(pointwise))
    assert isinstance(clone, layers.PointwiseConv2D)
    assert (clone.filters, clone.name) == (8, "pw")


def _pointwise_and_conv(activation=None, use_bias=True):
    """A PointwiseConv2D and a 1x1 Conv2D holding the same weights."""
    pointwise = layers.PointwiseConv2D(6, activation=activation,
                                       use_bias=use_bias)
    conv = keras.layers.Conv2D(6, 1, activation=activation, use_bias=use_bias)
    pointwise.build((None, 5, 5, 4))
    conv.build((None, 5, 5, 4))
    rng = np.random.default_rng(0)
    conv.set_weights([rng.normal(size=w.shape).astype("float32")
                      for w in conv.get_weights()])
    pointwise.set_weights(conv.get_weights())
    return pointwise, conv


@pytest.mark.parametrize("activation,use_bias", [(None, False),
                                                 ("swish", True)])
def test_pointwise_conv_matches_a_1x1_conv_and_its_gradients(activation,
                                                              use_bias):
    pointwise, conv = _pointwise_and_conv(activation, use_bias)
    x = tf.constant(np.random.default_rng(1).normal(size=(3, 5, 5, 4)),
                    tf.float32)
    results = []
    for layer in (pointwise, conv):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * y)
        results.append([y] + tape.gradient(
            loss, [x] + [w.value for w in layer.trainable_weights]))
    for ours, reference in zip(*results):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_pointwise_conv_is_a_matmul_not_a_conv():
    pointwise, _ = _pointwise_and_conv()
    graph = tf.function(pointwise).get_concrete_function(
        tf.TensorSpec((None, 5, 5, 4), tf.float32)).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "MatMul" in op_types and "Conv2D" not in op_types


def test_pointwise_conv_rejects_other_convolutions():
    with pytest.raises(ValueError, match="1x1, stride-1"):
        layers.PointwiseConv2D(4, kernel_size=3)
    with pytest.raises(ValueError, match="1x1, stride-1"):
        layers.PointwiseConv2D(4, strides=2)


@pytest.mark.parametrize("side,kernel,stride", [
    (1, 3, 1), (1, 5, 1), (2, 3, 1), (2, 5, 1), (2, 3, 2), (2, 5, 2),
    (1, 3, 2), (4, 3, 1)])
def test_small_map_depthwise_equals_keras_depthwise(side, kernel, stride):
    """Outputs, gradients (input and kernel) and weights interchangeable."""
    rng = np.random.default_rng(side * 100 + kernel * 10 + stride)
    x = tf.constant(rng.normal(size=(5, side, side, 6)).astype("float32"))
    ours = layers.SmallMapDepthwiseConv2D(kernel, strides=stride,
                                          padding="same", use_bias=False)
    plain = keras.layers.DepthwiseConv2D(kernel, strides=stride,
                                         padding="same", use_bias=False)
    ours.build(x.shape)
    plain.build(x.shape)
    ours.set_weights(plain.get_weights())  # Same variables, same shapes.
    grads = []
    for layer in (ours, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            weights = tf.reshape(tf.range(tf.size(y), dtype=y.dtype),
                                 tf.shape(y)) / tf.cast(tf.size(y), y.dtype)
            loss = tf.reduce_sum(y * weights)
        grads.append((y, *tape.gradient(loss, [x, layer.kernel])))
    for got, want in zip(grads[0], grads[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [w.name for w in ours.weights] == [w.name for w in plain.weights]
