"""A prediction worker run as a subprocess, so a test can kill it (-9).

Usage: python tests/predict_worker.py MODEL OUT_DIR NUM_IMAGES SLEEP_S

It labels the images of `make_images(NUM_IMAGES)` with RECORDS_PER_FILE and
BATCH_SIZE, sleeping SLEEP_S per image so that the parent can kill it while
it is writing.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Run as a script, sys.path[0] is tests/: put this checkout first, so the
# worker runs the code under test, not an installed copy of the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

RECORDS_PER_FILE = 32
BATCH_SIZE = 16
NUM_CLASSES = 10


def make_images(num_images, seed=0):
    """The unlabeled set shared by the tests and this worker."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_images, 12, 12, 3), dtype=np.uint8)


def make_dataset(num_images, sleep_s=0.0):
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": make_images(num_images)})
    if sleep_s:
        def slow(element):
            tf.py_function(lambda: time.sleep(sleep_s), [], [])
            return element
        dataset = dataset.map(slow)
    return dataset


def main(argv):
    from noisy_student.pseudo_labels import prediction  # pylint: disable=g-import-not-at-top
    model, out_dir, num_images, sleep_s = argv[1:5]
    prediction.predict(model, make_dataset(int(num_images), float(sleep_s)),
                    out_dir, NUM_CLASSES, batch_size=BATCH_SIZE,
                    records_per_file=RECORDS_PER_FILE)


if __name__ == "__main__":
    main(sys.argv)
