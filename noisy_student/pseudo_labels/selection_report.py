"""The report of a selection: report.{json,md,png} and contact sheets.

`select.select` counts what it keeps; this module turns the counts into the
report (every count per class, with the class names when known), logs the
classes the student gets no pseudo-label of, and draws the per-class counts
and the confidence histogram (report.png) and, for each of the first
MAX_CONTACT_SHEETS classes, its most and least confident kept images
(contact_sheets/class-<id>.png): pseudo-label quality at a glance.
"""

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.pseudo_labels import records
from noisy_student.utils import contact_sheet
from noisy_student.utils import reports
from noisy_student.utils import storage

# Images per side (most / least confident) of a class's contact sheet, and
# the number of classes that get one (the first ones by id): a look at
# pseudo-label quality, not a catalogue.
CONTACT_SHEET_IMAGES = 8
MAX_CONTACT_SHEETS = 100
CONTACT_SHEET_DIR = "contact_sheets"


class Extremes:
    """The most and least confident kept images of each class, streamed.

    Keeps at most `n` (confidence, index, PNG) per class and side, so
    memory does not grow with the selection.
    """

    def __init__(self, n, max_classes):
        self.n = n
        self.max_classes = max_classes
        self.most = {}
        self.least = {}

    def add(self, labels, confidences, indices, pngs):
        """Offers a batch of kept images to the sheets.

        Args:
          labels: int [B] classes.
          confidences: float [B] confidences.
          indices: int [B] source indices.
          pngs: [B] encoded images.
        """
        for c in np.unique(labels):
            if c >= self.max_classes:
                continue
            rows = np.nonzero(labels == c)[0]
            conf = confidences[rows].astype(np.float64)
            # Each side's own order, ties by index: the images kept do not
            # depend on how the stream was cut into batches or ranges.
            most = rows[np.lexsort((indices[rows], -conf))][:self.n]
            least = rows[np.lexsort((indices[rows], conf))][:self.n]
            for side, picked in ((self.most, most), (self.least, least)):
                self._keep(side, int(c), [
                    (float(confidences[i]), int(indices[i]), pngs[i])
                    for i in picked])

    def merge(self, other):
        """Adds the images another `Extremes` (of other records) kept.

        Args:
          other: An `Extremes` with the same n and max_classes.
        """
        for side, more in ((self.most, other.most), (self.least, other.least)):
            for c, entries in more.items():
                self._keep(side, c, entries)

    def _keep(self, side, c, entries):
        key = ((lambda t: (-t[0], t[1])) if side is self.most
               else (lambda t: (t[0], t[1])))
        side[c] = sorted(side.get(c, []) + list(entries), key=key)[:self.n]


def _decode(data):
    return records.decode(data).numpy()


def write_contact_sheets(out_dir, extremes, class_names):
    """One PNG per class: its most (top row) and least confident kept images.

    Args:
      out_dir: The selection folder; sheets go to out_dir/contact_sheets/
        class-<id>.png.
      extremes: An `Extremes` filled while selecting.
      class_names: Names in label order, or None (ids are shown; also when
        no installed font draws the names, with a note).

    Returns:
      The written paths, relative to out_dir.
    """
    folder = storage.join(out_dir, CONTACT_SHEET_DIR)
    tf.io.gfile.makedirs(folder)
    written = []
    name = reports.class_labels(class_names, "report.json")
    for c in sorted(extremes.most):
        rows = [("most\nconfident", [
            (_decode(image), f"{conf:.3f}")
            for conf, _, image in extremes.most[c]]),
                ("least\nconfident", [
            (_decode(image), f"{conf:.3f}")
            for conf, _, image in extremes.least[c]])]
        title = (f"class {c}: {name(c)}" if name.names else f"class {c}")
        data = contact_sheet.contact_sheet_png(
            rows, title=f"{title} (kept pseudo-labels, teacher confidence)",
            labels=name)
        relative = f"{CONTACT_SHEET_DIR}/class-{c:04d}.png"
        storage.atomic_write(storage.join(out_dir, relative), data)
        written.append(relative)
    return written


def selection_report(config, plan, kept, info, num_files, class_names):
    """The report dict: settings, per-class counts, names, contact sheets.

    Args:
      config: The stage's `select.SelectConfig`.
      plan: The per-class selection plan (min bin, counts, duplication).
      kept: What the selection wrote (counts, extremes for the sheets).
      info: The prediction folder's predict_info.json contents.
      num_files: Output record files written.
      class_names: Class names, or None.

    Returns:
      A JSON-ready dict (contact sheets written into config.out_dir).
    """
    settings = {"pred_dir": config.pred_dir, "per_class": config.per_class,
                "min_confidence": config.min_confidence,
                "effective_min_confidence": plan.min_bin / plan.num_bins,
                "label_type": config.label_type,
                "temperature": config.temperature, "seed": config.seed,
                "duplicate": config.duplicate, "num_files": num_files,
                "num_bins": plan.num_bins}
    report = _make_report(settings, plan, kept.unique, kept.total,
                          kept.min_confidence, info, kept.file_counts)
    if class_names is not None:
        report["class_names"] = list(class_names)
        for row in report["per_class"]:
            row["name"] = class_names[row["class"]]
    _warn_empty_classes(report, class_names)
    extremes = kept.extremes
    for row in report["per_class"]:
        # The source indices of the images on the contact sheet.
        for side, entries in (("most", extremes.most),
                              ("least", extremes.least)):
            if row["class"] in entries:
                row[f"{side}_confident_indices"] = [
                    index for _, index, _ in entries[row["class"]]]
    try:
        report["contact_sheets"] = write_contact_sheets(
            config.out_dir, extremes, class_names)
    except Exception as e:  # pylint: disable=broad-except
        # Pictures are not worth failing a selection for.
        logging.warning("select: contact sheets not written: %s", e)
    return report


def write(out_dir, report, histogram, plan):
    """Writes report.json, report.md and report.png in out_dir, atomically.

    A failed PNG is logged, not raised (see `report.write_png`).

    Args:
      out_dir: The selection folder.
      report: `selection_report`'s dict.
      histogram: int [K, num_bins] confidence counts.
      plan: The selection plan (for the threshold drawn on the plot).
    """
    reports.write_report(out_dir, "report", report,
                            _report_markdown(report),
                            lambda: _report_png(report, histogram, plan))


def _class_list(ids, class_names, limit=20):
    """'3 (cat), 7 (dog) ...': ids with their names when known."""
    shown = [f"{c} ({class_names[c]})" if class_names else str(c)
             for c in ids[:limit]]
    return ", ".join(shown) + (" ..." if len(ids) > limit else "")


def _warn_empty_classes(report, class_names):
    """Logs the classes the student will get no pseudo-label of."""
    never = report["classes_never_predicted"]
    low = [c for c in report["classes_without_confident_images"]
           if c not in never]
    if never:
        logging.warning("select: the teacher predicts no image as %d "
                        "classes: %s", len(never),
                        _class_list(never, class_names))
    if low:
        logging.warning("select: %d classes have no image with confidence "
                        ">= %s: %s", len(low),
                        report["config"]["min_confidence"],
                        _class_list(low, class_names))


def _make_report(config, plan, kept_unique, kept_total, min_kept, info,
                 file_counts):
    """Every count of a selection, as a JSON-able dict."""
    classes = []
    for c in range(len(plan.predicted)):
        kept = int(kept_unique[c])
        classes.append({
            "class": c,
            "predicted": int(plan.predicted[c]),
            "confident": int(plan.confident[c]),
            "kept_unique": kept,
            "kept_total": int(kept_total[c]),
            "expected_total": float(plan.expected_total[c]),
            "duplication_factor": float(plan.duplication[c]) if kept else None,
            "threshold": float(plan.threshold[c]) if kept else None,
            "min_kept_confidence": float(min_kept[c]) if kept else None,
            "boundary_bin": int(plan.boundary_bin[c]),
            "boundary_take": int(plan.boundary_take[c]),
        })
    without = [c for c in range(len(plan.predicted)) if plan.confident[c] == 0]
    never = [c for c in without if plan.predicted[c] == 0]
    return {
        "config": config,
        "totals": {
            "images_predicted": int(info["num_images"]),
            "confident": int(plan.confident.sum()),
            "dropped_below_min_confidence": int(
                info["num_images"] - plan.confident.sum()),
            "unique": int(kept_unique.sum()),
            "total": int(kept_total.sum()),
            "expected_total": float(plan.expected_total.sum()),
            "files": int(len(file_counts)),
            "records_per_file_min": int(file_counts.min()),
            "records_per_file_max": int(file_counts.max()),
        },
        "classes_without_confident_images": without,
        "classes_never_predicted": never,
        "per_class": classes,
    }


def _report_markdown(report):
    totals, config = report["totals"], report["config"]
    lines = [
        "# Pseudo-label selection",
        "",
        f"- predictions: `{config['pred_dir']}`",
        f"- per_class K = {config['per_class']}, min_confidence = "
        f"{config['min_confidence']} (effective "
        f"{config['effective_min_confidence']}), label_type = "
        f"{config['label_type']}, temperature = {config['temperature']}, "
        f"seed = {config['seed']}, duplicate = {config['duplicate']}",
        f"- images predicted: {totals['images_predicted']}; confident: "
        f"{totals['confident']}; dropped below min_confidence: "
        f"{totals['dropped_below_min_confidence']}",
        f"- kept: **{totals['unique']} unique, {totals['total']} total** "
        f"(with copies; expected {totals['expected_total']:.1f}) in "
        f"{totals['files']} files",
    ]
    without = report["classes_without_confident_images"]
    if without:
        names = report.get("class_names")
        lines.append(f"- **{len(without)} classes have no confident image** "
                     f"({len(report.get('classes_never_predicted', []))} of "
                     "them never predicted): "
                     f"{_class_list(without, names, 50)}")
    lines += ["", "| class | predicted | confident | threshold | kept unique "
              "| kept total | duplication |", "|---:|---:|---:|---:|---:|---:|"
              "---:|"]
    rows = report["per_class"]
    if len(rows) > 60:
        # Keep the table readable: the 30 smallest and largest classes.
        rows = sorted(rows, key=lambda r: r["confident"])
        rows = rows[:30] + rows[-30:]
    for row in rows:
        label = row["class"]
        if "name" in row:
            label = f"{label} {row['name']}"
        threshold = ("-" if row["threshold"] is None
                     else f"{row['threshold']:.3f}")
        duplication = ("-" if row["duplication_factor"] is None
                       else f"{row['duplication_factor']:.2f}")
        lines.append(
            f"| {label} | {row['predicted']} | {row['confident']} | "
            f"{threshold} | {row['kept_unique']} | {row['kept_total']} | "
            f"{duplication} |")
    return "\n".join(lines) + "\n"


def _report_png(report, histogram, plan):
    """Per-class counts before/after and the confidence histogram (PNG)."""
    fig = reports.new_figure(10, 7)
    top, bottom = fig.subplots(2, 1)
    rows = report["per_class"]
    classes = np.arange(len(rows))
    top.bar(classes - 0.2, [r["confident"] for r in rows], width=0.4,
            label="before (confident)")
    top.bar(classes + 0.2, [r["kept_total"] for r in rows], width=0.4,
            label="after (with copies)")
    top.plot(classes, [r["kept_unique"] for r in rows], "k.",
             label="after (unique)")
    top.set_xlabel("class")
    if report.get("class_names") and len(rows) <= 40:
        name = reports.class_labels(report["class_names"], "report.json")
        top.set_xticks(classes, [name(c) for c in classes], rotation=90,
                       fontsize=7, **name.font)
        reports.add_note(fig, name.note)
    top.set_ylabel("images")
    top.set_title(f"per-class counts (K={report['config']['per_class']})")
    top.legend(fontsize=8)
    coarse = 100 if plan.num_bins % 100 == 0 else plan.num_bins
    counts = histogram.sum(axis=0).reshape(coarse, -1).sum(axis=1)
    edges = np.linspace(0.0, 1.0, coarse + 1)
    bottom.stairs(counts, edges, fill=True, alpha=0.6, label="all images")
    bottom.axvline(report["config"]["effective_min_confidence"], color="r",
                   linestyle="--", label="min_confidence")
    bottom.set_xlabel("teacher confidence (top probability)")
    bottom.set_ylabel("images")
    if counts.max() > 0:
        bottom.set_yscale("log")
        bottom.set_ylim(bottom=0.5)
    bottom.legend(fontsize=8)
    return reports.figure_png(fig, dpi=80)
