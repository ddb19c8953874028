"""Contact sheets: grids of images with captions, as PNG bytes.

Used where a person would rather look than read: the select stage's most
and least confident kept images of each class, and ns-eval's most confident
mistakes. Drawn through `noisy_student.utils.reports` (matplotlib's object API, no
pyplot state, safe in any thread), each image with nearest-neighbour pixels
so small images stay sharp.
"""

import numpy as np

from noisy_student.utils import reports


def contact_sheet_png(rows, title=None, dpi=100, labels=None):
    """A grid of captioned images, one labelled row per entry of `rows`.

    Args:
      rows: A list of (row_label str, [(image, caption str), ...]); images
        are uint8 [H, W, C] with C 1 or 3 (any sizes). Rows may have
        different lengths (empty cells stay blank).
      title: Optional title of the sheet.
      dpi: Resolution of the PNG.
      labels: The `report.ClassLabels` of class names in the title or
        captions (their font, and their note as the caption), or None.

    Returns:
      PNG bytes.

    Raises:
      ValueError: for no rows or no image at all.
    """
    if not rows or not any(cells for _, cells in rows):
        raise ValueError("Expected at least one image for a contact sheet. "
                         f"Received: {len(rows)} rows without images")
    font = labels.font if labels else {}
    num_cols = max(len(cells) for _, cells in rows)
    fig = reports.new_figure(1.3 * num_cols + 1.4,
                            1.45 * len(rows) + (0.4 if title else 0.0))
    axes = np.asarray(fig.subplots(len(rows), num_cols, squeeze=False))
    for r, (label, cells) in enumerate(rows):
        for c in range(num_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(cells):
                image, caption = cells[c]
                image = np.asarray(image)
                if image.ndim == 3 and image.shape[-1] == 1:
                    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255,
                              interpolation="nearest")
                else:
                    ax.imshow(image[..., :3], interpolation="nearest")
                ax.set_title(caption, fontsize=7, **font)
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right",
                              va="center")
    if title:
        fig.suptitle(title, fontsize=9, **font)
    reports.add_note(fig, labels.note if labels else "")
    return reports.figure_png(fig, dpi)
