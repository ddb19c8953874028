"""The Python API: the pipeline and each of its stages, without flags.

The commands are flags -> these calls; each call takes what its command
takes, with the same defaults, and does the same checks (an output folder
of another stage, or made from other inputs, is refused naming what
differs; a rerun resumes). For a notebook:

    from noisy_student import api

    data = api.DataConfig(labeled="digits:train", test="digits:test")
    recipe = api.Recipe(model="w0.5-d0.5", image_size=32, train_steps=600)
    teacher = api.train("/tmp/ns/teacher", data, recipe)
    labels = api.predict(teacher.model_dir, "/tmp/ns/predict", data)
    selection = api.select(labels.out_dir, "/tmp/ns/select")
    student = api.train("/tmp/ns/student", data, recipe,
                        pseudo_labels=selection.out_dir)
    print(api.evaluate(student.model_dir, data)["clean"]["top1"])

or the whole loop in one call, as `noisy-student` runs it:

    report = api.run_pipeline("/tmp/ns-digits", data, teacher=recipe)

Paths are local or gs://. Data sources: see `data.sources` (tfds:, folder:,
npz:, idx:, digits).
"""

import dataclasses

from noisy_student.evaluation import evaluator
from noisy_student.model import loading
from noisy_student.pipeline import experiment
from noisy_student.pipeline import lock
from noisy_student.pipeline import recipes
from noisy_student.pipeline import stages
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import selection
from noisy_student.serving import export as serving_export

DataConfig = stages.DataConfig
Recipe = recipes.Recipe
SelectConfig = selection.SelectConfig


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """A finished training run.

    Attributes:
      model_dir: Its folder: model.keras (EMA weights), checkpoints,
        metrics.json, the preprocessing recipe and class names.
      metrics: Its final metrics (`training.loop.train_and_evaluate`).
    """
    model_dir: str
    metrics: dict


@dataclasses.dataclass(frozen=True)
class PredictResult:
    """A prediction folder (this worker's part of it, done).

    Attributes:
      out_dir: The prediction folder (`select`'s `pred_dir`).
      summary: What the worker did (`prediction.PredictSummary`'s fields:
        num_images, images_written, blocks_written, blocks_skipped,
        seconds, images_per_second, inference_runtime/_precision).
    """
    out_dir: str
    summary: dict


@dataclasses.dataclass(frozen=True)
class SelectResult:
    """A finished selection.

    Attributes:
      out_dir: The selection folder (a student's `pseudo_labels`).
      report: The selection report (`pseudo_labels.selection.select`).
    """
    out_dir: str
    report: dict


def _scanned_into(data, folder):
    """`data` writing folder sources' skipped-image reports into `folder`
    unless it names a place already."""
    if data.scan_dir is None:
        return dataclasses.replace(data, scan_dir=folder)
    return data


def train(model_dir, data, recipe=Recipe(), pseudo_labels=None,
          init_from=None, freeze_blocks=0, teacher=False):
    """Trains a model (ns-train); a student when `pseudo_labels` is given.

    Args:
      model_dir: The run's folder; a rerun resumes from its checkpoints.
      data: A `DataConfig` (its labeled source, and its test or validation
        part for the evaluations during training).
      recipe: The `Recipe`; a student trains on `recipe.unlabel_ratio`
        pseudo-labeled images per labeled one.
      pseudo_labels: A selection folder (`select`): trains a student.
      init_from: Pretrained weights to start from (see ns-train's
        --init_from); with `recipe.train_steps == 0`, used unchanged.
      freeze_blocks: Freeze the stem and the first N blocks.
      teacher: Train as the pipeline's teacher (labeled loss alone).

    Returns:
      A `TrainResult`.

    Raises:
      ValueError: for a bad recipe or source, or a model_dir of other
        settings, images or stage (naming what differs).
      pipeline.lock.WorkdirBusyError: if another process trains there.
    """
    data = _scanned_into(data, model_dir)
    labeled = data.labeled_source()
    ratio = recipe.unlabel_ratio if pseudo_labels else 0
    train_config = recipes.resolve(
        recipe, labeled, channels=data.channels, teacher=teacher,
        unlabel_ratio=ratio, init_from=init_from,
        freeze_blocks=freeze_blocks)
    with lock.WorkdirLock(model_dir):
        metrics = stages.run_train(train_config, data, model_dir,
                                   pseudo_labels)
    return TrainResult(model_dir, metrics)


def predict(teacher, out_dir, data, num_classes=None,
            batch_size=prediction.BATCH_SIZE,
            records_per_file=prediction.RECORDS_PER_FILE,
            inference_runtime="tensorflow", inference_precision="float32",
            shard_index=0, num_shards=1):
    """Pseudo-labels the unlabeled images with the teacher (ns-predict).

    Args:
      teacher: A training model_dir (EMA weights), a .keras file or a
        SavedModel.
      out_dir: The prediction folder; a rerun keeps its finished blocks.
      data: A `DataConfig`: its unlabeled source (or the rest of its
        labeled one after `labels_per_class`). Images are read with the
        teacher's channels.
      num_classes: Classes of the labeled set; default: the labeled
        source's if it names one, else the teacher's outputs.
      batch_size, records_per_file, inference_runtime, inference_precision,
      shard_index, num_shards: As `prediction.PredictConfig`'s.

    Returns:
      A `PredictResult`.

    Raises:
      ValueError: for a bad source, or an out_dir begun with another
        teacher, source or settings.
    """
    data = _scanned_into(data, out_dir)
    if num_classes is None:
        num_classes = (data.labeled_source().num_classes if data.labeled
                       else loading.num_classes(
                           loading.load_model(teacher, what="teacher")))
    config = prediction.PredictConfig(
        teacher=teacher, out_dir=out_dir, num_classes=num_classes,
        batch_size=batch_size, shard_index=shard_index,
        num_shards=num_shards, records_per_file=records_per_file,
        inference_runtime=inference_runtime,
        inference_precision=inference_precision)
    return PredictResult(
        out_dir, stages.run_predict(config, data, channels_given=False))


def select(pred_dir, out_dir, **settings):
    """Filters and balances the teacher's pseudo-labels (ns-select).

    Args:
      pred_dir: A finished prediction folder (`predict`).
      out_dir: The selection folder to write (replaced when rerun).
      **settings: `SelectConfig`'s other fields: per_class (K),
        min_confidence (paper: 0.3), label_type ("soft" or "hard"),
        temperature, duplicate, seed.

    Returns:
      A `SelectResult`.
    """
    config = SelectConfig(pred_dir=pred_dir, out_dir=out_dir, **settings)
    return SelectResult(out_dir, stages.run_select(config))


def evaluate(model_path, data, part="test", **settings):
    """Scores a trained model (ns-eval).

    Args:
      model_path: A training model_dir (EMA weights), a .keras file or a
        SavedModel.
      data: A `DataConfig`; images are read with the model's channels.
      part: "test" or "validation".
      **settings: `evaluation.evaluator.EvalConfig`'s other fields:
        out_dir, batch_size, corruptions, epsilons, attack, ...

    Returns:
      The results dict (results.json's): "clean" holds top1, top5, ece.
    """
    config = evaluator.EvalConfig(model_path=model_path, **settings)
    if config.out_dir:
        data = _scanned_into(data, config.out_dir)
    return stages.run_eval(config, data, part, channels_given=False)


def export(model_path, out_dir, **settings):
    """Writes the serving SavedModel of a trained model (ns-export).

    Args:
      model_path: A training model_dir (EMA weights) or a .keras file.
      out_dir: The SavedModel folder to create.
      **settings: `serving.export.ExportConfig`'s other fields: overwrite,
        image_size, top_k, tflite.

    Returns:
      What `serving.export.export_from_config` returns.
    """
    config = serving_export.ExportConfig(model_path=model_path,
                                         out_dir=out_dir, **settings)
    return stages.run_export(config)


def pipeline_config(workdir, data=None, teacher=Recipe(), student=None,
                    iterations=2, student_models=(), teacher_init=None,
                    student_init=None, init_student_from_teacher=False,
                    allow_smaller_student=False, predict_settings=None,
                    select_settings=None, export=True, overwrite=False,
                    beam_pipeline_options=""):
    """The `experiment.ExperimentConfig` of a Noisy Student run, checked.

    Args:
      workdir: Folder of every stage's output.
      data: A `DataConfig`; default: the digits demo (digits:train,
        digits:test).
      teacher: The teacher's `Recipe`.
      student: The students' `Recipe` (its model is replaced by
        `student_models`'); default: the teacher's.
      iterations: Noisy Student iterations after the teacher.
      student_models: Each iteration's student model name (the last
        repeats); empty: the teacher's model.
      teacher_init, student_init: Pretrained weights the teacher / each
        student starts from (default: from scratch, as in the paper).
      init_student_from_teacher: Start students from their teacher.
      allow_smaller_student: Allow a student smaller than its teacher.
      predict_settings: `prediction.PredictConfig` fields (batch_size,
        records_per_file, inference_runtime, inference_precision).
      select_settings: `SelectConfig` fields (per_class, min_confidence,
        label_type, temperature, duplicate, seed).
      export: Export the final model to WORKDIR/export.
      overwrite: Redo stages whose settings changed instead of failing.
      beam_pipeline_options: Run the predict and select stages as Apache
        Beam pipelines with these options ("runner=...,key=value"; see
        `pipeline.beam`); "" runs them in this process.

    Raises:
      ValueError: for bad settings or sources (before any work).
    """
    if data is None:
        data = DataConfig(labeled="digits:train", test="digits:test")
    data = _scanned_into(data, workdir)
    student = (student or teacher).replace(model=teacher.model)
    labeled = data.labeled_source()
    layout_from = teacher_init or student_init
    teacher_config = recipes.resolve(
        teacher, labeled, channels=data.channels, teacher=True,
        init_from=teacher_init, layout_from=layout_from)
    if student.unlabel_ratio <= 0:
        raise ValueError("Expected unlabel_ratio > 0. Received: "
                         f"unlabel_ratio={student.unlabel_ratio}")
    student_config = recipes.resolve(
        student, labeled, channels=data.channels,
        unlabel_ratio=student.unlabel_ratio, init_from=student_init,
        layout_from=layout_from)
    if iterations:
        data.unlabeled_source()  # Fails now, not after the teacher.
    # A test (or validation) set the model cannot score fails now too.
    data.eval_source("validation" if data.validation_size else "test",
                     num_classes=labeled.num_classes)
    return experiment.ExperimentConfig(
        workdir=workdir, data=data, teacher=teacher_config,
        student=student_config, student_models=tuple(student_models),
        iterations=iterations,
        init_student_from_teacher=init_student_from_teacher,
        allow_smaller_student=allow_smaller_student,
        predict=prediction.PredictConfig(
            teacher="", out_dir="", num_classes=labeled.num_classes,
            **(predict_settings or {})),
        select=SelectConfig(pred_dir="", out_dir="",
                            **(select_settings or {})),
        export=export, overwrite=overwrite,
        student_resolution_from_model=teacher.image_size is None,
        beam_pipeline_options=beam_pipeline_options)


def run_pipeline(workdir, data=None, **settings):
    """Runs (or continues) the whole pipeline, as `noisy-student` does.

    Args:
      workdir, data, **settings: As `pipeline_config`'s.

    Returns:
      The report dict (WORKDIR/report.json): one entry per iteration with
      its model, test top-1 / top-5 and pseudo-label counts.

    Raises:
      ValueError: as `pipeline_config`, or for a workdir made with other
        settings (naming them; `overwrite=True` redoes what changed).
      pipeline.lock.WorkdirBusyError: if another process runs there.
    """
    return experiment.run(pipeline_config(workdir, data, **settings))
