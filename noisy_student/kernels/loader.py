"""CPU kernels for the training step: batch norm + SiLU, SiLU, the
depthwise filter gradient and the squeeze-and-excite gate.

On a CPU, TensorFlow runs EfficientNet's batch norm and SiLU as separate
passes (the SiLU gradient as six elementwise kernels), its depthwise
filter gradient with a generic kernel and the squeeze-and-excite gate's
gradient as three ops; together they were most of a B0 step on this
project's machine (BENCHMARKS.md, "CPU kernels"). `kernels/cpu_kernels.cc`
does each in one kernel per direction. It is compiled on first use with
the C++ compiler and the headers of the installed TensorFlow
(`tf.sysconfig`), cached per source, TF version and CPU under
`$NOISY_STUDENT_CACHE` (default `~/.cache/noisy_student`; delete the folder
to reclaim its space), checked against its recorded SHA-256 before every
load (a truncated library would crash the process), and loaded with
`tf.load_op_library`. Without a compiler, or when anything in that fails,
a warning says why once per process and TF's own ops are used: the same
arithmetic with other float rounding, slower. A failed build is recorded
next to the library, so later processes do not retry it (the warning names
the record to delete).

Only float32 on CPU devices and without XLA (custom ops have no XLA or GPU
kernel); `training.state` decides, `kernels.switch` switches a model.
"""

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time

from absl import logging
import tensorflow as tf

from noisy_student.utils import storage

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernels.cc")
# The machine's own vector instructions; GCC 12 cannot compile Eigen's
# AVX512-FP16 header, so that extension is left out. The next flag set is
# tried only when the compiler rejects one of these flags.
ARCH_FLAGS = (("-march=native", "-mno-avx512fp16"), ("-march=native",), ())
# Seconds one compiler run may take (about 10 here) before it counts as
# failed.
COMPILE_TIMEOUT_S = 300
# Temporary outputs of builds killed midway are removed by the next build
# once this old.
TEMP_PREFIX = ".building-"
STALE_TEMP_S = 2 * COMPILE_TIMEOUT_S


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


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _verified(path):
    """Whether `path` exists and matches the SHA-256 its build recorded."""
    try:
        with open(path + ".sha256") as f:
            return f.read().strip() == _sha256(path)
    except OSError:
        return False


def _remove_stale_temps(folder):
    now = time.time()
    for name in os.listdir(folder):
        temp = os.path.join(folder, name)
        if (name.startswith(TEMP_PREFIX) or storage.is_temp(name)) and (
                now - os.path.getmtime(temp) > STALE_TEMP_S):
            os.remove(temp)


def _compile(target, compiler):
    """Compiles SOURCE into `target`, then records its SHA-256 (each
    written atomically: concurrent processes each build a temporary file
    and rename it). Raises RuntimeError with the compiler's last lines."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temps(folder)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".so", dir=folder)
    os.close(fd)
    try:
        for arch in ARCH_FLAGS:
            command = ([compiler, "-shared", "-fPIC", "-O3", "-w", *arch,
                        *tf.sysconfig.get_compile_flags(), SOURCE, "-o",
                        temp, *tf.sysconfig.get_link_flags()])
            result = subprocess.run(command, capture_output=True, text=True,
                                    check=False, timeout=COMPILE_TIMEOUT_S)
            if result.returncode == 0:
                digest = _sha256(temp)
                os.replace(temp, target)
                storage.atomic_write(target + ".sha256", digest + "\n")
                return
            errors = (result.stderr or result.stdout).strip()
            if not any(flag in errors for flag in arch):
                break  # Not a flag this compiler lacks: another set fails too.
        tail = " | ".join(errors.splitlines()[-3:]) or "no output"
        raise RuntimeError(f"{compiler} failed (exit {result.returncode}): "
                           f"{tail}")
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def _build(path):
    """Builds the library at `path` unless an earlier build with the same
    compiler failed (recorded in path + '.failed'). Raises RuntimeError."""
    compiler = _compiler()
    if not compiler:
        raise RuntimeError("no C++ compiler (g++ or c++ on PATH, or $CXX)")
    failed = path + ".failed"
    try:
        with open(failed) as f:
            failed_compiler, reason = f.read().split("\n", 1)
        if failed_compiler == compiler:
            raise RuntimeError(f"{reason.strip()} (an earlier build; delete "
                               f"{failed} to retry)")
    except (OSError, ValueError):
        pass  # No record of a failure with this compiler.
    logging.info("Compiling the CPU kernels %s into %s (once per source, TF "
                 "version and CPU; about 10 s)", SOURCE, path)
    started = time.time()
    try:
        _compile(path, compiler)
    except (RuntimeError, subprocess.SubprocessError) as error:
        try:
            storage.atomic_write(failed, f"{compiler}\n{error}\n")
        except OSError:
            pass  # Unrecorded: the next process tries again.
        raise RuntimeError(str(error)) from error
    logging.info("Compiled the CPU kernels in %.0f s", time.time() - started)


@functools.lru_cache(maxsize=None)
def library():
    """The loaded op library, compiled first if not cached; None (with one
    warning naming the cause) when it cannot be built or loaded."""
    try:
        with open(SOURCE, "rb") as f:
            path = _library_path(f.read())
        if not _verified(path):
            _build(path)
        return tf.load_op_library(path)
    except (OSError, RuntimeError, tf.errors.OpError) as error:
        logging.warning(
            "CPU kernels unavailable (%s); training uses TF's own ops for "
            "batch norm + SiLU, SiLU, depthwise filter gradients and the "
            "squeeze-and-excite gate: the same arithmetic, slower. "
            "--nocpu_kernels skips them (and this warning).", error)
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
