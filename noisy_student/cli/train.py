"""ns-train: train a teacher, or a student when --pseudo_labels is given.

  ns-train --labeled=digits:train --labels_per_class=10 --model=w0.5-d0.5 \
      --image_size=32 --train_steps=300 --model_dir=/tmp/teacher
  ns-train ... --pseudo_labels=/tmp/select --unlabel_ratio=3 \
      --model_dir=/tmp/student
"""

import contextlib

from absl import flags

from noisy_student.cli import common
from noisy_student.pipeline import lock as workdir_lock
from noisy_student.pipeline import recipes
from noisy_student.pipeline import stage_inputs
from noisy_student.pipeline import stages
from noisy_student.training import strategy as strategy_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", None, "Output folder (local or gs://); a "
                    "rerun resumes from its checkpoints.", required=True)
flags.DEFINE_string("pseudo_labels", None,
                    "A selection folder from ns-select: train a student on "
                    "labeled + these pseudo-labeled images.")
flags.DEFINE_string("init_from", None,
                    "Pretrained weights that initialise the model: an "
                    "official TF1 / Noisy Student checkpoint, a Keras "
                    "applications .h5 file, or a model_dir / model.keras "
                    "(e.g. the teacher's; see ns-convert). Paper default: "
                    "from scratch. With --train_steps=0: used unchanged.")
flags.DEFINE_integer("freeze_blocks", 0,
                     "Freeze the stem and the first N blocks (FixRes-style "
                     "fine-tune at a larger --image_size).", lower_bound=0)
common.define_data_flags()
common.define_train_flags()
common.define_role_flags("", "model")
# --help lists the shared flags too (absl shows only key flags).
flags.adopt_module_key_flags(common)


def main(argv):
    """ns-train: trains one model from the parsed FLAGS."""
    del argv
    # A multi-worker strategy must exist before any other TF op.
    strategy = strategy_lib.make_strategy(FLAGS.strategy, FLAGS.tpu)
    if FLAGS.pseudo_labels and FLAGS.unlabel_ratio <= 0:
        raise common.UsageError(
            "Expected --unlabel_ratio > 0 with --pseudo_labels (a student "
            "trains on both). Received: --unlabel_ratio="
            f"{FLAGS.unlabel_ratio}, which would ignore --pseudo_labels="
            f"{FLAGS.pseudo_labels}")
    data = common.data_config(scan_dir=FLAGS.model_dir)
    # Writable first: the sources' scan reports go into the model_dir.
    with common.output_folder(FLAGS.model_dir, "model_dir"):
        # Before the scan writes its report into the folder.
        stage_inputs.check_owner(FLAGS.model_dir, "train", "--model_dir")
        labeled = data.labeled_source()
        ratio = FLAGS.unlabel_ratio if FLAGS.pseudo_labels else 0
        train_config = recipes.resolve(
            common.recipe_from_flags(""), labeled, channels=FLAGS.channels,
            unlabel_ratio=ratio, init_from=FLAGS.init_from,
            freeze_blocks=FLAGS.freeze_blocks)
        # One run per model_dir; the workers of one multi-worker run share
        # it, so only the chief takes the lock.
        lock = (workdir_lock.WorkdirLock(FLAGS.model_dir)
                if strategy_lib.is_chief(strategy)
                else contextlib.nullcontext())
        with lock:
            # Refused before flags.txt is rewritten.
            stages.check_train_folder(train_config, labeled, FLAGS.model_dir,
                                      FLAGS.pseudo_labels)
            common.write_flags(FLAGS.model_dir)
            metrics = stages.run_train(train_config, data, FLAGS.model_dir,
                                       FLAGS.pseudo_labels,
                                       strategy=strategy)
    print(metrics)


def run():
    """The ns-train console script (setup.py entry point)."""
    common.run_command(main, "ns-train")


if __name__ == "__main__":
    run()
