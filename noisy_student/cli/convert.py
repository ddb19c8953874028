"""ns-convert: pretrained weights into a model.keras every command accepts.

Sources (detected from --checkpoint): a TF1 checkpoint of the official
EfficientNet code, including the released Noisy Student ones (a folder with a
`checkpoint` file, or a prefix like .../model.ckpt; EMA copies preferred); a
Keras applications EfficientNetB0-B7 weight file (.h5 / .weights.h5, with or
without top); or a model.keras of this package.

  ns-convert --checkpoint=noisy_student_efficientnet-b0 --model=b0
      --out_dir=/tmp/ns-b0
  ns-convert --checkpoint=efficientnetb0_notop.h5 --model=b0
      --num_classes=5 --image_size=224 --out_dir=/tmp/b0-flowers

The result (OUT_DIR/model.keras, OUT_DIR/convert.json) is accepted by
--teacher, --init_from, --teacher_init, --student_init, ns-eval
--model_path and ns-export --model_path. In Python, `import
noisy_student.model.layers` before `keras.saving.load_model` (it registers the
model's custom layers).
"""

from absl import flags

from noisy_student.cli import common
from noisy_student.model import checkpoints

FLAGS = flags.FLAGS

flags.DEFINE_string("checkpoint", None, "The source: TF1 checkpoint folder "
                    "or prefix, Keras .h5 weight file, or model.keras (or "
                    "its folder). Local or gs://.", required=True)
flags.DEFINE_string("model", None, "The EfficientNet the checkpoint is of: "
                    "b0..b8, l2 (or wW-dD).", required=True)
flags.DEFINE_string("out_dir", None, "Folder to write model.keras and "
                    "convert.json into.", required=True)
flags.DEFINE_integer("image_size", None, "Input side of the written model; "
                     "default: the variant's resolution (B0 224). Any size "
                     "loads (EfficientNet is resolution-agnostic).",
                     lower_bound=common.MIN_IMAGE_SIZE)
flags.DEFINE_integer("num_classes", None, "Classes of the head; default: the "
                     "checkpoint's (ImageNet: 1000). Another count keeps the "
                     "backbone and builds a fresh head.", lower_bound=1)
flags.DEFINE_enum("normalization", "imagenet", sorted(
    checkpoints.NORMALIZATIONS), "Pixel scaling a TF1 checkpoint was trained "
                  "with: imagenet (mean/stddev, official) or advprop (to "
                  "[-1, 1], the AdvProp checkpoints). Keras files and "
                  "model.keras carry their own.")
flags.DEFINE_bool("overwrite", False, "Replace an existing "
                  "OUT_DIR/model.keras.")


def main(argv):
    """ns-convert: converts an official checkpoint from the parsed FLAGS."""
    del argv
    summary = checkpoints.convert(
        FLAGS.checkpoint, FLAGS.model, FLAGS.out_dir,
        image_size=FLAGS.image_size, num_classes=FLAGS.num_classes,
        normalization=FLAGS.normalization, overwrite=FLAGS.overwrite)
    source = summary["source"]
    print(f"{FLAGS.out_dir}/model.keras: {FLAGS.model} at "
          f"{summary['image_size']} px, {summary['num_classes']} classes "
          f"({summary['head']} head) from a {source['kind']} checkpoint"
          + (" (EMA weights)" if source["ema"] else ""), flush=True)


def run():
    """The ns-convert console script (setup.py entry point)."""
    common.run_command(main, "ns-convert")


if __name__ == "__main__":
    run()
