"""Tests for the training loop (noisy_student.training.loop) on tiny models.

The kill -9 tests run tests/train_worker.py; the tf.distribute strategies
tests are in test_train_distributed.py.
"""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.utils import storage
from noisy_student.model import loading
from noisy_student.utils import reports
from noisy_student.training import strategy as strategy_lib
from noisy_student.training import config as train_config
from noisy_student.training import loop as train_lib
from noisy_student.training import state as train_state

# no_grappler is an autouse fixture: imported, it applies here.
from train_helpers import (  # pylint: disable=g-bad-import-order,unused-import
    FAST_ENV, WORKER, checkpoint_weights, eval_dataset, no_grappler,
    restored_model, save_initial_model, synthetic_dataset_fn, tiny_config)

# ------------------------------------------------------------- single device --

def test_one_step_default_strategy_outputs(tmp_path):
    config = tiny_config(unlabel_ratio=2, train_steps=1, log_every=1,
                         eval_every=1)
    init_dir = str(tmp_path / "init")
    initial = save_initial_model(config, init_dir)
    config = config.replace(init_from=init_dir)
    model_dir = tmp_path / "run"
    dataset_fn = synthetic_dataset_fn(config)
    seen_config = []

    def checking_dataset_fn(input_context):
        # The resolved config is on disk before the first step.
        seen_config.append((model_dir / "config.json").exists())
        return dataset_fn(input_context)

    previous_policy = keras.mixed_precision.global_policy().name
    result = train_lib.train_and_evaluate(config, str(model_dir), checking_dataset_fn,
                             eval_dataset=eval_dataset(config))
    assert seen_config == [True]
    assert result["step"] == 1 and result["start_step"] == 0
    assert np.isfinite(result["loss"]) and result["unlabeled_loss"] > 0
    assert 0 <= result["eval_top1"] <= result["eval_top5"] <= 1
    assert result["learning_rate"] == pytest.approx(config.peak_lr)
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["loop"]["unlabel_ratio"] == 2 and saved["num_replicas"] == 1
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["best"]["top1"] == result["best_eval_top1"]
    assert metrics["last"]["top5"] == result["eval_top5"]
    assert metrics["last"]["count"] == 64
    assert os.listdir(model_dir / "logs" / "train")
    assert os.listdir(model_dir / "logs" / "eval")
    assert keras.mixed_precision.global_policy().name == previous_policy
    assert not [n for n in os.listdir(model_dir) if n.startswith(".tmp-")]
    # model.keras holds the EMA: after one update (decay 2/11 with the
    # warm-up) it is 2/11 * initial + 9/11 * trained weights.
    trained = restored_model(config, str(model_dir)).get_layer("stem_conv")
    trained = trained.kernel.numpy()
    model = loading.load_model(str(model_dir))
    index = [w.path for w in model.weights].index("stem_conv/kernel")
    np.testing.assert_allclose(
        model.get_layer("stem_conv").kernel.numpy(),
        2 / 11 * initial[index] + 9 / 11 * trained, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained, initial[index], atol=1e-4)


def test_tiny_model_overfits_small_labeled_set(tmp_path):
    config = tiny_config(train_steps=100, log_every=20, steps_per_loop=20,
                         base_learning_rate=0.25, label_smoothing=0.0, dropout_rate=0.0,
                         stochastic_depth_rate=0.0, bn_momentum=0.9,
                         checkpoint_every=0, verbose=True)
    result = train_lib.train_and_evaluate(config, str(tmp_path), synthetic_dataset_fn(
        config, num_images=16), eval_dataset=eval_dataset(config, 16))
    losses = reports.read_tensorboard_scalars(tmp_path / "logs" / "train", "loss")
    assert sorted(losses) == [20, 40, 60, 80, 100]
    assert losses[100] < 0.2 * losses[20]
    assert losses[100] == pytest.approx(result["loss"], rel=1e-5)
    assert result["accuracy"] >= 0.95
    # The EMA weights, in inference mode, classify the training set too.
    assert result["eval_top1"] >= 0.9


def test_jit_compile_one_step(tmp_path):
    config = tiny_config(train_steps=1, log_every=1, jit_compile=True)
    result = train_lib.train_and_evaluate(config, str(tmp_path), synthetic_dataset_fn(config))
    assert result["step"] == 1 and np.isfinite(result["loss"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(train_steps=10, checkpoint_every=2, steps_per_loop=2,
                         log_every=2)
    dataset_fn = synthetic_dataset_fn(config)

    def poisoned_fn(input_context):
        # Batches 5.. (the 6th step on) carry NaN pixels.
        def poison(index, element):
            image = element["labeled"]["image"]
            element["labeled"]["image"] = tf.where(
                index >= 5, tf.fill(tf.shape(image), np.nan), image)
            return element
        return dataset_fn(input_context).enumerate().map(poison)

    with pytest.raises(FloatingPointError, match=r"at step 6 .*ckpt-4"):
        train_lib.train_and_evaluate(config, str(tmp_path), poisoned_fn)
    checkpoints = tf.train.get_checkpoint_state(
        str(tmp_path / "checkpoints")).all_model_checkpoint_paths
    assert [int(p.rsplit("-", 1)[1]) for p in checkpoints] == [2, 4]
    weights = checkpoint_weights(config, str(tmp_path))
    assert all(np.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "model.keras").exists()


def test_kill_9_then_resume_finishes_at_configured_step(tmp_path):
    config = tiny_config(train_steps=40, checkpoint_every=5, steps_per_loop=5,
                         log_every=5, keep_checkpoints=20)
    config_path = tmp_path / "config.json.in"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    model_dir = tmp_path / "run"
    ckpt_dir = model_dir / "checkpoints"
    log = open(tmp_path / "worker.log", "w", encoding="utf-8")
    # 100 ms per batch: the run takes >= 4 s, time to kill it mid-way.
    worker = subprocess.Popen(
        [sys.executable, WORKER, str(model_dir), str(config_path),
         str(tmp_path / "result.json"), "100"],
        env=dict(os.environ, **FAST_ENV), stdout=log,
        stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while tf.train.latest_checkpoint(str(ckpt_dir)) is None:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == -signal.SIGKILL
    killed_at = int(tf.train.latest_checkpoint(str(ckpt_dir)).rsplit("-")[-1])
    assert 5 <= killed_at < 40
    assert not (model_dir / "model.keras").exists()

    result = train_lib.train_and_evaluate(config, str(model_dir), synthetic_dataset_fn(config))
    assert result["start_step"] == killed_at
    assert result["step"] == 40
    state = tf.train.get_checkpoint_state(str(ckpt_dir))
    steps = [int(p.rsplit("-", 1)[1])
             for p in state.all_model_checkpoint_paths]
    assert steps == list(range(5, 45, 5))
    for path in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(path)
        assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == \
            int(path.rsplit("-", 1)[1])
    assert loading.load_model(str(model_dir)).count_params() > 0
    # A rerun of a finished run trains no further.
    again = train_lib.train_and_evaluate(config, str(model_dir), synthetic_dataset_fn(config))
    assert again["start_step"] == again["step"] == 40


def test_student_init_from_teacher_and_freeze_blocks(tmp_path):
    # Any saved model serves as the teacher; these are fresh weights.
    teacher = tiny_config()
    save_initial_model(teacher, str(tmp_path / "teacher"))
    teacher_model = loading.load_model(str(tmp_path / "teacher"))
    # FixRes-style: a larger resolution, early blocks frozen.
    student = tiny_config(train_steps=2, log_every=2, image_size=24,
                          init_from=str(tmp_path / "teacher"), freeze_blocks=2,
                          base_learning_rate=0.5)
    train_lib.train_and_evaluate(student, str(tmp_path / "student"), synthetic_dataset_fn(student))
    model = loading.load_model(str(tmp_path / "student"))
    assert model.input_shape[1:3] == (24, 24)
    for name in ("stem_conv", "stem_bn", "block1a_dwconv", "block2a_bn"):
        for got, want in zip(model.get_layer(name).weights,
                             teacher_model.get_layer(name).weights):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    for name in ("block3a_expand_conv", "predictions"):
        assert not np.allclose(model.get_layer(name).weights[0].numpy(),
                               teacher_model.get_layer(name).weights[0].numpy())
    with pytest.raises(ValueError, match="freeze_blocks"):
        train_lib.train_and_evaluate(student.replace(freeze_blocks=99),
                        str(tmp_path / "bad"), synthetic_dataset_fn(student))
    with pytest.raises(FileNotFoundError, match="init_from"):
        train_lib.train_and_evaluate(student.replace(init_from=str(tmp_path)),
                        str(tmp_path / "bad2"), synthetic_dataset_fn(student))


# ------------------------------------------------------------ fail fast ------

def test_tpu_strategy_without_tpu_fails_fast(tmp_path):
    start = time.time()
    with pytest.raises(RuntimeError, match="Expected a reachable TPU"):
        train_lib.train_and_evaluate(tiny_config(strategy="tpu", tpu="local"), str(tmp_path),
                        lambda ctx: None)
    # Fast = no resolver retries (minutes); the bound leaves room for a
    # loaded CI machine (37 s was seen under a load of 11 on 2 cores).
    assert time.time() - start < 60
    with pytest.raises(ValueError, match="tpu"):
        strategy_lib.make_strategy("tpu")
    with pytest.raises(ValueError, match="tpu=None"):
        tiny_config(strategy="tpu")


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("unlabel_ratio", -1), ("optimizer", "lamb"),
    ("precision", "float8"), ("strategy", "parameter_server"),
    ("label_smoothing", 1.0), ("ema_decay", 1.0), ("lr_schedule", "step"),
    ("steps_per_loop", 0), ("num_classes", 1), ("variant", "b9"),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_config_checks_the_labeled_loss_weight():
    with pytest.raises(ValueError, match="labeled_loss_weight=-0.5"):
        tiny_config(unlabel_ratio=2, labeled_loss_weight=-0.5)
    # A teacher's loss is the labeled term alone: weight 0 leaves nothing.
    with pytest.raises(ValueError, match="labeled_loss_weight=0.0"):
        tiny_config(labeled_loss_weight=0.0)
    assert tiny_config(unlabel_ratio=2, labeled_loss_weight=0.0).optimizer \
        .labeled_loss_weight == 0.0


def test_pseudo_labels_only_step_ignores_the_labeled_labels():
    """With labeled_loss_weight=0 the training step's loss and gradients do
    not depend on the labeled images' labels (the images are still
    forwarded, so batch norm sees them); with the default they do."""
    from noisy_student.model import efficientnet  # pylint: disable=g-import-not-at-top
    from noisy_student.training import step as train_step  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    size, n_lab, ratio = 16, 4, 2
    batch = {
        "labeled": {"image": rng.uniform(0, 255, (n_lab, size, size, 3))
                    .astype("float32"),
                    "label": rng.integers(0, 10, n_lab)},
        "unlabeled": {"image": rng.uniform(0, 255, (n_lab * ratio, size,
                                                    size, 3))
                      .astype("float32"),
                      "target": np.eye(10, dtype="float32")[
                          rng.integers(0, 10, n_lab * ratio)]}}
    relabeled = {**batch, "labeled": {**batch["labeled"],
                                      "label": (batch["labeled"]["label"]
                                                + 1) % 10}}
    # No dropout or stochastic depth: two forward passes are identical.
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=size, small_images=True,
        num_classes=10, dropout_rate=0.0, stochastic_depth_rate=0.0)

    def loss_and_grads(weight, b):
        config = tiny_config(batch_size=n_lab, unlabel_ratio=ratio,
                             labeled_loss_weight=weight)
        with tf.GradientTape() as tape:
            loss = train_step._forward_loss(model, b, config)[1]
        return loss, tape.gradient(loss, model.trainable_variables)

    loss_a, grads_a = loss_and_grads(0.0, batch)
    loss_b, grads_b = loss_and_grads(0.0, relabeled)
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    loss_a, _ = loss_and_grads(1.0, batch)
    loss_b, _ = loss_and_grads(1.0, relabeled)
    assert abs(float(loss_a) - float(loss_b)) > 1e-3


def test_config_needs_images_per_epoch_for_epoch_schedules():
    with pytest.raises(ValueError, match="images_per_epoch"):
        tiny_config(warmup_steps=None, warmup_epochs=5.0)
    with pytest.raises(ValueError, match="images_per_epoch"):
        tiny_config(lr_schedule="exponential")
    config = tiny_config(lr_schedule="exponential", images_per_epoch=800,
                         warmup_steps=None)
    assert config.resolved_warmup_steps == 500
    assert train_config.TrainConfig.from_dict(config.to_dict()) == config


def test_config_parts_and_the_flat_config_json_of_older_runs():
    config = tiny_config(base_learning_rate=0.5, dropout_rate=0.3, seed=7)
    # Each leaf field lives in one part; the model part is the builder's
    # keyword arguments as they are.
    assert config.model.dropout_rate == 0.3 and config.loop.seed == 7
    assert config.optimizer.base_learning_rate == 0.5
    assert config.peak_lr == 0.5 * 8 / 256
    assert train_state.build_model(config).get_layer(
        "top_dropout").rate == 0.3
    # A tpu strategy turns synchronized batch norm on, as before.
    assert not config.model.sync_batch_norm
    assert tiny_config(strategy="tpu", tpu="local").model.sync_batch_norm
    with pytest.raises(TypeError, match="learning_rate"):
        tiny_config(learning_rate=0.5)
    # config.json of runs made before the parts: flat, with base_lr and
    # dropout.
    flat = config.fields()
    flat["base_lr"] = flat.pop("base_learning_rate")
    flat["dropout"] = flat.pop("dropout_rate")
    assert train_config.TrainConfig.from_dict(flat) == config


def test_dataset_that_breaks_the_contract_is_rejected(tmp_path):
    teacher = tiny_config(train_steps=1)
    with pytest.raises(ValueError, match="per-replica labeled batches of 16"):
        train_lib.train_and_evaluate(teacher.replace(batch_size=16),
                        str(tmp_path / "a"), synthetic_dataset_fn(teacher))
    student = tiny_config(train_steps=1, unlabel_ratio=1)
    with pytest.raises(ValueError, match="no \"unlabeled\" part"):
        train_lib.train_and_evaluate(teacher, str(tmp_path / "b"), synthetic_dataset_fn(student))
    with pytest.raises(ValueError, match="an \"unlabeled\" part"):
        train_lib.train_and_evaluate(student, str(tmp_path / "c"), synthetic_dataset_fn(teacher))
    with pytest.raises(ValueError, match="unlabel_ratio"):
        train_lib.train_and_evaluate(student.replace(unlabel_ratio=3),
                        str(tmp_path / "d"), synthetic_dataset_fn(student))
    with pytest.raises(FileNotFoundError, match="Received: model=.*nothing"):
        loading.load_model(str(tmp_path / "nothing"))


@pytest.mark.parametrize("precision", ["mixed_float16", "bfloat16"])
def test_mixed_precision_one_step(tmp_path, precision):
    config = tiny_config(train_steps=1, log_every=1, unlabel_ratio=1,
                         precision=precision)
    previous_policy = keras.mixed_precision.global_policy().name
    result = train_lib.train_and_evaluate(config, str(tmp_path), synthetic_dataset_fn(config))
    assert np.isfinite(result["loss"])
    assert keras.mixed_precision.global_policy().name == previous_policy
    reader = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))
    names = reader.get_variable_to_shape_map()
    # Dynamic loss scaling only where float16 needs it.
    assert any("dynamic_scale" in n for n in names) == (
        precision == "mixed_float16")
    # Variables stay float32; the export runs in float32.
    model = loading.load_model(str(tmp_path))
    assert model.dtype_policy.name == "float32"
    assert all(w.dtype == "float32" for w in model.weights)


def test_fused_batch_norm_matches_keras_batch_norm():
    x = tf.constant(np.random.default_rng(0).normal(
        3.0, 2.0, (4, 5, 5, 6)).astype("float32"))
    weights = tf.constant(np.random.default_rng(1).normal(
        size=(4, 5, 5, 6)).astype("float32"))
    layers = []
    for fused in (False, True):
        layer = keras.layers.BatchNormalization(momentum=0.9)
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 6))
        layer.beta.assign(np.linspace(-1.0, 1.0, 6))
        if fused:
            assert train_state.use_fused_batch_norm(
                keras.Sequential([layer])) == 1
        layers.append(layer)
    results = []
    for layer in layers:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * weights)
        grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
        results.append([y] + grads + [layer.moving_mean.numpy(),
                                      layer.moving_variance.numpy()])
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(np.asarray(fused_value),
                                   np.asarray(keras_value),
                                   rtol=1e-4, atol=1e-4)
    graph = tf.function(lambda t: layers[1](t, training=True))
    ops = {op.type for op in graph.get_concrete_function(x).graph
           .get_operations()}
    assert "FusedBatchNormV3" in ops
    # Inference uses the moving statistics, as Keras does.
    np.testing.assert_allclose(layers[1](x, training=False),
                               layers[0](x, training=False), rtol=1e-5)


# ------------------------------------------------------------ resume equality --

def _pipeline_dataset_fn(config, fail_at=None):
    """The real input pipeline (digits, RandAugment, a student's two zipped
    streams); with `fail_at`, fetching global batch `fail_at` raises, as if
    the process died there."""
    from noisy_student.data import streams as pipeline  # pylint: disable=g-import-not-at-top
    from noisy_student.data import sources  # pylint: disable=g-import-not-at-top
    labeled = sources.load_source("digits:train", channels=3).dataset.take(96)
    unlabeled = sources.load_source("digits:test", labeled=False,
                                    channels=3).dataset.take(96)
    pseudo = unlabeled.map(lambda d: {
        "image": d["image"],
        "target": tf.fill([config.model.num_classes], 1.0 / config.model.num_classes)})
    inner = pipeline.train_dataset_fn(
        labeled, pipeline.InputConfig(magnitude=5, shuffle_buffer=50),
        image_size=config.model.image_size, batch_size=config.loop.batch_size,
        unlabel_ratio=config.loop.unlabel_ratio, seed=3, unlabeled=pseudo,
        num_classes=config.model.num_classes)
    if fail_at is None:
        return inner

    def dataset_fn(input_context=None, start_step=0):
        dataset = (inner(input_context, start_step=start_step) if start_step
                   else inner(input_context))

        def check(index, batch):
            ok = tf.debugging.assert_less(
                index, tf.constant(fail_at, tf.int64),
                message="simulated crash")
            with tf.control_dependencies([ok]):
                return tf.nest.map_structure(tf.identity, batch)
        return dataset.enumerate(start_step).map(check)
    return dataset_fn


def _checkpoint_tensors(model_dir):
    """Every tensor of the latest checkpoint (model, optimizer, EMA, seeds)."""
    reader = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
    return {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
            and not name.startswith("save_counter")}


# Noise on: RandAugment in the input, dropout and stochastic depth in the
# model, so every random stream must resume where it stopped.
NOISY_STUDENT = dict(train_steps=12, checkpoint_every=4, steps_per_loop=4,
                     log_every=4, unlabel_ratio=1, dropout_rate=0.3,
                     stochastic_depth_rate=0.5, keep_checkpoints=10)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    config = tiny_config(**NOISY_STUDENT)
    reference_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    previous = tf.config.optimizer.get_experimental_options().get(
        "disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True})  # As no_grappler.
    try:
        train_lib.train_and_evaluate(config, reference_dir,
                                     _pipeline_dataset_fn(config))
    finally:
        # Left off, Grappler stayed off for every later module of this
        # process: their graphs ran unfused, with other float rounding than
        # a fresh process's (tests/pipeline/test_beam.py's worker processes).
        tf.config.optimizer.set_experimental_options(
            {"disable_meta_optimizer": previous})
    return reference_dir


@pytest.mark.parametrize("fail_at", [8, 6], ids=["at_checkpoint",
                                                  "mid_interval"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, fail_at,
                                              uninterrupted_run):
    config = tiny_config(**NOISY_STUDENT)
    reference_dir = uninterrupted_run
    model_dir = str(tmp_path / "resumed")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="simulated crash"):
        train_lib.train_and_evaluate(config, model_dir,
                        _pipeline_dataset_fn(config, fail_at=fail_at))
    result = train_lib.train_and_evaluate(config, model_dir, _pipeline_dataset_fn(config))
    assert result["start_step"] == fail_at // 4 * 4
    reference = _checkpoint_tensors(reference_dir)
    resumed = _checkpoint_tensors(model_dir)
    for name, value in reference.items():
        # Exact: the same ops on the same data in the same order.
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    assert resumed.keys() == reference.keys()
    # The dropout / stochastic-depth seed states are part of the state.
    assert any("seed" in name for name in reference)


def test_speed_and_eta_leave_out_the_tracing_call(tmp_path, capsys):
    config = tiny_config(train_steps=6, steps_per_loop=2, log_every=2,
                         checkpoint_every=0, verbose=True)
    result = train_lib.train_and_evaluate(config, str(tmp_path), synthetic_dataset_fn(config),
                             log_prefix="[teacher] ")
    lines = [l for l in capsys.readouterr().out.splitlines()
             if "step" in l and "loss" in l]
    assert len(lines) == 3
    # The first window is all tracing: no speed or ETA measured from it.
    assert lines[0].startswith("[teacher] step 2/6") and "tracing" in lines[0]
    assert "img/s eta" in lines[1] and "img/s eta" in lines[2]
    assert result["images_per_sec"] > 0


def test_checkpoint_without_seed_states_still_resumes(tmp_path,
                                                     monkeypatch):
    # Checkpoints written before the seed states were saved.
    config = tiny_config(train_steps=4, checkpoint_every=2, steps_per_loop=2,
                         log_every=2, dropout_rate=0.3, keep_checkpoints=5)
    with monkeypatch.context() as patch:
        patch.setattr(train_state, "seed_states", lambda model: [])
        train_lib.train_and_evaluate(config.replace(train_steps=2),
                        str(tmp_path), synthetic_dataset_fn(config))
    result = train_lib.train_and_evaluate(config, str(tmp_path), synthetic_dataset_fn(config))
    assert result["start_step"] == 2 and result["step"] == 4


def _full_disk_at(step):
    """A CheckpointManager.save that fails as on a full disk at `step`: the
    SaveV2 op's error, its empty `ckpt-N_temp/` folder left behind (as
    measured on a full tmpfs)."""
    real = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, **kwargs):
        if checkpoint_number != step:
            return real(self, checkpoint_number=checkpoint_number, **kwargs)
        temp = f"{self.directory}/ckpt-{step}_temp"
        os.makedirs(temp)
        raise tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2_dtypes_3}} "
            f"{temp}/part-00000-of-00001.data-00000-of-00001.tempstate1; "
            "No space left on device [Op:SaveV2]")
    return save


def test_full_disk_names_the_checkpoint_folder_and_leaves_no_partial_save(
        tmp_path, monkeypatch):
    """Issue 32, 4c: a full disk gave a raw ResourceExhaustedError and left
    checkpoints/ckpt-N_temp/ behind."""
    config = tiny_config(train_steps=4, checkpoint_every=2, steps_per_loop=2,
                         log_every=2, keep_checkpoints=5)
    folder = tmp_path / "checkpoints"
    with monkeypatch.context() as patch:
        patch.setattr(tf.train.CheckpointManager, "save", _full_disk_at(4))
        with pytest.raises(storage.DiskFullError) as error:
            train_lib.train_and_evaluate(config, str(tmp_path),
                                         synthetic_dataset_fn(config))
    assert str(error.value) == (
        f"no space left on the device while writing the checkpoint into "
        f"{folder}: free space and rerun (it resumes from its last "
        f"checkpoint, step 2)")
    assert sorted(os.listdir(folder)) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    # A save killed half-way leaves its temp folder too: removed on resume.
    (folder / "ckpt-3_temp").mkdir()
    result = train_lib.train_and_evaluate(config, str(tmp_path),
                                          synthetic_dataset_fn(config))
    assert result["start_step"] == 2 and result["step"] == 4
    assert not [n for n in os.listdir(folder) if n.endswith("_temp")]


def test_full_disk_while_writing_the_model_leaves_no_partial_file(
        tmp_path, monkeypatch):
    config = tiny_config(train_steps=1, log_every=1)

    def save_model(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(keras.saving, "save_model", save_model)
    with pytest.raises(storage.DiskFullError,
                       match=f"^no space left on the device while writing "
                             f"the model {tmp_path}/model.keras: free"):
        train_lib.train_and_evaluate(config, str(tmp_path),
                                     synthetic_dataset_fn(config))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
