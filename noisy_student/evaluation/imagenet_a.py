"""ImageNet-A (Hendrycks et al., CVPR 2021): top-1 over its 200 classes.

The model's 1000 ImageNet logits are restricted to ImageNet-A's 200 classes
before the argmax, as the data set's own evaluation does (eval.py of
github.com/hendrycks/natural-adv-examples) and as the paper reports it.
"""

import numpy as np

from noisy_student.evaluation import inference
from noisy_student.evaluation import metrics
from noisy_student.model import loading

# ImageNet-A's 200 classes as indices into ImageNet's 1000 (sorted wnids, the
# order of TFDS `imagenet2012` / `imagenet_a` labels). Source: the
# `thousand_k_to_200` map of eval.py in
# github.com/hendrycks/natural-adv-examples.
IMAGENET_A_CLASS_INDICES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79,
    89, 90, 94, 96, 97, 99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143,
    144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301, 306,
    307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330,
    334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407,
    411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470,
    472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552,
    557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627,
    640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746,
    749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802,
    803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862,
    870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943,
    945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
)

# ImageNet-P perturbations whose frames are independent noise draws: each


def imagenet_a_predictions(logits):
    """ImageNet-1k class predicted among ImageNet-A's 200 classes.

    Args:
      logits: [N, 1000] ImageNet logits.

    Returns:
      int64 [N] ImageNet-1k indices (always one of the 200).
    """
    logits = np.asarray(logits)
    if logits.shape[-1] != 1000:
        raise ValueError(
            "Expected ImageNet logits with 1000 classes for ImageNet-A. "
            f"Received: logits.shape={logits.shape}")
    indices = np.asarray(IMAGENET_A_CLASS_INDICES)
    return indices[logits[:, indices].argmax(axis=1)]


def imagenet_a_accuracy(logits, labels):
    """Top-1 accuracy on ImageNet-A.

    Args:
      logits: float [N, 1000] ImageNet logits.
      labels: int [N] ImageNet-1k class indices (as TFDS `imagenet_a`).

    Returns:
      The accuracy, a float in [0, 1].
    """
    labels = np.asarray(labels, np.int64)
    return float(np.mean(imagenet_a_predictions(logits) == labels))


def load_imagenet_a(data_dir, split="test"):
    """TFDS `imagenet_a` (download=False; fails fast when absent).

    Args:
      data_dir: TFDS data folder (local or gs://) holding the prepared set.
      split: TFDS split ("test", the only one).

    Returns:
      A `tf.data.Dataset` of {"image": uint8 [H, W, 3], "label": int64 []}.

    Raises:
      FileNotFoundError: if the data set is not prepared in data_dir.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
        return tfds.load("imagenet_a", split=split, data_dir=data_dir,
                         download=False, shuffle_files=False)
    except Exception as error:  # pylint: disable=broad-except
        raise FileNotFoundError(
            f"Expected TFDS imagenet_a in data_dir={data_dir}. Received: "
            f"{type(error).__name__}: {error}") from error


def evaluate_imagenet_a(model, source, *, batch_size=64, preprocess=None):
    """ImageNet-A top-1 accuracy over its 200-class subset.

    Args:
      model: A model with ImageNet's 1000 classes.
      source: A TFDS data_dir (str) or a labeled dataset (labels are
        ImageNet-1k indices, as in TFDS).
      batch_size: Evaluation batch size.
      preprocess: Per-image function; default: the model's eval transform
        (`default_preprocess`: at 224 px a 224/256 = 87.5% centre crop).

    Returns:
      {"top1", "error", "num_examples"}.
    """
    if loading.num_classes(model) != 1000:
        raise ValueError(
            "Expected a model with ImageNet's 1000 classes for ImageNet-A. "
            f"Received: num_classes={loading.num_classes(model)}")
    dataset = load_imagenet_a(source) if isinstance(source, str) else source
    logits, labels = inference.predict_logits(model, dataset, batch_size,
                                              preprocess)
    metrics.check_labels(labels, 1000)
    top1 = imagenet_a_accuracy(logits, labels)
    return {"top1": top1, "error": 1.0 - top1,
            "num_examples": int(len(labels))}

