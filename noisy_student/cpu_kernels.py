"""CPU kernels for the training step: SiLU and the depthwise filter gradient.

On a CPU, TensorFlow runs EfficientNet's SiLU gradient as six elementwise
kernels and its depthwise filter gradient with a generic kernel; together
they were the largest share of a B0 step on this project's machine
(BENCHMARKS.md, "CPU kernels"). `kernels/cpu_kernels.cc` does each in one
pass. It is compiled on first use with the C++ compiler and the headers of
the installed TensorFlow (`tf.sysconfig`), cached per source, TF version and
CPU under `$NOISY_STUDENT_CACHE` (default `~/.cache/noisy_student`), and
loaded with `tf.load_op_library`. Without a compiler, or when anything in
that fails, a warning says why once and TF's own ops are used: same results
to float rounding, slower.

Only float32 on CPU devices and without XLA (custom ops have no XLA or GPU
kernel); `train_state.use_cpu_kernels` decides.
"""

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "cpu_kernels.cc")
# The machine's own vector instructions; GCC 12 cannot compile Eigen's
# AVX512-FP16 header, so that extension is left out (retried without the
# flag for compilers that do not know it).
ARCH_FLAGS = (("-march=native", "-mno-avx512fp16"), ("-march=native",), ())
# Seconds one compiler run may take (about 10 here) before it counts as
# failed.
COMPILE_TIMEOUT_S = 300


def cache_dir():
    """Folder of the compiled libraries: $NOISY_STUDENT_CACHE, else
    ~/.cache/noisy_student."""
    return os.environ.get("NOISY_STUDENT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "noisy_student")


def _cpu_id():
    """The CPU's model and instruction-set flags (a library built with
    -march=native must not load on another CPU sharing the cache)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("flags", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _library_path(source_bytes):
    key = hashlib.sha256(b"\0".join([
        source_bytes, tf.__version__.encode(), _cpu_id().encode(),
        " ".join(tf.sysconfig.get_compile_flags()).encode()])).hexdigest()
    return os.path.join(cache_dir(), f"cpu_kernels-{key[:16]}.so")


def _compile(target):
    """Compiles SOURCE into `target` (atomically: concurrent processes each
    write a temporary file and rename). Raises RuntimeError with the
    compiler's last lines when every flag set fails."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which(
        "c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++ or c++ on PATH, or $CXX)")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, temp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    errors = ""
    try:
        for arch in ARCH_FLAGS:
            command = ([compiler, "-shared", "-fPIC", "-O3", "-w", *arch,
                        *tf.sysconfig.get_compile_flags(), SOURCE, "-o",
                        temp, *tf.sysconfig.get_link_flags()])
            result = subprocess.run(command, capture_output=True, text=True,
                                    check=False, timeout=COMPILE_TIMEOUT_S)
            if result.returncode == 0:
                os.replace(temp, target)
                return
            errors = result.stderr
        tail = "\n".join(errors.strip().splitlines()[-5:])
        raise RuntimeError(f"{compiler} failed:\n{tail}")
    finally:
        if os.path.exists(temp):
            os.remove(temp)


@functools.lru_cache(maxsize=None)
def library():
    """The loaded op library, compiled first if not cached; None (with one
    warning naming the cause) when it cannot be built or loaded."""
    try:
        with open(SOURCE, "rb") as f:
            path = _library_path(f.read())
        if not os.path.exists(path):
            logging.info("Compiling the CPU kernels %s into %s", SOURCE, path)
            _compile(path)
        return tf.load_op_library(path)
    except (OSError, RuntimeError, subprocess.SubprocessError,
            tf.errors.OpError) as error:
        logging.warning(
            "CPU kernels unavailable (%s); training uses TF's own SiLU and "
            "depthwise gradients: same results, slower. Set --nocpu_kernels "
            "to silence this.", error)
        return None


def silu(x):
    """SiLU, x * sigmoid(x), whose forward and gradient are one kernel each.

    Args:
      x: A float32 tensor of any shape (other dtypes: `tf.nn.silu`).

    Returns:
      The activations, x's shape and dtype.
    """
    ops = library()
    if ops is None or x.dtype != tf.float32:
        return tf.nn.silu(x)
    return _silu(ops, x)


def _silu(ops, x):
    @tf.custom_gradient
    def forward(features):
        def grad(dy):
            return ops.ns_silu_grad(dy, features)
        return ops.ns_silu(features), grad
    return forward(x)


def depthwise_conv2d(x, kernel, stride):
    """A "same"-padded depthwise convolution whose filter gradient is ours.

    The forward pass and the input gradient are TF's; only the filter
    gradient runs `NsDepthwiseFilterGrad`.

    Args:
      x: float32 [batch, height, width, channels] (NHWC).
      kernel: float32 [k, k, channels, 1] (square, depth multiplier 1).
      stride: The stride along both axes.

    Returns:
      float32 [batch, ceil(height / stride), ceil(width / stride),
      channels].
    """
    strides = (1, stride, stride, 1)
    ops = library()
    if (ops is None or x.dtype != tf.float32 or kernel.shape[0] !=
            kernel.shape[1] or kernel.shape[-1] != 1):
        return tf.nn.depthwise_conv2d(x, kernel, strides, "SAME")

    @tf.custom_gradient
    def forward(inputs, filters):
        def grad(dy):
            dx = tf.compat.v1.nn.depthwise_conv2d_native_backprop_input(
                tf.shape(inputs), filters, dy, strides, "SAME")
            dw = ops.ns_depthwise_filter_grad(
                inputs, dy, kernel_size=filters.shape[0], stride=stride)
            return dx, dw
        return tf.nn.depthwise_conv2d(inputs, filters, strides, "SAME"), grad
    return forward(x, kernel)


def channel_scale(x, scale):
    """x * scale broadcast over the pixels (squeeze-and-excitation's gate),
    forward and gradient one pass each.

    Args:
      x: float32 [batch, height, width, channels].
      scale: float32 [batch, 1, 1, channels].

    Returns:
      float32 [batch, height, width, channels].
    """
    ops = library()
    if ops is None or x.dtype != tf.float32 or scale.dtype != tf.float32:
        return x * scale

    @tf.custom_gradient
    def forward(features, gate):
        def grad(dy):
            return ops.ns_channel_scale_grad(dy, features, gate)
        return ops.ns_channel_scale(features, gate), grad
    return forward(x, scale)


def batch_norm_silu(x, gamma, beta, epsilon):
    """Training-mode batch norm then SiLU, forward and gradient in one
    kernel each (`NsBatchNormSilu`, `NsBatchNormSiluGrad`).

    y = silu(gamma * (x - mean) / sqrt(variance + epsilon) + beta), mean and
    variance over (batch, height, width), as Keras and TF's fused batch norm
    normalise in training. The library must be loaded (`library()`).

    Args:
      x: float32 [batch, height, width, channels].
      gamma: float32 [channels].
      beta: float32 [channels].
      epsilon: The variance's epsilon (EfficientNet: 1e-3, official code).

    Returns:
      (y float32 x's shape, mean float32 [channels], variance float32
      [channels], the *biased* batch variance Keras' moving average takes).
    """
    ops = library()

    @tf.custom_gradient
    def forward(features, scale, offset):
        y, mean, variance = ops.ns_batch_norm_silu(
            features, scale, offset, epsilon=epsilon)

        def grad(dy, unused_dmean, unused_dvariance):
            return ops.ns_batch_norm_silu_grad(
                dy, features, scale, offset, mean, variance, epsilon=epsilon)
        return (y, tf.stop_gradient(mean), tf.stop_gradient(variance)), grad
    # Values, not variables, inside the custom gradient.
    return forward(x, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))
