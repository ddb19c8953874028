"""Tests of evaluation metrics, ImageNet-C/A/P arithmetic and adversarial
accuracy (noisy_student/evaluation/evaluator.py and noisy_student/evaluation/)."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from noisy_student.model import efficientnet
from noisy_student.evaluation import evaluator as E
from noisy_student.utils import storage
from noisy_student.model import loading
from noisy_student.evaluation import adversarial
from noisy_student.evaluation import clean
from noisy_student.evaluation import imagenet_a
from noisy_student.evaluation import imagenet_c
from noisy_student.evaluation import imagenet_p
from noisy_student.evaluation import inference
from noisy_student.evaluation import metrics
import weights  # pylint: disable=g-bad-import-order

SIZE = 16


def _digits(size=SIZE):
    """sklearn digits as uint8 RGB images at `size` px and int32 labels."""
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 255.0
    images = tf.image.resize(images[..., None], (size, size)).numpy()
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return np.repeat(images, 3, axis=-1), digits.target.astype(np.int32)


def _dataset(images, labels):
    return tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": labels})


def _tiny_model(num_classes=10, size=SIZE, seed=0):
    return weights.redraw_weights(efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=size, small_images=True,
        num_classes=num_classes, dropout_rate=0.0,
        stochastic_depth_rate=0.0, bn_momentum=0.9), seed)


@pytest.fixture(scope="module")
def digits():
    images, labels = _digits()
    return {"train": (images[:800], labels[:800]),
            "test": (images[1500:], labels[1500:])}


@pytest.fixture(scope="module")
def untrained():
    keras.utils.set_random_seed(1)
    return _tiny_model()


@pytest.fixture(scope="module")
def trained(digits):
    """A tiny EfficientNet trained for 3 epochs on 800 digits (~15 s)."""
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, labels = digits["train"]
    model.fit(images.astype(np.float32), labels, batch_size=32, epochs=3,
              verbose=0)
    return model


# ---------------------------------------------------------------- metrics


def test_top_k_accuracy_on_hand_made_logits():
    logits = np.array([[3.0, 2.0, 1.0, 0.0],   # label 0: rank 1
                       [0.0, 1.0, 2.0, 3.0],   # label 1: rank 3
                       [1.0, 1.0, 0.0, 0.0]])  # label 3: tied 3rd-4th
    labels = np.array([0, 1, 3])
    assert metrics.top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(logits, labels, 2) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(logits, labels, 3) == pytest.approx(1.0)
    # Same tie rule as tf.math.in_top_k.
    for k in (1, 2, 3):
        expected = tf.reduce_mean(tf.cast(tf.math.in_top_k(
            labels, logits.astype(np.float32), k), tf.float32))
        assert metrics.top_k_accuracy(logits, labels, k) == pytest.approx(
            float(expected))


def test_ece_on_hand_made_probabilities():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05],
                              [0.65, 0.35], [0.65, 0.35]])
    labels = np.array([0, 1, 0, 0])
    # Bin of 0.95: accuracy 0.5; bin of 0.65: accuracy 1.0.
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.65)
    assert metrics.expected_calibration_error(probabilities, labels) == (
        pytest.approx(expected))
    # One bin: |mean accuracy - mean confidence|.
    assert metrics.expected_calibration_error(probabilities, labels, 1) == (
        pytest.approx(abs(0.75 - 0.8)))
    # Perfect confidence on correct answers: ECE 0.
    assert metrics.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    counts, _, _ = metrics.calibration_bins(probabilities, labels, 15)
    assert counts.sum() == 4 and counts[14] == 2 and counts[9] == 2


def test_per_class_accuracy_and_confusion_matrix():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2])
    matrix = metrics.confusion_matrix(labels, predictions, 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0],
                               [0, 0, 0, 0]]
    accuracy = metrics.per_class_accuracy(labels, predictions, 4)
    assert accuracy[:3] == pytest.approx([0.5, 2 / 3, 1.0])
    assert accuracy[3] is None


# ------------------------------------------------------------- ImageNet-C


def test_alexnet_table_matches_published_per_corruption_ce():
    # The per-corruption means published with the paper's code (AlexNet CE).
    published = {
        "gaussian_noise": 0.886428, "shot_noise": 0.894468,
        "impulse_noise": 0.922640, "defocus_blur": 0.819880,
        "glass_blur": 0.826268, "motion_blur": 0.785948,
        "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
        "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
        "elastic_transform": 0.646056, "pixelate": 0.717840,
        "jpeg_compression": 0.606500}
    alexnet = imagenet_c.ALEXNET_IMAGENET_C_ERRORS
    assert set(alexnet) == set(imagenet_c.IMAGENET_C_CORRUPTIONS)
    for name, mean in published.items():
        assert np.mean(alexnet[name]) == pytest.approx(mean, abs=1e-6), name


def test_mce_arithmetic_on_known_tables():
    alexnet = imagenet_c.ALEXNET_IMAGENET_C_ERRORS
    result = imagenet_c.corruption_errors(alexnet)
    assert result["mce"] == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in result["ce"].values())
    relative = imagenet_c.relative_corruption_errors(
        alexnet, imagenet_c.ALEXNET_CLEAN_ERROR)
    assert relative["relative_mce"] == pytest.approx(100.0)
    # Half of AlexNet's error everywhere: mCE 50.
    half = {k: [e / 2 for e in v] for k, v in alexnet.items()}
    assert imagenet_c.corruption_errors(half)["mce"] == pytest.approx(50.0)
    # A hand-computed two-corruption table against a custom baseline.
    errors = {"a": [0.1, 0.2, 0.3, 0.4, 0.5], "b": [0.2] * 5}
    baseline = {"a": [0.3] * 5, "b": [0.4] * 5}
    result = imagenet_c.corruption_errors(errors, baseline)
    assert result["ce"]["a"] == pytest.approx(100 * 1.5 / 1.5)
    assert result["ce"]["b"] == pytest.approx(50.0)
    assert result["mce"] == pytest.approx(75.0)
    relative = imagenet_c.relative_corruption_errors(errors, 0.1, baseline,
                                                     0.2)
    # a: sum(E - 0.1) = 1.0, sum(B - 0.2) = 0.5 -> 200; b: 0.5 / 1.0 -> 50.
    assert relative["relative_ce"]["a"] == pytest.approx(200.0)
    assert relative["relative_ce"]["b"] == pytest.approx(50.0)
    assert relative["relative_mce"] == pytest.approx(125.0)


def test_mce_names_a_missing_corruption():
    errors = dict(imagenet_c.ALEXNET_IMAGENET_C_ERRORS)
    del errors["frost"]
    with pytest.raises(ValueError, match="frost"):
        imagenet_c.corruption_errors(errors)


def test_imagenet_c_source_missing_a_corruption_fails_before_work():
    class NeverCalled:
        def __call__(self, *args, **kwargs):
            raise AssertionError("evaluation must not start")

    tiny = _dataset(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int32))
    source = {(name, s): tiny for name in imagenet_c.IMAGENET_C_CORRUPTIONS
              for s in imagenet_c.SEVERITIES if (name, s) != ("fog", 3)}
    with pytest.raises(ValueError, match=r"'fog' at severity 3"):
        imagenet_c.evaluate_imagenet_c(NeverCalled(), source)
    nested = {"fog": {1: tiny}}
    with pytest.raises(ValueError, match="gaussian_noise"):
        imagenet_c.evaluate_imagenet_c(NeverCalled(), nested)


def test_imagenet_c_data_dir_without_the_data_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"gaussian_noise.*severity 1"):
        imagenet_c.load_imagenet_c(str(tmp_path))


def test_imagenet_c_evaluation_on_a_fake_source(digits, untrained):
    model = untrained
    images, labels = digits["test"]
    data = _dataset(images[:16], labels[:16])
    # Two corruptions from a nested mapping, all five severities.
    source = {"fog": {s: data for s in imagenet_c.SEVERITIES},
              "snow": {s: data.take(8) for s in imagenet_c.SEVERITIES}}
    result = imagenet_c.evaluate_imagenet_c(
        model, source, corruptions=("fog", "snow"), clean_error=0.5)
    logits, _ = inference.predict_logits(model, data)
    expected = 1.0 - metrics.top_k_accuracy(logits, labels[:16], 1)
    assert result["errors"]["fog"] == pytest.approx([expected] * 5)
    assert set(result["ce"]) == {"fog", "snow"}
    assert result["mce"] == pytest.approx(np.mean(list(result["ce"].values())))
    assert "relative_mce" in result


# ------------------------------------------------------------- ImageNet-A/P


def test_imagenet_a_class_indices():
    indices = imagenet_a.IMAGENET_A_CLASS_INDICES
    assert len(indices) == 200 and len(set(indices)) == 200
    assert list(indices) == sorted(indices)
    assert 0 <= indices[0] and indices[-1] < 1000
    # Spot checks against thousand_k_to_200 of natural-adv-examples.
    for position, index in ((0, 6), (38, 207), (100, 496), (119, 606),
                            (154, 802), (179, 924), (199, 988)):
        assert indices[position] == index


def test_imagenet_a_accuracy_restricts_logits_to_its_classes():
    logits = np.zeros((3, 1000))
    logits[:, 0] = 10.0          # class 0 is not an ImageNet-A class
    logits[0, 6] = 5.0           # best of the 200: 6 (correct)
    logits[1, 988] = 5.0         # best of the 200: 988 (label 11: wrong)
    logits[2, 11] = 1.0          # best of the 200: 11 (correct)
    labels = np.array([6, 11, 11])
    assert imagenet_a.imagenet_a_predictions(logits).tolist() == [6, 988, 11]
    accuracy = imagenet_a.imagenet_a_accuracy(logits, labels)
    assert accuracy == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1000"):
        imagenet_a.imagenet_a_predictions(np.zeros((1, 10)))


def test_flip_probability_definition():
    predictions = np.array([[1, 2, 2, 2], [3, 3, 3, 3]])
    # Consecutive frames: 1 flip of 3, then 0 of 3.
    flip_probability = imagenet_p.flip_probability
    assert flip_probability(predictions) == pytest.approx((1 / 3) / 2)
    # Noise: every frame against the first: 3 of 3, then 0 of 3.
    assert flip_probability(predictions, noise=True) == pytest.approx(0.5)
    # step 2: sub-sequences [1, 2] and [2, 2] -> 1 flip of 2; then 0.
    assert flip_probability(predictions, step=2) == pytest.approx(0.25)


def test_imagenet_p_on_constant_and_changing_sequences(untrained):
    model = untrained
    rng = np.random.RandomState(0)
    frame = rng.randint(0, 256, (2, 1, SIZE, SIZE, 3)).astype(np.uint8)
    constant = np.repeat(frame, 4, axis=1)
    result = imagenet_p.evaluate_imagenet_p(
        model, {"translate": constant, "gaussian_noise": constant},
        baseline_flip_probabilities={"translate": 0.5, "gaussian_noise": 0.5})
    assert result["flip_probability"] == {"translate": 0.0,
                                          "gaussian_noise": 0.0}
    assert result["mfr"] == 0.0
    with pytest.raises(ValueError, match="num_seq, frames"):
        imagenet_p.evaluate_imagenet_p(model, {"translate": constant[0]})


# ------------------------------------------------------------ clean + model


def test_clean_evaluation_of_a_trained_model(trained, digits, tmp_path):
    images, labels = digits["test"]
    png = str(tmp_path / "cm.png")
    result = clean.evaluate_clean(trained, _dataset(images, labels),
                                  num_classes=10, batch_size=50,
                                  confusion_png=png)
    assert result["num_examples"] == len(labels)
    assert result["top1"] > 0.5            # well above chance (0.1)
    assert result["top5"] >= result["top1"]
    assert 0.0 <= result["ece"] <= 1.0
    assert np.sum(result["confusion_matrix"]) == len(labels)
    logits = trained(images.astype(np.float32), training=False).numpy()
    assert result["top1"] == pytest.approx(
        np.mean(logits.argmax(1) == labels))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_class_count_mismatch_is_a_clear_error(digits, untrained):
    images, labels = digits["test"]
    data = _dataset(images[:8], labels[:8])
    model = untrained
    with pytest.raises(ValueError, match=r"10 classes.*num_classes=5"):
        clean.evaluate_clean(model, data, num_classes=5)
    unlabeled = tf.data.Dataset.from_tensor_slices({"image": images[:4]})
    with pytest.raises(ValueError, match="labeled"):
        clean.evaluate_clean(model, unlabeled)
    small = _tiny_model(num_classes=5)
    with pytest.raises(ValueError, match=r"labels in \[0, 5\)"):
        clean.evaluate_clean(small, _dataset(images[:32], labels[:32]))
    with pytest.raises(ValueError, match=r"labels in \[0, 5\)"):
        adversarial.adversarial_accuracy(
            small, _dataset(images[:32], labels[:32]), [0.0])


def test_load_model_from_file_dir_and_missing(tmp_path, untrained):
    model = untrained
    model.save(str(tmp_path / "model.keras"))
    x = np.random.RandomState(1).randint(0, 256, (2, SIZE, SIZE, 3))
    x = x.astype(np.float32)
    expected = model(x, training=False).numpy()
    for path in (tmp_path / "model.keras", tmp_path):
        loaded = loading.load_model(str(path))
        np.testing.assert_allclose(loaded(x, training=False).numpy(),
                                   expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="model.keras"):
        loading.load_model(str(tmp_path / "nothing"))


def test_resizes_images_of_another_side(untrained):
    model = untrained
    images, labels = _digits(24)
    logits, _ = inference.predict_logits(
        model, _dataset(images[:8], labels[:8]))
    resized = tf.image.resize(images[:8].astype(np.float32), (SIZE, SIZE))
    np.testing.assert_allclose(logits, model(resized, training=False),
                               atol=1e-5)


def test_run_evaluation_writes_results_json(trained, digits, tmp_path):
    images, labels = digits["test"]
    config = E.EvalConfig(out_dir=str(tmp_path / "eval"), batch_size=64,
                          num_classes=10, corruptions=("contrast",),
                          severities=(1, 5), epsilons=(0.0, 4.0))
    data = _dataset(images[:96], labels[:96])
    results = E.run_evaluation(config, data, model=trained)
    saved = storage.read_json(str(tmp_path / "eval" / "results.json"))
    assert saved["clean"]["top1"] == pytest.approx(results["clean"]["top1"])
    errors = saved["corruptions"]["errors"]["contrast"]
    assert len(errors) == 2 and errors[1] >= errors[0]
    assert saved["adversarial"]["accuracy"]["0.0"] == pytest.approx(
        saved["clean"]["top1"])
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()


def test_corruption_evaluation_of_a_trained_model(trained, digits):
    images, labels = digits["test"]
    data = _dataset(images[:128], labels[:128])
    result = imagenet_c.evaluate_corruptions(
        trained, data, corruptions=("gaussian_noise", "defocus_blur"),
        num_classes=10, baseline_errors={"gaussian_noise": [0.5] * 5,
                                         "defocus_blur": [0.5] * 5})
    for name in ("gaussian_noise", "defocus_blur"):
        errors = result["errors"][name]
        assert len(errors) == 5
        assert result["mean_error"][name] == pytest.approx(np.mean(errors))
        # Severity 5 hurts a trained model more than severity 1.
        assert errors[4] > errors[0]
    assert result["mean_corruption_error"] == pytest.approx(
        np.mean(list(result["mean_error"].values())))
    assert result["mce"] == pytest.approx(
        100 * result["mean_corruption_error"] / 0.5)
    again = imagenet_c.evaluate_corruptions(trained, data,
                                            corruptions=("gaussian_noise",))
    assert again["errors"]["gaussian_noise"] == (
        result["errors"]["gaussian_noise"])


# -------------------------------------------------------------- adversarial


def test_fgsm_eps0_is_clean_and_accuracy_falls_with_eps(trained, digits):
    images, labels = digits["test"]
    data = _dataset(images, labels)
    clean_top1 = clean.evaluate_clean(trained, data)["top1"]
    epsilons = [0.0, 1.0, 2.0, 4.0, 8.0]
    result = adversarial.adversarial_accuracy(trained, data, epsilons,
                                              batch_size=100)
    accuracy = [result["accuracy"][str(e)] for e in epsilons]
    assert accuracy[0] == clean_top1
    assert all(b <= a for a, b in zip(accuracy, accuracy[1:])), accuracy
    assert accuracy[-1] < clean_top1 - 0.1      # the attack does something
    # The functional form agrees: eps 0 returns the images unchanged.
    x = images[:4].astype(np.float32)
    np.testing.assert_array_equal(
        adversarial.fgsm(trained, x, labels[:4], 0.0).numpy(), x)
    adv = adversarial.fgsm(trained, x, labels[:4], 8.0).numpy()
    assert np.abs(adv - x).max() <= 8.0 + 1e-4
    assert adv.min() >= 0.0 and adv.max() <= 255.0


def test_pgd_is_at_least_as_strong_as_fgsm(trained, digits):
    images, labels = digits["test"]
    data = _dataset(images[:64], labels[:64])
    fgsm = adversarial.adversarial_accuracy(trained, data, [4.0])
    pgd = adversarial.adversarial_accuracy(trained, data, [0.0, 4.0],
                                           attack="pgd", steps=5)
    assert pgd["accuracy"]["4.0"] <= fgsm["accuracy"]["4.0"]
    assert pgd["accuracy"]["4.0"] <= pgd["accuracy"]["0.0"]
    x = images[:4].astype(np.float32)
    adv = adversarial.pgd(trained, x, labels[:4], 4.0, steps=3).numpy()
    assert np.abs(adv - x).max() <= 4.0 + 1e-4
    with pytest.raises(ValueError, match="attack"):
        adversarial.adversarial_accuracy(trained, data, [1.0], attack="cw")
    with pytest.raises(ValueError, match="epsilon"):
        adversarial.adversarial_accuracy(trained, data, [-1.0])
