"""absl flags shared by the commands, and their conversion to configs.

Each command calls the `define_*` functions it needs at import time, then
`flags.adopt_module_key_flags(common)` so that its `--help` lists them (absl
lists only a module's key flags there), and in `main` turns FLAGS
into frozen config dataclasses once with the `*_config` functions; its
`run()` is `run_command(main)`, which turns user errors into a message and
exit status 2. Nothing below noisy_student/cli/ reads FLAGS.

Size: every flag the commands share, each with its help text and bounds
(about half the module), kept in one place so that a flag means the same in
every command.
"""

import contextlib
import dataclasses
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from noisy_student.data import preprocess
from noisy_student.model import info as model_info
from noisy_student.pipeline import beam
from noisy_student.pipeline import recipes
from noisy_student.pipeline import stages
from noisy_student.pseudo_labels import inference_runtime
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import selection
from noisy_student.training import loop as train_lib
from noisy_student.utils import storage

FLAGS = flags.FLAGS
# The flags' defaults: the Python API's (recipes.Recipe).
RECIPE = recipes.Recipe()


class UsageError(ValueError):
    """A bad flag or input: reported as a message, exit status 2."""


# Errors a user's flags or files cause: printed as one message (the
# traceback only with --verbosity=1). Anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError,
               NotADirectoryError, PermissionError, tf.errors.PermissionDeniedError,
               tf.errors.NotFoundError)


def _user_errors():
    from noisy_student.pipeline import lock  # pylint: disable=g-import-not-at-top

    # A full disk too: the user frees space (or writes elsewhere) and reruns.
    return USER_ERRORS + (lock.WorkdirBusyError,
                          storage.DiskFullError,
                          inference_runtime.RuntimeNotInstalledError,
                          beam.BeamNotInstalledError)


# absl's help flags print the help and exit with status 1.
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort",
             "--helpfull", "-helpfull", "--helpxml", "-helpxml")


def run_command(main, name):
    """`app.run(main)` with user errors as one line and exit status 2.

    User errors (bad or missing flags included) are printed as
    `name: error: message` on stderr (tracebacks with --verbosity=1 or
    more); help asked for (`--help`) exits with status 0. So is a full
    device (or quota), from any write: `utils.storage.DiskFullError`'s message
    names what was being written, where possible.

    Args:
      main: The command's main(argv).
      name: The command's name, the prefix of its error lines (ns-train).
    """
    def guarded(argv):
        try:
            with storage.naming_full_disk():
                return main(argv)
        except _user_errors() as e:
            if FLAGS.verbosity >= 1:
                raise
            message = getattr(e, "message", None) or str(e)
            print(f"{name}: error: {message}\n(--verbosity=1 shows the "
                  "traceback)", file=sys.stderr, flush=True)
            sys.exit(2)

    def parse(argv):
        # A missing or bad flag is a user error like the others (absl's own
        # parser prints "FATAL Flags parsing error" and exits 1).
        try:
            return FLAGS(argv)
        except flags.Error as e:
            print(f"{name}: error: {e}\n(--help lists the flags)",
                  file=sys.stderr, flush=True)
            sys.exit(2)
    # absl's --help lists the key flags of the module named by sys.argv[0]:
    # the command's module when run with `python -m`, but a console script
    # (ns-train) is another file, whose list would be empty.
    for flag in FLAGS.get_key_flags_for_module(main.__module__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    try:
        app.run(guarded, flags_parser=parse)
    except SystemExit as e:
        # absl exits 1 after printing the help the user asked for.
        if e.code == 1 and any(a in HELP_ARGS for a in sys.argv[1:]):
            sys.exit(0)
        raise


def _write_problem(folder):
    """None if `folder` (made if missing) takes a new file, else why not."""
    # A unique name: the workers of one ns-predict share --out_dir.
    probe = storage.temp_path(f"{str(folder).rstrip('/')}/write-test")
    try:
        tf.io.gfile.makedirs(folder)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        return getattr(e, "message", None) or str(e)
    return None


def check_writable_dir(folder, flag):
    """Creates `folder` and writes a file there, or fails naming the flag.

    An unwritable or invalid output folder fails before any work, not with
    a raw TF error later.

    Args:
      folder: A local or gs:// folder.
      flag: The flag that set it, without dashes (out_dir).

    Raises:
      UsageError: naming --flag, the folder and the reason.
    """
    reason = _write_problem(folder)
    if reason:
        raise UsageError(f"Expected a writable folder --{flag}. Received: "
                         f"--{flag}={folder} ({reason})")


def check_writable_parent(path, flag):
    """Checks, before any work, that `path`'s parent folder takes a new file.

    For an output made whole at the end (ns-export's SavedModel, written
    beside `path` and renamed).

    Args:
      path: The output's path (local or gs://).
      flag: The flag that set it, without dashes.

    Raises:
      UsageError: naming --flag, the parent folder and the reason.
    """
    parent = str(path).rstrip("/").rpartition("/")[0] or "."
    reason = _write_problem(parent)
    if reason:
        raise UsageError(f"Expected --{flag} in a writable folder. Received: "
                         f"--{flag}={path} ({parent}: {reason})")


# The resolved flags each command writes into its output folder.
FLAGS_FILE = "flags.txt"
# Records a command writes before its work: a folder made for a command that
# failed holding only these is removed with them. (skipped_images.json is
# kept: it lists the files that made a --noskip_corrupt command fail.)
RECORD_FILES = (FLAGS_FILE, stages.STAGE_CONFIG, stages.INPUTS_FILE,
                train_lib.CONFIG_FILE, preprocess.RECIPE_FILE,
                model_info.CLASS_NAMES_FILE)


@contextlib.contextmanager
def output_folder(folder, flag):
    """A context that checks `folder` is writable and cleans up on failure.

    If the block fails and the folder was made for it and holds nothing but
    RECORD_FILES (no checkpoint, prediction or result), the folder is
    removed: a failed command leaves no --out_dir that looks like a run.

    Args:
      folder: The command's output folder.
      flag: The flag that set it, without dashes.

    Raises:
      UsageError: from `check_writable_dir`, before the block runs.
      utils.storage.DiskFullError: for a full device in the block, naming
        --flag as the other place to write to.
    """
    existed = tf.io.gfile.exists(folder)
    check_writable_dir(folder, flag)
    try:
        yield
    except BaseException as e:
        if not existed and tf.io.gfile.exists(folder) and set(
                tf.io.gfile.listdir(folder)) <= set(RECORD_FILES):
            tf.io.gfile.rmtree(folder)
        full = storage.DiskFullError.of(e)
        if full is None:
            raise
        raise full.with_flag(flag) from e


# The noisy-student command's demo (README quickstart): scikit-learn's digits.
DEMO_LABELED = "digits:train"
DEMO_TEST = "digits:test"
# Seeds reach numpy's and Keras' generators, which take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
# Smallest input side a model trains at: below it the pad-and-crop
# augmentation's mirror padding and the 3x3 depthwise kernels fail inside
# TensorFlow (measured: 1 and 2 px fail, 3 px trains).
MIN_IMAGE_SIZE = 3


def define_float(name, default, help_text, lower_bound=None,
                 upper_bound=None, above=None, below=None):
    """flags.DEFINE_float that also refuses what the configs would refuse
    later: NaN, infinities and values at an open bound.

    A refused value fails when the flags are parsed, as
    "flag --NAME=VALUE: expected ...", before any work.

    Args:
      name, default, help_text: As flags.DEFINE_float's.
      lower_bound, upper_bound: Inclusive bounds (absl's, shown in --help).
      above: Open lower bound: the value must be > above.
      below: Open upper bound: the value must be < below.
    """
    flags.DEFINE_float(name, default, help_text, lower_bound=lower_bound,
                       upper_bound=upper_bound)

    def check(value):
        return value is None or (
            math.isfinite(value) and (above is None or value > above)
            and (below is None or value < below))
    expected = ["a finite number"]
    if above is not None:
        expected.append(f"> {above:g}")
    if below is not None:
        expected.append(f"< {below:g}")
    flags.register_validator(name, check,
                             message="expected " + ", ".join(expected))


def define_data_flags(demo=False):
    """The data source flags; `demo`: default to the digits demo (only the
    noisy-student command, which runs it); other commands have no default
    source, so a missing --labeled/--test is named, not replaced by
    digits."""
    flags.DEFINE_string(
        "labeled", DEMO_LABELED if demo else None,
        "Labeled training source: tfds:NAME[:SPLIT], folder:PATH, "
        "tfrecord:PATTERN[,image_key=K,label_key=K,first_label=1,"
        "names=FILE], list:FILE[,names=FILE], npz:PATH, "
        "idx:DIR[:SPLIT] or digits[:SPLIT]. Labels must be 0..K-1, each "
        "class with at least one image.")
    flags.DEFINE_string(
        "unlabeled", "",
        "Unlabeled source (any spec; labels never read). Empty: the rest of "
        "--labeled after --labels_per_class.")
    flags.DEFINE_string("test", None,
                        "Labeled source of the final evaluation (its "
                        "classes must be the model's)."
                        + (" Default: digits:test with the digits demo's "
                           "--labeled; required with any other." if demo
                           else ""))
    flags.DEFINE_integer(
        "labels_per_class", 0,
        "Labels kept per class of --labeled (seeded by --split_seed); 0 keeps "
        "all. E.g. 100 on Fashion-MNIST = 1,000 labels.", lower_bound=0)
    flags.DEFINE_integer(
        "validation_size", 0,
        "Images of the unlabeled rest held out as validation (evaluated "
        "during training instead of --test).", lower_bound=0)
    flags.DEFINE_integer("split_seed", 0, "Seed of the labeled split.",
                         lower_bound=0, upper_bound=MAX_SEED)
    flags.DEFINE_string("data_dir", None,
                        "TFDS data folder (local or gs://).")
    flags.DEFINE_integer("channels", 3,
                         "Image channels given to the model (1 or 3); "
                         "ns-eval and ns-predict read the model's when "
                         "this is left out.")
    flags.register_validator("channels", lambda value: value in (1, 3),
                             message="expected 1 or 3")
    flags.DEFINE_bool("skip_corrupt", True,
                      "Folder, list and tfrecord sources: leave out image "
                      "files (records) that do not "
                      "decode (checked once before any work, named in the "
                      "log and in OUTPUT_FOLDER/skipped_images.json, not "
                      "counted); --noskip_corrupt fails before any work, "
                      "naming the first.")


def data_config(scan_dir=None, demo=False):
    """The `stages.DataConfig` of the data flags (validated).

    Args:
      scan_dir: The command's output folder, where folder sources write
        skipped_images.json.
      demo: The command runs the digits demo by default: an unset --test
        is digits' test split when --labeled is digits too.

    Raises:
      ValueError: with `demo`, for an unset --test and another --labeled
        (the demo's test set would score a model of other classes).
    """
    test = FLAGS.test or ""
    if demo and not test:
        # Only the demo's own training split: digits:test or digits:all
        # would be scored on images they trained on.
        if (FLAGS.labeled or "") not in ("digits", DEMO_LABELED):
            raise ValueError(
                "Expected --test (the labeled source of the final "
                "evaluation) with your own --labeled; digits:test is the "
                "default of the digits demo (--labeled=digits:train) only. "
                f"Received: --labeled="
                f"{FLAGS.labeled} and no --test")
        test = DEMO_TEST
    return stages.DataConfig(
        labeled=FLAGS.labeled or "", unlabeled=FLAGS.unlabeled,
        test=test,
        labels_per_class=FLAGS.labels_per_class,
        validation_size=FLAGS.validation_size, split_seed=FLAGS.split_seed,
        data_dir=FLAGS.data_dir, channels=FLAGS.channels,
        skip_corrupt=FLAGS.skip_corrupt, scan_dir=scan_dir)


def define_role_flags(prefix, role, model=True):
    """Defines the flags that differ between a teacher and a student
    (`recipes.Recipe`'s fields of those names, with its defaults).

    Args:
      prefix: Flag name prefix ("", "teacher_", "student_").
      role: The role named in the help texts (teacher, student, model).
      model: Whether to define --{prefix}model.
    """
    if model:
        flags.DEFINE_string(
            prefix + "model", RECIPE.model,
            f"The {role}'s EfficientNet: b0..b8, l2, or wW-dD (width W, depth "
            "D coefficients, e.g. w0.5-d0.5).")
    flags.DEFINE_integer(prefix + "train_steps", RECIPE.train_steps,
                         f"Training steps of the {role} (global batches).",
                         lower_bound=0)
    flags.DEFINE_enum(prefix + "augment", RECIPE.augment,
                      ["randaugment", "keras_cv", "none"],
                      f"Input noise of the {role}: the paper's RandAugment "
                      "(ours), keras_cv's, or none.")
    define_float(prefix + "magnitude", RECIPE.magnitude,
                 f"RandAugment magnitude M of the {role} on the paper's "
                 "0..10 scale, > 10 allowed (paper: 27 for B7, 5 SVHN).",
                 lower_bound=0)
    flags.DEFINE_integer(prefix + "num_layers", RECIPE.num_layers,
                         f"RandAugment ops per image N of the {role} (2).",
                         lower_bound=0)
    define_float(prefix + "dropout_rate", RECIPE.dropout_rate,
                 f"Head dropout of the {role}; default: the variant's "
                 "(B0 0.2 ... B7 0.5).", lower_bound=0, below=1)
    define_float(prefix + "stochastic_depth_rate",
                 RECIPE.stochastic_depth_rate,
                 f"Base stochastic-depth drop rate of the {role} "
                 "(paper: 0.2; rate of block i is 0.2*i/n).",
                 lower_bound=0, below=1)


def define_train_flags():
    """Training recipe flags shared by teachers and students."""
    flags.DEFINE_integer("image_size", RECIPE.image_size,
                         "Model input side in pixels; default: the teacher "
                         "variant's (B0 224).", lower_bound=MIN_IMAGE_SIZE)
    flags.DEFINE_bool("small_images", RECIPE.small_images,
                      "Stride 1 in stages 2-3 (inputs <= 64 px); default: on "
                      "when image_size <= 64, unless starting from pretrained "
                      "weights (then the checkpoint's strides: standard for "
                      "ImageNet checkpoints).")
    flags.DEFINE_bool("flip", RECIPE.flip, "Random left-right flips; default: on "
                      "unless the source is digits/MNIST/SVHN-like.")
    flags.DEFINE_integer("batch_size", RECIPE.batch_size,
                         "Labeled images per global batch (SVHN recipe: 128).",
                         lower_bound=1)
    flags.DEFINE_integer("unlabel_ratio", RECIPE.unlabel_ratio,
                         "Unlabeled images per labeled image in a student's "
                         "batch (paper: 1 for B0, 3 for B1-B7, 14/28 L2).",
                         lower_bound=0)
    flags.DEFINE_enum("optimizer", RECIPE.optimizer, ["rmsprop", "sgd", "adam",
                                               "adamw"],
                      "Optimizer (paper: RMSProp rho 0.9, momentum 0.9, "
                      "eps 1e-3).")
    define_float("base_learning_rate", RECIPE.base_learning_rate,
                 "Learning rate per 256 labeled images, scaled to "
                 "--batch_size (official code's flag: 0.016).",
                 above=0)
    define_float("warmup_epochs", RECIPE.warmup_epochs, "Linear warm-up epochs (5).",
                 lower_bound=0)
    flags.DEFINE_integer("warmup_steps", RECIPE.warmup_steps,
                         "Warm-up in steps; overrides --warmup_epochs.",
                         lower_bound=0)
    flags.DEFINE_enum("lr_schedule", RECIPE.lr_schedule,
                      ["exponential", "cosine", "constant"],
                      "exponential: x0.97 every 2.4 epochs (paper); cosine "
                      "over the run.")
    define_float("lr_decay_epochs", RECIPE.lr_decay_epochs,
                 "Epochs between x0.97 decays (paper: 2.4).",
                 above=0)
    define_float("weight_decay", RECIPE.weight_decay,
                 "L2 weight decay on non-batch-norm weights (1e-5).",
                 lower_bound=0)
    define_float("label_smoothing", RECIPE.label_smoothing,
                 "Label smoothing of the labeled loss (0.1).",
                 lower_bound=0, below=1)
    define_float("labeled_loss_weight", RECIPE.labeled_loss_weight,
                 "Weight of the labeled cross-entropy in a student's "
                 "loss (1: the paper's; 0: pseudo-labels only, the "
                 "labeled images still forwarded; an ablation, not in "
                 "the paper). The pipeline's teacher always uses 1.",
                 lower_bound=0)
    define_float("ema_decay", RECIPE.ema_decay,
                 "Decay of the weights' moving average used to "
                 "evaluate, teach and export (0.9999; 0 = off).",
                 lower_bound=0, below=1)
    _define_device_flags()
    flags.DEFINE_integer("steps_per_loop", RECIPE.steps_per_loop,
                         "Steps per tf.function call (TPU host loop).",
                         lower_bound=1)
    flags.DEFINE_integer("checkpoint_every", RECIPE.checkpoint_every,
                         "Steps between checkpoints (0: only at the end).",
                         lower_bound=0)
    flags.DEFINE_integer("eval_every", RECIPE.eval_every,
                         "Steps between validations (0: only at the end).",
                         lower_bound=0)
    flags.DEFINE_integer("log_every", RECIPE.log_every,
                         "Steps between progress lines.", lower_bound=1)
    flags.DEFINE_integer("seed", RECIPE.seed, "Seed of weights, noise and shuffling.",
                         lower_bound=0, upper_bound=MAX_SEED)


def _define_device_flags():
    """Where and how the step runs: precision, strategy, XLA, CPU kernels."""
    flags.DEFINE_enum("precision", RECIPE.precision,
                      ["float32", "bfloat16", "mixed_float16"],
                      "Compute precision (bfloat16 on TPU).")
    flags.DEFINE_enum("strategy", RECIPE.strategy,
                      ["default", "one_device", "mirrored",
                       "multi_worker_mirrored", "tpu"],
                      "tf.distribute strategy.")
    flags.DEFINE_string("tpu", RECIPE.tpu,
                        "TPU address for --strategy=tpu ('local' on a VM).")
    flags.DEFINE_bool("jit_compile", RECIPE.jit_compile,
                      "XLA-compile the step (slower on CPU; TPU compiles).")
    flags.DEFINE_bool("cpu_kernels", RECIPE.cpu_kernels,
                      "On CPU in float32 without XLA, train batch norm + "
                      "SiLU, SiLU, the depthwise filter gradient and the "
                      "squeeze-and-excite gate with the project's C++ "
                      "kernels, compiled on first use (g++ and TF's headers; "
                      "cached in $NOISY_STUDENT_CACHE, default "
                      "~/.cache/noisy_student; about 10 s, once). Same "
                      "arithmetic, other float rounding; TF's ops when they "
                      "cannot be built. GPU, TPU and XLA runs never use "
                      "them.")


def recipe_from_flags(prefix, model=None):
    """The `recipes.Recipe` of one role from the flags.

    Each field is read from --{prefix}<field> where the command defines it,
    else from --<field> (the flags both roles share), else it keeps its
    default.

    Args:
      prefix: The role's flag prefix ("teacher_", "student_" or "").
      model: The role's model name, when no --{prefix}model flag sets it.

    Raises:
      UsageError: for --{prefix}augment=keras_cv with --channels=1 (keras_cv's
        RandAugment needs RGB), naming both flags.
    """
    values = {}
    for field in dataclasses.fields(recipes.Recipe):
        for name in (prefix + field.name, field.name):
            if name in FLAGS:
                values[field.name] = FLAGS[name].value
                break
    if model is not None:
        values["model"] = model
    if values["augment"] == "keras_cv" and FLAGS.channels == 1:
        raise UsageError(
            f"Expected --{prefix}augment=randaugment or none with "
            f"--channels=1 (keras_cv's RandAugment needs RGB). Received: "
            f"--{prefix}augment=keras_cv, --channels=1")
    return recipes.Recipe(**values)


def define_predict_flags():
    """The flags of the predict stage (defaults: pseudo_labels/prediction.py's)."""
    flags.DEFINE_integer("predict_batch_size", prediction.BATCH_SIZE,
                         "Images per teacher call when pseudo-labeling.",
                         lower_bound=1)
    flags.DEFINE_integer("records_per_file", prediction.RECORDS_PER_FILE,
                         "Unlabeled images per prediction file (the unit of "
                         "resume and of --shard_index/--num_shards work).",
                         lower_bound=1)
    flags.DEFINE_enum(
        "inference_runtime", inference_runtime.DEFAULT_RUNTIME,
        list(inference_runtime.RUNTIMES),
        "What runs the teacher's forward pass when pseudo-labeling: "
        "tensorflow (the reference) or openvino (faster on CPUs; pip "
        "install 'noisy-student[openvino]'). A prediction folder is "
        "resumed only with the runtime and --inference_precision that "
        "began it.")
    flags.DEFINE_enum(
        "inference_precision", inference_runtime.DEFAULT_PRECISION,
        list(inference_runtime.PRECISIONS),
        "Precision of the teacher's forward pass: float32 (the reference) "
        "or bfloat16 (--inference_runtime=openvino on a CPU with "
        "AVX512-BF16 or AMX).")


def define_beam_flag(stages_run):
    """--beam_pipeline_options (TensorFlow Datasets' flag and syntax).

    Args:
      stages_run: The stages it runs on Beam, for the help text.
    """
    flags.DEFINE_string(
        "beam_pipeline_options", "",
        f"Run {stages_run} as an Apache Beam pipeline with these options, "
        "comma-separated key=value items of Beam's PipelineOptions, e.g. "
        "runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp"
        ",extra_package=dist/noisy_student-0.1.0-py3-none-any.whl or "
        "runner=DirectRunner,direct_running_mode=multi_processing,"
        "direct_num_workers=8 (docs/scale.md). Empty: in this process. The "
        "files are the same either way. Needs pip install "
        "'noisy-student[beam]'.")


def beam_options():
    """--beam_pipeline_options, checked before any work.

    Returns:
      The flag's text ("" when not given).

    Raises:
      pipeline.beam.BeamNotInstalledError: for options without Beam
        installed (one line naming the flag).
      ValueError: for an item that is not key=value.
    """
    text = FLAGS.beam_pipeline_options or ""
    if text:
        beam.pipeline_options(text)
    return text


def define_select_flags():
    """The flags of the select stage (SelectConfig's fields)."""
    flags.DEFINE_integer(
        "per_class", None,
        "K: pseudo-labeled images kept per class, most confident first; "
        "classes with fewer are duplicated up to K (paper: 130,000 on "
        "ImageNet). Unset or 0: keep every confident image once.",
        lower_bound=0)
    define_float("min_confidence", 0.3,
                 "Drop images whose top probability is below this "
                 "(paper: 0.3).", lower_bound=0, below=1)
    flags.DEFINE_enum("label_type", "soft", ["soft", "hard"],
                      "Soft (probabilities, paper's best) or hard (one-hot) "
                      "pseudo-labels.")
    define_float("temperature", 1.0,
                 "T of soft targets p^(1/T), renormalised (1 keeps the "
                 "teacher's; -> 0 approaches one-hot).", above=0)
    flags.DEFINE_bool("duplicate", True,
                      "Duplicate the images of classes with fewer than K up "
                      "to K (the paper's balancing; --noduplicate keeps at "
                      "most K per class, each once).")
    flags.DEFINE_integer("select_seed", 0,
                         "Seed of the duplicates' stochastic rounding.",
                         lower_bound=0, upper_bound=MAX_SEED)


def select_settings():
    """The select stage's settings from the flags: `SelectConfig`'s fields
    other than its folders."""
    return {"per_class": FLAGS.per_class or None,
            "min_confidence": FLAGS.min_confidence,
            "label_type": FLAGS.label_type,
            "temperature": FLAGS.temperature, "duplicate": FLAGS.duplicate,
            "seed": FLAGS.select_seed}


def select_config(pred_dir, out_dir):
    """The select stage's `SelectConfig` from the flags (validated).

    Args:
      pred_dir: The prediction folder to select from.
      out_dir: The selection folder to write.
    """
    return selection.SelectConfig(pred_dir=pred_dir, out_dir=out_dir,
                                  **select_settings())


def _flag_values(text):
    """{"--name": value} of a flagfile's lines ("--name=value"; a boolean
    is "--name" or "--noname")."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
        elif line.startswith("--no"):
            values["--" + line[4:]] = "false"
        elif line.startswith("--"):
            values[line] = "true"
    return values


def changed_flags(folder):
    """The flags whose values differ from those folder/flags.txt recorded
    (written by `write_flags` at the folder's last run).

    Returns:
      ["--name=now (was recorded)", ...] sorted by name; [] when no
      flags.txt can be read.
    """
    try:
        with tf.io.gfile.GFile(os.path.join(folder, FLAGS_FILE)) as f:
            recorded = _flag_values(f.read())
    except (OSError, tf.errors.OpError):
        return []
    now = _flag_values(FLAGS.flags_into_string())
    # A flag absent from one side is at its default there. --overwrite is
    # what to do this time, not a setting of the run.
    return [f"{name}={now.get(name, '(default)')} "
            f"(was {recorded.get(name, '(default)')})"
            for name in sorted(set(now) | set(recorded))
            if now.get(name) != recorded.get(name)
            and name != "--overwrite"]


def write_flags(folder):
    """Writes the resolved flags (a flagfile) into `folder`."""
    storage.atomic_write(os.path.join(folder, FLAGS_FILE),
                          FLAGS.flags_into_string())
    logging.info("Flags written to %s/%s", folder, FLAGS_FILE)

