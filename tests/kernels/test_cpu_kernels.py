"""The compiled CPU kernels equal TF's ops, and everything works without them."""

import logging as std_logging
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.kernels import layers as kernel_layers
from noisy_student.kernels import loader
from noisy_student.kernels import switch
from noisy_student.model import efficientnet
from noisy_student.training import config as train_config
from noisy_student.training import state


@pytest.fixture(scope="module")
def ops():
    if not (os.environ.get("CXX") or shutil.which("g++")
            or shutil.which("c++")):
        pytest.skip("no C++ compiler: training uses TF's ops (.ci/run "
                    "installs g++, so CI runs these tests)")
    library = loader.library()
    assert library is not None, "the CPU kernels must build with a compiler"
    return library


def _silu_and_gradient(fn, x, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return y, tape.gradient(y, x, output_gradients=dy)


# Sizes that are not multiples of the kernel's 1,024-element block, and
# activations far into both tails of the sigmoid.
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 33, 33, 24), (1,)])
def test_silu_and_its_gradient_equal_tfs(ops, shape):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0, 8, shape), tf.float32)
    dy = tf.constant(rng.normal(0, 1, shape), tf.float32)
    y, dx = _silu_and_gradient(loader.silu, x, dy)
    y_ref, dx_ref = _silu_and_gradient(tf.nn.silu, x, dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    # The kernels really ran (not TF's fallback).
    np.testing.assert_allclose(ops.ns_silu(x), y_ref, rtol=1e-5, atol=1e-6)


def test_silu_of_other_dtypes_is_tfs():
    x = tf.constant([-2.0, 0.5, 3.0], tf.float16)
    assert loader.silu(x).dtype == tf.float16
    np.testing.assert_allclose(loader.silu(x), tf.nn.silu(x))


def _depthwise_and_gradients(fn, x, kernel, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = fn(x, kernel)
    return (y, *tape.gradient(y, [x, kernel], output_gradients=dy))


# Kernel sizes and strides of the EfficientNet, odd and even maps, channel
# counts below, at and above one 16-float vector.
@pytest.mark.parametrize("size,channels,kernel_size,stride", [
    (8, 16, 3, 1), (9, 24, 3, 2), (10, 7, 5, 2), (7, 40, 5, 1),
    (16, 3, 3, 2)])
def test_depthwise_gradients_equal_tfs(ops, size, channels, kernel_size,
                                       stride):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, size, size + 1, channels)),
                    tf.float32)
    kernel = tf.constant(
        rng.normal(size=(kernel_size, kernel_size, channels, 1)), tf.float32)
    out = -(-size // stride), -(-(size + 1) // stride)
    dy = tf.constant(rng.normal(size=(3, *out, channels)), tf.float32)
    ours = _depthwise_and_gradients(
        lambda a, b: loader.depthwise_conv2d(a, b, stride), x, kernel,
        dy)
    plain = _depthwise_and_gradients(
        lambda a, b: tf.nn.depthwise_conv2d(a, b, (1, stride, stride, 1),
                                            "SAME"), x, kernel, dy)
    for got, want in zip(ours, plain):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ops.ns_depthwise_filter_grad(x, dy, kernel_size=kernel_size,
                                     stride=stride), plain[2],
        rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 5, 7, 24), (2, 1, 1, 40),
                                   (4, 9, 9, 3)])
def test_channel_scale_and_its_gradients_equal_tfs(ops, shape):
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=shape), tf.float32)
    gate = tf.constant(rng.uniform(size=(shape[0], 1, 1, shape[-1])),
                       tf.float32)
    dy = tf.constant(rng.normal(size=shape), tf.float32)

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, gate])
            y = fn(x, gate)
        return (y, *tape.gradient(y, [x, gate], output_gradients=dy))

    for got, want in zip(run(loader.channel_scale),
                         run(lambda a, b: a * b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.ns_channel_scale(x, gate), x * gate,
                               rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[N, 1, 1, C\]"):
        ops.ns_channel_scale(x, tf.reshape(gate, (shape[0], shape[-1])))


def test_gate_multiply_leaves_other_products_to_keras():
    layer = kernel_layers.GateMultiply()
    a, b = tf.fill([2, 3], 2.0), tf.fill([2, 3], 3.0)
    np.testing.assert_allclose(layer([a, b]), np.full([2, 3], 6.0))
    three = layer([a, b, b])
    np.testing.assert_allclose(three, np.full([2, 3], 18.0))


@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 5, 7, 11),
                                   (8, 1, 1, 40)])
def test_batch_norm_silu_and_its_gradients_equal_tfs(ops, shape):
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(2, 3, shape), tf.float32)
    gamma = tf.constant(rng.normal(1, 0.3, shape[-1]), tf.float32)
    beta = tf.constant(rng.normal(0, 1, shape[-1]), tf.float32)
    dy = tf.constant(rng.normal(size=shape), tf.float32)

    def plain(a, g, b):
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            a, g, b, epsilon=1e-3, is_training=True)
        count = np.prod(shape[:3])
        return tf.nn.silu(y), mean, variance * (count - 1) / count

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, variance = fn(x, gamma, beta)
        return (y, mean, variance,
                *tape.gradient(y, [x, gamma, beta], output_gradients=dy))

    ours = run(lambda a, g, b: loader.batch_norm_silu(a, g, b, 1e-3))
    for got, want in zip(ours, run(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="per-channel"):
        ops.ns_batch_norm_silu(x, gamma[:-1], beta, epsilon=1e-3)


def test_depthwise_filter_gradient_refuses_a_mismatched_backprop(ops):
    x = tf.zeros([2, 8, 8, 4])
    with pytest.raises(tf.errors.InvalidArgumentError, match="stride 2"):
        ops.ns_depthwise_filter_grad(x, tf.zeros([2, 8, 8, 4]),
                                     kernel_size=3, stride=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="channel"):
        ops.ns_depthwise_filter_grad(x, tf.zeros([2, 8, 8, 5]),
                                     kernel_size=3, stride=1)


def _tiny_model():
    keras.utils.set_random_seed(0)
    return efficientnet.build_efficientnet(
        width=0.25, depth=0.25, num_classes=3, image_size=16,
        dropout_rate=0.0, stochastic_depth_rate=0.0)


def _loss_gradients(model, images, labels):
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
    return logits, tape.gradient(loss, model.trainable_variables)


def _layers_of(model, cls):
    return [l for l in model.layers if type(l) is cls]  # pylint: disable=unidiomatic-typecheck


def test_a_switched_model_trains_as_the_plain_one(ops):
    plain, switched = _tiny_model(), _tiny_model()
    switched.set_weights(plain.get_weights())
    state.use_fused_batch_norm(plain)
    state.use_fused_batch_norm(switched)
    names = [v.path for v in switched.weights]
    count = switch.use_cpu_kernels(switched)
    silus = [l for l in switched.layers
             if getattr(l, "activation", None) is loader.silu]
    depthwise = _layers_of(switched, kernel_layers.KernelDepthwiseConv2D)
    gates = _layers_of(switched, kernel_layers.GateMultiply)
    pairs = _layers_of(switched, kernel_layers.BatchNormSilu)
    identities = [l for l in switched.layers
                  if isinstance(l, keras.layers.Activation)
                  and l.activation is keras.activations.linear]
    # Every SiLU after a batch norm is fused into it (stem, expand, depthwise
    # and head); the squeeze-and-excitation convs keep their own SiLU.
    assert len(pairs) == len(identities) == len(
        [l for l in plain.layers if isinstance(l, keras.layers.Activation)])
    assert silus and depthwise and gates
    assert all(l.name.endswith("se_reduce") for l in silus)
    # A model built after the switch has none of it: the switch is per
    # model, not per class or process.
    fresh = _tiny_model()
    assert not [l for l in fresh.layers
                if type(l).__module__ == kernel_layers.__name__
                or getattr(l, "activation", None) is loader.silu]
    assert count == (len(silus) + len(depthwise) + len(gates)
                     + 2 * len(pairs))
    # Checkpoints are untouched: same variables, same names.
    assert [v.path for v in switched.weights] == names
    rng = np.random.default_rng(2)
    images = tf.constant(rng.uniform(0, 255, (4, 16, 16, 3)), tf.float32)
    labels = tf.constant([0, 1, 2, 1])
    logits, grads = _loss_gradients(switched, images, labels)
    logits_ref, grads_ref = _loss_gradients(plain, images, labels)
    # Float rounding, amplified by batch norm over 4 images; gradients that
    # should be zero (a beta followed by another batch norm) are rounding
    # noise, hence a tolerance on the scale of the largest gradient.
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-3, atol=1e-3)
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in grads_ref)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-4 * scale)
    # The batch norms' moving averages took the same batch statistics, and
    # inference (moving averages, then SiLU) gives the same outputs.
    for got, want in zip(switched.non_trainable_weights,
                         plain.non_trainable_weights):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(switched(images, training=False),
                               plain(images, training=False),
                               rtol=1e-4, atol=1e-4)


def test_without_a_compiler_training_falls_back_to_tfs_ops(
        monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NOISY_STUDENT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    loader.library.cache_clear()
    try:
        with caplog.at_level(std_logging.WARNING):
            assert loader.library() is None
        assert "CPU kernels unavailable" in caplog.text
        assert "/bin/false failed" in caplog.text
        model = _tiny_model()
        assert switch.use_cpu_kernels(model) == 0
        x = tf.constant([[-3.0, 0.0, 2.0]])
        np.testing.assert_allclose(loader.silu(x), tf.nn.silu(x))
    finally:
        loader.library.cache_clear()
    # No half-written library left; the failure is recorded.
    assert [p.suffix for p in tmp_path.iterdir()] == [".failed"]


def test_a_failed_build_is_not_retried_by_later_processes(
        monkeypatch, tmp_path, caplog):
    # A compiler that fails on this source (not on a flag): run once, its
    # failure recorded, and not run again by a later process.
    calls = tmp_path / "calls"
    compiler = tmp_path / "cxx"
    compiler.write_text(f"#!/bin/sh\necho x >> {calls}\n"
                        "echo 'error: no such header' >&2\nexit 1\n")
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NOISY_STUDENT_CACHE", str(cache))
    monkeypatch.setenv("CXX", str(compiler))
    stale = cache / (loader.TEMP_PREFIX + "killed.so")
    cache.mkdir()
    stale.write_bytes(b"half a library")
    os.utime(stale, (0, 0))
    try:
        for _ in range(2):
            loader.library.cache_clear()
            with caplog.at_level(std_logging.WARNING):
                assert loader.library() is None
    finally:
        loader.library.cache_clear()
    assert calls.read_text() == "x\n"
    assert "error: no such header" in caplog.text
    assert "delete" in caplog.text and ".failed to retry" in caplog.text
    assert not stale.exists()  # A killed build's leftover is removed.


def test_a_truncated_library_is_rebuilt_not_loaded(monkeypatch, tmp_path,
                                                   ops):
    # Loading a truncated library kills the process (SIGBUS): the recorded
    # SHA-256 must stop it first.
    del ops  # Built: its file is the good copy.
    good = loader._library_path(open(loader.SOURCE, "rb").read())  # pylint: disable=protected-access
    monkeypatch.setenv("NOISY_STUDENT_CACHE", str(tmp_path))
    path = loader._library_path(open(loader.SOURCE, "rb").read())  # pylint: disable=protected-access
    data = open(good, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    open(path + ".sha256", "w").write(open(good + ".sha256").read())
    builds = []

    def rebuild(target):
        builds.append(target)
        shutil.copy(good, target)

    loaded = []
    monkeypatch.setattr(loader, "_build", rebuild)
    # Recorded, not loaded: a second copy of the ops in one process would
    # register every kernel twice.
    monkeypatch.setattr(tf, "load_op_library", loaded.append)
    loader.library.cache_clear()
    try:
        loader.library()
    finally:
        loader.library.cache_clear()
    assert builds == [path] and loaded == [path]


def test_a_compiled_library_is_reused_from_the_cache(monkeypatch, ops):
    def no_compiler(target, compiler):
        raise AssertionError(f"recompiled {target} with {compiler}")

    monkeypatch.setattr(loader, "_compile", no_compiler)
    loader.library.cache_clear()
    try:
        assert loader.library() is not None
    finally:
        loader.library.cache_clear()


def test_cpu_kernels_is_not_fingerprinted():
    on = train_config.TrainConfig.from_fields(variant="b0",
                                              images_per_epoch=1000)
    off = on.replace(cpu_kernels=False)
    assert not off.loop.cpu_kernels
    assert (train_config.fingerprint_fields(on)
            == train_config.fingerprint_fields(off))


def test_the_kernels_are_used_only_on_cpu_in_float32_without_xla():
    config = train_config.TrainConfig.from_fields(
        variant="b0", images_per_epoch=1000)
    assert state._on_cpu_in_float32(config)  # pylint: disable=protected-access
    for change in (dict(precision="mixed_float16"), dict(jit_compile=True),
                   dict(precision="bfloat16")):
        assert not state._on_cpu_in_float32(config.replace(**change))  # pylint: disable=protected-access


def test_depthwise_filter_gradient_is_deterministic(ops):
    # Many shards on the thread pool; their sums must not depend on timing
    # (a resumed run equals an uninterrupted one bit for bit).
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(32, 32, 32, 48)), tf.float32)
    dy = tf.constant(rng.normal(size=(32, 32, 32, 48)), tf.float32)
    first = ops.ns_depthwise_filter_grad(x, dy, kernel_size=5, stride=1)
    for _ in range(10):
        np.testing.assert_array_equal(
            ops.ns_depthwise_filter_grad(x, dy, kernel_size=5, stride=1),
            first)
