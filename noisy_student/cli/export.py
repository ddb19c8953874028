"""ns-export: a serving SavedModel (uint8 images or JPEG/PNG bytes in).

  ns-export --model_path=/tmp/student --out_dir=/tmp/export
"""

from absl import flags

from noisy_student import export as export_lib
from noisy_student import stages
from noisy_student.cli import common

FLAGS = flags.FLAGS

flags.DEFINE_string("model_path", None, "A training model_dir (its EMA "
                    "weights are exported) or a .keras file.", required=True)
flags.DEFINE_string("out_dir", None, "SavedModel folder to create.",
                    required=True)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir.")
flags.DEFINE_integer("image_size", None, "Serving resolution; default: the "
                     "model's.")
flags.DEFINE_integer("top_k", 5, "Classes returned with their scores.")
flags.DEFINE_bool("tflite", False, "Also write OUT_DIR/model.tflite.")


def main(argv):
    del argv
    config = export_lib.ExportConfig(
        model_path=FLAGS.model_path, out_dir=FLAGS.out_dir,
        overwrite=FLAGS.overwrite, image_size=FLAGS.image_size,
        top_k=FLAGS.top_k, tflite=FLAGS.tflite)
    print(stages.run_export(config))


def run():
    common.run_command(main, "ns-export")


if __name__ == "__main__":
    run()
