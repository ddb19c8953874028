"""The training loop under tf.distribute strategies: MirroredStrategy over
two logical CPUs and MultiWorkerMirroredStrategy over two processes (run as
tests/train_worker.py) give the single-process run's loss and weights."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from noisy_student.model import loading
from noisy_student.training import loop as train_lib

# no_grappler is an autouse fixture: imported, it applies here.
from train_helpers import (  # pylint: disable=g-bad-import-order,unused-import
    FAST_ENV, WORKER, checkpoint_weights, free_port, no_grappler,
    save_initial_model, synthetic_dataset_fn, tiny_config)

# ------------------------------------------------------------- distributed --

# A student, 2 steps, no random noise and synchronised batch norm: the same
# global batch must give the same loss and weights on any strategy.
DISTRIBUTED = dict(train_steps=2, unlabel_ratio=1, dropout_rate=0.0,
                   stochastic_depth_rate=0.0, sync_batch_norm=True,
                   log_every=2, steps_per_loop=2, checkpoint_every=0,
                   base_learning_rate=0.5)


@pytest.fixture(scope="module")
def distributed_setup(tmp_path_factory):
    """The shared initial weights and a lazily computed single-process run."""
    root = tmp_path_factory.mktemp("distributed")
    init_dir = str(root / "init")
    save_initial_model(tiny_config(**DISTRIBUTED), init_dir)
    cache = {}

    def reference():
        if not cache:
            config = tiny_config(**DISTRIBUTED, init_from=init_dir)
            model_dir = str(root / "single")
            cache["result"] = train_lib.train_and_evaluate(config, model_dir,
                                              synthetic_dataset_fn(config))
            cache["weights"] = checkpoint_weights(config, model_dir)
            cache["initial"] = {
                w.path: w.numpy()
                for w in loading.load_model(init_dir).weights}
            cache["model_dir"] = model_dir
        return cache
    return root, init_dir, reference


def _assert_same_run(result, weights, reference):
    assert result["step"] == 2
    assert result["loss"] == pytest.approx(reference["result"]["loss"],
                                           rel=1e-4)
    assert result["unlabeled_loss"] == pytest.approx(
        reference["result"]["unlabeled_loss"], rel=1e-4)
    assert weights.keys() == reference["weights"].keys()
    changed = 0
    for name, value in reference["weights"].items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-3,
                                   atol=2e-5, err_msg=name)
        changed += not np.allclose(value, reference["initial"][name])
    # Training moved (nearly) every weight away from the shared start.
    assert changed > 0.9 * len(weights)


def test_multi_worker_matches_single_process(distributed_setup):
    root, init_dir, reference = distributed_setup
    config = tiny_config(**DISTRIBUTED, init_from=init_dir,
                         strategy="multi_worker_mirrored")
    config_path = str(root / "mw_config.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(config), f)
    model_dir = str(root / "multi_worker")
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    workers = []
    for index in range(2):
        env = dict(os.environ, **FAST_ENV, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = open(root / f"worker{index}.log", "w", encoding="utf-8")
        workers.append(subprocess.Popen(
            [sys.executable, WORKER, model_dir, config_path,
             str(root / f"worker{index}.json")],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        expected = reference()  # runs here while the workers start
        for index, worker in enumerate(workers):
            code = worker.wait(timeout=240)
            assert code == 0, (root / f"worker{index}.log").read_text()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    results = [json.loads((root / f"worker{i}.json").read_text())
               for i in range(2)]
    _assert_same_run(results[0], checkpoint_weights(config, model_dir),
                     expected)
    # Every worker reports the same global metrics; only the chief exports.
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
    saved = json.loads((root / "multi_worker" / "config.json").read_text())
    assert saved["num_replicas"] == 2
    assert os.path.exists(os.path.join(model_dir, "model.keras"))


def test_mirrored_two_replicas_match_single_process(distributed_setup,
                                                    tmp_path):
    _, init_dir, reference = distributed_setup
    config = tiny_config(**DISTRIBUTED, init_from=init_dir, strategy="mirrored")
    model_dir = str(tmp_path / "mirrored")
    result = train_lib.train_and_evaluate(config, model_dir, synthetic_dataset_fn(config))
    saved = json.loads((tmp_path / "mirrored" / "config.json").read_text())
    assert saved["num_replicas"] == 2
    _assert_same_run(result, checkpoint_weights(config, model_dir),
                     reference())
