"""Facts recorded beside a trained model: its class names.

A training run writes `class_names.json` (a JSON list of strings, in label
order) into its model_dir when its labeled source names its classes (a
folder source's sorted sub-folder names, a TFDS label's names). ns-eval puts
them in results.json and on the confusion matrix; ns-export puts them in the
SavedModel (`class_names` output). The preprocessing recipe is recorded the
same way (`noisy_student.data.preprocess.write_recipe`).
"""

from noisy_student.utils import storage

CLASS_NAMES_FILE = "class_names.json"


def write_class_names(folder, class_names):
    """Writes folder/class_names.json (atomically); nothing for None.

    Args:
      folder: The model's folder, local or gs://.
      class_names: Names in label order (written as strings), or None.
    """
    if class_names is None:
        return
    storage.write_json(storage.join(folder, CLASS_NAMES_FILE),
                        [str(name) for name in class_names])


def read_class_names(model_path):
    """The class names recorded with a model, or None.

    Args:
      model_path: A model_dir, a SavedModel folder or a .keras file (its
        folder is searched). Local or gs://.

    Returns:
      A tuple of strings, or None when none were recorded.

    Raises:
      ValueError: if the file is not a list of strings.
    """
    names_path, names = storage.read_beside_model(model_path,
                                                   CLASS_NAMES_FILE)
    if names is None:
        return None
    if not isinstance(names, list) or not all(
            isinstance(n, str) for n in names):
        raise ValueError(f"Expected a JSON list of class names. Received: "
                         f"{names_path}: {names!r}")
    return tuple(names)
