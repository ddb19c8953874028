"""absl entry points: ns-train, ns-predict, ns-select, ns-eval, ns-export and
noisy-student.

Importing this package (which every command does first) quiets TensorFlow's
C++ start-up lines (CUDA probing, oneDNN and cpu_feature_guard notes), which
TF 2.21 prints before its log level applies: TensorFlow is imported and its
devices listed with stderr closed, and TF_CPP_MIN_LOG_LEVEL is set to 2
(errors only). A TF_CPP_MIN_LOG_LEVEL the user set is kept and nothing is
hidden (TF_CPP_MIN_LOG_LEVEL=0 shows every line).
"""

import os
import sys


def _import_tensorflow_quietly():
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        tf.config.list_physical_devices()  # The CUDA probe, while quiet.
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()
