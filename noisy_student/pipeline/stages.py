"""The pipeline's stages as functions of config dataclasses.

Both the single-stage commands (ns-train, ns-predict, ns-select, ns-eval,
ns-export) and the one-command pipeline (noisy-student) call these, so a stage
run by hand and a stage run by the pipeline do the same thing. Each stage
writes its resolved configuration into its output folder before it starts.
"""

import dataclasses

import tensorflow as tf

from noisy_student.data import image_scan
from noisy_student.data import preprocess
from noisy_student.data import sources
from noisy_student.data import streams
from noisy_student.evaluation import evaluator
from noisy_student.model import info
from noisy_student.model import loading
from noisy_student.pipeline import stage_inputs
from noisy_student.pseudo_labels import inference_runtime
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import records
from noisy_student.pseudo_labels import selection
from noisy_student.serving import export
from noisy_student.training import loop as train_lib
from noisy_student.utils import storage

STAGE_CONFIG = stage_inputs.STAGE_CONFIG
INPUTS_FILE = stage_inputs.INPUTS_FILE


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from (source specs: see data/sources.py).

    Attributes:
      labeled: Labeled training source.
      unlabeled: Unlabeled source; "" takes the rest of `labeled` after its
        labeled (and validation) part when labels_per_class > 0.
      test: Labeled source of the final evaluation.
      labels_per_class: > 0 keeps only this many labels per class of
        `labeled` (seeded by split_seed); 0 uses every label.
      validation_size: Images of the unlabeled rest held out for validation
        (evaluated during training instead of the test set).
      split_seed: Seed of the labeled / validation / unlabeled split.
      data_dir: TFDS data folder (local or gs://).
      channels: Channels given to the model (grey sources are repeated).
      skip_corrupt: Leave out the image files the decoder rejects (named
        in the log and in scan_dir's skipped_images.json), or fail, naming
        the first, before any work.
      scan_dir: Where folder sources write their scan report and cache
        (`image_scan.REPORT_FILE`): the command's output folder; None
        scans without writing. Not a data setting: fingerprints leave it
        out.

    Raises:
      ValueError: for labels_per_class or validation_size < 0, or channels
        other than 1 or 3.
    """
    labeled: str = "digits:train"
    unlabeled: str = ""
    test: str = "digits:test"
    labels_per_class: int = 0
    validation_size: int = 0
    split_seed: int = 0
    data_dir: str | None = None
    channels: int = 3
    skip_corrupt: bool = True
    scan_dir: str | None = None

    def __post_init__(self):
        # Checked when built; the sources themselves are opened (and
        # checked) by the commands before any work.
        for name in ("labels_per_class", "validation_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"Expected {name} >= 0. Received: "
                                 f"{name}={getattr(self, name)}")
        if self.channels not in (1, 3):
            raise ValueError("Expected channels 1 or 3. Received: "
                             f"channels={self.channels}")

    def _subset(self, part):
        if not self.labels_per_class:
            return None
        return sources.Subset(part, self.labels_per_class,
                              self.validation_size, self.split_seed)

    def _load(self, field, **kwargs):
        """Loads the source of `field`; its errors name the field (= flag)."""
        spec = getattr(self, field)
        if not spec:
            raise ValueError(f"Expected a data source --{field}. Received: "
                             f"--{field}={spec!r}")
        try:
            return sources.load_source(spec, channels=self.channels,
                                       data_dir=self.data_dir,
                                       skip_corrupt=self.skip_corrupt,
                                       scan_dir=self.scan_dir, **kwargs)
        except image_scan.UndecodableImagesError as e:
            raise ValueError(
                f"--{field}={spec}: {e.describe('--noskip_corrupt')}") from e
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"--{field}={spec}: {e}") from e

    def labeled_source(self):
        """The labeled images (their labels_per_class part, if set).

        Raises:
          ValueError: also for fewer than 2 classes.
        """
        source = self._load("labeled", subset=self._subset("labeled"))
        if source.num_classes is not None and source.num_classes < 2:
            raise ValueError(
                f"Expected at least 2 classes in --labeled. Received: "
                f"--labeled={self.labeled} with {source.num_classes}")
        return source

    def unlabeled_flag(self):
        """The flag whose source holds the unlabeled images: "unlabeled",
        or "labeled" when they are the rest of it (labels_per_class)."""
        if not self.unlabeled or (self.unlabeled == self.labeled
                                  and self.labels_per_class):
            return "labeled"
        return "unlabeled"

    def unlabeled_source(self, keep_encoded=False):
        """The unlabeled images; never reads labels of a separate source.

        Args:
          keep_encoded: Also yield the stored bytes ("encoded") of folder
            files and TFDS images, so the prediction records keep them
            (see sources.load_source).
        """
        if self.unlabeled_flag() == "labeled":
            if not self.labels_per_class:
                raise ValueError(
                    "Expected an unlabeled source --unlabeled or "
                    "--labels_per_class > 0 (the rest of --labeled). "
                    "Received: --unlabeled='' and --labels_per_class=0")
            return self._load("labeled", labeled=False,
                              subset=self._subset("unlabeled"),
                              keep_encoded=keep_encoded)
        return self._load("unlabeled", labeled=False,
                          keep_encoded=keep_encoded)

    def eval_source(self, part="test", num_classes=None, class_names=None):
        """The test source, or the held-out validation part.

        Args:
          part: "test" or "validation".
          num_classes: The model's class count: labels (or class folders)
            beyond it are refused.
          class_names: The model's classes: a test folder's sub-folders are
            labelled by them (see sources.load_source).

        Raises:
          ValueError: for the validation part without a validation_size.
        """
        if part == "validation":
            if not self.validation_size:
                raise ValueError(
                    "Expected --validation_size > 0 to evaluate the "
                    "validation part (held out of --labeled after "
                    "--labels_per_class). Received: --validation_size=0")
            return self._load("labeled", subset=self._subset("validation"),
                              num_classes=num_classes)
        return self._load("test", num_classes=num_classes,
                          class_names=class_names)


def write_stage_config(folder, **configs):
    """Writes the stage's resolved configuration before it starts."""
    storage.write_json(f"{folder}/{STAGE_CONFIG}", {
        name: dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c
        for name, c in configs.items()})


def eval_batches(source, image_size, batch_size=256, channels=None,
                 recipe=None):
    """Clean, batched evaluation images of a labeled `ImageSource`.

    Every image through `preprocess.eval_image` (the eval transform of
    ns-eval and of the SavedModel), whatever the source's storage.

    Args:
      source: A labeled `sources.ImageSource`.
      image_size: The model's input side in pixels.
      batch_size: Images per batch (the last may be smaller).
      channels: The model's input channels (None: the source's).
      recipe: A `preprocess` crop recipe (None: the default).

    Returns:
      A dataset of {"image": float32 [b, S, S, C] in [0, 255],
      "label": int [b]}.
    """
    return streams.eval_dataset(source.dataset, image_size, batch_size,
                                 channels=channels, recipe=recipe)


def run_train(train_config, data, model_dir, pseudo_dir=None, strategy=None,
              log_prefix=""):
    """Trains a teacher, or a student when `pseudo_dir` holds a selection.

    Args:
      train_config: A `training.config.TrainConfig` (its `input` part says
        how the images are noised).
      data: A `DataConfig`.
      model_dir: The run's folder (resumed when it holds checkpoints).
      pseudo_dir: A selection folder from `run_select`, for a student.
      strategy: An existing tf.distribute strategy (default: the config's).
      log_prefix: Put before the progress lines (see
        train_lib.train_and_evaluate).

    Returns:
      The final metrics of train_lib.train_and_evaluate.

    Raises:
      ValueError: for a student without unlabel_ratio, a model_dir that holds another
        stage's records (`check_owner`) or checkpoints made with other
        settings (`train_lib.check_resumable`) or other images
        (`check_inputs`).
    """
    stage_inputs.check_owner(model_dir, "train", "--model_dir")
    model, loop = train_config.model, train_config.loop
    if pseudo_dir and not loop.unlabel_ratio:
        raise ValueError(
            "Expected unlabel_ratio > 0 to train a student on pseudo-labels "
            f"(pseudo_labels={pseudo_dir}). Received: unlabel_ratio="
            f"{loop.unlabel_ratio}, which would ignore them")
    labeled = data.labeled_source()
    if labeled.num_classes != model.num_classes:
        raise ValueError(
            f"Expected {model.num_classes} classes in {data.labeled}. "
            f"Received: {labeled.num_classes}")
    unlabeled = None
    if pseudo_dir:
        unlabeled = records.selected_dataset(
            pseudo_dir, num_classes=model.num_classes,
            channels=data.channels)
    dataset_fn = train_config.train_dataset_fn(labeled.dataset, unlabeled)
    part = "validation" if data.validation_size else "test"
    recipe = preprocess.DEFAULT_RECIPE
    eval_ds = None  # No test set given (ns-train without --test).
    if part == "validation" or data.test:
        eval_ds = eval_batches(
            data.eval_source(part, num_classes=model.num_classes,
                             class_names=labeled.class_names),
            model.resolved_image_size, channels=model.channels,
            recipe=recipe)
    # A refused resume must leave the model_dir's records as they were.
    check_train_folder(train_config, labeled, model_dir, pseudo_dir)
    tf.io.gfile.makedirs(model_dir)
    write_stage_config(model_dir, train=train_config, data=data,
                       pseudo_dir=pseudo_dir)
    # What ns-eval, ns-predict and ns-export read back from the model_dir.
    preprocess.write_recipe(model_dir, recipe)
    info.write_class_names(model_dir, labeled.class_names)
    return train_lib.train_and_evaluate(train_config, model_dir, dataset_fn,
                                        eval_ds, strategy=strategy,
                                        log_prefix=log_prefix)


def check_train_folder(train_config, labeled, model_dir, pseudo_dir=None):
    """Refuses a model_dir whose checkpoints would not be this run's.

    Checked before anything is written there: the folder must be a
    training run's (`stage_inputs.check_owner`), made from the same images
    (`stage_inputs.check_inputs`, which records them in a new folder) and
    with the same settings (`train_lib.check_resumable`). Images first: a
    changed image count would otherwise be named as a setting
    (images_per_epoch).

    Args:
      train_config: The run's `train_config.TrainConfig`.
      labeled: The labeled `sources.ImageSource` it trains on.
      model_dir: The run's folder.
      pseudo_dir: The selection a student trains on, or None.

    Raises:
      ValueError: naming what differs.
    """
    stage_inputs.check_owner(model_dir, "train", "--model_dir")
    inputs = {"--labeled": stage_inputs.source_input(labeled)}
    if pseudo_dir:
        inputs["--pseudo_labels"] = stage_inputs.selection_input(pseudo_dir)
    stage_inputs.check_inputs(model_dir, inputs, "--model_dir")
    train_lib.check_resumable(train_config, model_dir)


def with_model_channels(data, model, model_path, channels_given):
    """`data` reading its images with the model's input channels.

    Args:
      data: A `DataConfig`.
      model: The loaded model.
      model_path: Where it was loaded from (named in the error).
      channels_given: Whether the user set data.channels (--channels).

    Returns:
      `data`, its channels replaced by the model's when not given.

    Raises:
      ValueError: for given channels that differ from the model's.
    """
    model_channels = loading.channels(model)
    if not model_channels or data.channels == model_channels:
        return data
    if channels_given:
        raise ValueError(
            f"--channels={data.channels}, but the model at {model_path} "
            f"takes {model_channels}-channel images; leave --channels out "
            "to read them as it does.")
    return dataclasses.replace(data, channels=model_channels)


def run_predict(predict_config, data, channels_given=True,
                beam_options=""):
    """Labels (this worker's part of) the unlabeled images with a teacher.

    The images are read (and array sources' images stored in the records)
    with the teacher's channels.

    Args:
      predict_config: A `predict.PredictConfig` (validated when built).
      data: The `DataConfig` whose unlabeled source is labeled.
      channels_given: Whether the user set data.channels (--channels); when
        not, the teacher's are used.
      beam_options: --beam_pipeline_options: "" labels in this process;
        else an Apache Beam pipeline with these options labels every
        unfinished block (`pipeline.beam.run_predict`), the same files.

    Returns:
      The `predict.PredictSummary` as a dict.

    Raises:
      ValueError: for given channels that differ from the teacher's, or
        an out_dir made from another teacher, other images or other
        settings (`check_inputs`).
    """
    stage_inputs.check_owner(predict_config.out_dir, "predict", "--out_dir")
    source = data.unlabeled_source(keep_encoded=True)  # Its errors first.
    teacher = loading.load_model(predict_config.teacher, what="teacher")
    with_teachers = with_model_channels(data, teacher, predict_config.teacher,
                                        channels_given)
    if with_teachers is not data:
        data = with_teachers
        source = data.unlabeled_source(keep_encoded=True)
    size = predict_config.image_size or loading.image_size(teacher)
    recipe = preprocess.read_recipe(predict_config.teacher)
    clean = prediction.default_preprocess(size, loading.channels(teacher),
                                           recipe)
    # The teacher's files, its images and how it sees them: a finished
    # block made from other ones is never reused.
    stage_inputs.check_inputs(predict_config.out_dir, {
        "--teacher": {"sha256": loading.content_hash(predict_config.teacher),
                      "path": predict_config.teacher},
        f"--{data.unlabeled_flag()}": stage_inputs.source_input(source),
        "teacher image_size": size, "--channels": data.channels,
        "teacher recipe": dataclasses.asdict(recipe),
        "--num_classes": predict_config.num_classes,
        "--records_per_file": predict_config.records_per_file,
        "num_bins": predict_config.num_bins,
        "--inference_runtime": predict_config.inference_runtime,
        "--inference_precision": predict_config.inference_precision},
        "--out_dir", recorded_defaults={
            # Folders made before the runtime was a choice: TensorFlow's.
            "--inference_runtime": inference_runtime.DEFAULT_RUNTIME,
            "--inference_precision": inference_runtime.DEFAULT_PRECISION})
    # The select stage's report and contact sheets name the classes.
    info.write_class_names(
        predict_config.out_dir,
        info.read_class_names(predict_config.teacher))
    write_stage_config(predict_config.out_dir,
                       **{f"predict_{predict_config.shard_index}":
                          predict_config}, data=data)
    if beam_options:
        from noisy_student.pipeline import beam  # pylint: disable=g-import-not-at-top
        return dataclasses.asdict(beam.run_predict(
            predict_config, data, source, size, beam_options))
    summary = prediction.predict(
        teacher, source.dataset, predict_config.out_dir,
        predict_config.num_classes, batch_size=predict_config.batch_size,
        shard_index=predict_config.shard_index,
        num_shards=predict_config.num_shards,
        records_per_file=predict_config.records_per_file, preprocess=clean,
        image_size=size, num_bins=predict_config.num_bins,
        log_every_s=predict_config.log_every_s,
        runtime=predict_config.inference_runtime,
        precision=predict_config.inference_precision)
    return dataclasses.asdict(summary)


def run_select(select_config, beam_options=""):
    """Filters and balances a finished prediction folder.

    Args:
      select_config: A `select.SelectConfig` (validated when built).
      beam_options: --beam_pipeline_options: "" selects in this process;
        else an Apache Beam pipeline with these options does
        (`pipeline.beam.run_select`), the same files.

    Returns:
      The selection report dict (see `select.select`).
    """
    stage_inputs.check_owner(select_config.out_dir, "select", "--out_dir")
    tf.io.gfile.makedirs(select_config.out_dir)
    write_stage_config(select_config.out_dir, select=select_config)
    if beam_options:
        from noisy_student.pipeline import beam  # pylint: disable=g-import-not-at-top
        return beam.run_select(select_config, beam_options)
    return selection.select(select_config)


def run_eval(eval_config, data, part="test", channels_given=True):
    """Evaluates a trained model on the test (or validation) images.

    The images are read with the model's channels, as its SavedModel
    serves them.

    Args:
      eval_config: An `evaluate.EvalConfig` (its class names default to the
        model's, then the source's).
      data: The `DataConfig` of the test / validation source.
      part: "test" or "validation".
      channels_given: Whether the user set data.channels (--channels); when
        not, the model's are used.

    Returns:
      The results dict of `evaluate.run_evaluation`.

    Raises:
      ValueError: for given channels that differ from the model's.
    """
    if eval_config.out_dir:
        stage_inputs.check_owner(eval_config.out_dir, "eval", "--out_dir")
    model = loading.load_model(eval_config.model_path, what="model_path")
    data = with_model_channels(data, model, eval_config.model_path,
                               channels_given)
    model_names = info.read_class_names(eval_config.model_path)
    source = data.eval_source(
        part, num_classes=loading.check_num_classes(
            model, eval_config.num_classes), class_names=model_names)
    if not eval_config.class_names:
        names = model_names or source.class_names
        if names:
            eval_config = dataclasses.replace(eval_config,
                                              class_names=tuple(names))
    if eval_config.out_dir:
        tf.io.gfile.makedirs(eval_config.out_dir)
        write_stage_config(eval_config.out_dir, eval=eval_config,
                           data=data, part=part)
    # run_evaluation applies the model's eval transform (and its recipe).
    return evaluator.run_evaluation(eval_config, dataset=source.dataset,
                                   model=model, paths=source.files)


def run_export(export_config):
    """Writes the serving SavedModel of a trained model (EMA weights).

    Raises:
      ValueError: also for an out_dir that holds another stage's records
        (which --overwrite would delete).
    """
    stage_inputs.check_owner(export_config.out_dir, "export", "--out_dir")
    return export.export_from_config(export_config)
