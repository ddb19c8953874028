"""Run by every Python process the tests start (tests/conftest.py puts this
folder first on PYTHONPATH): TensorFlow's graph optimizer (Grappler) is
turned off as soon as TensorFlow is imported.

Grappler's rewrites cost seconds per traced function and gain nothing on the
tests' tiny models: off, a tiny pipeline run spends 18% less CPU (35 s
against 42 s of user time, one run each). The test processes themselves keep
TensorFlow's default, which `test_train_lib` switches per test
(`train_helpers.no_grappler`), and the benchmarks run with it on.
"""

import importlib.abc
import importlib.machinery
import sys


class _AfterTensorFlow(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as usual and turns Grappler off once it loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.config.optimizer.set_experimental_options(
                {"disable_meta_optimizer": True})

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterTensorFlow())
