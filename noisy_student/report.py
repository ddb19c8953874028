"""The one report writer: JSON, Markdown and PNG, written atomically.

Every report of the package (the pipeline's `report.{json,md,png}`, ns-eval's
results.json and figures, the contact sheets) is written through these
functions, so that every JSON file is valid JSON (no NaN, no numpy types) and
every figure is drawn the same way: matplotlib's object API, a
`matplotlib.figure.Figure` on its own `FigureCanvasAgg`. No pyplot and no
global backend switch (`matplotlib.use`), so drawing is safe in any thread
and does not change the backend of a program that imports this package.
"""

import dataclasses
import io
import math
from collections.abc import Mapping

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student import io_utils


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
    io_utils.write_json(path, jsonable(value))


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
        io_utils.atomic_write(path, data)
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
                io_utils.join(logdir, name)):
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
    write_json(io_utils.join(folder, f"{name}.json"), value)
    io_utils.atomic_write(io_utils.join(folder, f"{name}.md"), markdown)
    if draw is not None:
        write_png(io_utils.join(folder, f"{name}.png"), draw)
