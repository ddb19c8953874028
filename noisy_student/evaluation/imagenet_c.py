"""ImageNet-C and on-the-fly corruptions: corruption error, mCE.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019): for each corruption c the
top-1 error E_{s,c} at severities s = 1..5; the corruption error
CE_c = sum_s E_{s,c} / sum_s E_{s,c}^AlexNet; mCE = mean_c CE_c over the 15
benchmark corruptions; relative CE_c = sum_s (E_{s,c} - E_clean) /
sum_s (E_{s,c}^AlexNet - E_clean^AlexNet), relative mCE its mean. All in
percent (AlexNet itself scores 100), the score of the paper's ImageNet-C
robustness results.

`evaluate_corruptions` scores our own on-the-fly corruptions
(`noisy_student.evaluation.corruptions`) the same way, with any baseline (e.g. the
teacher) in place of AlexNet.
"""

from collections.abc import Mapping

import numpy as np

from noisy_student.data import preprocess as preprocess_lib
from noisy_student.evaluation import corruptions as ns_corruptions
from noisy_student.evaluation import inference
from noisy_student.evaluation import metrics
from noisy_student.model import loading

SEVERITIES = (1, 2, 3, 4, 5)

# The 15 ImageNet-C benchmark corruptions, in the paper's order.
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)

# AlexNet's top-1 error on ImageNet-C at severities 1..5, as fractions, as
# published for Hendrycks & Dietterich (2019) and used to normalise the CE.
# Source: the per-severity table in timm (huggingface/pytorch-image-models,
# timm/utils, `imagenetc_alexnet_error_rates_list`); its per-corruption means
# equal the AlexNet CE table of the paper's code (e.g. gaussian_noise
# 0.886428, jpeg_compression 0.606500, as in mmpretrain's `get_ce_alexnet`).
ALEXNET_IMAGENET_C_ERRORS = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# AlexNet's clean top-1 error on the ImageNet validation set: the torchvision
# AlexNet that Hendrycks evaluated (56.522% top-1, pytorch.org/vision model
# card); the paper's table rounds it to 43.5%.
ALEXNET_CLEAN_ERROR = 0.43478



def _check_errors(errors, baseline, corruptions):
    for name in corruptions:
        if name not in baseline:
            raise ValueError(
                f"Expected a baseline error table with corruption {name!r}. "
                f"Received: baseline corruptions={sorted(baseline)}")
        if name not in errors:
            raise ValueError(
                f"Expected errors for every corruption; missing {name!r}. "
                f"Received: corruptions={sorted(errors)}")
        if len(errors[name]) != len(baseline[name]):
            raise ValueError(
                f"Expected {len(baseline[name])} severities for {name!r}. "
                f"Received: {len(errors[name])} error rates")


def corruption_errors(errors, baseline=None, corruptions=None):
    """Corruption errors CE_c and their mean (mCE), in percent.

    CE_c = 100 * sum_s E_{s,c} / sum_s B_{s,c}, with E the model's and B the
    baseline's (AlexNet's) top-1 error at each severity.

    Args:
      errors: {corruption: [error at severity 1..5]} as fractions.
      baseline: Same for the baseline model; AlexNet's ImageNet-C errors by
        default.
      corruptions: Which corruptions make up the mean; default: the 15
        ImageNet-C benchmark ones when the baseline is AlexNet's, else all of
        `errors`.

    Returns:
      {"ce": {corruption: CE}, "mce": mean CE}.

    Raises:
      ValueError: naming a corruption missing from `errors` or the baseline.
    """
    if baseline is None:
        baseline = ALEXNET_IMAGENET_C_ERRORS
        corruptions = corruptions or IMAGENET_C_CORRUPTIONS
    corruptions = tuple(corruptions or errors)
    _check_errors(errors, baseline, corruptions)
    ce = {name: 100.0 * float(np.sum(errors[name]) / np.sum(baseline[name]))
          for name in corruptions}
    return {"ce": ce, "mce": float(np.mean(list(ce.values())))}


def relative_corruption_errors(errors, clean_error, baseline=None,
                               baseline_clean_error=None, corruptions=None):
    """Relative corruption errors and relative mCE, in percent.

    Relative CE_c = 100 * sum_s (E_{s,c} - E_clean) /
    sum_s (B_{s,c} - B_clean): how much accuracy the model loses to the
    corruption, relative to how much the baseline loses.

    Args:
      errors: {corruption: [error at severity 1..5]} as fractions.
      clean_error: The model's clean top-1 error (fraction).
      baseline: The baseline's table (AlexNet's by default).
      baseline_clean_error: The baseline's clean error (AlexNet's 0.43478 by
        default).
      corruptions: As in `corruption_errors`.

    Returns:
      {"relative_ce": {corruption: value}, "relative_mce": mean}.
    """
    if baseline is None:
        baseline = ALEXNET_IMAGENET_C_ERRORS
        corruptions = corruptions or IMAGENET_C_CORRUPTIONS
        if baseline_clean_error is None:
            baseline_clean_error = ALEXNET_CLEAN_ERROR
    if baseline_clean_error is None:
        raise ValueError("Expected baseline_clean_error with a custom "
                         "baseline. Received: baseline_clean_error=None")
    corruptions = tuple(corruptions or errors)
    _check_errors(errors, baseline, corruptions)
    rel = {}
    for name in corruptions:
        model_drop = np.sum(np.asarray(errors[name]) - clean_error)
        base_drop = np.sum(np.asarray(baseline[name]) - baseline_clean_error)
        rel[name] = 100.0 * float(model_drop / base_drop)
    return {"relative_ce": rel,
            "relative_mce": float(np.mean(list(rel.values())))}


def imagenet_c_config_name(corruption, severity):
    """The TFDS config of one corruption and severity.

    Args:
      corruption: A name of IMAGENET_C_CORRUPTIONS, e.g. "fog".
      severity: 1..5.

    Returns:
      The config name of `imagenet2012_corrupted`, e.g. "fog_3".
    """
    return f"{corruption}_{severity}"


def load_imagenet_c(data_dir, corruptions=IMAGENET_C_CORRUPTIONS,
                    severities=SEVERITIES, split="validation"):
    """Opens every ImageNet-C config from TFDS `imagenet2012_corrupted`.

    Uses `download=False`, so a missing config fails in well under a second
    instead of retrying a download.

    Args:
      data_dir: TFDS data dir (local or gs://) holding the prepared configs.
      corruptions: Corruption names.
      severities: Severities.
      split: TFDS split ("validation").

    Returns:
      {(corruption, severity): dataset of {"image", "label"}}.

    Raises:
      FileNotFoundError: naming the first corruption and severity missing.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    datasets = {}
    for name in corruptions:
        for severity in severities:
            config = imagenet_c_config_name(name, severity)
            try:
                ds = tfds.load(f"imagenet2012_corrupted/{config}",
                               split=split, data_dir=data_dir,
                               download=False, shuffle_files=False)
            except Exception as error:  # pylint: disable=broad-except
                raise FileNotFoundError(
                    f"Expected ImageNet-C corruption {name!r} severity "
                    f"{severity} (TFDS imagenet2012_corrupted/{config}) in "
                    f"data_dir={data_dir}. Received: "
                    f"{type(error).__name__}: {error}") from error
            datasets[(name, severity)] = ds
    return datasets


def _lookup_source(source, name, severity):
    """One (corruption, severity) data set from a source, or None."""
    if callable(source) and not isinstance(source, Mapping):
        return source(name, severity)
    if (name, severity) in source:
        return source[(name, severity)]
    inner = source.get(name)
    if isinstance(inner, Mapping):
        return inner.get(severity)
    return None


def resolve_corruption_source(source, corruptions, severities):
    """Checks a source holds every (corruption, severity) before any work.

    Args:
      source: A TFDS data_dir (str), a mapping {(name, severity): dataset}
        or {name: {severity: dataset}}, or a function (name, severity) ->
        dataset.
      corruptions: Corruption names needed.
      severities: Severities needed.

    Returns:
      {(name, severity): dataset}.

    Raises:
      ValueError: naming a corruption/severity missing from a mapping.
      FileNotFoundError: naming one missing from a data_dir.
    """
    if isinstance(source, str):
        return load_imagenet_c(source, corruptions, severities)
    resolved = {}
    for name in corruptions:
        for severity in severities:
            ds = _lookup_source(source, name, severity)
            if ds is None:
                raise ValueError(
                    f"Expected the corruption source to hold corruption "
                    f"{name!r} at severity {severity}. Received: no data set "
                    f"for ({name!r}, {severity})")
            resolved[(name, severity)] = ds
    return resolved


def evaluate_imagenet_c(model, source, *, corruptions=IMAGENET_C_CORRUPTIONS,
                        severities=SEVERITIES, clean_error=None,
                        batch_size=64, baseline=None,
                        baseline_clean_error=None, preprocess=None):
    """Top-1 error on every ImageNet-C corruption and severity; CE and mCE.

    Args:
      model: A model with ImageNet's 1000 classes (or the source's).
      source: See `resolve_corruption_source`; every (corruption, severity)
        is checked before any evaluation starts.
      corruptions: The corruptions to score (the 15 benchmark ones).
      severities: The severities (1..5).
      clean_error: The model's clean error, for the relative mCE.
      batch_size: Evaluation batch size.
      baseline: Per-severity baseline errors (AlexNet's by default).
      baseline_clean_error: The baseline's clean error.
      preprocess: Optional per-image function (default: the eval
        transform with `preprocess.WHOLE_IMAGE_RECIPE`: ImageNet-C images
        already are the benchmark's 224 x 224 centre crop, so they are
        resized whole to the model's side, never cropped again).

    Returns:
      {"errors": {name: [E_1..E_5]}, "ce", "mce"} plus "relative_ce" and
      "relative_mce" when clean_error is given. CE and mCE need all five
      severities and a baseline for every corruption (AlexNet's covers the
      15 benchmark ones); otherwise only "errors" is returned.
    """
    datasets = resolve_corruption_source(source, corruptions, severities)
    num_classes = loading.num_classes(model)
    if preprocess is None:
        preprocess = inference.default_preprocess(model,
                                        preprocess_lib.WHOLE_IMAGE_RECIPE)
    errors = {}
    for name in corruptions:
        errors[name] = []
        for severity in severities:
            logits, labels = inference.predict_logits(
                model, datasets[(name, severity)], batch_size, preprocess)
            metrics.check_labels(labels, num_classes)
            errors[name].append(
                1.0 - metrics.top_k_accuracy(logits, labels, 1))
    results = {"errors": errors}
    full = tuple(severities) == SEVERITIES
    if full and (baseline is not None or
                 set(corruptions) <= set(ALEXNET_IMAGENET_C_ERRORS)):
        results.update(corruption_errors(errors, baseline, corruptions))
        if clean_error is not None:
            results["clean_error"] = float(clean_error)
            results.update(relative_corruption_errors(
                errors, clean_error, baseline, baseline_clean_error,
                corruptions))
    return results



def evaluate_corruptions(model, dataset, *,
                         corruptions=ns_corruptions.CORRUPTION_NAMES,
                         severities=SEVERITIES, seed=0, batch_size=64,
                         num_classes=None, clean_error=None,
                         baseline_errors=None, baseline_clean_error=None,
                         preprocess=None):
    """Error under our on-the-fly corruptions (a -C style score).

    Args:
      model: A model.
      dataset: Labeled, unbatched `tf.data.Dataset` (uint8 images).
      corruptions: Names from `noisy_student.evaluation.corruptions.CORRUPTION_NAMES`.
      severities: Severities (1..5).
      seed: Base seed; element i gets the stateless seed (seed, i), so the
        result is reproducible.
      batch_size: Evaluation batch size.
      num_classes: The data set's class count; must equal the model's.
      clean_error: Optional clean error, for the relative CE.
      baseline_errors: Optional {name: [E_1..E_5]} of a baseline model (e.g.
        the teacher) for CE / mCE (percent) as in ImageNet-C.
      baseline_clean_error: The baseline's clean error, for relative mCE.
      preprocess: Per-image function applied after the corruption
        (default: the model's eval transform; `as_model_pixels` when the
        images already are the model's pixels).

    Returns:
      {"errors": {name: [E_s]}, "mean_error": {name: mean_s E_s},
      "mean_corruption_error": mean over corruptions} and, with a baseline,
      "ce", "mce" (and "relative_ce", "relative_mce").
    """
    model_classes = loading.check_num_classes(model, num_classes)
    for name in corruptions:
        ns_corruptions.get_corruption(name)
    errors = {}
    for name in corruptions:
        errors[name] = []
        for severity in severities:
            corrupted = ns_corruptions.corrupt_dataset(dataset, name,
                                                       severity, seed)
            logits, labels = inference.predict_logits(
                model, corrupted, batch_size, preprocess)
            metrics.check_labels(labels, model_classes)
            errors[name].append(
                1.0 - metrics.top_k_accuracy(logits, labels, 1))
    mean_error = {name: float(np.mean(e)) for name, e in errors.items()}
    results = {
        "severities": list(severities),
        "errors": errors,
        "mean_error": mean_error,
        "mean_corruption_error": float(np.mean(list(mean_error.values()))),
    }
    if clean_error is not None:
        results["clean_error"] = float(clean_error)
    if baseline_errors is not None:
        results.update(corruption_errors(errors, baseline_errors,
                                         corruptions))
        if clean_error is not None and baseline_clean_error is not None:
            results.update(relative_corruption_errors(
                errors, clean_error, baseline_errors, baseline_clean_error,
                corruptions))
    return results

