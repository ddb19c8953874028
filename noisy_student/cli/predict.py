"""ns-predict: label the unlabeled images with a teacher (no noise).

Several machines share the work with --shard_index/--num_shards and the same
--out_dir, or an Apache Beam runner does with --beam_pipeline_options; a
rerun skips finished files (resume after a kill).

  ns-predict --teacher=/tmp/teacher --labeled=digits:train \
      --labels_per_class=10 --out_dir=/tmp/predict
  ns-predict --teacher=/tmp/teacher --unlabeled=folder:/data/unlabeled \
      --out_dir=/tmp/predict    # classes: the teacher's
"""

from absl import flags

from noisy_student.cli import common
from noisy_student.model import loading
from noisy_student.pipeline import stage_inputs
from noisy_student.pipeline import stages
from noisy_student.pseudo_labels import prediction

FLAGS = flags.FLAGS

flags.DEFINE_string("teacher", None, "The teacher: a training model_dir "
                    "(EMA weights), a .keras file or a SavedModel.",
                    required=True)
flags.DEFINE_string("out_dir", None, "The prediction folder, shared by all "
                    "workers.", required=True)
flags.DEFINE_integer("num_classes", None, "Classes of the labeled set; "
                     "default: read from --labeled if given, else the "
                     "teacher's outputs.", lower_bound=1)
flags.DEFINE_integer("shard_index", 0, "This worker's index in "
                     "[0, --num_shards).", lower_bound=0)
flags.DEFINE_integer("num_shards", 1, "Workers sharing the prediction.",
                     lower_bound=1)
common.define_data_flags()
common.define_predict_flags()
common.define_beam_flag("the labelling of every unfinished block (then "
                        "--shard_index/--num_shards stay 0/1)")
# --help lists the shared flags too (absl shows only key flags).
flags.adopt_module_key_flags(common)


def main(argv):
    """ns-predict: runs one prediction worker from the parsed FLAGS."""
    del argv
    beam_options = common.beam_options()  # Beam missing: fails first.
    data = common.data_config(scan_dir=FLAGS.out_dir)
    # Writable first: the sources' scan reports go into the out_dir, which
    # is removed again if the command fails before writing anything there.
    with common.output_folder(FLAGS.out_dir, "out_dir"):
        # Before a scan writes its report into the folder.
        stage_inputs.check_owner(FLAGS.out_dir, "predict", "--out_dir")
        if FLAGS.num_classes:
            num_classes = FLAGS.num_classes
        elif data.labeled:
            num_classes = data.labeled_source().num_classes
        else:  # Nothing names the classes but the teacher.
            num_classes = loading.num_classes(
                loading.load_model(FLAGS.teacher, what="teacher"))
        config = prediction.PredictConfig(
            teacher=FLAGS.teacher, out_dir=FLAGS.out_dir,
            num_classes=num_classes, batch_size=FLAGS.predict_batch_size,
            shard_index=FLAGS.shard_index, num_shards=FLAGS.num_shards,
            records_per_file=FLAGS.records_per_file,
            inference_runtime=FLAGS.inference_runtime,
            inference_precision=FLAGS.inference_precision)
        summary = stages.run_predict(
            config, data, channels_given=FLAGS["channels"].present,
            beam_options=beam_options)
    print(summary)


def run():
    """The ns-predict console script (setup.py entry point)."""
    common.run_command(main, "ns-predict")


if __name__ == "__main__":
    run()
