"""Training and evaluation streams: shapes, ratios, replicas, determinism."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.data import streams
from noisy_student.data import sources

NUM_CLASSES = 10


def labeled_and_pseudo():
    labeled = sources.load_source("digits:train", channels=3).dataset
    unlabeled = sources.load_source("digits:test", labeled=False,
                                    channels=3).dataset
    rng = np.random.default_rng(0)
    targets = rng.dirichlet(np.ones(NUM_CLASSES), 360).astype(np.float32)
    pseudo = tf.data.Dataset.zip(
        (unlabeled, tf.data.Dataset.from_tensor_slices(targets))).map(
            lambda d, t: {"image": d["image"], "target": t})
    return labeled, pseudo


def dataset_fn(labeled, unlabeled=None, num_classes=NUM_CLASSES, **kwargs):
    """The test stream: 16 px, batches of 8 + 24 pseudo-labeled, seed 1."""
    stream = dict(image_size=16, batch_size=8, unlabel_ratio=3, seed=1)
    stream.update({k: kwargs.pop(k) for k in list(kwargs) if k in stream})
    config = streams.InputConfig(**{"shuffle_buffer": 100, "magnitude": 5,
                                    **kwargs})
    return streams.train_dataset_fn(labeled, config, unlabeled=unlabeled,
                                    num_classes=num_classes, **stream)


def test_zipped_stream_has_static_shapes_and_the_ratio():
    labeled, pseudo = labeled_and_pseudo()
    ds = dataset_fn(labeled, pseudo)()
    spec = ds.element_spec
    assert spec["labeled"]["image"].shape == (8, 16, 16, 3)
    assert spec["labeled"]["label"].shape == (8,)
    assert spec["unlabeled"]["image"].shape == (24, 16, 16, 3)
    assert spec["unlabeled"]["target"].shape == (24, NUM_CLASSES)
    batch = next(iter(ds))
    images = batch["unlabeled"]["image"].numpy()
    assert images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255
    np.testing.assert_allclose(batch["unlabeled"]["target"].numpy().sum(1), 1,
                               rtol=1e-5)


def test_teacher_stream_has_only_labeled_images():
    labeled, _ = labeled_and_pseudo()
    ds = dataset_fn(labeled, unlabel_ratio=0)()
    assert set(ds.element_spec) == {"labeled"}


def test_same_seed_same_batches():
    labeled, pseudo = labeled_and_pseudo()
    first = [next(iter(dataset_fn(labeled, pseudo)())) for _ in range(2)]
    for key in ("labeled", "unlabeled"):
        np.testing.assert_array_equal(first[0][key]["image"],
                                      first[1][key]["image"])


def test_two_replica_mirrored_batches_have_configured_sizes():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    labeled, pseudo = labeled_and_pseudo()
    ds = strategy.distribute_datasets_from_function(
        dataset_fn(labeled, pseudo))
    batch = next(iter(ds))
    for replica in range(2):
        local = tf.nest.map_structure(
            lambda t, r=replica: t.values[r], batch)
        assert local["labeled"]["image"].shape[0] == 4
        assert local["unlabeled"]["image"].shape[0] == 12
        assert local["unlabeled"]["target"].shape == (12, NUM_CLASSES)


def test_missing_or_mismatched_pseudo_labels_are_errors():
    labeled, pseudo = labeled_and_pseudo()
    with pytest.raises(ValueError, match="Received: unlabeled=None"):
        dataset_fn(labeled)
    with pytest.raises(ValueError, match="Received: length 10"):
        dataset_fn(labeled, pseudo, num_classes=5)
    with pytest.raises(ValueError, match="shuffle_buffer=0"):
        streams.InputConfig(shuffle_buffer=0)
    with pytest.raises(ValueError, match="augment='randaugmentt'"):
        streams.InputConfig(augment="randaugmentt")


def test_eval_dataset_keeps_every_image():
    source = sources.load_source("digits:test", channels=3)
    ds = streams.eval_dataset(source.dataset, 16, 64)
    sizes = [b["image"].shape[0] for b in ds]
    assert sum(sizes) == 360 and sizes[-1] == 360 % 64


def test_stream_from_start_step_equals_the_rest_of_the_stream():
    labeled, pseudo = labeled_and_pseudo()
    stream_fn = dataset_fn(labeled, pseudo)
    whole = list(stream_fn().take(5))
    resumed = list(stream_fn(start_step=3).take(2))
    for expected, got in zip(whole[3:], resumed):
        for key in ("labeled", "unlabeled"):
            for field in expected[key]:
                np.testing.assert_array_equal(got[key][field],
                                              expected[key][field])


def first_batches(num_batches=2):
    """The first batches of the seeded test stream, as {name: array}."""
    labeled, pseudo = labeled_and_pseudo()
    dataset = dataset_fn(labeled, pseudo)()
    arrays = {}
    for k, batch in enumerate(dataset.take(num_batches)):
        for key in ("labeled", "unlabeled"):
            for field, value in batch[key].items():
                arrays[f"{k}/{key}/{field}"] = value.numpy()
    return arrays


def test_stream_does_not_depend_on_what_ran_before_in_the_process(tmp_path):
    """A seeded stream is a function of its config: the batches a fresh
    process gets are the batches this one gets after other work seeded
    TensorFlow (as every training run and many tests do), drew random
    numbers and built other streams."""
    out = tmp_path / "fresh.npz"
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})"
              "\nimport numpy as np, test_streams\n"
              f"np.savez({str(out)!r}, **test_streams.first_batches())")
    subprocess.run([sys.executable, "-c", script], check=True)
    fresh = dict(np.load(out))
    for global_seed in (0, 3):
        keras.utils.set_random_seed(global_seed)
        tf.random.uniform(())
        next(iter(dataset_fn(labeled_and_pseudo()[0], seed=global_seed,
                             unlabel_ratio=0)()))
        got = first_batches()
        assert got.keys() == fresh.keys()
        for name, value in fresh.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
