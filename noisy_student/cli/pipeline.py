"""noisy-student: the whole paper in one command.

Trains the teacher, then --iterations iterations of predict -> select ->
train a noised, equal-or-larger student -> evaluate, and exports the final
student. All state lives in --workdir (iteration r in WORKDIR/iteration{r}/);
rerunning the same command after a kill continues where it stopped.

  noisy-student --flagfile=flags/digits.cfg --workdir=/tmp/ns-digits
"""

from absl import flags

from noisy_student import api
from noisy_student.cli import common
from noisy_student.pipeline import experiment
from noisy_student.pipeline import lock

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder of every stage's output (local "
                    "or gs://).", required=True)
flags.DEFINE_integer("iterations", 2, "Noisy Student iterations after the "
                     "teacher (paper: 3 for L2).", lower_bound=0)
flags.DEFINE_list("student_models", [],
                  "Each iteration's student, e.g. b0,b1 (the last repeats); "
                  "empty: the teacher's model.")
flags.DEFINE_bool("allow_smaller_student", False,
                  "Allow a student smaller than its teacher (the paper "
                  "requires equal-or-larger).")
flags.DEFINE_bool("init_student_from_teacher", False,
                  "Initialise students from their teacher's weights (paper "
                  "default: from scratch).")
flags.DEFINE_string(
    "teacher_init", None,
    "Pretrained weights the teacher is fine-tuned from: an official TF1 / "
    "Noisy Student checkpoint, a Keras applications .h5 file, or a "
    "model.keras folder (see ns-convert). --teacher_train_steps=0 uses it "
    "as the teacher unchanged. Default: from scratch.")
flags.DEFINE_string(
    "student_init", None,
    "Pretrained weights every student starts from (any --teacher_init "
    "source). Paper default: from scratch.")
flags.DEFINE_bool("export", True, "Export the final model as a SavedModel "
                  "to WORKDIR/export.")
flags.DEFINE_bool("overwrite", False, "Redo stages whose settings changed "
                  "instead of failing.")
common.define_data_flags(demo=True)
common.define_train_flags()
common.define_role_flags("teacher_", "teacher")
common.define_role_flags("student_", "student", model=False)
common.define_predict_flags()
common.define_select_flags()
common.define_beam_flag("every iteration's predict and select stages")
# --help lists the shared flags too (absl shows only key flags).
flags.adopt_module_key_flags(common)


def experiment_config():
    """Turns FLAGS into an ExperimentConfig (checks before any work)."""
    beam_options = common.beam_options()
    data = common.data_config(scan_dir=FLAGS.workdir, demo=True)
    teacher = common.recipe_from_flags("teacher_")
    student = common.recipe_from_flags("student_", model=FLAGS.teacher_model)
    if FLAGS.unlabel_ratio <= 0:
        raise ValueError("Expected --unlabel_ratio > 0. Received: "
                         f"unlabel_ratio={FLAGS.unlabel_ratio}")
    return api.pipeline_config(
        FLAGS.workdir, data, teacher=teacher, student=student,
        iterations=FLAGS.iterations, student_models=FLAGS.student_models,
        teacher_init=FLAGS.teacher_init, student_init=FLAGS.student_init,
        init_student_from_teacher=FLAGS.init_student_from_teacher,
        allow_smaller_student=FLAGS.allow_smaller_student,
        predict_settings={
            "batch_size": FLAGS.predict_batch_size,
            "records_per_file": FLAGS.records_per_file,
            "inference_runtime": FLAGS.inference_runtime,
            "inference_precision": FLAGS.inference_precision},
        select_settings=common.select_settings(),
        export=FLAGS.export, overwrite=FLAGS.overwrite,
        beam_pipeline_options=beam_options)


def main(argv):
    """noisy-student: runs or resumes the whole pipeline from the parsed FLAGS
    (argv: unused)."""
    del argv
    # Writable first: the sources' scan reports go into the workdir.
    with common.output_folder(FLAGS.workdir, "workdir"):
        config = experiment_config()
    # A second process on this workdir fails here, before it writes.
    with lock.WorkdirLock(FLAGS.workdir):
        # A workdir of the round{r}/ folders is renamed before it is read.
        experiment.migrate(config)
        # A workdir of other settings fails here, before flags.txt is
        # written; the checked plan is the one that runs.
        try:
            steps = experiment.check(config)
        except ValueError as e:
            changed = common.changed_flags(FLAGS.workdir)
            if not changed:
                raise
            raise ValueError(f"{e} Flags that differ from its last run "
                             f"(flags.txt): {', '.join(changed)}.") from e
        common.write_flags(FLAGS.workdir)
        experiment.run(config, steps)


def run():
    """The noisy-student console script (setup.py entry point)."""
    common.run_command(main, "noisy-student")


if __name__ == "__main__":
    run()
