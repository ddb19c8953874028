"""The student is noised where the paper noises it (Xie et al. 2020, Sec. 2).

The teacher labels clean images; the student sees the same images through
RandAugment, and its forward pass runs with dropout and stochastic depth.
These tests take the student's settings from the `noisy-student` command's
own flag parsing (`flags/digits.cfg`, shrunk to a tiny model), build its
input stream with `pipeline.train_dataset_fn` and its model with
`training.state.build_model`, as `stages.run_train` does, and check each noise
source on the unlabeled half of a student batch. Each check is paired with
the same computation with that noise switched off (`--student_augment=none`,
`--student_dropout_rate=0`, `--student_stochastic_depth_rate=0`), which must
show no difference: the tests see the noise, not some other randomness.
"""

import pathlib

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.data import randaugment as augment
from noisy_student.training import losses
from noisy_student.training import state
from noisy_student.data import streams
from noisy_student.data import preprocess
from noisy_student.data import sources

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
# The digits demo's student (RandAugment N=2 M=5, dropout 0.2 = the
# default of a wW-dD model, stochastic depth 0.2), on a tiny model.
TINY = [
    f"--flagfile={ROOT}/flags/digits.cfg", "--teacher_model=w0.25-d0.5",
    "--image_size=16", "--batch_size=16", "--unlabel_ratio=2",
    "--iterations=1",
]
NUM_UNLABELED = 10  # One image per class: the one-hot target names it.


@pytest.fixture
def student(tmp_path):
    """fn(*extra_flags) -> the student TrainConfig of the noisy-student
    command."""
    from noisy_student.cli import pipeline as cli  # pylint: disable=g-import-not-at-top

    def parse(*extra):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["noisy-student", f"--workdir={tmp_path}", *TINY,
                     *extra])
        config = cli.experiment_config()
        return config.student

    yield parse
    flags.FLAGS.unparse_flags()


def _unlabeled():
    """NUM_UNLABELED digits:test images (uint8 [N, 8, 8, 3]), image i with
    the one-hot pseudo-label i, so a batch row tells which image it is."""
    source = sources.load_source("digits:test", labeled=False, channels=3)
    images = np.stack([d["image"] for d in
                       source.dataset.take(NUM_UNLABELED).as_numpy_iterator()])
    return images, np.eye(NUM_UNLABELED, dtype=np.float32)


def _first_batch(config):
    """The first batch of the student's real input stream."""
    labeled = sources.load_source("digits:train", channels=3).dataset.take(64)
    images, targets = _unlabeled()
    unlabeled = tf.data.Dataset.from_tensor_slices(
        {"image": images, "target": targets})
    return next(iter(config.train_dataset_fn(labeled, unlabeled)()))


def test_unlabeled_images_are_randaugmented_versions_of_the_teachers(
        student):
    config = student()
    assert config.input.augment == "randaugment"
    assert config.input.magnitude == 5
    batch = _first_batch(config)["unlabeled"]
    # The same stream without RandAugment: the same seed gives the same
    # images in the same order with the same base crop and flip (their
    # seeds do not depend on the augmenter), so what differs is RandAugment.
    plain = _first_batch(student("--student_augment=none"))["unlabeled"]
    np.testing.assert_array_equal(batch["target"], plain["target"])

    images, _ = _unlabeled()
    which = np.argmax(batch["target"].numpy(), axis=-1)
    # What the teacher saw when it labeled image i (the predict stage's
    # transform): the whole image, clean.
    clean = np.stack([preprocess.eval_image(images[i], config.model.image_size,
                                            3).numpy() for i in which])
    clean = clean.astype(np.float32)
    noised = batch["image"].numpy()
    base = plain["image"].numpy()
    per_image = lambda a, b: np.abs(a - b).mean(axis=(1, 2, 3))  # noqa: E731
    assert noised.shape == clean.shape == (32, 16, 16, 3)
    # The student batch is the paper's RandAugment (N=2, M=5, the small-image
    # translate and cutout sizes) of the same images through the base crop
    # and flip alone, with the stream's seed of its first unlabeled batch:
    # [seed * 1000 + 2 (the unlabeled stream), batch index 0].
    seed = tf.constant([config.loop.seed * 1000 + 2, 0], tf.int32)
    expected = augment.randaugment(
        tf.cast(base, tf.uint8), 2, 5, seed,
        **streams.SMALL_IMAGE_AUGMENT).numpy()
    np.testing.assert_array_equal(noised, expected)
    # Most of them are changed by it: two ops of M=5 per image (a few of the
    # 16 ops leave a grey digit nearly as it is, e.g. Color, so not all; 25
    # of these 32 are changed by more than 1 grey level on average).
    changed = per_image(noised, base) > 1.0
    assert changed.mean() >= 0.5, per_image(noised, base)
    # And the student images differ from the clean ones their targets came
    # from (an image can come through unchanged: a crop at offset 0, no
    # flip and two ops that leave a grey digit as it is).
    assert (per_image(noised, clean) > 0).mean() >= 0.9, per_image(
        noised, clean)


def _model_and_batch(student, *extra):
    config = student(*extra)
    batch = _first_batch(config)
    images = tf.concat([batch["labeled"]["image"],
                        batch["unlabeled"]["image"]], axis=0)
    # The student's forward pass is on labeled + unlabeled images at once
    # (training.loop's step); rows n_labeled: are the unlabeled half.
    return config, state.build_model(config), images, batch


@pytest.mark.parametrize("extra, noise", [
    ((), "dropout and stochastic depth"),
    (("--student_dropout_rate=0",), "stochastic depth"),
    (("--student_stochastic_depth_rate=0",), "dropout"),
    (("--student_dropout_rate=0", "--student_stochastic_depth_rate=0"), None),
])
def test_training_passes_differ_on_the_unlabeled_half(student, extra, noise):
    config, model, images, batch = _model_and_batch(student, *extra)
    n_labeled = batch["labeled"]["image"].shape[0]
    first = model(images, training=True).numpy()[n_labeled:]
    second = model(images, training=True).numpy()[n_labeled:]
    differs = np.abs(first - second).max(axis=-1) > 1e-5
    if noise is None:
        # No dropout, no stochastic depth: batch norm's batch statistics
        # are the same for the same batch, so the passes are equal.
        assert config.model.dropout_rate == 0 and (
            config.model.stochastic_depth_rate == 0)
        assert not differs.any()
    elif noise == "stochastic depth":
        # Whole samples' residual branches are dropped (rates 0.2 * i / n):
        # some rows keep every block in both passes.
        assert differs.mean() >= 0.5, (noise, differs)
    else:
        # Head dropout of 0.2 on every row's features.
        assert differs.all(), (noise, differs)


def test_noised_loss_is_higher_than_the_clean_loss_on_a_fitted_batch(
        student):
    """The training-mode loss with dropout and stochastic depth exceeds the
    loss of the same weights without them, on a batch the model has fitted.

    Both are computed in training mode, so batch norm uses the batch's own
    statistics in each: the difference is the noise's alone (the issue's
    "training loss above inference loss" would also compare batch
    statistics with a few steps' moving averages).
    """
    config, model, images, batch = _model_and_batch(student)
    clean_config = config.replace(dropout_rate=0.0,
                                  stochastic_depth_rate=0.0)
    clean = state.build_model(clean_config)
    n_labeled = batch["labeled"]["image"].shape[0]

    def loss(net):
        logits = net(images, training=True)
        return losses.noisy_student_loss(
            batch["labeled"]["label"], logits[:n_labeled],
            config.loop.batch_size, targets=batch["unlabeled"]["target"],
            unlabeled_logits=logits[n_labeled:])[0]

    optimizer = tf.keras.optimizers.Adam(3e-3)

    @tf.function
    def fit_step():  # With the noise, the student's way.
        with tf.GradientTape() as tape:
            value = loss(model)
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for _ in range(40):
        fit_step()
    for layer in clean.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    clean_loss = float(loss(clean))
    noised_loss = np.mean([float(loss(model)) for _ in range(8)])
    assert clean_loss < 1.0, clean_loss  # The batch is fitted.
    assert noised_loss > 1.2 * clean_loss, (noised_loss, clean_loss)
