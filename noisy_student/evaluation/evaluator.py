"""The ns-eval stage: its config and the one call that runs the evaluators.

`run_evaluation` reads the model (`model.loading.load_model`: EMA weights of a
training folder, a `model.keras` or a SavedModel), puts the clean images
through the model's eval transform once, runs every evaluator the
`EvalConfig` asks for and writes the results. The evaluators live in
`noisy_student.evaluation` (see docs/architecture.md): this module imports
them, none of them imports this one.

What is computed (each in its own module):
- clean top-1, top-k, per-class accuracy, confusion matrix, expected
  calibration error (`evaluation.metrics`, `evaluation.clean`);
- on-the-fly corruptions and ImageNet-C CE / mCE (`evaluation.imagenet_c`);
- ImageNet-A top-1 over its 200 classes (`evaluation.imagenet_a`);
- FGSM / PGD accuracy (`evaluation.adversarial`);
- ImageNet-P flip probabilities (`evaluation.imagenet_p`, a library call:
  ns-eval has no ImageNet-P source).

Files written in `out_dir`: results.json, predictions.npz (per-image
probabilities in data set order), confusion_matrix.png and mistakes.png.
"""

import dataclasses

import numpy as np

from noisy_student.data import preprocess as preprocess_lib
from noisy_student.evaluation import adversarial
from noisy_student.evaluation import clean
from noisy_student.evaluation import corruptions as ns_corruptions
from noisy_student.evaluation import imagenet_a
from noisy_student.evaluation import imagenet_c
from noisy_student.evaluation import inference
from noisy_student.evaluation import metrics
from noisy_student.model import loading
from noisy_student.utils import reports
from noisy_student.utils import storage

# run_evaluation keeps the confusion matrix in results.json up to this many
# classes: 1000 x 1000 counts would make a multi-megabyte JSON, and the PNG
# still shows the matrix.
MAX_JSON_CONFUSION_CLASSES = 100


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `run_evaluation` computes and where it writes.

    Attributes:
      model_path: model.keras, a model_dir holding it, or a SavedModel.
      out_dir: Where results.json and confusion_matrix.png go ('' = none).
      batch_size: Evaluation batch size.
      num_classes: The data set's class count (checked against the model).
      top_k: k of the top-k accuracy (paper: 5).
      ece_bins: Equal-width ECE bins (15).
      corruptions: On-the-fly corruptions to score ('()' = skip).
      severities: Their severities.
      corruption_seed: Base seed of the corruption noise.
      epsilons: Adversarial epsilons in pixels of [0, 255] ('()' = skip).
      attack: "fgsm" or "pgd".
      pgd_steps: PGD iterations.
      imagenet_c_dir: TFDS data_dir with imagenet2012_corrupted ('' = skip).
      imagenet_a_dir: TFDS data_dir with imagenet_a ('' = skip).
      class_names: Class names in label order, for results.json and the
        confusion-matrix PNG ('()' = ids only).
    """
    model_path: str = ""
    out_dir: str = ""
    batch_size: int = 64
    num_classes: int | None = None
    top_k: int = 5
    ece_bins: int = metrics.ECE_BINS
    corruptions: tuple = ()
    severities: tuple = imagenet_c.SEVERITIES
    corruption_seed: int = 0
    epsilons: tuple = ()
    attack: str = "fgsm"
    pgd_steps: int = 10
    imagenet_c_dir: str = ""
    imagenet_a_dir: str = ""
    class_names: tuple = ()

    def __post_init__(self):
        # Checked when built: the pipeline builds every iteration's config
        # before any work.
        def fail(expected, name):
            raise ValueError(f"Expected {expected}. Received: "
                             f"{name}={getattr(self, name)!r}")

        for name in ("batch_size", "top_k", "ece_bins", "pgd_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                fail(f"an integer {name} >= 1", name)
        if self.num_classes is not None and not (
                isinstance(self.num_classes, (int, np.integer))
                and self.num_classes >= 2):
            fail("None or num_classes >= 2", "num_classes")
        if self.attack not in adversarial.ATTACKS:
            fail(f"attack in {list(adversarial.ATTACKS)}", "attack")
        unknown = [c for c in self.corruptions
                   if c not in ns_corruptions.CORRUPTION_NAMES]
        if unknown:
            raise ValueError(
                f"Expected corruptions among "
                f"{list(ns_corruptions.CORRUPTION_NAMES)}. Received: "
                f"{unknown}")
        if any(s not in imagenet_c.SEVERITIES for s in self.severities):
            fail(f"severities in {imagenet_c.SEVERITIES}", "severities")
        if any(not e >= 0 for e in self.epsilons):
            fail("epsilons >= 0 (pixels of [0, 255])", "epsilons")
        if self.class_names and self.num_classes is not None and len(
                self.class_names) != self.num_classes:
            fail(f"{self.num_classes} class_names", "class_names")


def run_evaluation(config, dataset=None, model=None, recipe=None,
                   paths=None):
    """Runs every evaluation the config asks for and writes results.json.

    The images go through the model's eval transform
    (`noisy_student.data.preprocess.eval_image`, the one the SavedModel
    applies) once; corruptions and attacks work on its output.

    Args:
      config: An `EvalConfig`.
      dataset: Labeled clean data set of user images of any size (None:
        skip clean, corruption and adversarial evaluation).
      model: An already loaded model; by default
        `model.loading.load_model(model_path)`.
      recipe: The model's `preprocess.Recipe`; by default the one recorded
        with config.model_path.
      paths: The images' file paths in data set order (folder sources),
        written beside their results; None when they have none.

    Returns:
      The results dict (also written to out_dir/results.json, with the
      per-image probabilities in out_dir/predictions.npz).

    Raises:
      ValueError: if config.num_classes differs from the model's, or a label
        is outside the model's classes.
      FileNotFoundError: for a missing model or ImageNet-C/A data.
    """
    if model is None:
        model = loading.load_model(config.model_path)
    loading.check_num_classes(model, config.num_classes)
    out = config.out_dir
    results = {"model_path": config.model_path,
               "config": dataclasses.asdict(config)}
    if config.class_names:
        results["class_names"] = list(config.class_names)
    clean_error = None
    if dataset is not None:
        if recipe is None and config.model_path:
            recipe = preprocess_lib.read_recipe(config.model_path)
        dataset = inference.model_pixels(dataset, model, recipe)
        results.update(_evaluate_dataset(config, model, dataset, paths))
        clean_error = results["clean"]["error"]
    if config.imagenet_c_dir:
        results["imagenet_c"] = imagenet_c.evaluate_imagenet_c(
            model, config.imagenet_c_dir, clean_error=clean_error,
            batch_size=config.batch_size)
    if config.imagenet_a_dir:
        results["imagenet_a"] = imagenet_a.evaluate_imagenet_a(
            model, config.imagenet_a_dir, batch_size=config.batch_size)
    if out:
        reports.write_json(storage.join(out, "results.json"), results)
    return results


def _evaluate_dataset(config, model, dataset, paths=None):
    """Clean, corruption and adversarial results on the model's pixels.

    Args:
      config: The `EvalConfig`.
      model: The loaded model.
      dataset: Labeled data set already through the eval transform.
      paths: Its images' file paths, or None.

    Returns:
      {"clean": ..., and "corruptions" / "adversarial" when asked for}.
    """
    out = config.out_dir
    names = list(config.class_names) or None
    results = {"clean": clean.evaluate_clean(
        model, dataset, num_classes=config.num_classes,
        batch_size=config.batch_size, top_k=config.top_k,
        ece_bins=config.ece_bins,
        confusion_png=storage.join(out, "confusion_matrix.png") if out
        else None,
        class_names=names, preprocess=inference.as_model_pixels,
        predictions_path=storage.join(out, "predictions.npz") if out
        else None, paths=paths)}
    if out:
        mistakes = results["clean"]["most_confident_mistakes"]
        reports.write_png(storage.join(out, "mistakes.png"),
                         lambda: clean.mistakes_png(dataset, mistakes, names))
    if results["clean"]["num_classes"] > MAX_JSON_CONFUSION_CLASSES:
        del results["clean"]["confusion_matrix"]
    if config.corruptions:
        results["corruptions"] = imagenet_c.evaluate_corruptions(
            model, dataset, corruptions=config.corruptions,
            severities=config.severities, seed=config.corruption_seed,
            batch_size=config.batch_size,
            clean_error=results["clean"]["error"],
            preprocess=inference.as_model_pixels)
    if config.epsilons:
        results["adversarial"] = adversarial.adversarial_accuracy(
            model, dataset, config.epsilons, attack=config.attack,
            steps=config.pgd_steps, batch_size=config.batch_size,
            preprocess=inference.as_model_pixels)
    return results
