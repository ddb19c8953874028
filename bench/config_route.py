"""The route of the pipeline's configs through the package's modules.

Issue 22 measures how far a reader has to follow a configuration: the
modules it passes through, and how often the route comes back to a module it
already left. This script runs a tiny digits pipeline in-process (one
teacher and --iterations students, w0.25-d0.25 at 16 px, a few steps each)
under `sys.setprofile` / `threading.setprofile` and records every call of a
`noisy_student` function that receives a config object: an instance of a
dataclass of this package whose class name ends in "Config"
(ExperimentConfig, TrainConfig and its parts, InputConfig, DataConfig,
PredictConfig, SelectConfig, EvalConfig, ExportConfig, ...), as an argument
or as `self`. The calls, in order, give the sequence of their modules;

  stay     a run of consecutive such calls in one module;
  return   a stay in a module the route had already left (stays - modules);
  entries  the stays of each module.

Two routes are printed: every such call ("all"), and only calls of functions
that take a config as an argument ("functions"), leaving out the configs'
own methods and properties (`TrainConfig.peak_lr`, `ModelConfig.model_name`,
`DataConfig.labeled_source`, ...), which a reader reads where the config is
defined rather than follows.

By default the route starts at `experiment.run` (the configs already built
from the flags, as the issue counts it); --from_flags follows the whole
command instead (`noisy-student`'s main: the configs built from the flags,
the checks before any work, then the run).

Run (about a minute or two on 2 CPU cores; the profile hook slows Python):
  PYTHONPATH=$PWD python bench/config_route.py [--iterations=1] [--verbose]
Last lines:
  RESULT config_route_all modules=<m> stays=<s> returns=<r> <module>=<n> ...
  RESULT config_route_functions modules=<m> stays=<s> returns=<r> ...
"""

import argparse
import collections
import dataclasses
import os
import sys
import tempfile
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The tests' tiny configuration of the digits demo (tests/pipeline/test_experiment.py
# TINY), with fewer steps: the route does not depend on the step count.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    f"--flagfile={REPO}/flags/digits.cfg", "--teacher_model=w0.25-d0.25",
    "--image_size=16", "--batch_size=16", "--unlabel_ratio=2",
    "--teacher_train_steps=10", "--student_train_steps=10",
    "--warmup_steps=5", "--steps_per_loop=5", "--log_every=10",
    "--checkpoint_every=5", "--predict_batch_size=16",
    "--records_per_file=100", "--min_confidence=0.0",
]
PACKAGE = "noisy_student"


def _is_config(value):
    """A config object: a dataclass instance of this package named *Config."""
    kind = type(value)
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and kind.__name__.endswith("Config")
            and kind.__module__.startswith(PACKAGE))


def _receives_config(frame):
    """None if the function of `frame` (at its call) got no config, else
    "method" if the config is its `self`, else "function"."""
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    names = code.co_varnames[:count]
    flags = code.co_flags
    if flags & 0x04:  # *args
        names += (code.co_varnames[count],)
        count += 1
    if flags & 0x08:  # **kwargs
        names += (code.co_varnames[count],)
    values = frame.f_locals
    if names and names[0] == "self" and _is_config(values.get("self")):
        return "method"
    for name in names:
        value = values.get(name)
        if isinstance(value, (tuple, list)):
            if any(_is_config(v) for v in value):
                return "function"
        elif isinstance(value, dict) and name == names[-1] and flags & 0x08:
            if any(_is_config(v) for v in value.values()):
                return "function"
        elif _is_config(value):
            return "function"
    return None


class Route:
    """Collects the modules of config-receiving calls, in call order."""

    def __init__(self):
        self.calls = []  # (module, qualified function name, kind)
        self._lock = threading.Lock()

    def profile(self, frame, event, arg):
        del arg
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        # Dunder methods (a config's own __init__ / __post_init__ when it is
        # built or replaced, __eq__, ...) and comprehensions are no step a
        # reader follows.
        if not module.startswith(PACKAGE + ".") or (
                name.startswith("__") and name.endswith("__")) or (
                name.startswith("<")):
            return
        kind = _receives_config(frame)
        if kind:
            with self._lock:
                self.calls.append((module[len(PACKAGE) + 1:],
                                   frame.f_code.co_qualname, kind))

    def stays(self, methods=True):
        """[(module, [function names])] of consecutive calls per module
        (without the configs' own methods unless `methods`)."""
        runs = []
        for module, name, kind in self.calls:
            if kind == "method" and not methods:
                continue
            if runs and runs[-1][0] == module:
                runs[-1][1].append(name)
            else:
                runs.append((module, [name]))
        return runs


def _start(route):
    sys.setprofile(route.profile)
    threading.setprofile(route.profile)


def _stop():
    sys.setprofile(None)
    threading.setprofile(None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=1,
                        help="Students after the teacher (default 1).")
    parser.add_argument("--from_flags", action="store_true",
                        help="Follow the whole noisy-student command "
                        "(cli.pipeline.main) instead of experiment.run.")
    parser.add_argument("--verbose", action="store_true",
                        help="Print every stay with its functions.")
    parser.add_argument("--workdir", default=None,
                        help="Work directory, kept (default: a temporary one, "
                        "removed at the end).")
    args = parser.parse_args()
    from absl import flags  # pylint: disable=g-import-not-at-top
    from noisy_student.pipeline import experiment  # pylint: disable=g-import-not-at-top
    from noisy_student.cli import pipeline  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory(prefix="config_route-") as temp:
        lines = _measure(args, args.workdir or temp, flags, experiment,
                         pipeline)
    print("\n".join(lines), flush=True)


def _measure(args, workdir, flags, experiment, pipeline):
    """Runs the tiny pipeline in `workdir` under the profile hook; returns
    the RESULT lines."""
    flags.FLAGS(["noisy-student", f"--workdir={workdir}", *TINY,
                 f"--iterations={args.iterations}"])
    route = Route()
    config = None if args.from_flags else pipeline.experiment_config()
    _start(route)
    try:
        if args.from_flags:
            pipeline.main([])
        else:
            experiment.run(config)
    finally:
        _stop()
    lines = []
    for label, methods in (("all", True), ("functions", False)):
        stays = route.stays(methods)
        entries = collections.Counter(module for module, _ in stays)
        if args.verbose:
            print(f"route ({label}):")
            for number, (module, names) in enumerate(stays, 1):
                shown = ", ".join(dict.fromkeys(names))
                print(f"{number:3d} {module}: {shown}")
        lines.append(
            f"RESULT config_route_{label} modules={len(entries)} "
            f"stays={len(stays)} returns={len(stays) - len(entries)} "
            + " ".join(f"{m}={n}" for m, n in entries.most_common()))
    return lines


if __name__ == "__main__":
    main()
