"""ns-select: filter and balance the teacher's pseudo-labels.

  ns-select --pred_dir=/tmp/predict --out_dir=/tmp/select --per_class=130000
"""

from absl import flags

from noisy_student.cli import common
from noisy_student.pipeline import stages

FLAGS = flags.FLAGS

flags.DEFINE_string("pred_dir", None, "A finished prediction folder "
                    "(ns-predict).", required=True)
flags.DEFINE_string("out_dir", None, "The selection folder to write.",
                    required=True)
common.define_select_flags()
common.define_beam_flag("the selection")
# --help lists the shared flags too (absl shows only key flags).
flags.adopt_module_key_flags(common)


def main(argv):
    """ns-select: selects and balances pseudo-labels from the parsed FLAGS."""
    del argv
    beam_options = common.beam_options()
    config = common.select_config(FLAGS.pred_dir, FLAGS.out_dir)
    with common.output_folder(FLAGS.out_dir, "out_dir"):
        report = stages.run_select(config, beam_options=beam_options)
    print(report["totals"])


def run():
    """The ns-select console script (setup.py entry point)."""
    common.run_command(main, "ns-select")


if __name__ == "__main__":
    run()
