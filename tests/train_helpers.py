"""What the training-loop tests share: a tiny config, synthetic data, the
initial weights several runs start from, and Grappler turned off.

Imported by test modules as `import train_helpers` (pytest puts tests/ on
sys.path, as for train_worker.py and weights.py).
"""

import os
import socket

import keras
import pytest
import tensorflow as tf

from noisy_student.training import config as train_config
from noisy_student.training import state

import train_worker  # pylint: disable=g-bad-import-order

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
TINY = dict(width=0.25, depth=0.25, image_size=16, small_images=True,
            num_classes=10, batch_size=8, warmup_steps=0,
            lr_schedule="constant", verbose=False)


def tiny_config(**overrides):
    return train_config.TrainConfig.from_fields(**{**TINY, **overrides})


def synthetic_dataset_fn(config, delay_ms=0, num_images=64):
    images, labels = train_worker.synthetic_data(
        num_images=num_images, image_size=config.model.resolved_image_size,
        num_classes=config.model.num_classes)
    return train_worker.make_dataset_fn(
        images, labels, config.loop.batch_size, config.model.num_classes,
        config.loop.unlabel_ratio, delay_ms)


def eval_dataset(config, num_images=64):
    images, labels = train_worker.synthetic_data(
        num_images=num_images, image_size=config.model.resolved_image_size,
        num_classes=config.model.num_classes)
    return tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": labels}).batch(16)


def save_initial_model(config, path):
    """Saves freshly initialised weights, so runs in different processes can
    start from the same point (init_from)."""
    model = state.build_model(config)
    os.makedirs(path, exist_ok=True)
    keras.saving.save_model(model, os.path.join(path, "model.keras"))
    return [w.numpy() for w in model.weights]


def restored_model(config, model_dir):
    """The raw (not averaged) weights of the latest checkpoint, as a model."""
    model = state.build_model(config)
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(
        os.path.join(model_dir, "checkpoints"))).expect_partial()
    return model


def checkpoint_weights(config, model_dir):
    """{path: value} of the model's weights in the latest checkpoint."""
    return {w.path: w.numpy()
            for w in restored_model(config, model_dir).weights}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Grappler's graph rewrites cost seconds per traced training step and gain
# nothing on these tiny models, so most tests turn them off (the production
# setting, on, is what test_one_step_default_strategy_outputs and the
# benchmark use). Subprocess workers get the same through this variable.
FAST_ENV = {"NS_TEST_DISABLE_GRAPPLER": "1"}


@pytest.fixture(autouse=True)
def no_grappler(request):
    if request.node.name == "test_one_step_default_strategy_outputs":
        yield
        return
    previous = tf.config.optimizer.get_experimental_options().get(
        "disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True})
    yield
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": previous})
