"""Runs one command on several command lines in one process (test helper).

`python tests/cli_batch.py noisy_student.cli.train` reads a JSON list of
cases on stdin, runs each in turn, its flags reset in between, and prints
one line: CLI_BATCH=[{"code": exit status, "out": stdout, "err": stderr},
...]. A case is an argument list, run through the command's console entry
point (`run()`), or {"parse": argument list}: the flags parsed only
("ACCEPTED" on stdout, or "REFUSED <absl's error>" and code 2).

For commands that stop before any work (bad flags and inputs, --help): one
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


def _parse(argv):
    """Parses the flags only; the exit status of the parse."""
    try:
        flags.FLAGS(["prog", *argv])
    except flags.Error as e:
        print("REFUSED", e)
        return 2
    print("ACCEPTED")
    return 0


def run_cases(module_name, cases):
    """[{"code", "out", "err"}] of `module_name` on each case."""
    module = importlib.import_module(module_name)
    results = []
    for case in cases:
        parse_only = isinstance(case, dict)
        argv = case["parse"] if parse_only else case
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [module.__file__, *argv]
        flags.FLAGS.unparse_flags()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if parse_only:
                    code = _parse(argv)
                else:
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
