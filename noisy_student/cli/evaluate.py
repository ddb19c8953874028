"""ns-eval: accuracy, calibration and robustness of a trained model.

  ns-eval --model_path=/tmp/student --test=digits:test --out_dir=/tmp/eval
  ns-eval --model_path=... --corruptions=gaussian_noise,jpeg --epsilons=0,2,8
"""

import math

from absl import flags

from noisy_student.cli import common
from noisy_student.evaluation import corruptions
from noisy_student.evaluation import evaluator
from noisy_student.pipeline import stages

FLAGS = flags.FLAGS

flags.DEFINE_string("model_path", None, "A training model_dir (EMA weights), "
                    "a .keras file or a SavedModel.", required=True)
flags.DEFINE_string("out_dir", "", "Where results.json and "
                    "confusion_matrix.png go.")
# The flag's name in 0.1.0 (every other command's output folder is
# --out_dir); the alias goes away in 0.2.0.
flags.DEFINE_alias("output_dir", "out_dir")
flags.DEFINE_enum("part", "test", ["test", "validation"],
                  "Evaluate --test, or the validation part of --labeled.")
flags.DEFINE_integer("eval_batch_size", 64, "Images per batch.", lower_bound=1)
flags.DEFINE_list("corruptions", [], "On-the-fly corruptions to score "
                  f"(any of {', '.join(corruptions.CORRUPTION_NAMES)}).")
flags.register_validator(
    "corruptions",
    lambda names: set(names) <= set(corruptions.CORRUPTION_NAMES),
    message="expected names among "
    f"{', '.join(corruptions.CORRUPTION_NAMES)}")
flags.DEFINE_list("epsilons", [], "FGSM/PGD epsilons in pixels of [0, 255].")


def _epsilons_are_numbers(values):
    try:
        epsilons = [float(v) for v in values]
    except ValueError:
        return False
    return all(math.isfinite(e) and e >= 0 for e in epsilons)


flags.register_validator(
    "epsilons", _epsilons_are_numbers,
    message="expected comma-separated numbers >= 0 (pixels of [0, 255])")
flags.DEFINE_enum("attack", "fgsm", ["fgsm", "pgd"], "Adversarial attack.")
flags.DEFINE_integer("pgd_steps", 10, "PGD iterations.", lower_bound=0)
flags.DEFINE_string("imagenet_c_dir", "", "TFDS data_dir holding "
                    "imagenet2012_corrupted (mCE vs AlexNet).")
flags.DEFINE_string("imagenet_a_dir", "", "TFDS data_dir holding imagenet_a.")
common.define_data_flags()
# --help lists the shared flags too (absl shows only key flags).
flags.adopt_module_key_flags(common)


def main(argv):
    """ns-eval: evaluates a model on the test sets from the parsed FLAGS."""
    del argv
    if FLAGS.out_dir:
        with common.output_folder(FLAGS.out_dir, "out_dir"):
            evaluate_and_print()
    else:
        evaluate_and_print()


def evaluate_and_print():
    """Evaluates the model of the flags; prints the clean metrics."""
    config = evaluator.EvalConfig(
        model_path=FLAGS.model_path, out_dir=FLAGS.out_dir,
        batch_size=FLAGS.eval_batch_size,
        corruptions=tuple(FLAGS.corruptions),
        epsilons=tuple(float(e) for e in FLAGS.epsilons),
        attack=FLAGS.attack, pgd_steps=FLAGS.pgd_steps,
        imagenet_c_dir=FLAGS.imagenet_c_dir,
        imagenet_a_dir=FLAGS.imagenet_a_dir)
    # Folder sources' scan reports go beside the results (if written).
    data = common.data_config(scan_dir=FLAGS.out_dir or None)
    results = stages.run_eval(config, data, FLAGS.part,
                              channels_given=FLAGS["channels"].present)
    print({k: v for k, v in results.get("clean", {}).items()
           if k in ("top1", "top5", "ece", "num_examples")})


def run():
    """The ns-eval console script (setup.py entry point)."""
    common.run_command(main, "ns-eval")


if __name__ == "__main__":
    run()
