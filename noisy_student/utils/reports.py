"""The one report writer: JSON, Markdown and PNG, written atomically.

Every report of the package (the pipeline's `report.{json,md,png}`, ns-eval's
results.json and figures, the contact sheets) is written through these
functions, so that every JSON file is valid JSON (no NaN, no numpy types) and
every figure is drawn the same way: matplotlib's object API, a
`matplotlib.figure.Figure` on its own `FigureCanvasAgg`. No pyplot and no
global backend switch (`matplotlib.use`), so drawing is safe in any thread
and does not change the backend of a program that imports this package.

Class names are drawn through `class_labels`: in a font that has their
glyphs (matplotlib's default, DejaVu Sans, has none for CJK scripts and
would draw boxes), or, when no installed font has them, as class numbers
with a note saying which file names the classes.
"""

from collections.abc import Mapping
import dataclasses
import functools
import io
import math
import textwrap

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.utils import storage


def jsonable(value):
    """`value` as plain JSON types, so `json.dumps` writes valid JSON.

    Dataclasses become dicts, mappings dicts with str keys, tuples and numpy
    arrays lists, numpy scalars Python numbers, and NaN / infinite floats
    None (JSON has no NaN).

    Args:
      value: Any nesting of the types above and JSON types.

    Returns:
      The same data in dict / list / str / int / float / bool / None.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    return value


def new_figure(width, height):
    """A matplotlib Figure with its own Agg canvas (no pyplot state).

    Args:
      width: Width in inches.
      height: Height in inches.

    Returns:
      A `matplotlib.figure.Figure`, ready for `fig.subplots()` and
      `figure_png`.
    """
    # Imported here: matplotlib takes ~0.3 s to import and most commands
    # never draw.
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
    fig = figure.Figure(figsize=(width, height))
    backend_agg.FigureCanvasAgg(fig)
    return fig


# Wide-coverage fonts (CJK above all) tried first, by family name, for text
# the default font cannot draw; any other installed font is tried after.
# matplotlib finds fonts installed after its font cache was built only once
# that cache (~/.cache/matplotlib/fontlist-*.json) is removed.
WIDE_FONTS = (
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC",
    "Noto Sans CJK KR", "Source Han Sans", "Source Han Sans SC",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback",
    "AR PL UMing CN", "IPAGothic", "Noto Sans", "Arial Unicode MS",
    "Microsoft YaHei", "SimHei", "MS Gothic", "Malgun Gothic",
    "PingFang SC", "Hiragino Sans", "Apple SD Gothic Neo", "Unifont")
# matplotlib's stand-in of last resort: its "glyphs" are boxes.
_STAND_IN = "Last Resort"
_ASCII = frozenset(map(chr, range(0x20, 0x7f)))


def text_font(texts):
    """Text keyword arguments that draw every character of `texts`, or None.

    Args:
      texts: Strings to draw (class names).

    Returns:
      {} if matplotlib's default font has every glyph. Else the first
      installed font with the glyphs it lacks: {"fontfamily": [name],
      "fontweight": w} if that font has them all and ASCII (drawn at its
      weight nearest regular: matplotlib warns of a weight it lacks), or
      {"fontfamily": [*default, name]} (matplotlib >= 3.6 falls back glyph
      by glyph). None if no installed font has them.
    """
    from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
    chars = frozenset("".join(texts)) - frozenset(" \n\t")
    missing = chars - _glyphs(font_manager.findfont(
        font_manager.FontProperties()))
    if not missing:
        return {}
    found = _font_with(missing)
    if found is None:
        return None
    name, weight, path = found
    # The whole text in that font if it has ASCII too (the rest of a title
    # or caption), at its own weight.
    if chars | _ASCII <= _glyphs(path):
        return {"fontfamily": [name], "fontweight": weight}
    default = list(font_manager.FontProperties().get_family())
    return {"fontfamily": default + [name]}


@functools.lru_cache(maxsize=None)
def _font_with(chars):
    """(family name, weight, path) of the first installed font with glyphs
    of every one of `chars` (a frozenset), WIDE_FONTS first, or None."""
    from matplotlib import font_manager  # pylint: disable=g-import-not-at-top

    # Each family's upright face nearest the regular weight (CJK fonts
    # often have 500 only).
    weights = {}
    for face in font_manager.fontManager.ttflist:
        if face.style == "normal" and not face.name.startswith(_STAND_IN):
            weight = font_manager.weight_dict.get(face.weight, face.weight)
            weights[face.name] = min(weights.get(face.name, weight), weight,
                                     key=lambda w: abs(w - 400))
    order = [n for n in WIDE_FONTS if n in weights] + sorted(
        n for n in weights if n not in WIDE_FONTS)
    for name in order:
        path = font_manager.findfont(font_manager.FontProperties(
            family=[name], weight=weights[name]), fallback_to_default=False)
        if chars <= _glyphs(path):
            return name, weights[name], path
    return None


@functools.lru_cache(maxsize=None)
def _glyphs(path):
    """The characters the font at `path` (findfont's) has glyphs for."""
    from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
    return frozenset(map(chr, font_manager.get_font(path).get_charmap()))


@dataclasses.dataclass(frozen=True)
class ClassLabels:
    """How a figure labels classes; call it with a class id for its label.

    Attributes:
      names: The class names, or None: the classes are drawn by number
        (no names given, or no installed font draws them).
      font: Keyword arguments of the texts that draw a label (see
        `text_font`).
      note: "" or a line for the figure's caption (`add_note`) saying the
        classes are drawn by number and which file names them.
    """
    names: tuple | None = None
    font: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    def __call__(self, class_id):
        return self.names[class_id] if self.names else str(class_id)


def class_labels(class_names, where):
    """The `ClassLabels` of a figure: names if a font draws them, else ids.

    Args:
      class_names: Names in label order, or None (ids are drawn).
      where: The file that lists the names, for the note (results.json).

    Returns:
      A `ClassLabels`: the names with a font that has their glyphs, or
      (none installed) the ids with a note, never boxes.
    """
    if not class_names:
        return ClassLabels()
    font = text_font(class_names)
    if font is None:
        return ClassLabels(note=(
            "classes by number: no installed font draws their names "
            f"(listed in {where})"))
    return ClassLabels(tuple(class_names), font)


def add_note(fig, note):
    """Writes `note` as the figure's caption, at the bottom, in small type.

    Args:
      fig: A figure from `new_figure`.
      note: One line, wrapped here (e.g. a `ClassLabels.note`); "" adds
        nothing.
    """
    if note:
        fig.supxlabel(textwrap.fill(note, 64), fontsize=8)


def figure_png(fig, dpi=100):
    """The figure as PNG bytes (after `tight_layout`).

    Args:
      fig: A figure from `new_figure`.
      dpi: Resolution in dots per inch.

    Returns:
      PNG bytes.
    """
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_json(path, value):
    """Writes `jsonable(value)` as indented, key-sorted JSON, atomically.

    Args:
      path: Destination file, local or gs://.
      value: Data for `jsonable`.
    """
    storage.write_json(path, jsonable(value))


def write_png(path, draw, what=None):
    """Writes the PNG that `draw()` returns; a failure is only logged.

    A picture is not worth failing a run for: any exception of `draw` or of
    the write is logged as a warning naming the file, and nothing is written.

    Args:
      path: Destination .png, local or gs://.
      draw: A function of no arguments returning PNG bytes, or None for
        "nothing to draw".
      what: Name for the warning (default: the file name).

    Returns:
      True if the file was written.
    """
    try:
        data = draw()
        if data is None:
            return False
        storage.atomic_write(path, data)
        return True
    except Exception as error:  # pylint: disable=broad-except
        logging.warning("%s not written: %s", what or path.rsplit("/", 1)[-1],
                        error)
        return False


def read_tensorboard_scalars(logdir, tag):
    """The values of one scalar that a run wrote to TensorBoard.

    Training writes its scalars (loss, learning rate, images/s ...) with
    `tf.summary.scalar` into event files; this reads them back, e.g. for a
    benchmark or a test.

    Args:
      logdir: A TensorBoard log folder (e.g. model_dir/logs/train), local
        or gs://; every file in it is read as an event file.
      tag: The scalar's name.

    Returns:
      {step (int): value (float)}; a later event of a step replaces an
      earlier one.
    """
    values = {}
    for name in sorted(tf.io.gfile.listdir(logdir)):
        for event in tf.compat.v1.train.summary_iterator(
                storage.join(logdir, name)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def write_report(folder, name, value, markdown, draw=None):
    """Writes `name`.json, `name`.md and (if `draw`) `name`.png in `folder`.

    Args:
      folder: Destination folder, local or gs://.
      name: File stem, e.g. "report".
      value: The report's data (written through `jsonable`).
      markdown: The Markdown text.
      draw: Optional function of no arguments returning PNG bytes; its
        failure is logged, not raised (see `write_png`).
    """
    write_json(storage.join(folder, f"{name}.json"), value)
    storage.atomic_write(storage.join(folder, f"{name}.md"), markdown)
    if draw is not None:
        write_png(storage.join(folder, f"{name}.png"), draw)
