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


@pytest.fixture
def pipeline_flags():
    """The noisy-student CLI module (its flags defined); flags reset after."""
    from noisy_student.cli import pipeline  # pylint: disable=g-import-not-at-top
    yield pipeline
    flags.FLAGS.unparse_flags()
