"""Runs one command on several command lines in one process (test helper).

`python tests/cli_batch.py noisy_student.cli.train` reads a JSON list of
argument lists on stdin, runs the command's console entry point (`run()`)
on each in turn, its flags reset in between, and prints one line:
CLI_BATCH=[{"code": exit status, "out": stdout, "err": stderr}, ...].

For commands that stop before any work (bad flags and inputs): one
TensorFlow start-up (seconds of CPU) instead of one per case. What each
case prints through Python is captured apart; what TensorFlow's C++ code
writes to the file descriptors goes to this process's own stderr. A case
that raises is recorded with its traceback and status 1, as the
interpreter would end.
"""

import contextlib
import importlib
import io
import json
import sys
import traceback

from absl import flags

RESULT_PREFIX = "CLI_BATCH="


def run_cases(module_name, cases):
    """[{"code", "out", "err"}] of `module_name`'s run() on each argv."""
    module = importlib.import_module(module_name)
    results = []
    for argv in cases:
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [module.__file__, *argv]
        flags.FLAGS.unparse_flags()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.run()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(
                    e.code is not None)
            except BaseException:  # pylint: disable=broad-except
                traceback.print_exc()
                code = 1
        results.append({"code": code, "out": out.getvalue(),
                        "err": err.getvalue()})
    return results


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(
        run_cases(sys.argv[1], json.loads(sys.stdin.read()))), flush=True)
