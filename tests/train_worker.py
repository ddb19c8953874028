"""One training run in its own process, for the subprocess tests.

Used by tests/training/test_loop.py for the multi-worker test (one process per
worker, TF_CONFIG in the environment) and the kill -9 / resume test. Also
holds the synthetic data those tests share.

    python tests/train_worker.py MODEL_DIR CONFIG_JSON RESULT_JSON [DELAY_MS]
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Run as a script, sys.path[0] is tests/: put this checkout first, so the
# worker runs the code under test, not an installed copy of the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def synthetic_data(num_images=64, image_size=16, num_classes=10, seed=0):
    """Deterministic images in [0, 255] with labels, as numpy arrays."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (num_images, image_size, image_size, 3))
    labels = rng.integers(0, num_classes, num_images)
    return images.astype("float32"), labels.astype("int32")


def make_dataset_fn(images, labels, global_batch, num_classes,
                    unlabel_ratio=0, delay_ms=0):
    """A train_dataset_fn whose global batch k is always images[kB:(k+1)B].

    However the global batch is split (one process, several replicas, several
    workers), the union of the per-replica batches of step k is the same, so
    runs under different strategies see the same data.
    """
    def dataset_fn(input_context):
        per_replica = input_context.get_per_replica_batch_size(global_batch)
        share = global_batch // input_context.num_input_pipelines
        start = input_context.input_pipeline_id * share
        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
        dataset = dataset.repeat().batch(global_batch, drop_remainder=True)
        dataset = dataset.map(
            lambda x, y: (x[start:start + share], y[start:start + share]))
        dataset = dataset.unbatch().batch(per_replica, drop_remainder=True)

        def to_element(x, y):
            element = {"labeled": {"image": x, "label": y}}
            if unlabel_ratio:
                # Pseudo-labels: soft targets peaked on the true class.
                target = 0.8 * tf.one_hot(y, num_classes) + 0.2 / num_classes
                element["unlabeled"] = {
                    "image": tf.repeat(x, unlabel_ratio, axis=0),
                    "target": tf.repeat(target, unlabel_ratio, axis=0)}
            return element
        dataset = dataset.map(to_element)
        if delay_ms:
            dataset = dataset.map(lambda e: _after_sleep(e, delay_ms / 1000))
        return dataset.prefetch(2)
    return dataset_fn


def _after_sleep(element, seconds):
    """`element`, produced `seconds` late (slows a run down for kill tests)."""
    done = tf.py_function(lambda: time.sleep(seconds) or 0, [], tf.int32)
    with tf.control_dependencies([done]):
        return tf.nest.map_structure(tf.identity, element)


def main(argv):
    model_dir, config_json, result_json = argv[1:4]
    delay_ms = float(argv[4]) if len(argv) > 4 else 0.0
    # Imported here: a multi-worker strategy must exist before other TF ops.
    from noisy_student.training import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
    from noisy_student.training import config as train_config  # pylint: disable=g-import-not-at-top
    from noisy_student.training import loop as train_lib  # pylint: disable=g-import-not-at-top
    with open(config_json, encoding="utf-8") as f:
        config = train_config.TrainConfig.from_dict(json.load(f))
    strategy = strategy_lib.make_strategy(config.loop.strategy, config.loop.tpu)
    if os.environ.get("NS_TEST_DISABLE_GRAPPLER"):
        # As the in-process tests do: tracing is the slow part of tiny runs.
        tf.config.optimizer.set_experimental_options(
            {"disable_meta_optimizer": True})
    images, labels = synthetic_data(
        image_size=config.model.resolved_image_size, num_classes=config.model.num_classes)
    dataset_fn = make_dataset_fn(images, labels, config.loop.batch_size,
                                 config.model.num_classes, config.loop.unlabel_ratio,
                                 delay_ms)
    result = train_lib.train_and_evaluate(config, model_dir, dataset_fn, strategy=strategy)
    with open(result_json, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv)
