"""Test set-up shared by every test: quiet TF, two logical CPU devices,
and the fixtures several test files use."""

import os

from absl import flags
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Two logical CPUs let MirroredStrategy tests run on this one-CPU machine. This
# must happen before TensorFlow initialises its devices, so it lives here.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


def _process_settings():
    """TensorFlow's and Keras' process-wide settings a test could change."""
    import keras  # pylint: disable=g-import-not-at-top
    return {"grappler": tf.config.optimizer.get_experimental_options(),
            "jit": tf.config.optimizer.get_jit(),
            "run_functions_eagerly": tf.config.functions_run_eagerly(),
            "keras_policy": keras.mixed_precision.global_policy().name,
            "floatx": keras.config.floatx()}


@pytest.fixture(autouse=True, scope="module")
def process_settings_unchanged():
    """Fails a module that leaves a process-wide setting changed.

    xdist runs many modules in one process in any order: a setting left
    changed (Grappler off, a mixed-precision policy) changes the numbers of
    every later module there, so a test would pass or fail by module order.
    """
    before = _process_settings()
    yield
    after = _process_settings()
    assert after == before, (
        "Expected the module to leave TensorFlow's and Keras' process-wide "
        f"settings as it found them. Received: {after}, was {before}")


@pytest.fixture
def pipeline_flags():
    """The noisy-student CLI module (its flags defined); flags reset after."""
    from noisy_student.cli import pipeline  # pylint: disable=g-import-not-at-top
    yield pipeline
    flags.FLAGS.unparse_flags()
