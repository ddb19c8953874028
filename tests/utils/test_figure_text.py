"""Figures draw class names in a font that has their glyphs, or by number.

Issue 32, item 6: CJK class names were drawn as empty boxes in
confusion_matrix.png (matplotlib's default font, DejaVu Sans, has no CJK
glyph; matplotlib warned "Glyph ... missing from font(s)"). Every figure
that draws class names (ns-eval's confusion matrix and mistakes sheet, the
select stage's contact sheets and report.png) now uses an installed font
that has the glyphs, or, when none has, numbers the classes and says in
the figure which file names them. The tests pass with and without a CJK
font installed (`fc-list :lang=zh`).
"""

import logging
import os
import warnings

from matplotlib import font_manager
from matplotlib import ft2font
from matplotlib import text as text_lib
import numpy as np
import pytest
import tensorflow as tf

from noisy_student.utils import storage
from noisy_student.utils import reports
from noisy_student.pseudo_labels import selection
from noisy_student.evaluation import clean
from prediction_records import probs_for, write_predictions  # pylint: disable=g-bad-import-order

CJK = ["猫", "狗", "鸟"]


def _confusion_matrix(names, tmp_path):
    del tmp_path
    clean.confusion_matrix_png(np.diag([5, 4, 3]), names)
    return "results.json"


def _mistakes(names, tmp_path):
    del tmp_path
    images = np.zeros((3, 8, 8, 3), np.uint8)
    dataset = tf.data.Dataset.from_tensor_slices({"image": images})
    mistakes = [{"index": i, "label": i, "predicted": (i + 1) % 3,
                 "confidence": 0.9} for i in range(3)]
    clean.mistakes_png(dataset, mistakes, names)
    return "results.json"


def _selection(names, tmp_path):
    """The select stage's contact sheets (one per class) and report.png."""
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    pred_dir, out_dir = str(tmp_path / "pred"), str(tmp_path / "sel")
    write_predictions(pred_dir, probs_for(labels, rng.uniform(0.5, 1, 30),
                                           3))
    storage.write_json(os.path.join(pred_dir, "class_names.json"), names)
    selection.select(selection.SelectConfig(pred_dir, out_dir, min_confidence=0.3))
    return "report.json"


FIGURES = {"confusion_matrix": _confusion_matrix, "mistakes": _mistakes,
           "selection": _selection}


def _draw(figure, names, tmp_path, monkeypatch, caplog):
    """(figures drawn, glyph warnings, file naming the classes)."""
    drawn = []
    real = reports.figure_png

    def keeping(fig, *args, **kwargs):
        drawn.append(fig)
        return real(fig, *args, **kwargs)
    monkeypatch.setattr(reports, "figure_png", keeping)
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        where = FIGURES[figure](names, tmp_path)
    messages = [str(w.message) for w in caught] + [
        r.getMessage() for r in caplog.records]
    glyphs = [m for m in messages if "missing from font" in m
              or "not written" in m]  # (report.write_png's failures)
    return drawn, glyphs, where


def _undrawable(fig):
    """Texts of `fig` with a character none of their fonts has."""
    bad = []
    for artist in fig.findobj(text_lib.Text):
        chars = set(artist.get_text()) - set(" \n")
        for family in artist.get_fontfamily():
            properties = artist.get_fontproperties().copy()
            properties.set_family([family])
            path = font_manager.findfont(properties)
            if "LastResort" not in path:  # Its glyphs are boxes.
                chars -= set(map(chr, ft2font.FT2Font(path).get_charmap()))
        if chars:
            bad.append(artist.get_text())
    return bad


def _texts(figs):
    """Every text of the figures, in one line (wrapped lines joined)."""
    return " ".join(" ".join(t.get_text() for fig in figs
                             for t in fig.findobj(text_lib.Text)).split())


@pytest.mark.parametrize("figure", FIGURES)
def test_cjk_class_names_are_drawn_or_numbered_never_boxes(
        figure, tmp_path, monkeypatch, caplog):
    figs, glyph_warnings, where = _draw(figure, CJK, tmp_path, monkeypatch,
                                        caplog)
    assert figs and not glyph_warnings
    assert not [bad for fig in figs for bad in _undrawable(fig)]
    texts = _texts(figs)
    if reports.text_font(CJK) is None:  # No CJK font installed.
        assert not set("".join(CJK)) & set(texts)
        assert f"(listed in {where})" in texts
    else:
        assert all(name in texts for name in CJK)


@pytest.mark.parametrize("figure", FIGURES)
def test_without_a_font_for_the_names_classes_are_numbered_with_a_note(
        figure, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(reports, "_font_with", lambda chars: None)
    figs, glyph_warnings, where = _draw(figure, CJK, tmp_path, monkeypatch,
                                        caplog)
    assert figs and not glyph_warnings
    texts = _texts(figs)
    assert not set("".join(CJK)) & set(texts)
    assert (f"classes by number: no installed font draws their names "
            f"(listed in {where})") in texts
    if figure == "confusion_matrix":
        ticks = [t.get_text() for t in figs[0].axes[0].get_xticklabels()]
        assert ticks == ["0", "1", "2"]


@pytest.mark.parametrize("names", [["arc⌒", "b", "c"], ["arc⌒", "Ǆ", "c"]],
                         ids=["one_font", "glyph_fallback"])
def test_an_installed_font_with_the_glyphs_is_used(names, tmp_path,
                                                   monkeypatch, caplog):
    # "⌒" is in DejaVu Sans Mono (shipped with matplotlib), not in DejaVu
    # Sans, the default: names with it are drawn in a font that has it;
    # with "Ǆ" (DejaVu Sans has it, DejaVu Sans Mono not) they need both,
    # glyph by glyph.
    figs, glyph_warnings, _ = _draw("confusion_matrix", names, tmp_path,
                                    monkeypatch, caplog)
    assert not glyph_warnings and not _undrawable(figs[0])
    ticks = [t.get_text() for t in figs[0].axes[0].get_xticklabels()]
    assert ticks == names
    # Names the default font draws keep it (no lookup, no change).
    assert reports.text_font(["circle", "Ünïcödé"]) == {}
