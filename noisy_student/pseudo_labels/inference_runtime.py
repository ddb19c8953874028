"""The runtime that runs the teacher's forward pass in the predict stage.

At the paper's scale the teacher's pass over the unlabeled images (300M in
Sec. 3 of the paper) is the compute of pseudo-labelling, so the predict stage
can hand it to a faster inference runtime than TensorFlow:

- "tensorflow" (the default and the reference): the Keras model or
  SavedModel in a `tf.function` (no XLA, which is slower on CPUs), float32.
- "openvino" (`pip install 'noisy-student[openvino]'`): the same function
  converted once by OpenVINO (batch norm folded into the convolutions,
  activations fused, the graph compiled for this CPU) and run in its
  throughput mode, several inference requests at once over its CPU streams.
  Its float32 probabilities agree with TensorFlow's within 1e-4; bfloat16
  (`inference_precision="bfloat16"`) only where the CPU computes in it
  (AVX512-BF16 or AMX).

Whichever runs, the records, histograms and selection are made the same way;
ns-predict records the runtime and precision in its folder's inputs, so a
folder labelled by one is never resumed by another.
"""

import logging as python_logging
import math
import weakref

from absl import logging
import numpy as np
import tensorflow as tf

RUNTIMES = ("tensorflow", "openvino")
PRECISIONS = ("float32", "bfloat16")
DEFAULT_RUNTIME = "tensorflow"
DEFAULT_PRECISION = "float32"
# OpenVINO's names of the two precisions (its INFERENCE_PRECISION_HINT).
_OPENVINO_PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}
# Images per OpenVINO inference request at most: a batch is split into
# requests of up to this many, which OpenVINO spreads over its CPU streams
# (B0 at 224 px ran faster in requests of 32 than of 64 or 128:
# BENCHMARKS.md, "The teacher's runtime").
MAX_CHUNK = 32


class RuntimeNotInstalledError(ImportError):
    """The chosen runtime's package is not installed (a user error: the
    commands print its one line and exit with status 2)."""


def is_default(runtime, precision):
    """Whether these are the reference settings: TensorFlow in float32.

    Args:
      runtime: One of RUNTIMES.
      precision: One of PRECISIONS.

    Returns:
      A bool.
    """
    return (runtime, precision) == (DEFAULT_RUNTIME, DEFAULT_PRECISION)


def check(runtime, precision):
    """Checks that this machine can run the teacher with these settings.

    Args:
      runtime: One of RUNTIMES.
      precision: One of PRECISIONS.

    Raises:
      ValueError: for an unknown runtime or precision, bfloat16 with
        TensorFlow (on CPUs its bfloat16 is no faster than float32), or
        bfloat16 on a CPU without it.
      RuntimeNotInstalledError: for "openvino" when OpenVINO is not
        installed (one line saying how to install it).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"Expected --inference_runtime in {list(RUNTIMES)}. "
                         f"Received: --inference_runtime={runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(
            f"Expected --inference_precision in {list(PRECISIONS)}. "
            f"Received: --inference_precision={precision!r}")
    if runtime == "tensorflow":
        if precision != "float32":
            raise ValueError(
                "Expected --inference_precision=float32 with "
                "--inference_runtime=tensorflow (bfloat16 needs "
                "--inference_runtime=openvino). Received: "
                f"--inference_precision={precision}")
        return
    capabilities = _openvino().Core().get_property(
        "CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bfloat16" and "BF16" not in capabilities:
        raise ValueError(
            "Expected a CPU that computes in bfloat16 (AVX512-BF16 or AMX) "
            "for --inference_precision=bfloat16. Received: a CPU whose "
            f"OpenVINO capabilities are {', '.join(capabilities)}")


def _openvino():
    # Importing OpenVINO empties the root logger's handlers (absl's among
    # them), which would turn the rest of the run's log lines into bare
    # "INFO:absl:..." ones: they are put back.
    handlers = list(python_logging.root.handlers)
    try:
        import openvino  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise RuntimeNotInstalledError(
            "Expected OpenVINO for --inference_runtime=openvino. Received: "
            f"no openvino package ({e}); install it with pip install "
            "openvino (or pip install '.[openvino]' in a checkout of "
            "noisy-student)") from None
    finally:
        python_logging.root.handlers = handlers
    return openvino


def probabilities_fn(teacher, runtime, precision, batch_size, image_size,
                     channels):
    """The teacher's forward pass, pixels to probabilities, on a runtime.

    Args:
      teacher: A keras.Model returning logits, or a
        `model.loading.SavedModelClassifier`; called with `training=False`.
      runtime: One of RUNTIMES (checked with `check`).
      precision: One of PRECISIONS.
      batch_size: B, the images of every call (the predict stage pads its
        last batch).
      image_size: S, the teacher's input side.
      channels: C, the teacher's input channels.

    Returns:
      A function float32 pixels [B, S, S, C] in [0, 255] (a tf.Tensor or
      numpy array) -> float32 numpy probabilities [B, K]. Its `start`
      method takes the same pixels and returns at once a function that
      waits for their probabilities: the caller prepares the next batch
      while the runtime computes (one batch may be pending at a time).

    Raises:
      As `check`; RuntimeError when OpenVINO cannot convert the teacher.
    """
    check(runtime, precision)
    cache = _TEACHERS.setdefault(teacher, {})
    key = (runtime, precision, batch_size, image_size, channels)
    if key not in cache:
        if runtime == "tensorflow":
            cache[key] = _TensorFlowTeacher(teacher)
        else:
            cache[key] = _OpenVinoTeacher(teacher, precision, batch_size,
                                          image_size, channels)
    return cache[key]


# One traced function (or one OpenVINO compilation) per teacher and shape,
# so that repeated calls in one process (several shards, a rerun) do not
# trace or convert the model again (seconds for B0). Held weakly: a value
# that referred to its key would keep every iteration's teacher alive.
_TEACHERS = weakref.WeakKeyDictionary()


def _softmax_fn(teacher_ref):
    def probabilities(pixels):
        logits = teacher_ref()(pixels, training=False)
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    return probabilities


class _TensorFlowTeacher:
    """The teacher in a tf.function (no XLA), computed when started."""

    def __init__(self, teacher):
        self.fn = tf.function(_softmax_fn(weakref.ref(teacher)),
                              jit_compile=False)

    def start(self, pixels):
        probabilities = self.fn(pixels).numpy()
        return lambda: probabilities

    def __call__(self, pixels):
        return self.start(pixels)()


class _OpenVinoTeacher:
    """The teacher compiled by OpenVINO for batches of B images.

    Throughput mode runs each inference request on one CPU stream (its own
    cores), so a batch is split into chunks of at least one per stream and
    at most MAX_CHUNK images (the last one padded): every image is computed
    in the same static shape whatever its position, and a rerun writes the
    same probabilities. Two sets of requests take turns, so that one batch
    runs while the next is started.
    """

    def __init__(self, teacher, precision, batch_size, image_size, channels):
        ov = _openvino()
        spec = tf.TensorSpec([None, image_size, image_size, channels],
                             tf.float32)
        fn = tf.function(_softmax_fn(weakref.ref(teacher)),
                         input_signature=[spec], jit_compile=False)
        try:
            model = ov.convert_model(fn.get_concrete_function())
        except Exception as e:  # pylint: disable=broad-except
            raise RuntimeError(
                "Expected a teacher that OpenVINO can convert. Received: "
                f"{type(e).__name__}: {e}") from e
        # TF's SiLU (a custom gradient) leaves its forward values as extra
        # outputs of the converted graph; only the probabilities are wanted.
        model = ov.Model([model.output(0)], model.get_parameters())
        logging.info("OpenVINO: converting the teacher (%s) for batches of "
                     "%d at %d px", precision, batch_size, image_size)
        core = ov.Core()
        settings = {"PERFORMANCE_HINT": "THROUGHPUT",
                    # Explicit: on CPUs with bfloat16 OpenVINO uses it by
                    # default.
                    "INFERENCE_PRECISION_HINT":
                        _OPENVINO_PRECISIONS[precision],
                    # The input pipeline's decoding threads share the
                    # cores: pinned inference threads ran at half speed in
                    # some runs (BENCHMARKS.md, "The teacher's runtime").
                    "ENABLE_CPU_PINNING": False}
        streams = int(core.compile_model(model, "CPU", settings).get_property(
            "OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.chunk = min(math.ceil(batch_size / max(1, streams)), MAX_CHUNK)
        model.reshape([self.chunk, image_size, image_size, channels])
        compiled = core.compile_model(model, "CPU", settings)
        self.request_sets = [
            [compiled.create_infer_request()
             for _ in range(math.ceil(batch_size / self.chunk))]
            for _ in range(2)]
        self.turn = 0

    def start(self, pixels):
        pixels = np.asarray(pixels, np.float32)
        count = len(pixels)
        requests = self.request_sets[self.turn]
        self.turn = 1 - self.turn
        padded = len(requests) * self.chunk
        if count < padded:
            pixels = np.concatenate(
                [pixels, np.zeros((padded - count,) + pixels.shape[1:],
                                  np.float32)])
        for index, request in enumerate(requests):
            chunk = pixels[index * self.chunk:(index + 1) * self.chunk]
            request.start_async({0: np.ascontiguousarray(chunk)})

        def wait():
            outputs = []
            for request in requests:
                request.wait()
                outputs.append(request.get_output_tensor(0).data.copy())
            return np.concatenate(outputs)[:count]
        return wait

    def __call__(self, pixels):
        return self.start(pixels)()
