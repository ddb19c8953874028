"""ns-export: a serving SavedModel (uint8 images or encoded bytes in).

  ns-export --model_path=/tmp/student --out_dir=/tmp/export

Both signatures apply ns-eval's preprocessing inside the graph, so served
probabilities equal ns-eval's for the same file:

  serve_bytes(image_bytes: string [N])  JPEG/PNG/GIF/BMP/WebP of any size:
      decode (tf.io.decode_image, the file's own channels, CMYK -> RGB),
      JPEG EXIF orientation applied (flips/quarter turns, as Pillow's
      exif_transpose; not for PNG), then as serve_images.
  serve_images(images: uint8 [N, H, W, C]), also serving_default: any H, W,
      C = 1/2/3/4: channels to the model's (grey repeated, RGB -> grey by
      tf.image.rgb_to_grayscale, alpha dropped); longer side <= 64 px: the
      whole image, else the central size/(size+32) of the shorter side (at
      least 1 px); resized bilinear with anti-aliasing, rounded to uint8.

Outputs: probabilities, top_k_classes, top_k_scores, top_k_names, valid,
error and class_names. An image serve_bytes cannot decode does not fail the
request: its row has valid false, an error ("empty input", "undecodable
image: ..."), probabilities 0 and top_k_classes -1 (see serving/export.py). An
empty request returns 0 rows. The crop numbers and class names are read from the model's
folder (preprocess.json, class_names.json), not from flags.
"""

from absl import flags

from noisy_student.cli import common
from noisy_student.pipeline import stages
from noisy_student.serving import export

FLAGS = flags.FLAGS

flags.DEFINE_string("model_path", None, "A training model_dir (its EMA "
                    "weights are exported) or a .keras file.", required=True)
flags.DEFINE_string("out_dir", None, "SavedModel folder to create.",
                    required=True)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir.")
flags.DEFINE_integer("image_size", None, "Serving resolution; default: the "
                     "model's.", lower_bound=common.MIN_IMAGE_SIZE)
flags.DEFINE_integer("top_k", 5, "Classes returned with their scores.",
                     lower_bound=1)
flags.DEFINE_bool("tflite", False, "Also write OUT_DIR/model.tflite.")


def main(argv):
    """ns-export: exports a SavedModel from the parsed FLAGS."""
    del argv
    common.check_writable_parent(FLAGS.out_dir, "out_dir")
    config = export.ExportConfig(
        model_path=FLAGS.model_path, out_dir=FLAGS.out_dir,
        overwrite=FLAGS.overwrite, image_size=FLAGS.image_size,
        top_k=FLAGS.top_k, tflite=FLAGS.tflite)
    print(stages.run_export(config))


def run():
    """The ns-export console script (setup.py entry point)."""
    common.run_command(main, "ns-export")


if __name__ == "__main__":
    run()
