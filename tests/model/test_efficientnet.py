"""EfficientNet builder: parameter counts, schedule, shapes, config, errors."""

import keras
import numpy as np
import pytest

from noisy_student.model import efficientnet
from noisy_student.model import layers as ns_layers


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def tiny(**kwargs):
    args = dict(width=0.25, depth=0.25, image_size=32, small_images=True,
                num_classes=10)
    args.update(kwargs)
    return efficientnet.build_efficientnet(**args)


@pytest.mark.parametrize("variant, size, reference", [
    ("b0", 224, keras.applications.EfficientNetB0),
    ("b3", 300, keras.applications.EfficientNetB3),
    ("b7", 600, keras.applications.EfficientNetB7),
])
def test_trainable_parameters_match_keras_applications(variant, size,
                                                       reference):
    ours = efficientnet.build_efficientnet(variant, image_size=size)
    theirs = reference(weights=None, input_shape=(size, size, 3))
    assert trainable_count(ours) == trainable_count(theirs)


def test_l2_has_about_480m_parameters(monkeypatch):
    # Zero-filled weights: the count does not depend on the initialiser, and
    # drawing 480M truncated-normal values is most of the build time.
    monkeypatch.setattr(efficientnet, "conv_initializer", lambda: "zeros")
    monkeypatch.setattr(efficientnet, "dense_initializer", lambda: "zeros")
    # Built 300 Python frames down (a notebook, a test runner's worker):
    # Keras maps the graph one frame per layer on its longest path, ~950
    # for L2, next to Python's default limit of 1000.
    def deep(frames):
        if frames:
            return deep(frames - 1)
        return efficientnet.build_efficientnet("l2", image_size=32,
                                               small_images=True)
    model = deep(300)
    assert abs(model.count_params() - 480e6) / 480e6 < 0.02


def test_variant_table_matches_the_paper():
    expected = {"b0": (1.0, 1.0, 224, 0.2), "b4": (1.4, 1.8, 380, 0.4),
                "b7": (2.0, 3.1, 600, 0.5), "b8": (2.2, 3.6, 672, 0.5),
                "l2": (4.3, 5.3, 800, 0.5)}
    for name, values in expected.items():
        v = efficientnet.get_variant(name)
        assert (v.width, v.depth, v.resolution, v.dropout) == values


def test_round_filters_and_repeats():
    assert efficientnet.round_filters(32, 1.0) == 32
    assert efficientnet.round_filters(32, 1.1) == 32  # 35.2 -> 32 (>= 90%)
    assert efficientnet.round_filters(1280, 4.3) == 5504
    assert efficientnet.round_filters(16, 0.1) == 8  # never below divisor
    assert efficientnet.round_repeats(3, 3.1) == 10
    assert efficientnet.round_repeats(1, 0.25) == 1


def test_b7_stochastic_depth_schedule_rises_linearly_to_documented_end():
    model = efficientnet.build_efficientnet("b7")
    total = sum(efficientnet.round_repeats(b.repeats, 3.1)
                for b in efficientnet.BLOCKS)
    assert total == 55
    rates = efficientnet.drop_rates(3.1)
    assert rates[0] == 0.0
    np.testing.assert_allclose(np.diff(rates), 0.2 / total)
    assert rates[-1] == pytest.approx(0.2 * (total - 1) / total)
    # Only blocks with an identity skip (all but the first of each stage)
    # carry the layer, with the rate of their position in the network.
    layers = efficientnet.stochastic_depth_layers(model)
    assert len(layers) == total - len(efficientnet.BLOCKS)
    assert max(layer.rate for layer in layers) == pytest.approx(rates[-1])
    assert all(0 < layer.rate < 0.2 for layer in layers)
    assert layers[-1].rate == pytest.approx(rates[-1])


def test_small_image_variant_feature_map_sizes():
    sides = {k: layer.output.shape[1]
             for k, layer in efficientnet.stage_outputs(tiny()).items()}
    assert sides == {1: 16, 2: 16, 3: 16, 4: 8, 5: 8, 6: 4, 7: 4}
    standard = tiny(small_images=False)
    sides = {k: layer.output.shape[1]
             for k, layer in efficientnet.stage_outputs(standard).items()}
    assert sides == {1: 16, 2: 8, 3: 4, 4: 2, 5: 2, 6: 1, 7: 1}


def test_config_round_trip_gives_identical_outputs():
    model = tiny(stochastic_depth_rate=0.5)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3))
    np.testing.assert_array_equal(model.predict(images, verbose=0),
                                  clone.predict(images, verbose=0))
    assert [l.name for l in clone.layers] == [l.name for l in model.layers]


def test_model_normalises_raw_pixels_and_outputs_float32_logits():
    model = tiny(num_classes=7, channels=1)
    out = model(np.full((2, 32, 32, 1), 255.0, np.float32), training=False)
    assert out.shape == (2, 7)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    norm = model.get_layer("normalize")
    assert isinstance(norm, ns_layers.PixelNormalization)
    x = norm(np.array([[0.0], [255.0]], np.float32))
    assert float(x[0, 0]) < -1.5 and float(x[1, 0]) > 1.5


def test_mixed_precision_keeps_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny()
        out = model(np.zeros((1, 32, 32, 3), np.float32), training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert model.get_layer("stem_conv").compute_dtype == "float16"


def test_sync_batch_norm_option():
    model = tiny(sync_batch_norm=True)
    assert model.get_layer("stem_bn").synchronized


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="b9"), "variant='b9'"),
    (dict(variant=None, width=0.0, depth=1.0), "width=0.0"),
    (dict(variant=None, width=1.0, depth=-1), "depth=-1"),
    (dict(variant="b0", stochastic_depth_rate=1.0),
     "stochastic_depth_rate=1.0"),
    (dict(variant="b0", dropout_rate=-0.1), "dropout_rate=-0.1"),
    (dict(variant="b0", num_classes=0), "num_classes=0"),
    (dict(variant=None), "width=None"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match="Received: .*" + message):
        efficientnet.build_efficientnet(**kwargs)


def test_model_names():
    assert efficientnet.parse_model_name("B3") == ("b3", 1.2, 1.4)
    assert efficientnet.parse_model_name("w0.5-d0.25") == (None, 0.5, 0.25)
    for bad in ("b9", "w0.5", "wx-d1", "w0-d1", "", "wnan-d1", "w1-dinf"):
        with pytest.raises(ValueError, match="Received: model="):
            efficientnet.parse_model_name(bad)
    assert efficientnet.is_smaller("b0", "b1")
    assert efficientnet.is_smaller("w1.2-d0.5", "b0")
    assert not efficientnet.is_smaller("b1", "b0")
    assert not efficientnet.is_smaller("b0", "w1.0-d1.0")


def test_equal_shaped_layers_start_with_different_weights_and_seeds_repeat():
    keras.utils.set_random_seed(3)
    model = tiny(depth=1.0)
    a = model.get_layer("block6b_expand_conv").kernel.numpy()
    b = model.get_layer("block6c_expand_conv").kernel.numpy()
    assert a.shape == b.shape and not np.allclose(a, b)
    keras.utils.set_random_seed(3)
    again = tiny(depth=1.0).get_layer("block6b_expand_conv").kernel.numpy()
    np.testing.assert_array_equal(a, again)
