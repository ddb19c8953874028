"""The evidence study: Noisy Student vs its teacher on Fashion-MNIST, 1,000 labels.

Runs the project's own command (`noisy-student`) for each run of the study,
then rewrites the results table of BENCHMARKS.md and README.md (between the
`ssl_study` markers) from the runs' report.json files. Each run has its
flagfile, flags/fashion_mnist_1000/<run>.cfg (main:
flags/fashion_mnist_1000.cfg; digits: flags/digits.cfg):

  main               teacher on 1,000 labels, then Noisy Student iterations
                     1, 2 and 3;
  no_noise           iteration 1 without RandAugment, dropout or stochastic
                     depth (the base pad-crop and flip stay, as in the
                     official code's augment_name=None);
  hard_labels        iteration 1 with one-hot pseudo-labels;
  no_filter          iteration 1 keeping every pseudo-label once (no
                     confidence threshold, no per-class balancing);
  init_from_teacher  iteration 1 started from the teacher's weights;
  supervised         the teacher's model and recipe on all 60,000 labels,
                     trained on as many images as one student sees;
  digits             the README's demo, flags/digits.cfg.

Ablations reuse the main run's teacher and iteration-1 pseudo-labels: their
work directory starts as a copy of main's round 0 and round 1 predict/select
stages, and the pipeline (`--overwrite`) redoes only what their flags change.
A killed study resumes: rerun the same command (finished stages are skipped).

  python bench/ssl_study.py --workdir=/tmp/ns-study          # everything
  python bench/ssl_study.py --workdir=/tmp/ns-study --runs=main,supervised
  python bench/ssl_study.py --workdir=/tmp/ns-study --report_only

Needs Debian's dataset-fashion-mnist. Last line:
RESULT ssl_study gap_closed_2=<x> no_noise_gain_fraction=<y>
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = ("no_noise", "hard_labels", "no_filter", "init_from_teacher")
RUNS = ("main",) + ABLATIONS + ("supervised", "digits")
FLAGFILES = {"main": "flags/fashion_mnist_1000.cfg",
             "digits": "flags/digits.cfg"}
# Stages an ablation takes from the main run.
SHARED_STAGES = ("round0/train", "round0/eval", "round1/predict",
                 "round1/select")


def command(run):
    """The noisy-student arguments of one run."""
    flagfile = FLAGFILES.get(run, f"flags/fashion_mnist_1000/{run}.cfg")
    # Ablations redo the stages their flags change in a copy of main's.
    return [f"--flagfile={flagfile}"] + (
        ["--overwrite"] if run in ABLATIONS else [])


def seed_from_main(workdir, run):
    """Starts an ablation's work directory from main's shared stages."""
    main, target = os.path.join(workdir, "main"), os.path.join(workdir, run)
    if os.path.exists(os.path.join(target, "manifest.json")):
        return  # Started earlier: the pipeline continues it.
    with open(os.path.join(main, "manifest.json")) as f:
        stages = json.load(f)["stages"]
    missing = [s for s in SHARED_STAGES if "finished_at" not in
               stages.get(s, {})]
    if missing:
        raise SystemExit(f"Expected main's stages {missing} to be finished "
                         f"before ablation {run!r}; run --runs=main first.")
    os.makedirs(target, exist_ok=True)
    for stage in SHARED_STAGES:
        shutil.copytree(os.path.join(main, stage),
                        os.path.join(target, stage), dirs_exist_ok=True)
    with open(os.path.join(target, "manifest.json"), "w") as f:
        json.dump({"stages": {s: stages[s] for s in SHARED_STAGES}}, f)


def run_one(workdir, run):
    folder = os.path.join(workdir, run)
    if run in ABLATIONS:
        seed_from_main(workdir, run)
    argv = ["noisy-student", f"--workdir={folder}"] + command(run)
    print(f"[ssl_study] {run}: {' '.join(argv)}", flush=True)
    os.makedirs(folder, exist_ok=True)
    started = time.time()
    with open(os.path.join(folder, "study.log"), "a") as log:
        subprocess.run(argv, cwd=REPO, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    print(f"[ssl_study] {run}: done in {time.time() - started:.0f} s",
          flush=True)


def load(workdir, run):
    """(report rounds, manifest stages) of a run, or None if unfinished."""
    folder = os.path.join(workdir, run)
    try:
        with open(os.path.join(folder, "report.json")) as f:
            rounds = json.load(f)["rounds"]
        with open(os.path.join(folder, "manifest.json")) as f:
            stages = json.load(f)["stages"]
    except FileNotFoundError:
        return None
    return rounds, stages


def train_minutes(stages, index):
    """Minutes round `index`'s training took (as the pipeline recorded)."""
    return stages.get(f"round{index}/train", {}).get("seconds", 0) / 60


def rows(workdir):
    """{key: (name, test top-1, training minutes)} of the finished runs."""
    out = {}
    for run, prefix, labels in (("main", "", "1,000"),
                                ("digits", "digits ", "100")):
        result = load(workdir, run)
        for r in result[0] if result else []:
            i = r["round"]
            name = (f"{prefix}teacher ({labels} labels)" if i == 0
                    else f"{prefix}Noisy Student iteration {i}")
            out[f"{run}{i}"] = (name, r["test_top1"],
                                train_minutes(result[1], i))
    for run in ABLATIONS:
        result = load(workdir, run)
        if result and len(result[0]) > 1:
            out[run] = (f"iteration 1, {run.replace('_', ' ')}",
                        result[0][1]["test_top1"],
                        train_minutes(result[1], 1))
    result = load(workdir, "supervised")
    if result:
        out["supervised"] = ("fully supervised (60,000 labels)",
                             result[0][0]["test_top1"],
                             train_minutes(result[1], 0))
    return out


def total_minutes(workdir):
    """Minutes of every stage of every run (shared stages counted once)."""
    seconds = 0
    for run in RUNS:
        result = load(workdir, run)
        for name, stage in (result[1] if result else {}).items():
            if run in ABLATIONS and name in SHARED_STAGES:
                continue
            seconds += stage.get("seconds", 0)
    return seconds / 60


def gap_closed(out, iteration):
    """(student - teacher) / (fully supervised - teacher); None if missing."""
    teacher, full, student = (out.get(key, (0, None))[1] for key in
                              ("main0", "supervised", f"main{iteration}"))
    if None in (teacher, full, student) or full == teacher:
        return None
    return (student - teacher) / (full - teacher)


def summary(out):
    """(gap closed at iteration 2, fraction of the iteration-1 gain the
    no-noise ablation keeps); None where runs are missing."""
    teacher = out.get("main0", (0, None))[1]
    student1 = out.get("main1", (0, None))[1]
    no_noise = out.get("no_noise", (0, None))[1]
    gain = None
    if None not in (teacher, student1, no_noise) and student1 != teacher:
        gain = (no_noise - teacher) / (student1 - teacher)
    return gap_closed(out, 2), gain


def table(out, teacher):
    lines = ["| run | test top-1 | vs teacher | train minutes |",
             "|---|---|---|---|"]
    for key, (name, top1, mins) in out.items():
        if key.startswith("digits"):
            continue
        delta = "" if teacher is None else f"{top1 - teacher:+.4f}"
        lines.append(f"| {name} | {top1:.4f} | {delta} | {mins:.1f} |")
    digits = [v for k, v in out.items() if k.startswith("digits")]
    if digits:
        lines += ["", "| digits demo | test top-1 | train minutes |",
                  "|---|---|---|"]
        lines += [f"| {n} | {t:.4f} | {m:.1f} |" for n, t, m in digits]
    return lines


def replace_block(path, text):
    """Rewrites what lies between the ssl_study markers of `path`."""
    with open(path) as f:
        content = f.read()
    pattern = re.compile(r"(<!-- ssl_study:begin -->\n).*?(<!-- ssl_study:end -->)",
                         re.S)
    if not pattern.search(content):
        raise SystemExit(f"Expected ssl_study markers in {path}.")
    content = pattern.sub(lambda m: m.group(1) + text + m.group(2), content)
    with open(path, "w") as f:
        f.write(content)


def report_text(workdir):
    """(the results block, gap closed at iteration 2, no-noise fraction)."""
    out = rows(workdir)
    gap, gain = summary(out)
    teacher = out.get("main0", (0, None))[1]
    lines = table(out, teacher)
    lines.append("")
    iterations = sorted(int(k[4:]) for k in out if k.startswith("main"))
    for i in [i for i in iterations if i > 0] or [2]:
        # Every iteration's gap closed; the target is at iteration 2.
        closed = gap_closed(out, i)
        lines.append(f"gap closed (iteration {i}): " +
                     ("n/a" if closed is None else f"{closed:.2f}"))
    lines.append("no-noise ablation keeps of the iteration-1 gain: " +
                 ("n/a" if gain is None else f"{gain:.2f}"))
    lines.append(f"all stages of all runs: {total_minutes(workdir):.0f} "
                 "minutes")
    return "\n".join(lines) + "\n", gap, gain


def report(workdir):
    """Prints the results block and writes it into BENCHMARKS and README."""
    text, gap, gain = report_text(workdir)
    print(text)
    for name in ("BENCHMARKS.md", "README.md"):
        replace_block(os.path.join(REPO, name), text)
    return gap, gain


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--runs", default=",".join(RUNS),
                        help=f"Comma-separated subset of {','.join(RUNS)}.")
    parser.add_argument("--report_only", action="store_true",
                        help="Only rewrite the tables from finished runs.")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"Expected runs in {RUNS}. Received: {unknown}")
    if not args.report_only:
        for run in runs:
            run_one(os.path.abspath(args.workdir), run)
    gap, gain = report(os.path.abspath(args.workdir))
    fmt = lambda x: "nan" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"RESULT ssl_study gap_closed_2={fmt(gap)} "
          f"no_noise_gain_fraction={fmt(gain)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
