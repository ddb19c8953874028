"""What a stage's output folder was made from, and which stage owns it.

A stage that resumes or skips work in its output folder (ns-predict's
finished blocks, ns-train's checkpoints, the pipeline's finished stages)
keeps only work made from the same inputs: `check_inputs` records them in
the folder (INPUTS_FILE) the first time and refuses other ones later,
naming each one that differs. Inputs are what the output is made from: a
teacher's files (hashed, so a moved teacher is the same teacher), what a
source holds (`sources.ImageSource.content`), a selection's files and the
settings that change the output. One folder, one owner: `check_owner`
refuses an output folder that holds another stage's records.
"""

import json

import tensorflow as tf

from noisy_student.data import sources
from noisy_student.pseudo_labels import records
from noisy_student.utils import storage

# Each stage's resolved configuration, written before it starts.
STAGE_CONFIG = "stage_config.json"
# What a stage's output folder was made from (`check_inputs`).
INPUTS_FILE = "inputs.json"


def source_input(source):
    """A source as a stage's input (`check_inputs`): its content key, and
    its spec and image count for messages."""
    return {"content": source.content, "path": source.spec,
            "images": source.num_examples}


def selection_input(pseudo_dir):
    """A selection of pseudo-labels as a student's input (`check_inputs`):
    its record files' names and sizes and its selection.json."""
    files, info = records.selected_files(pseudo_dir)
    sizes = [[f.rsplit("/", 1)[-1], tf.io.gfile.stat(f).length]
             for f in files]
    return {"content": sources.content_key(info, sizes), "path": pseudo_dir}


def check_inputs(folder, inputs, flag, overwrite=False,
                 remedy="or restore the inputs", recorded_defaults=None):
    """Refuses an output folder made from other inputs; records them in a
    new one (INPUTS_FILE), before the stage writes anything else there.

    A stage that resumes or skips work in its folder (ns-predict's finished
    blocks, ns-train's checkpoints) keeps only work made from the same
    teacher, images and settings. Concurrent workers (ns-predict shards)
    record the folder once: the first one's record wins and the others are
    checked against it.

    Args:
      folder: The stage's output folder, local or gs://.
      inputs: {name: JSON-able value} of what the output is made from, e.g.
        {"--teacher": {"sha256": ..., "path": ...}, "image_size": 32}. A
        dict value's "path" and "images" are shown in messages, not
        compared (a moved teacher is the same teacher; the content key
        covers the images).
      flag: The flag that named `folder` (for the message).
      overwrite: Record `inputs` in place of other ones instead of
        refusing (the work made from those is being redone).
      remedy: What else the user can do, said after "Use another FLAG,".
      recorded_defaults: {name: value} of inputs that folders made before
        they were recorded were made with (a setting added since, at its
        default): a record without `name` counts as holding `value`.

    Raises:
      ValueError: naming every input that differs, with the recorded one.
    """
    path = storage.join(folder, INPUTS_FILE)
    if overwrite:
        storage.write_json(path, inputs)
    elif not tf.io.gfile.exists(path):
        tf.io.gfile.makedirs(folder)
        temp = storage.temp_path(path)
        storage.write_json(temp, inputs)
        try:  # The first worker's record wins.
            tf.io.gfile.rename(temp, path, overwrite=False)
        except tf.errors.OpError:
            tf.io.gfile.remove(temp)
    recorded = {**(recorded_defaults or {}), **storage.read_json(path)}
    differ = [_describe_input(name, inputs.get(name), recorded.get(name))
              for name in sorted(set(inputs) | set(recorded))
              if _compared(inputs.get(name)) != _compared(recorded.get(name))]
    if differ:
        raise ValueError(
            f"Expected the inputs that made {flag}={folder} (its "
            f"{INPUTS_FILE}); its work would be reused or mixed with work "
            f"from other inputs. Received: {'; '.join(differ)}. Use another "
            f"{flag}, {remedy}.")


def _compared(value):
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("path", "images")}
    return value


def _describe_input(name, now, recorded):
    """"name=now (was recorded)", a dict shown by its path and images."""
    def show(value):
        if not isinstance(value, dict):
            return json.dumps(value)
        images = f" ({value['images']} images)" if "images" in value else ""
        return f"{value.get('path', '')}{images}"
    if isinstance(now, dict) and isinstance(recorded, dict) and (
            now.get("path") == recorded.get("path")):
        was = (f"{recorded['images']} images" if "images" in recorded
               else "other content")
        return f"{name}={show(now)}, changed since (was {was})"
    return f"{name}={show(now)} (was {show(recorded)})"


def _owner(stage_config):
    """The stage whose records a stage_config.json holds, by its keys."""
    for key in stage_config:
        for stage in ("train", "predict", "select", "eval"):
            if key == stage or key.startswith(stage + "_"):
                return stage
    return None


def check_owner(folder, stage, flag):
    """Refuses an output folder that holds another stage's records.

    One folder, one owner: ns-eval into a model_dir, or ns-select into its
    prediction folder, would replace that folder's stage_config.json (the
    record of its teacher, source and settings) and mix in its own files.

    Args:
      folder: The stage's output folder.
      stage: "train", "predict", "select", "eval" or "export".
      flag: The flag that named the folder (for the message).

    Raises:
      ValueError: if `folder` holds another stage's STAGE_CONFIG.
    """
    path = storage.join(folder, STAGE_CONFIG)
    if not tf.io.gfile.exists(path):
        return
    owner = _owner(storage.read_json(path)) or "other"
    if owner != stage:
        raise ValueError(
            f"Expected {flag} to name a new folder or the {stage} stage's own. "
            f"Received: {flag}={folder}, which holds the records of a "
            f"{owner} stage ({STAGE_CONFIG}); use another {flag}.")


def data_inputs(data, with_unlabeled=True):
    """A run's sources as inputs, loaded as its stages load them.

    Args:
      data: The run's `stages.DataConfig`.
      with_unlabeled: Include the unlabeled images (a run with iterations).

    Returns:
      {name: `source_input`} of the labeled images, the test (or validation)
      images and the unlabeled ones, each named by its flag ("--labeled",
      "--test", "--unlabeled") or as a part of --labeled.
    """
    labeled = data.labeled_source()
    loaded = {"--labeled": labeled}
    if data.validation_size:
        loaded["validation part of --labeled"] = data.eval_source(
            "validation", num_classes=labeled.num_classes)
    else:
        loaded["--test"] = data.eval_source(
            "test", num_classes=labeled.num_classes)
    if with_unlabeled:
        name = ("--unlabeled" if data.unlabeled_flag() == "unlabeled"
                else "unlabeled part of --labeled")
        loaded[name] = data.unlabeled_source()
    return {name: source_input(source) for name, source in loaded.items()}
