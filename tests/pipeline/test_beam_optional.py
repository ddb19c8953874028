"""Beam is optional: nothing but pipeline/beam.py imports it, and only when a
pipeline is built; --beam_pipeline_options without it is one line naming
the flag. (Runs without Beam installed: no importorskip.)"""

import ast
import pathlib
import sys

from absl import flags
import pytest

from noisy_student.pipeline import beam

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "noisy_student"


def _beam_imports(path):
    """(line, at module level?) of each import of apache_beam in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any(n == "apache_beam" or n.startswith("apache_beam.")
               for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_only_the_beam_module_imports_beam_and_only_inside_functions():
    importers = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = _beam_imports(path)
        if found:
            importers[str(path.relative_to(PACKAGE))] = found
    assert set(importers) == {"pipeline/beam.py"}, importers
    assert not any(top for _, top in importers["pipeline/beam.py"])


def test_the_flag_without_beam_is_one_line_naming_it(monkeypatch,
                                                     pipeline_flags):
    from noisy_student.cli import common  # pylint: disable=g-import-not-at-top
    # An import of apache_beam now fails, as on a machine without it.
    for name in [n for n in sys.modules if n.startswith("apache_beam")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    flags.FLAGS(["noisy-student", "--workdir=/tmp/unused",
                 "--beam_pipeline_options=runner=DirectRunner"])
    with pytest.raises(beam.BeamNotInstalledError) as error:
        common.beam_options()
    message = str(error.value)
    assert "\n" not in message
    assert "--beam_pipeline_options" in message
    assert "pip install 'noisy-student[beam]'" in message
    assert isinstance(error.value, common._user_errors())  # pylint: disable=protected-access
    # Empty: the in-process stages, no Beam needed.
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["noisy-student", "--workdir=/tmp/unused"])
    assert common.beam_options() == ""
    assert pipeline_flags is not None
