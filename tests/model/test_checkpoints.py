"""Pretrained weights in: TF1 official checkpoints, Keras .h5 files, ours.

Every checkpoint is built here (no network): a keras.applications
EfficientNet with random, non-trivial weights (batch-norm statistics
included) is the reference; its weights are written as a Keras weight file
and, under the official code's variable names, as a TF1 checkpoint.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.model import checkpoints
from noisy_student.model import efficientnet
from noisy_student.model import loading
from pipeline_runs import run_pipeline
from pipeline_runs import TINY

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
STDDEV = np.array([0.229, 0.224, 0.225], np.float32)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)


def randomize(model, seed=0):
    """Non-trivial weights: every variable, BN statistics included."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            continue
        for w in layer.weights:
            shape = tuple(w.shape)
            if w.name == "moving_variance":
                value = rng.uniform(0.5, 1.5, shape)
            elif w.name == "gamma":
                value = rng.uniform(0.7, 1.3, shape)
            elif w.name in ("beta", "moving_mean", "bias"):
                value = rng.normal(0.0, 0.1, shape)
            else:  # Kernels: keep He-like scale, new values.
                value = np.asarray(w.numpy()) * rng.uniform(0.8, 1.2, shape)
            w.assign(value.astype(np.float32))


def set_normalization(model, variance):
    """Sets the keras.applications normalisation (ImageNet mean)."""
    norm = next(layer for layer in model.layers
                if isinstance(layer, keras.layers.Normalization))
    values = {w.name: w for w in norm.weights}
    values["mean"].assign(MEAN)
    values["variance"].assign(variance)
    norm.finalize_state()


def keras_reference(name, size, include_top=True, classes=1000, seed=0):
    """A keras.applications model returning logits (or pooled features)."""
    builder = getattr(keras.applications, f"EfficientNet{name.upper()}")
    model = builder(weights=None, include_top=include_top, classes=classes,
                    input_shape=(size, size, 3), classifier_activation=None,
                    pooling=None if include_top else "avg")
    randomize(model, seed)
    return model


def save_keras_file(model, path):
    """Writes the weights as keras.applications ships them: the quirk.

    The published files store the ImageNet stddev as the normalisation's
    variance; the function they were trained for divides by the stddev.
    Returns the reference model computing that function.
    """
    set_normalization(model, STDDEV)
    if path.endswith(".weights.h5"):
        model.save_weights(path)
    else:  # Keras 2's format, as the published efficientnetbN.h5 files.
        import h5py  # pylint: disable=g-import-not-at-top
        from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
    set_normalization(model, STDDEV ** 2)  # The trained-for function.
    return model


def official_names(model):
    """{official TF1 name: array} of a keras.applications-named model.

    Written from the official code's side: blocks_N counts blocks in network
    order; inside a block the convolutions are conv2d (expand, if any) then
    conv2d_1 (project), the batch norms tpu_batch_normalization{,_1,_2} in
    call order, the SE convs se/conv2d and se/conv2d_1.
    """
    scope = "efficientnet-b0"
    out = {}
    block_ids, convs, bns = {}, {}, {}
    for layer in model.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization):
            continue
        values = {w.name: np.asarray(w.numpy()) for w in layer.weights}
        name = layer.name
        match = re.match(r"^(block\d[a-z])_(.*)$", name)
        if name in ("stem_conv", "top_conv"):
            where = "stem" if name == "stem_conv" else "head"
            out[f"{scope}/{where}/conv2d/kernel"] = values["kernel"]
            continue
        if name in ("stem_bn", "top_bn"):
            where = "stem" if name == "stem_bn" else "head"
            for var, value in values.items():
                out[f"{scope}/{where}/tpu_batch_normalization/{var}"] = value
            continue
        if name == "predictions":
            for var, value in values.items():
                out[f"{scope}/head/dense/{var}"] = value
            continue
        block, op = match.groups()
        index = block_ids.setdefault(block, len(block_ids))
        base = f"{scope}/blocks_{index}"
        if op == "dwconv":
            out[f"{base}/depthwise_conv2d/depthwise_kernel"] = values["kernel"]
        elif op in ("se_reduce", "se_expand"):
            conv = "conv2d" if op == "se_reduce" else "conv2d_1"
            for var, value in values.items():
                out[f"{base}/se/{conv}/{var}"] = value
        elif op.endswith("_conv"):
            n = convs.get(block, 0)
            convs[block] = n + 1
            out[f"{base}/conv2d{'_1' if n else ''}/kernel"] = values["kernel"]
        else:  # expand_bn, bn, project_bn, in call order
            n = bns.get(block, 0)
            bns[block] = n + 1
            for var, value in values.items():
                suffix = f"_{n}" if n else ""
                out[f"{base}/tpu_batch_normalization{suffix}/{var}"] = value
    return out


def write_tf1(folder, tensors, with_state_file=True):
    """A TF1-format (name-based) checkpoint; returns its prefix."""
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "model.ckpt")
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])
    if with_state_file:
        with open(os.path.join(folder, "checkpoint"), "w") as f:
            f.write('model_checkpoint_path: "model.ckpt"\n')
    return prefix


def tf1_flavour(weights, flavour, rng):
    """raw+ema (raw copies are noise: EMA must win), ema_only or raw_only."""
    tensors = {"global_step": np.int64(1000)}
    for name, value in weights.items():
        if flavour == "raw_only":
            tensors[name] = value
            continue
        tensors[name + "/ExponentialMovingAverage"] = value
        if flavour == "raw+ema":
            tensors[name] = (value + rng.normal(0, 1, value.shape)).astype(
                value.dtype)
            tensors[name + "/RMSProp"] = np.ones_like(value)
    return tensors


def images(size, n=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)


def relative_difference(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def ours(out_dir):
    return keras.saving.load_model(os.path.join(out_dir, "model.keras"),
                                   compile=False)


def same_model_at(model, size):
    """Our converted model rebuilt at another input size (same weights)."""
    config = model.get_config()
    config["layers"][0]["config"]["batch_shape"] = [None, size, size, 3]
    other = keras.Model.from_config(config)
    other.set_weights(model.get_weights())
    return other


@pytest.mark.parametrize("name,size,other,fmt", [
    ("b0", 224, 96, ".weights.h5"), ("b3", 300, 64, ".h5")])
def test_keras_weight_file_gives_the_same_logits(tmp_path, name, size, other,
                                                  fmt):
    reference = save_keras_file(keras_reference(name, size),
                                str(tmp_path / f"w{fmt}"))
    summary = checkpoints.convert(str(tmp_path / f"w{fmt}"), name,
                                  str(tmp_path / "out"), image_size=size)
    assert summary["head"] == "copied" and summary["num_classes"] == 1000
    converted = ours(str(tmp_path / "out"))
    x = images(size)
    assert relative_difference(converted(x), reference(x)) <= 1e-4
    # Another resolution: the same weights in both models at that size.
    ref_other = keras_reference(name, other, seed=5)
    ref_other.set_weights(reference.get_weights())
    set_normalization(ref_other, STDDEV ** 2)
    x = images(other)
    assert relative_difference(same_model_at(converted, other)(x),
                               ref_other(x)) <= 1e-4


def test_keras_weight_file_without_top_gets_a_new_head(tmp_path):
    reference = save_keras_file(keras_reference("b0", 64, include_top=False),
                                str(tmp_path / "notop.weights.h5"))
    with pytest.raises(ValueError, match="num_classes"):
        checkpoints.convert(str(tmp_path / "notop.weights.h5"), "b0",
                            str(tmp_path / "x"), image_size=64)
    summary = checkpoints.convert(str(tmp_path / "notop.weights.h5"), "b0",
                                  str(tmp_path / "out"), image_size=64,
                                  num_classes=7)
    assert summary["head"] == "new"
    converted = ours(str(tmp_path / "out"))
    assert converted.output_shape == (None, 7)
    features = keras.Model(converted.input,
                           converted.get_layer("avg_pool").output)
    x = images(64)
    assert relative_difference(features(x), reference(x)) <= 1e-4


@pytest.mark.parametrize("flavour", ["raw+ema", "ema_only", "raw_only"])
def test_tf1_checkpoint_gives_the_same_logits(tmp_path, flavour):
    # Any resolution tests the names; 64 px keeps the test fast.
    reference = keras_reference("b0", 64)
    set_normalization(reference, STDDEV ** 2)
    tensors = tf1_flavour(official_names(reference), flavour,
                          np.random.default_rng(3))
    prefix = write_tf1(str(tmp_path / "ckpt"), tensors,
                       with_state_file=flavour != "raw_only")
    # A folder with a `checkpoint` file, or a bare prefix.
    source = str(tmp_path / "ckpt") if flavour != "raw_only" else prefix
    summary = checkpoints.convert(source, "b0", str(tmp_path / "out"),
                                  image_size=64)
    assert summary["source"]["kind"] == "tf1"
    assert summary["source"]["ema"] == (flavour != "raw_only")
    x = images(64, n=2)
    assert relative_difference(ours(str(tmp_path / "out"))(x),
                               reference(x)) <= 1e-4


def test_advprop_normalisation_scales_to_minus_one_one(tmp_path):
    reference = keras_reference("b0", 64)
    write_tf1(str(tmp_path / "ckpt"), official_names(reference))
    checkpoints.convert(str(tmp_path / "ckpt"), "b0", str(tmp_path / "out"),
                        image_size=64, normalization="advprop")
    norm = ours(str(tmp_path / "out")).get_layer("normalize")
    assert norm.mean == (127.5,) * 3 and norm.stddev == (127.5,) * 3
    with pytest.raises(ValueError, match="normalization"):
        checkpoints.read(str(tmp_path / "ckpt"), "b0", "inception")


def tiny_tf1(folder, classes=10, seed=0):
    """A TF1 checkpoint of a tiny w0.5-d0.5 EfficientNet (official names)."""
    model = efficientnet.build_efficientnet(
        width=0.5, depth=0.5, num_classes=classes, image_size=32)
    randomize(model, seed)
    write_tf1(folder, official_names(model))
    return model


def test_errors_name_the_problem(tmp_path):
    reference = keras_reference("b0", 64)
    write_tf1(str(tmp_path / "b0"), official_names(reference))
    # A checkpoint of another size.
    with pytest.raises(ValueError, match=r"(?s)model b3.*looks like a "
                       r"checkpoint of b0"):
        checkpoints.convert(str(tmp_path / "b0"), "b3", str(tmp_path / "o"))

    def convert_fails(folder, names, match):
        write_tf1(str(tmp_path / folder), names)
        with pytest.raises(ValueError, match=match):
            checkpoints.convert(str(tmp_path / folder), "b0",
                                str(tmp_path / "o"))

    # Missing variables are listed by name.
    names = official_names(reference)
    del names["efficientnet-b0/blocks_3/conv2d_1/kernel"]
    convert_fails("missing", names, r"1 variables missing, first: "
                  r"block3a_project_conv/kernel")
    # Extra variables are listed by name.
    names = official_names(reference)
    names["efficientnet-b0/blocks_3/conv2d_7/kernel"] = np.zeros([1], "f")
    convert_fails("extra", names, r"not in the model, first: "
                  r"efficientnet-b0/blocks_3/conv2d_7/kernel")
    # A wrong shape: name, expected, received.
    names = official_names(reference)
    names["efficientnet-b0/stem/conv2d/kernel"] = np.zeros([3, 3, 3, 8], "f")
    convert_fails("shape", names, r"stem_conv/kernel: expected shape "
                  r"\(3, 3, 3, 32\), received \(3, 3, 3, 8\)")
    # Keras file of another variant: the variant it fits is named.
    save_keras_file(keras_reference("b0", 64), str(tmp_path / "b0.weights.h5"))
    with pytest.raises(ValueError, match="EfficientNetB0"):
        checkpoints.convert(str(tmp_path / "b0.weights.h5"), "b1",
                            str(tmp_path / "o"))
    # Nothing there; a SavedModel; an existing output.
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        checkpoints.convert(str(tmp_path / "nothing"), "b0",
                            str(tmp_path / "o"))
    checkpoints.convert(str(tmp_path / "b0"), "b0", str(tmp_path / "o"),
                        image_size=64)
    with pytest.raises(FileExistsError, match="out_dir"):
        checkpoints.convert(str(tmp_path / "b0"), "b0", str(tmp_path / "o"))
    assert not os.path.exists(str(tmp_path / "nothing"))


def test_small_image_strides_are_refused_for_imagenet_checkpoints(tmp_path):
    tiny_tf1(str(tmp_path / "ckpt"))
    model = efficientnet.build_efficientnet(
        width=0.5, depth=0.5, num_classes=10, image_size=32,
        small_images=True)
    pretrained = checkpoints.read(str(tmp_path / "ckpt"), "w0.5-d0.5")
    with pytest.raises(ValueError, match="small_images"):
        checkpoints.apply(pretrained, model)


def test_converted_model_loads_everywhere_and_new_head(tmp_path):
    source = tiny_tf1(str(tmp_path / "ckpt"), classes=10)
    checkpoints.convert(str(tmp_path / "ckpt"), "w0.5-d0.5",
                        str(tmp_path / "ten"), image_size=32)
    loaded = loading.load_model(str(tmp_path / "ten"))
    x = images(32)
    np.testing.assert_allclose(loaded(x), source(x), rtol=1e-5, atol=1e-5)
    # Our own model.keras as a source, with a new head.
    summary = checkpoints.convert(str(tmp_path / "ten"), "w0.5-d0.5",
                                  str(tmp_path / "three"), num_classes=3,
                                  image_size=32)
    assert summary["source"]["kind"] == "model.keras"
    assert summary["head"] == "new"
    three = loading.load_model(str(tmp_path / "three"))
    assert loading.num_classes(three) == 3
    pooled = [keras.Model(m.input, m.get_layer("avg_pool").output)(x)
              for m in (three, loaded)]
    np.testing.assert_allclose(pooled[0], pooled[1], rtol=1e-5, atol=1e-5)


def test_fingerprint_changes_with_the_files(tmp_path):
    tiny_tf1(str(tmp_path / "ckpt"))
    before = checkpoints.fingerprint(str(tmp_path / "ckpt"))
    assert len(before["files"]) == 2  # .index and .data
    tiny_tf1(str(tmp_path / "ckpt"), seed=1)
    os.utime(str(tmp_path / "ckpt" / "model.ckpt.index"), ns=(1, 1))
    assert checkpoints.fingerprint(str(tmp_path / "ckpt")) != before


def test_ns_convert_command(tmp_path):
    tiny_tf1(str(tmp_path / "ckpt"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "noisy_student.cli.convert",
               f"--checkpoint={tmp_path}/ckpt", "--model=w0.5-d0.5",
               f"--out_dir={tmp_path}/out", "--image_size=32",
               "--num_classes=4"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "out" / "convert.json") as f:
        summary = json.load(f)
    assert summary["head"] == "new" and summary["num_classes"] == 4


def test_pipeline_teacher_from_a_checkpoint_unchanged(tmp_path):
    """--teacher_train_steps=0 makes the checkpoint the teacher; a changed
    checkpoint invalidates the stages that used it."""
    ckpt = str(tmp_path / "ckpt")
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, num_classes=10, image_size=16)
    randomize(model, seed=0)
    write_tf1(ckpt, official_names(model))
    workdir = str(tmp_path / "work")
    flags_ = [f"--teacher_init={ckpt}", "--teacher_train_steps=0",
              "--iterations=0", "--noexport"]
    proc = run_pipeline(workdir, *flags_)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = keras.saving.load_model(
        f"{workdir}/iteration0/train/model.keras", compile=False)
    for ours_w, source_w in zip(teacher.weights, model.weights, strict=True):
        np.testing.assert_array_equal(ours_w.numpy(), source_w.numpy())
    with open(f"{workdir}/manifest.json") as f:
        first = json.load(f)["stages"]["iteration0/train"]["finished_at"]

    randomize(model, seed=1)
    write_tf1(ckpt, official_names(model))
    proc = run_pipeline(workdir, *flags_)
    assert proc.returncode != 0
    assert "iteration0/train" in proc.stderr and "overwrite" in proc.stderr
    proc = run_pipeline(workdir, *flags_, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(f"{workdir}/manifest.json") as f:
        assert json.load(f)["stages"]["iteration0/train"][
            "finished_at"] != first
    teacher = keras.saving.load_model(
        f"{workdir}/iteration0/train/model.keras", compile=False)
    np.testing.assert_array_equal(teacher.get_layer("stem_conv").kernel,
                                  model.get_layer("stem_conv").kernel)


def test_student_init_reaches_every_student_and_its_fingerprint(tmp_path):
    """--student_init: each iteration's student config starts from the
    checkpoint, whose files are part of the students' fingerprints."""
    from absl import flags  # pylint: disable=g-import-not-at-top
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    from noisy_student.cli import pipeline as cli  # pylint: disable=g-import-not-at-top
    ckpt = str(tmp_path / "ckpt")
    write_tf1(ckpt, official_names(efficientnet.build_efficientnet(
        width=0.25, depth=0.25, num_classes=10, image_size=16)))

    def plan():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["noisy-student", f"--workdir={tmp_path}/work",
                     *TINY, f"--student_init={ckpt}",
                     "--noinit_student_from_teacher", "--iterations=2"])
        config = cli.experiment_config()
        experiment.check(config)  # Reads the checkpoint against each model.
        return {s.name: s for s in experiment.plan(config)}

    try:
        before = plan()
        for r in (1, 2):
            assert before[f"iteration{r}/train"].config.init_from == ckpt
        assert not before["iteration0/train"].config.init_from
        os.utime(f"{ckpt}/model.ckpt.index", ns=(1, 1))
        after = plan()
    finally:
        flags.FLAGS.unparse_flags()
    assert (after["iteration0/train"].fingerprint
            == before["iteration0/train"].fingerprint)
    for r in (1, 2):
        assert (after[f"iteration{r}/train"].fingerprint
                != before[f"iteration{r}/train"].fingerprint)


def test_pipeline_refuses_a_teacher_checkpoint_without_its_head(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, num_classes=3, image_size=16)
    write_tf1(ckpt, official_names(model))
    proc = run_pipeline(str(tmp_path / "work"), f"--teacher_init={ckpt}",
                        "--teacher_train_steps=0")
    assert proc.returncode != 0
    assert "teacher_train_steps > 0" in proc.stderr
    assert not os.path.exists(str(tmp_path / "work" / "iteration0"))


def test_training_from_a_checkpoint_keeps_its_normalisation(tmp_path):
    """ns-train --init_from: the run's model.keras keeps the source's pixel
    scaling (AdvProp here); with train_steps=0 it is the source unchanged."""
    import train_worker  # pylint: disable=g-import-not-at-top
    from noisy_student.training import config as train_config  # pylint: disable=g-import-not-at-top
    from noisy_student.training import loop  # pylint: disable=g-import-not-at-top
    tiny_tf1(str(tmp_path / "ckpt"))
    checkpoints.convert(str(tmp_path / "ckpt"), "w0.5-d0.5",
                        str(tmp_path / "advprop"), image_size=32,
                        normalization="advprop")
    source = ours(str(tmp_path / "advprop"))
    for steps in (0, 2):
        config = train_config.TrainConfig.from_fields(
            width=0.5, depth=0.5, image_size=32, num_classes=10,
            batch_size=8, warmup_steps=0, lr_schedule="constant",
            verbose=False, train_steps=steps, log_every=1,
            init_from=str(tmp_path / "advprop"))
        images_, labels = train_worker.synthetic_data(
            num_images=16, image_size=32, num_classes=10)
        model_dir = str(tmp_path / f"run{steps}")
        loop.train_and_evaluate(
            config, model_dir,
            train_worker.make_dataset_fn(images_, labels, 8, 10, 0, 0))
        trained = ours(model_dir)
        assert trained.get_layer("normalize").stddev == (127.5,) * 3
        same = [np.array_equal(a, b) for a, b in
                zip(trained.get_weights(), source.get_weights(), strict=True)]
        assert all(same) == (steps == 0)
    with pytest.raises(ValueError, match="train_steps > 0"):
        train_config.TrainConfig.from_fields(
            width=0.5, depth=0.5, image_size=32, train_steps=0,
            warmup_steps=0, lr_schedule="constant")


def test_convert_refuses_bad_sizes_and_unreadable_files(tmp_path):
    tiny_tf1(str(tmp_path / "ckpt"))
    for kwargs, flag in (({"num_classes": 0}, "num_classes"),
                         ({"num_classes": 1}, "num_classes"),
                         ({"image_size": 0}, "image_size")):
        with pytest.raises(ValueError, match=f"Received: {flag}="):
            checkpoints.convert(str(tmp_path / "ckpt"), "w0.5-d0.5",
                                str(tmp_path / "out"), **kwargs)
    truncated = tmp_path / "cut.weights.h5"
    save_keras_file(keras_reference("b0", 32, include_top=False),
                    str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(ValueError, match=f"checkpoint={truncated}"):
        checkpoints.convert(str(truncated), "b0", str(tmp_path / "out"),
                            num_classes=3)
