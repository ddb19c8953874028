"""The pipeline's report: one line per iteration, as JSON, Markdown, PNG.

`noisy-student` rewrites `workdir/report.{json,md,png}` after each
iteration's evaluation: the teacher's and each student's test top-1 and
top-5, its training steps and seconds, and the pseudo-labels it was
trained on.
"""

import time

from noisy_student.model import info
from noisy_student.pipeline import layout
from noisy_student.utils import reports


def iteration_entry(r, role, name, metrics, results, manifest, selection):
    """Iteration r's line of the report (its eval, train and select).

    Args:
      r: The iteration (0: the teacher).
      role: "teacher" or "student".
      name: The model's name (b0, wW-dD ...).
      metrics: The train stage's summary (`training.loop.train_and_evaluate`).
      results: The eval stage's results (`evaluate.run_evaluation`).
      manifest: The workdir's `manifest.Manifest` (train seconds).
      selection: The select stage's totals, or None for the teacher.

    Returns:
      A JSON-able dict: test top-1/top-5/ECE, train steps and seconds, best
      eval top-1 and the pseudo-labels' counts.
    """
    clean = results.get("clean", {})
    entry = {
        "iteration": r, "role": role, "model": name,
        "test_top1": clean.get("top1"), "test_top5": clean.get("top5"),
        "test_ece": clean.get("ece"),
        "train_steps": metrics.get("step"),
        "train_seconds": manifest.stages[
            layout.stage_name(r, "train")].get("seconds"),
        "best_eval_top1": metrics.get("best_eval_top1"),
    }
    if selection is not None:
        entry["pseudo_labels"] = selection
    return entry


def _class_names(workdir):
    """The class names the teacher's run recorded (None if it has none)."""
    return info.read_class_names(
        layout.stage_folder(workdir, 0, "train"))


def write_report(workdir, iterations, class_names=None):
    """Writes report.json, report.md and report.png; returns the report.

    Args:
      workdir: The run's folder, local or gs://.
      iterations: One entry per evaluated iteration (see
        `iteration_entry`).
      class_names: Class names in label order; None: those the teacher's
        run recorded, if any.
    """
    class_names = class_names or _class_names(workdir)
    report = {"iterations": iterations, "updated_at": time.strftime(
        "%Y-%m-%d %H:%M:%S")}
    if class_names:
        report["class_names"] = list(class_names)
        info.write_class_names(workdir, class_names)
    reports.write_report(workdir, "report", report, markdown_table(report),
                            lambda: _plot(iterations))
    return report


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(report):
    """The report as a Markdown table."""
    lines = ["# Noisy Student report", ""]
    names = report.get("class_names") or []
    if names:
        shown = ", ".join(f"{i} {name}" for i, name in enumerate(names[:50]))
        more = f" ... ({len(names)} classes)" if len(names) > 50 else ""
        lines += [f"classes: {shown}{more}", ""]
    lines += ["| iteration | role | model | test top-1 | test top-5 | "
              "pseudo-labels (unique / total) | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["iterations"]:
        pl = r.get("pseudo_labels") or {}
        pseudo = f"{pl.get('unique', '-')} / {pl.get('total', '-')}" if pl \
            else "-"
        lines.append(
            f"| {r['iteration']} | {r['role']} | {r['model']} | "
            f"{_fmt(r['test_top1'])} | {_fmt(r['test_top5'])} | {pseudo} | "
            f"{_fmt(r['train_seconds'], 0)} |")
    return "\n".join(lines) + "\n"


def print_table(report):
    """Prints the report's table to the terminal."""
    print(markdown_table(report), flush=True)


def _plot(iterations):
    """Test top-1 and pseudo-label counts per iteration, as PNG bytes."""
    fig = reports.new_figure(9, 3.5)
    ax1, ax2 = fig.subplots(1, 2)
    xs = [r["iteration"] for r in iterations]
    ax1.plot(xs, [r["test_top1"] or 0 for r in iterations], "o-")
    ax1.set_xlabel("iteration (0 = teacher)")
    ax1.set_ylabel("test top-1")
    ax1.set_xticks(xs)
    counts = [(r["iteration"], r["pseudo_labels"]) for r in iterations
              if r.get("pseudo_labels")]
    if counts:
        ax2.bar([c[0] - 0.2 for c in counts],
                [c[1].get("unique", 0) for c in counts], 0.4, label="unique")
        ax2.bar([c[0] + 0.2 for c in counts],
                [c[1].get("total", 0) for c in counts], 0.4, label="total")
        ax2.legend()
    ax2.set_xticks(xs)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("pseudo-labeled images")
    return reports.figure_png(fig, dpi=90)
