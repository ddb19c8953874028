"""The whole paper in one call: teacher, then iterations of noisy students.

Iteration 0 trains the teacher on the labeled images and evaluates it. Each
iteration r >= 1 (the paper's word, Sec. 3.1) then runs, in
`workdir/iteration{r}/` (see `pipeline.layout`):
  predict  the previous iteration's model (EMA weights, no noise) labels the
           unlabeled images;
  select   filter (min confidence) and balance (K per class) the labels;
  train    a noised, equal-or-larger student on labeled + pseudo-labeled
           images (from scratch, or initialised from the teacher);
  eval     test top-1 of the student, which becomes the next teacher.
The final student is exported to `workdir/export/`. `workdir/manifest.json`
records every stage with a fingerprint of its settings, so rerunning the same
call after a kill continues where it stopped, and a call with changed
settings fails (or, with overwrite, redoes the stages they change).
One process at a time runs in a workdir (`pipeline.lock`). A workdir made
before the round -> iteration rename is renamed first (`pipeline.layout`).
"""

import dataclasses

from absl import logging
import tensorflow as tf

from noisy_student.data import preprocess
from noisy_student.evaluation import evaluator
from noisy_student.model import checkpoints
from noisy_student.model import efficientnet
from noisy_student.pipeline import layout
from noisy_student.pipeline import legacy
from noisy_student.pipeline import lock
from noisy_student.pipeline import manifest as manifest_lib
from noisy_student.pipeline import report as pipeline_report
from noisy_student.pipeline import stage_inputs
from noisy_student.pipeline import stages
from noisy_student.pseudo_labels import inference_runtime
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import selection
from noisy_student.serving import export as export_lib
from noisy_student.training import config as train_config_lib
from noisy_student.training import state
from noisy_student.utils import reports


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of a Noisy Student run.

    Attributes:
      workdir: Folder of every stage's output (local or gs://).
      data: Sources and the labeled split.
      teacher: Training recipe and model of iteration 0 (its init_from: the
        pretrained weights it is fine-tuned from; train_steps=0 uses them
        unchanged).
      student: Training recipe of the students; its variant/width/depth are
        replaced by `student_models` (its init_from: pretrained weights
        every student starts from).
      student_models: Model name of each iteration's student (the last one
        repeats); empty: the teacher's model.
      iterations: Iterations of student training (the paper's, Sec. 3.1).
      init_student_from_teacher: Start each student from its teacher's
        weights instead of from scratch.
      allow_smaller_student: Allow a student narrower or shallower than its
        teacher (the paper uses equal-or-larger students).
      predict: Prediction settings (teacher, out_dir are set per
        iteration).
      select: Selection settings (pred_dir, out_dir are set per
        iteration).
      export: Export the final model as a SavedModel.
      overwrite: Redo stages whose settings changed instead of failing.
      student_resolution_from_model: Train each student at its variant's
        resolution (e.g. B7 600 px) instead of the teacher's image size.
      beam_pipeline_options: Runs the predict and select stages as Apache
        Beam pipelines with these options (`pipeline.beam`); "" runs them
        in this process. Not in the stages' fingerprints: the files are
        the same either way.
    """
    workdir: str
    data: stages.DataConfig
    teacher: train_config_lib.TrainConfig
    student: train_config_lib.TrainConfig
    student_models: tuple = ()
    iterations: int = 2
    init_student_from_teacher: bool = False
    allow_smaller_student: bool = False
    predict: prediction.PredictConfig = None
    select: selection.SelectConfig = None
    export: bool = True
    overwrite: bool = False
    student_resolution_from_model: bool = False
    beam_pipeline_options: str = ""

    def __post_init__(self):
        if self.iterations < 0:
            raise ValueError("Expected iterations >= 0. Received: "
                             f"iterations={self.iterations}")
        if self.student.loop.unlabel_ratio <= 0 and self.iterations:
            raise ValueError(
                "Expected unlabel_ratio > 0 for the students. Received: "
                f"unlabel_ratio={self.student.loop.unlabel_ratio}")
        if self.init_student_from_teacher and self.student.init_from:
            raise ValueError(
                "Expected students started from their teacher or from a "
                "checkpoint, not both. Received: init_student_from_teacher="
                f"True, student_init={self.student.init_from}")
        teacher = self.teacher.model.model_name
        for name in self.student_models:
            efficientnet.parse_model_name(name)
        previous = teacher
        for r in range(1, self.iterations + 1):
            name = self.student_model(r)
            if efficientnet.is_smaller(name, previous) and (
                    not self.allow_smaller_student):
                raise ValueError(
                    f"Expected an equal-or-larger student than its teacher "
                    f"{previous} (or --allow_smaller_student). Received: "
                    f"student_models={','.join(self.student_models)} "
                    f"(iteration {r}: {name})")
            previous = name

    def student_model(self, iteration):
        """Model name of the student of iteration `iteration` (1-based)."""
        if not self.student_models:
            return self.teacher.model.model_name
        return self.student_models[min(iteration, len(
            self.student_models)) - 1]


def with_model(train_config, name):
    """`train_config` with the model called `name`.

    Args:
      train_config: A `train_config.TrainConfig`.
      name: b0..b8, l2 or wW-dD (see `efficientnet.parse_model_name`).

    Returns:
      The TrainConfig (validated) with that variant / width / depth.
    """
    variant, width, depth = efficientnet.parse_model_name(name)
    if variant:
        return train_config.replace(variant=variant, width=None, depth=None)
    return train_config.replace(variant=None, width=width, depth=depth)


def _train_fingerprint_args(train_config):
    """The train config's fingerprinted settings (all but init_from, which
    counts by its files), under the names of the flat config that made
    earlier work directories (see train_config.fingerprint_fields)."""
    fields = train_config_lib.fingerprint_fields(train_config)
    del fields["init_from"]
    return fields


def _input_fingerprint_args(train_config):
    """The input settings as earlier work directories hashed them.

    Before the input settings were a part of `TrainConfig` they were a
    separate `InputConfig` that also held the stream's image size, batch
    size, unlabel_ratio, seed and small-image augmentation, and the
    fingerprint's JSON encoder wrote that dataclass as its repr (json's
    `default=str`). This rebuilds that text, field for field, so those
    directories keep their train stages' fingerprints and resume.
    """
    model, loop, noise = (train_config.model, train_config.loop,
                          train_config.input)
    image_size = model.resolved_image_size
    fields = (("image_size", image_size), ("batch_size", loop.batch_size),
              ("unlabel_ratio", loop.unlabel_ratio),
              ("augment", noise.augment), ("num_layers", noise.num_layers),
              ("magnitude", noise.magnitude), ("flip", noise.flip),
              ("small_images",
               preprocess.uses_small_image_augment(image_size)),
              ("shuffle_buffer", noise.shuffle_buffer), ("seed", loop.seed))
    return "InputConfig(" + ", ".join(
        f"{name}={value!r}" for name, value in fields) + ")"


def _without_paths(config, *fields):
    return {k: v for k, v in dataclasses.asdict(config).items()
            if k not in fields}


def _data_fingerprints(data, sources):
    """(fingerprint of training and evaluation data, of the unlabeled data).

    Where the folder scans are written is no data setting; what the sources
    hold is: the labeled and test images count for training and evaluation,
    the unlabeled ones for prediction (new unlabeled images leave the
    teacher as it is). Without `sources`, the settings alone count (and the
    second fingerprint is None), as in work directories made before the
    sources' contents did.
    """
    if sources is None:
        return manifest_lib.fingerprint(_without_paths(data, "scan_dir")), None

    def contents(unlabeled):
        return [source["content"] for name, source in sources.items()
                if ("unlabeled" in name) == unlabeled]
    return (manifest_lib.fingerprint(_without_paths(data, "scan_dir"),
                                     *contents(False)),
            manifest_lib.fingerprint({}, *contents(True)))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the plan: its manifest name, fingerprint, folder, work."""
    name: str
    fingerprint: str
    folder: str
    work: object  # () -> JSON-able summary
    config: object = None  # The stage's main config, for inspection.
    # Redone, not refused, when its fingerprint changes (see Manifest.check).
    redo_if_changed: bool = False


def plan(config, sources=None):
    """Every stage of the run, in order, with fingerprints known up front.

    A fingerprint depends only on settings and on what the sources hold
    (never on results), so a whole work directory is checked against the
    configuration before any work.

    Args:
      config: The `ExperimentConfig`.
      sources: The run's sources as `stage_inputs.data_inputs` gives them,
        whose contents count in the fingerprints; None: the settings alone
        count (a work directory made before the contents did, `check`).
    """
    workdir = config.workdir.rstrip("/")
    data_fp, unlabeled_fp = _data_fingerprints(config.data, sources)
    steps = []

    def train_and_eval(r, train_config, pseudo_dir, upstream):
        model_dir = layout.stage_folder(workdir, r, "train")
        # A pretrained checkpoint counts by its files (path, size, mtime); a
        # teacher's folder (init_student_from_teacher) by its stages.
        init = train_config.init_from
        init_fp = (checkpoints.fingerprint(init)
                   if init and not (r and config.init_student_from_teacher)
                   else None)
        train_fp = manifest_lib.fingerprint(
            {"train": _train_fingerprint_args(train_config),
             "input": _input_fingerprint_args(train_config), "init": init_fp},
            data_fp, *upstream)
        name = layout.stage_name(r, "train")
        steps.append(Stage(
            name, train_fp, model_dir,
            lambda: reports.jsonable(stages.run_train(
                train_config, config.data, model_dir,
                pseudo_dir, log_prefix=f"[{name}] ")), train_config))
        eval_config = evaluator.EvalConfig(
            model_path=model_dir,
            out_dir=layout.stage_folder(workdir, r, "eval"),
            num_classes=train_config.model.num_classes)
        steps.append(Stage(
            layout.stage_name(r, "eval"),
            manifest_lib.fingerprint({}, train_fp),
            eval_config.out_dir,
            lambda: reports.jsonable(
                stages.run_eval(eval_config, config.data))))
        return model_dir, train_fp

    teacher_dir, fp = train_and_eval(0, config.teacher, None, ())
    for r in range(1, config.iterations + 1):
        labeling, pseudo_dir, select_fp = _label_stages(
            config, r, teacher_dir,
            (fp,) if unlabeled_fp is None else (fp, unlabeled_fp))
        steps += labeling
        student = _student_config(config, r, teacher_dir)
        teacher_dir, fp = train_and_eval(
            r, student, pseudo_dir,
            (select_fp, config.init_student_from_teacher))
    if config.export:
        # From the model_dir: its class names and recipe go along.
        export_config = export_lib.ExportConfig(
            model_path=teacher_dir, out_dir=f"{workdir}/export",
            overwrite=True)
        steps.append(Stage(
            "export", manifest_lib.fingerprint({}, fp), export_config.out_dir,
            lambda: export_lib.export_from_config(export_config),
            # More iterations change what is exported, not how.
            redo_if_changed=True))
    return steps


def _label_stages(config, r, teacher_dir, upstream):
    """Iteration r's predict and select stages.

    Args:
      config: The `ExperimentConfig`.
      r: The iteration, 1-based.
      teacher_dir: The model_dir of the teacher that labels the images.
      upstream: Fingerprints of the teacher's stage and of the unlabeled
        images.

    Returns:
      ([predict Stage, select Stage], the selection folder, the select
      stage's fingerprint).
    """
    workdir = config.workdir.rstrip("/")
    predict_config = dataclasses.replace(
        config.predict, teacher=teacher_dir,
        out_dir=layout.stage_folder(workdir, r, "predict"),
        num_classes=config.teacher.model.num_classes)
    # The reference runtime is left out of the fingerprint, so that work
    # directories made before the runtime was a choice resume.
    leave_out = ["teacher", "out_dir", "log_every_s"]
    if inference_runtime.is_default(predict_config.inference_runtime,
                                    predict_config.inference_precision):
        leave_out += ["inference_runtime", "inference_precision"]
    predict_fp = manifest_lib.fingerprint(
        _without_paths(predict_config, *leave_out), *upstream)
    select_config = dataclasses.replace(
        config.select, pred_dir=predict_config.out_dir,
        out_dir=layout.stage_folder(workdir, r, "select"))
    select_fp = manifest_lib.fingerprint(
        _without_paths(select_config, "pred_dir", "out_dir"), predict_fp)
    return [
        Stage(layout.stage_name(r, "predict"), predict_fp,
              predict_config.out_dir,
              lambda: stages.run_predict(
                  predict_config, config.data,
                  beam_options=config.beam_pipeline_options)),
        Stage(layout.stage_name(r, "select"), select_fp,
              select_config.out_dir,
              lambda: reports.jsonable(
                  stages.run_select(
                      select_config,
                      beam_options=config.beam_pipeline_options)["totals"])),
    ], select_config.out_dir, select_fp


def _student_config(config, r, teacher_dir):
    """The training config of iteration r's student.

    Args:
      config: The `ExperimentConfig`.
      r: The iteration, 1-based.
      teacher_dir: The model_dir of the student's teacher.

    Returns:
      A TrainConfig with the iteration's model, its resolution
      when `student_resolution_from_model`, and the teacher's weights as
      init_from when `init_student_from_teacher`.
    """
    student = with_model(config.student, config.student_model(r))
    variant = student.model.variant
    if config.student_resolution_from_model and variant:
        size = efficientnet.get_variant(variant).resolution
        student = student.replace(image_size=size)
    if config.init_student_from_teacher:
        student = dataclasses.replace(student, init_from=teacher_dir)
    return student


def check(config):
    """Plans the run and checks the plan before any work.

    Call it holding the workdir's lock, after `migrate`.

    Returns:
      The plan (see `plan`), for `run`.

    Raises:
      ValueError: if the workdir was made by other settings, or a
        pretrained checkpoint does not fit its model.
    """
    workdir = config.workdir.rstrip("/")
    manifest = manifest_lib.Manifest(workdir, config.overwrite)
    sources = None
    if manifest.stages and not tf.io.gfile.exists(
            f"{workdir}/{stage_inputs.INPUTS_FILE}"):
        # Made before the data was recorded: its stages keep their
        # fingerprints (settings only), and a change of data goes unseen.
        logging.warning("%s records no data (%s): a change of the images "
                        "is not detected there.", workdir,
                        stage_inputs.INPUTS_FILE)
    else:
        sources = stage_inputs.data_inputs(config.data, config.iterations)
        # Data that changed since the stages ran is named as such (before
        # the stages' fingerprints, which it changes).
        stage_inputs.check_inputs(
            workdir, sources, "--workdir", overwrite=config.overwrite,
            remedy="restore the data, or pass --overwrite to redo the "
                   "stages that read it")
    steps = plan(config, sources)
    _check_iterations_kept(manifest, config)
    for stage in steps:
        manifest.check(stage.name, stage.fingerprint, stage.redo_if_changed)
    _check_inits(config, steps)
    return steps


def _check_iterations_kept(manifest, config):
    """Refuses fewer --iterations than the workdir holds (without
    --overwrite): the export, redone whenever the last iteration changes so
    that a run can grow, would silently fall back to an earlier student."""
    most = max((parsed[0] for parsed in map(layout.parse_stage_name,
                                            manifest.stages) if parsed),
               default=0)
    if most > config.iterations and not config.overwrite:
        raise ValueError(
            f"Expected --iterations >= {most}: {manifest.workdir} holds "
            f"iterations up to {most}, and fewer would replace its export "
            "and report with an earlier student's. Received: --iterations="
            f"{config.iterations}. Pass --overwrite for that, or use a new "
            "--workdir.")


def _check_inits(config, steps):
    """Reads every pretrained checkpoint against its model, before work.

    The models are the planned training stages' (a teacher's folder that
    starts a student, init_student_from_teacher, is no checkpoint); each
    (checkpoint, model) pair is read once.
    """
    seen = set()
    for stage in steps:
        r, kind = layout.parse_stage_name(stage.name) or (None, None)
        train_config = stage.config
        if kind != "train" or not train_config.init_from or (
                r and config.init_student_from_teacher):
            continue
        name = train_config.model.model_name
        if (train_config.init_from, name) in seen:
            continue
        seen.add((train_config.init_from, name))
        pretrained = checkpoints.read(
            train_config.init_from, name,
            what="student_init" if r else "teacher_init")
        head = checkpoints.check(
            pretrained, state.build_model(train_config), name)
        if train_config.loop.train_steps == 0 and not head:
            raise ValueError(
                f"Expected a checkpoint with a "
                f"{train_config.model.num_classes}-"
                "class head to use as the teacher unchanged; it has "
                f"{pretrained.num_classes or 'no'} classes. Give "
                "--teacher_train_steps > 0 to fine-tune a new head. "
                f"Received: teacher_init={train_config.init_from}, "
                "teacher_train_steps=0")


def migrate(config):
    """Renames a workdir made before the round -> iteration rename.

    Call it holding the workdir's lock, before `check` (see
    `pipeline.legacy.migrate`; a no-op on other work directories).

    Raises:
      ValueError: if an iteration's folder or stage exists under both names.
    """
    return legacy.migrate(config.workdir.rstrip("/"))


def run(config, steps=None):
    """Runs (or continues) the pipeline; returns the report dict.

    Args:
      config: The `ExperimentConfig`.
      steps: The plan that `check` returned for `config` under the same
        lock (the workdir already migrated); None: migrate and check here.

    Raises:
      pipeline.lock.WorkdirBusyError: if another process runs in the workdir.
      ValueError: see `migrate` and `check`.
    """
    workdir = config.workdir.rstrip("/")
    with lock.WorkdirLock(workdir):
        if steps is None:
            migrate(config)
            steps = check(config)
        return _run(config, workdir, steps)


def _run(config, workdir, steps):
    manifest = manifest_lib.Manifest(workdir, config.overwrite)
    results, iterations = {}, []
    for number, stage in enumerate(steps, 1):
        if not manifest.finished(stage.name, stage.fingerprint):
            print(f"[stage {number}/{len(steps)}] {stage.name}", flush=True)
        results[stage.name] = manifest.run(stage.name, stage.fingerprint,
                                           stage.folder, stage.work,
                                           stage.redo_if_changed)
        r, kind = layout.parse_stage_name(stage.name) or (None, None)
        if kind == "eval":
            iterations.append(pipeline_report.iteration_entry(
                r, "teacher" if r == 0 else "student",
                config.teacher.model.model_name if r == 0
                else config.student_model(r),
                results[layout.stage_name(r, "train")],
                results[stage.name], manifest,
                results.get(layout.stage_name(r, "select"))))
            pipeline_report.write_report(workdir, iterations)
    report = pipeline_report.write_report(workdir, iterations)
    pipeline_report.print_table(report)
    print(f"Report: {workdir}/report.json (also report.md, report.png)",
          flush=True)
    if config.export:
        print(f"SavedModel: {workdir}/export", flush=True)
    return report
