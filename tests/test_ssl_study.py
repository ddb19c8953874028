"""bench/ssl_study.py: its commands, its ablation set-up and its arithmetic.

The study itself takes about two hours; these tests check, on fake work
directories, what turns its runs into the published numbers: which flagfile
each run uses, that an ablation starts from exactly the main run's shared
stages, the table rows and the "gap closed" formula.
"""

import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location(
        "ssl_study", REPO / "bench" / "ssl_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_study()


def fake_run(workdir, run, top1s, seconds=60.0, stages=None):
    """A finished run: report.json iterations with `top1s`, and its manifest."""
    folder = workdir / run
    folder.mkdir(parents=True)
    iterations = [{"iteration": i, "test_top1": t}
                  for i, t in enumerate(top1s)]
    (folder / "report.json").write_text(json.dumps({"iterations": iterations}))
    names = stages or [f"iteration{i}/{s}" for i in range(len(top1s))
                       for s in ("train", "eval")]
    manifest = {n: {"fingerprint": n, "finished_at": 1.0, "seconds": seconds}
                for n in names}
    (folder / "manifest.json").write_text(json.dumps({"stages": manifest}))


def test_every_run_has_a_flagfile():
    for run in study.RUNS:
        flagfile = study.command(run)[0].split("=", 1)[1]
        assert (REPO / flagfile).is_file(), (run, flagfile)
    assert "--overwrite" in study.command("no_noise")
    assert "--overwrite" not in study.command("main")


def test_gap_closed_and_no_noise_fraction(tmp_path):
    fake_run(tmp_path, "main", [0.80, 0.84, 0.86, 0.87])
    fake_run(tmp_path, "no_noise", [0.80, 0.81])
    fake_run(tmp_path, "supervised", [0.90])
    out = study.rows(str(tmp_path))
    assert out["main0"][1] == 0.80 and out["main3"][1] == 0.87
    assert out["no_noise"][1] == 0.81
    assert out["main1"][2] == pytest.approx(1.0)  # 60 s of training
    gap, gain = study.summary(out)
    assert gap == pytest.approx((0.86 - 0.80) / (0.90 - 0.80))
    assert gain == pytest.approx((0.81 - 0.80) / (0.84 - 0.80))


def test_report_gives_the_gap_closed_of_every_iteration(tmp_path):
    fake_run(tmp_path, "main", [0.80, 0.84, 0.86, 0.87])
    fake_run(tmp_path, "supervised", [0.90])
    text, gap, _ = study.report_text(str(tmp_path))
    assert gap == pytest.approx(0.6)
    assert "gap closed at iteration 1 (1,000 labels, one seed): 0.40" in text
    assert "gap closed at iteration 2 (1,000 labels, one seed): 0.60" in text
    assert "gap closed at iteration 3 (1,000 labels, one seed): 0.70" in text


def test_summary_is_none_without_the_bound(tmp_path):
    fake_run(tmp_path, "main", [0.80, 0.84, 0.86])
    gap, gain = study.summary(study.rows(str(tmp_path)))
    assert gap is None and gain is None


def test_ablation_starts_from_mains_shared_stages(tmp_path):
    stages = list(study.SHARED_STAGES) + ["iteration1/train", "iteration1/eval"]
    fake_run(tmp_path, "main", [0.8, 0.85], stages=stages)
    for stage in stages:
        (tmp_path / "main" / stage).mkdir(parents=True)
        (tmp_path / "main" / stage / "file").write_text(stage)
    study.seed_from_main(str(tmp_path), "hard_labels")
    target = tmp_path / "hard_labels"
    manifest = json.loads((target / "manifest.json").read_text())["stages"]
    assert sorted(manifest) == sorted(study.SHARED_STAGES)
    for stage in study.SHARED_STAGES:
        assert (target / stage / "file").read_text() == stage
    assert not (target / "iteration1" / "train").exists()


def test_ablation_copy_keeps_mains_record_of_its_data(tmp_path):
    """Without main's inputs.json the pipeline fingerprints the copy's
    stages by their settings alone, and --overwrite retrains the teacher
    (seen in the robustness study: the copy's iteration0/train fingerprint
    differed from main's)."""
    fake_run(tmp_path, "main", [0.8, 0.85], stages=list(study.SHARED_STAGES))
    for stage in study.SHARED_STAGES:
        (tmp_path / "main" / stage).mkdir(parents=True)
    record = json.dumps({"--labeled": {"content": "abc", "images": 250}})
    (tmp_path / "main" / "inputs.json").write_text(record)
    study.seed_from_main(str(tmp_path), "hard_no_noise")
    assert (tmp_path / "hard_no_noise" / "inputs.json").read_text() == record
    # A main made before the record: nothing to copy.
    (tmp_path / "main" / "inputs.json").unlink()
    study.seed_from_main(str(tmp_path), "no_noise")
    assert not (tmp_path / "no_noise" / "inputs.json").exists()


def test_ablation_refuses_an_unfinished_main(tmp_path):
    fake_run(tmp_path, "main", [0.8], stages=["iteration0/train"])
    with pytest.raises(SystemExit, match="iteration1/predict"):
        study.seed_from_main(str(tmp_path), "no_noise")


def test_replace_block_rewrites_only_between_markers(tmp_path):
    path = tmp_path / "doc.md"
    path.write_text("before\n<!-- ssl_study:begin -->\nold\n"
                    "<!-- ssl_study:end -->\nafter\n")
    study.replace_block(str(path), "new\n")
    assert path.read_text() == ("before\n<!-- ssl_study:begin -->\nnew\n"
                                "<!-- ssl_study:end -->\nafter\n")
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(SystemExit):
        study.replace_block(str(tmp_path / "plain.md"), "x")


def test_table_lists_fashion_runs_then_the_digits_demo(tmp_path):
    fake_run(tmp_path, "main", [0.80, 0.84])
    fake_run(tmp_path, "hard_labels", [0.80, 0.83])
    fake_run(tmp_path, "digits", [0.90, 0.93])
    lines = study.table(study.rows(str(tmp_path)), 0.80)
    assert lines[2].startswith("| teacher (1,000 labels) | 0.8000 |")
    assert lines[3] == "| Noisy Student iteration 1 | 0.8400 | +0.0400 | 1.0 |"
    assert lines[4].startswith("| iteration 1, hard labels | 0.8300 | +0.0300")
    digits = lines[lines.index("| digits demo | test top-1 | train minutes |"):]
    assert digits[2:] == ["| digits teacher (100 labels) | 0.9000 | 1.0 |",
                          "| digits Noisy Student iteration 1 | 0.9300 | 1.0 |"]


def fake_ablation_run(workdir, seed, run, tests, vals):
    """A finished run of the ablation study: iterations 0 and 1 (tests), and
    each iteration's validation curve ending at vals[i]."""
    folder = workdir / f"s{seed}" / run
    fake_run(workdir / f"s{seed}", run, tests)
    for i, val in enumerate(vals):
        (folder / f"iteration{i}" / "train").mkdir(parents=True)
        (folder / f"iteration{i}" / "train" / "metrics.json").write_text(
            json.dumps({"evals": [{"step": 1, "top1": 0.1},
                                  {"step": 2, "top1": val}]}))
    return folder


def test_ablation_runs_have_flagfiles_and_set_both_seeds():
    for run in study.ABLATION_RUNS:
        argv = study.ablation_command(run, 3)
        assert (REPO / argv[0].split("=", 1)[1]).is_file(), run
        assert "--seed=3" in argv and "--split_seed=3" in argv
        assert ("--overwrite" in argv) == (run != "main")


def test_ablation_gains_are_per_seed_against_that_seeds_teacher(tmp_path):
    fake_ablation_run(tmp_path, 0, "main", [0.70, 0.74], [0.71, 0.75])
    fake_ablation_run(tmp_path, 0, "no_noise", [0.70, 0.71], [0.71, 0.72])
    fake_ablation_run(tmp_path, 1, "main", [0.60, 0.66], [0.61, 0.66])
    fake_ablation_run(tmp_path, 1, "no_noise", [0.60, 0.60], [0.61, 0.60])
    scores = study.ablation_scores(str(tmp_path), [0, 1])
    assert scores[("teacher", 1)] == (0.61, 0.60)  # Last validation eval.
    assert scores[("no_noise", 0)] == (0.72, 0.71)
    gains = study.ablation_gains(scores, [0, 1], 1)
    assert gains["main"] == pytest.approx({0: 0.04, 1: 0.06})
    assert gains["no_noise"] == pytest.approx({0: 0.01, 1: 0.0})
    assert study.no_noise_share(gains) == pytest.approx(0.01 / 0.10)
    assert study.no_noise_share(gains, "hard") is None  # Not run.
    text, share, seeds, _ = study.ablation_report_text(str(tmp_path), [0, 1])
    assert seeds == 2 and share == pytest.approx(0.1)
    assert "\nno-noise share: 0.10 (soft labels" in text and "seeds: 2" in text
    assert ": soft labels" in text
    assert ("noise effect (noised minus no noise), soft labels, test: "
            "+0.0300, +0.0600 (same sign at every seed; outside the "
            "spread)") in text
    assert ("| iteration 1, soft labels, noised | 0.750 | 0.7400 | 0.660 | "
            "0.6600 | 0.705 | 0.7000 | 0.0800 | 2 |") in text


def test_ablation_share_is_none_when_the_method_gains_nothing(tmp_path):
    fake_ablation_run(tmp_path, 0, "main", [0.70, 0.69], [0.71, 0.70])
    fake_ablation_run(tmp_path, 0, "no_noise", [0.70, 0.71], [0.71, 0.72])
    gains = study.ablation_gains(study.ablation_scores(str(tmp_path), [0]),
                                 [0], 1)
    assert study.no_noise_share(gains) is None


def test_tables_are_written_only_when_asked(tmp_path, monkeypatch):
    fake_run(tmp_path, "main", [0.80, 0.84])
    written = []
    monkeypatch.setattr(study, "replace_block",
                        lambda path, text, marker="ssl_study":
                        written.append(path))
    study.report(str(tmp_path))
    assert not written
    study.report(str(tmp_path), write_tables=True)
    assert sorted(p.rsplit("/", 1)[1] for p in written) == [
        "BENCHMARKS.md", "README.md"]


def test_ablation_configuration_is_chosen_on_validation(tmp_path):
    # Hard labels win on validation, soft on test: validation decides.
    fake_ablation_run(tmp_path, 0, "main", [0.70, 0.76], [0.70, 0.72])
    fake_ablation_run(tmp_path, 0, "hard_labels", [0.70, 0.72], [0.70, 0.75])
    fake_ablation_run(tmp_path, 0, "hard_no_noise", [0.70, 0.71],
                      [0.70, 0.70])
    text, share, _, _ = study.ablation_report_text(str(tmp_path), [0])
    assert ": hard labels" in text
    assert share == pytest.approx(0.01 / 0.02)
    # One seed: a mean but no range.
    assert ("| teacher (250 labels) | 0.700 | 0.7000 | 0.700 | 0.7000 | - "
            "| 1 |") in text


def test_ablation_control_is_scored_from_its_metrics_and_eval(tmp_path):
    fake_ablation_run(tmp_path, 0, "main", [0.70, 0.74], [0.71, 0.75])
    control = tmp_path / "s0" / "labels_only"
    (control / "eval").mkdir(parents=True)
    (control / "metrics.json").write_text(json.dumps(
        {"evals": [{"step": 600, "top1": 0.73}]}))
    (control / "eval" / "results.json").write_text(json.dumps(
        {"clean": {"top1": 0.72}}))
    scores = study.ablation_scores(str(tmp_path), [0])
    assert scores[("labels_only", 0)] == (0.73, 0.72)
    gains = study.ablation_gains(scores, [0], 1)
    assert gains["labels_only"] == pytest.approx({0: 0.02})
    gains["no_noise"] = {0: 0.025}
    # Over the control: (0.025 - 0.02) / (0.04 - 0.02).
    assert study.no_noise_share(gains, "soft", "labels_only") == \
        pytest.approx(0.25)


def test_digits_table_gives_the_seeds_mean_and_range(tmp_path):
    fake_run(tmp_path, "digits", [0.90, 0.93, 0.95])
    fake_run(tmp_path, "digits_s1", [0.92, 0.91, 0.96])
    fake_run(tmp_path, "digits_s2", [0.94, 0.95, 0.94])
    assert study.command("digits_s2") == ["--flagfile=flags/digits.cfg",
                                          "--seed=2"]
    seeds = study.digits_seed_scores(str(tmp_path))
    assert seeds[0] == [0.90, 0.92, 0.94]
    lines = study.table(study.rows(str(tmp_path)), None, seeds)
    assert lines[-5].startswith("| digits demo | test top-1, seed 0 | "
                                "mean over 3 seeds (--seed) | range |")
    assert lines[-2] == ("| digits Noisy Student iteration 1 | 0.9300 | "
                         "0.9300 | 0.0400 | 1.0 |")


def fake_control(workdir, seed, name, val, test):
    """A finished control (ns-train's metrics.json, ns-eval's results)."""
    folder = workdir / f"s{seed}" / name
    (folder / "eval").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"evals": [{"step": 600, "top1": val}]}))
    (folder / "eval" / "results.json").write_text(json.dumps(
        {"clean": {"top1": test}}))


def test_every_ablation_arm_and_control_has_its_flagfile():
    for arm in study.ABLATION_RUNS.values():
        assert (REPO / arm.flagfile).is_file(), arm
    for control in study.CONTROLS.values():
        assert (REPO / control.flagfile).is_file(), control
    # The configuration's run grows to iteration 3; the others stop at 1.
    assert "--iterations=3" in study.ablation_command("hard_labels", 0)
    assert not any(a.startswith("--iterations") for a in
                   study.ablation_command("hard_no_noise", 0))


def test_split_constants_are_the_flagfiles():
    text = (REPO / "flags/fashion_mnist_ablation/main.cfg").read_text()
    assert (f"--labels_per_class={study.ABLATION_LABELS_PER_CLASS}\n"
            in text)
    assert f"--validation_size={study.ABLATION_VALIDATION_SIZE}\n" in text


def test_supervised_split_is_the_pipelines_split_less_validation(tmp_path):
    """The bound trains on every image the pipeline does not hold out for
    validation, and validates on exactly the pipeline's validation slice."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from noisy_student.pipeline import stages  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    x = rng.integers(0, 255, (len(y), 4, 4)).astype(np.uint8)
    x[:, 0, 0] = np.arange(len(y))  # Each image says its row.
    path = str(tmp_path / "subset.npz")
    np.savez(path, x=x, y=y)
    train, validation = study.write_supervised_split(
        1, path, per_class=2, validation_size=5, num_classes=3)
    assert (train, validation) == study.split_paths(1, path)
    data = stages.DataConfig(labeled=f"npz:{path}", labels_per_class=2,
                             validation_size=5, split_seed=1, channels=1)
    held_out = sorted(int(b["image"][0, 0, 0]) for b in
                      data.eval_source("validation").dataset
                      .as_numpy_iterator())
    with np.load(validation) as v, np.load(train) as t:
        assert sorted(v["x"][:, 0, 0].tolist()) == held_out
        assert len(held_out) == 5
        rows = t["x"][:, 0, 0].tolist()
        assert sorted(rows) == sorted(set(range(len(y))) - set(held_out))
        np.testing.assert_array_equal(t["y"], y[rows])
    # A second call keeps the files.
    before = pathlib.Path(train).stat().st_mtime_ns
    study.write_supervised_split(1, path, per_class=2, validation_size=5,
                                 num_classes=3)
    assert pathlib.Path(train).stat().st_mtime_ns == before


def test_control_commands_start_from_the_seeds_teacher(tmp_path):
    for name, control in study.CONTROLS.items():
        train = study.control_commands(str(tmp_path), 1, name)[0]
        assert f"--flagfile={control.flagfile}" in train
        assert (f"--init_from={tmp_path}/s1/main/iteration0/train" in train)
        assert "--seed=1" in train and "--split_seed=1" in train
        data = [a for a in train if a.startswith(("--labeled", "--test"))]
        if control.supervised:
            paths = study.split_paths(1)
            assert data == [f"--labeled=npz:{paths[0]}",
                            f"--test=npz:{paths[1]}"]
        else:
            assert not data  # The flagfile's subset and split.
    fake_control(tmp_path, 1, "labels_only", 0.7, 0.7)
    assert len(study.control_commands(str(tmp_path), 1, "labels_only")) == 1


def test_one_seed_controls_run_at_the_first_seed_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "write_subset", lambda: None)
    monkeypatch.setattr(study, "run_control",
                        lambda w, seed, name: calls.append((name, seed)))
    monkeypatch.setattr(study, "run_ablation",
                        lambda w, run, seed: calls.append((run, seed)))
    args = study.argparse.Namespace(
        seeds="1,0", runs="hard_labels,supervised,supervised_long",
        workdir=str(tmp_path), report_only=False, write_tables=False)
    study.ablation_main(args)
    assert calls == [("hard_labels", 1), ("supervised", 1),
                     ("supervised_long", 1), ("hard_labels", 0),
                     ("supervised", 0)]


def test_gap_closed_per_seed_and_mean_over_seeds(tmp_path):
    # Teachers 0.70 / 0.60, bounds 0.80 / 0.70: gaps of 0.10 each.
    for seed, base in ((0, 0.70), (1, 0.60)):
        fake_ablation_run(tmp_path, seed, "main", [base, base + 0.01],
                          [base, base + 0.01])
        fake_ablation_run(tmp_path, seed, "hard_labels",
                          [base, base + 0.03, base + 0.06 - seed * 0.02],
                          [base, base + 0.03, base + 0.05])
        fake_control(tmp_path, seed, "supervised", base + 0.10, base + 0.10)
    fake_control(tmp_path, 0, "supervised_long", 0.90, 0.90)
    scores = study.ablation_scores(str(tmp_path), [0, 1])
    assert scores[("hard_labels@2", 1)] == (0.65, pytest.approx(0.64))
    assert study.gap_closed_per_seed(scores, [0, 1], "hard_labels@2") == \
        pytest.approx([0.6, 0.4])
    text, _, _, closed = study.ablation_report_text(str(tmp_path), [0, 1])
    assert ": hard labels" in text  # Chosen on validation.
    assert closed == pytest.approx({1: 0.3, 2: 0.5})
    assert "\ngap closed (iteration 2): 0.50 (test, mean of 2 seeds: 0.60, " \
        "0.40; validation 0.50: 0.50, 0.50)" in text
    assert "gap closed (iteration 2) against the 4x-steps bound: 0.30 " \
        "(1 seed)" in text
    assert "| iteration 2, hard labels, noised | 0.750 | 0.7600 |" in text


def test_spread_verdict():
    assert study.spread_verdict([0.005, 0.006]) == "outside the spread"
    # Same sign but a mean under 2 x 0.003 / sqrt(2) = 0.0042.
    assert study.spread_verdict([0.002, 0.005]) == "inside the spread"
    assert study.spread_verdict([0.02, -0.001]) == "inside the spread"
    assert study.spread_verdict([-0.01, -0.02]) == "outside the spread"
    assert study.spread_verdict([0.01]) == "one seed"
    assert study.spread_verdict([]) == "-"


def test_pseudo_only_pair_and_noise_sources_are_reported(tmp_path):
    runs = {"main": 0.72, "hard_labels": 0.74, "hard_no_noise": 0.72,
            "hard_pseudo_only": 0.73, "hard_pseudo_only_no_noise": 0.70,
            "hard_no_randaugment": 0.725, "hard_no_dropout_sd": 0.735}
    for seed in (0, 1):
        for run, top1 in runs.items():
            fake_ablation_run(tmp_path, seed, run, [0.70, top1],
                              [0.70, top1])
    text, share, _, _ = study.ablation_report_text(str(tmp_path), [0, 1])
    assert share == pytest.approx(0.5)
    assert "no-noise share, hard labels, pseudo-labels only: test 0.00, " \
        "validation 0.00" in text
    assert ("noise effect (noised minus no noise), hard labels, "
            "pseudo-labels only, test: +0.0300, +0.0300 (same sign at "
            "every seed; outside the spread)") in text
    assert ("noise source alone, hard labels, RandAugment only (no dropout or "
            "stochastic depth): keeps test 0.88, validation 0.88 of the "
            "noised gain; minus no noise, test: +0.0150, +0.0150 (outside "
            "the spread)") in text
    assert ("noise source alone, hard labels, dropout + stochastic depth "
            "only (no RandAugment): keeps test 0.62") in text
    assert ("| iteration 1, hard labels, no noise, pseudo-labels only | "
            "-0.0400, -0.0400 | -0.0400 |") in text


def test_runs_are_paired_by_seed_not_by_position(tmp_path):
    """A run finished at seed 1 only is compared with seed 1 of the other
    run, never with its seed 0."""
    for seed, base in ((0, 0.70), (1, 0.60)):
        fake_ablation_run(tmp_path, seed, "main", [base, base + 0.01],
                          [base, base + 0.01])
        fake_ablation_run(tmp_path, seed, "hard_labels", [base, base + 0.04],
                          [base, base + 0.04])
    fake_ablation_run(tmp_path, 1, "hard_no_noise", [0.60, 0.61],
                      [0.60, 0.61])
    gains = study.ablation_gains(study.ablation_scores(str(tmp_path), [0, 1]),
                                 [0, 1], 1)
    assert gains["hard_no_noise"] == pytest.approx({1: 0.01})
    assert study.noise_effect(gains, "hard") == pytest.approx([0.03])
    assert study.no_noise_share(gains, "hard") == pytest.approx(0.25)
    assert study.paired_differences(gains, "hard_no_noise", "main") == \
        pytest.approx([0.0])


# --------------------------------------------------------------------------
# --study=robustness


def fake_eval(workdir, seed, key, clean, errors, fgsm, pgd=None):
    """ns-eval's results.json of one model: clean error, {corruption:
    [error per severity]} and FGSM (PGD) accuracy per epsilon, as
    evaluate.run_evaluation writes them (epsilon keys str(float))."""
    folder = workdir / f"s{seed}" / "robustness" / key
    means = [sum(e) / len(e) for e in errors.values()]
    results = {"clean": {"error": clean, "top1": 1 - clean},
               "corruptions": {"errors": errors,
                               "mean_corruption_error":
                                   sum(means) / len(means)},
               "adversarial": {"accuracy": {
                   str(float(e)): a for e, a in fgsm.items()}}}
    (folder / "corruptions_fgsm").mkdir(parents=True)
    (folder / "corruptions_fgsm" / "results.json").write_text(
        json.dumps(results))
    if pgd is not None:
        (folder / "pgd").mkdir()
        (folder / "pgd" / "results.json").write_text(json.dumps(
            {"clean": results["clean"], "adversarial": {"accuracy": {
                str(float(e)): a for e, a in pgd.items()}}}))


def test_robustness_corruptions_are_the_projects_set():
    """The study scores every corruption ns-eval knows."""
    from noisy_student.evaluation import corruptions  # pylint: disable=g-import-not-at-top
    assert study.ROBUST_CORRUPTIONS == corruptions.CORRUPTION_NAMES


def test_robustness_eval_commands_and_skip_finished(tmp_path):
    commands = study.eval_commands(str(tmp_path), 1, "noised_2")
    assert len(commands) == 2
    corr, pgd = commands
    assert corr[1:3] == ["-m", "noisy_student.cli.evaluate"]
    assert (f"--model_path={tmp_path}/s1/hard_labels/iteration2/train"
            in corr)
    assert f"--test=idx:{study.FASHION_MNIST}:test" in corr
    assert (f"--out_dir={tmp_path}/s1/robustness/noised_2/"
            "corruptions_fgsm") in corr
    assert ("--corruptions=" + ",".join(study.ROBUST_CORRUPTIONS)) in corr
    assert "--epsilons=" + ",".join(study.FGSM_EPSILONS) in corr
    assert "--attack=fgsm" in corr
    assert "--attack=pgd" in pgd and not any(
        a.startswith("--corruptions") for a in pgd)
    assert f"--out_dir={tmp_path}/s1/robustness/noised_2/pgd" in pgd
    # Models of the other kinds: the teacher's and a control's folders.
    assert (f"--model_path={tmp_path}/s1/main/iteration0/train" in
            study.eval_commands(str(tmp_path), 1, "teacher")[0])
    assert (f"--model_path={tmp_path}/s1/labels_only" in
            study.eval_commands(str(tmp_path), 1, "labels_only")[0])
    # A finished ns-eval is not run again.
    fake_eval(tmp_path, 1, "noised_2", 0.2, {"contrast": [0.3] * 5},
              {e: 0.5 for e in study.FGSM_EPSILONS})
    assert study.eval_commands(str(tmp_path), 1, "noised_2") == [pgd]
    (tmp_path / "s1/robustness/noised_2/pgd").mkdir()
    (tmp_path / "s1/robustness/noised_2/pgd/results.json").write_text("{}")
    assert study.eval_commands(str(tmp_path), 1, "noised_2") == []


def test_robustness_evals_wait_for_the_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study.subprocess, "run",
                        lambda argv, **kw: calls.append(argv))
    study.run_evals(str(tmp_path), 0, "teacher")
    assert not calls  # Not trained yet.
    model = tmp_path / "s0/main/iteration0/train"
    model.mkdir(parents=True)
    (model / "model.keras").write_text("")
    study.run_evals(str(tmp_path), 0, "teacher")
    assert [a[5] for a in calls] == [
        f"--out_dir={tmp_path}/s0/robustness/teacher/{kind}"
        for kind in study.ROBUST_EVALS]


def test_robustness_builds_only_what_is_missing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "run_ablation",
                        lambda w, run, seed, iterations=None:
                        calls.append((run, seed, iterations)))
    monkeypatch.setattr(study, "run_control",
                        lambda w, seed, name: calls.append((name, seed)))
    fake_run(tmp_path / "s0", "main", [0.70, 0.72])
    fake_run(tmp_path / "s0", "hard_labels", [0.70, 0.74])  # Iteration 1.
    fake_control(tmp_path, 0, "labels_only", 0.7, 0.7)
    for run in study.SHORT_RUNS + study.LONG_RUNS:
        study.build_run(str(tmp_path), 0, run)
    # hard_labels stops at iteration 2; the others run their arm's length.
    assert calls == [("hard_labels", 0, 2), ("hard_no_noise", 0, None),
                     ("supervised", 0), (study.LONG_NOISED, 0, None),
                     (study.LONG_PLAIN, 0, None)]
    calls.clear()
    fake_run(tmp_path / "s1", "hard_labels", [0.70, 0.74, 0.75])
    study.build_run(str(tmp_path), 1, "hard_labels")
    assert calls == []  # Iteration 2 is finished.


def test_robustness_runs_short_models_first_then_the_long_pair(
        tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "write_subset", lambda: None)
    monkeypatch.setattr(study, "build_run",
                        lambda w, seed, run: calls.append(("build", run,
                                                           seed)))
    monkeypatch.setattr(study, "run_evals",
                        lambda w, seed, key, kinds: calls.append(
                            (kinds[0], key, seed)))
    args = study.argparse.Namespace(workdir=str(tmp_path), report_only=False,
                                    write_tables=False)
    study.robustness_main(args, [0, 1])
    short = [("build", r, 0) for r in study.SHORT_RUNS] + [
        ("corruptions_fgsm", k, 0) for k in study.SHORT_MODELS]
    assert calls[:len(short)] == short
    assert calls[len(short)][2] == 1  # Seed 1's short models next.
    pgd = [("pgd", k, s) for s in (0, 1) for k in study.ROBUST_MODELS]
    assert calls[-len(pgd):] == pgd  # PGD last.
    assert calls[-len(pgd) - 1] == ("corruptions_fgsm", "long_plain", 1)
    assert len(calls) == 2 * (len(study.SHORT_RUNS) + len(study.LONG_RUNS)
                              + 2 * len(study.ROBUST_MODELS))


def test_relative_corruption_error_is_imagenet_c_with_the_teacher():
    from noisy_student.evaluation import imagenet_c  # pylint: disable=g-import-not-at-top
    errors = {"a": [0.2, 0.3, 0.4, 0.5, 0.6], "b": [0.1] * 5}
    teacher = {"a": [0.4] * 5, "b": [0.2, 0.1, 0.1, 0.05, 0.05]}
    expected = imagenet_c.corruption_errors(errors, teacher)["mce"]
    assert study.relative_corruption_error(errors, teacher) == \
        pytest.approx(expected)
    assert expected == pytest.approx(100 * (2.0 / 2.0 + 0.5 / 0.5) / 2)


def fake_robust_seed(workdir, seed, offset):
    """Six models at one seed: the iteration-2 student lower than its
    teacher in corruption error and above it under FGSM."""
    eps = study.FGSM_EPSILONS
    pgd = study.PGD_EPSILONS
    for key, clean, corr, adv in (
            ("teacher", 0.24, 0.40, 0.30), ("noised_1", 0.22, 0.36, 0.32),
            ("noised_2", 0.21, 0.34, 0.35), ("no_noise", 0.22, 0.38, 0.31),
            ("labels_only", 0.23, 0.39, 0.30),
            ("supervised", 0.18, 0.33, 0.36)):
        fake_eval(workdir, seed, key, clean + offset,
                  {"gaussian_noise": [corr + offset] * 5,
                   "contrast": [corr + offset - 0.1, corr + offset + 0.1,
                                corr + offset, corr + offset,
                                corr + offset]},
                  {e: adv - offset - 0.01 * i for i, e in enumerate(eps)},
                  {e: adv / 2 for e in pgd})


def test_robustness_report_means_pairs_and_lines(tmp_path):
    fake_robust_seed(tmp_path, 0, 0.0)
    fake_robust_seed(tmp_path, 1, 0.02)
    fake_eval(tmp_path, 2, "teacher", 0.3, {"contrast": [0.5] * 5},
              {e: 0.2 for e in study.FGSM_EPSILONS})  # Seed 2 unfinished.
    metrics = study.robustness_metrics(str(tmp_path), [0, 1, 2])
    assert metrics[("noised_2", 1)]["corruption_error"] == \
        pytest.approx(0.36)
    assert metrics[("noised_2", 1)]["corruption_drop"] == \
        pytest.approx(0.36 - 0.23)
    assert metrics[("noised_2", 0)]["ce_vs_teacher"] == \
        pytest.approx(100 * 0.34 / 0.40)
    assert metrics[("teacher", 2)]["ce_vs_teacher"] == pytest.approx(100)
    assert "pgd " + study.PGD_EPSILONS[0] not in metrics[("teacher", 2)]
    text, summary = study.robustness_report_text(str(tmp_path), [0, 1, 2])
    lines = text.splitlines()
    assert "robustness seeds: 2" in lines
    # Means over the seeds both models have: (0.40, 0.42) and (0.34, 0.36).
    assert "corruption error, teacher -> iteration 2: 0.41 -> 0.35" in lines
    assert "corruption error, noised vs un-noised student: 0.37 vs 0.39" \
        in lines
    e0 = study.FGSM_EPSILONS[0]
    assert (f"FGSM accuracy (eps={e0}), teacher -> iteration 2: 0.29 -> "
            "0.34") in lines
    assert summary["seeds"] == 2
    assert summary["ce_teacher"] == pytest.approx(0.41)
    assert summary["ce_iteration2"] == pytest.approx(0.35)
    # Table: mean (range) over the seeds the model has.
    teacher_row = next(l for l in lines if l.startswith("| teacher"))
    assert "| 0.2667 (0.0600) | 0.4400 (0.1000) | 100.0 (0.0) |" in teacher_row
    assert teacher_row.endswith("| 3 |")
    # Paired differences, per seed, with their sign agreement.
    assert ("| iteration 2, hard labels, noised minus teacher (250 labels) "
            "| corruption error | s0 -0.0600, s1 -0.0600 | -0.0600 | "
            "2 of 2 < 0 |") in lines
    assert any(l.startswith("| iteration 2, hard labels, noised minus fully "
                            "supervised bound") and "| corruption error - "
               "clean error | s0 -0.0200, s1 -0.0200 |" in l for l in lines)
    assert "perturbation flip rate: not measured" in text


def test_sign_agreement():
    assert study.sign_agreement([-0.1, -0.2, 0.1]) == "2 of 3 < 0"
    assert study.sign_agreement([0.1, 0.2]) == "2 of 2 > 0"
    assert study.sign_agreement([]) == "-"


def test_long_pair_share_is_the_ablations_formula(tmp_path):
    """(mean un-noised gain) / (mean noised gain) over the seeds' teachers,
    from the pipelines' reports, as no_noise_share for 2,400 steps."""
    for seed, base in ((0, 0.70), (1, 0.60)):
        fake_ablation_run(tmp_path, seed, "main", [base, base + 0.01],
                          [base, base + 0.01])
        fake_ablation_run(tmp_path, seed, study.LONG_NOISED,
                          [base, base + 0.04], [base, base + 0.03])
        fake_ablation_run(tmp_path, seed, study.LONG_PLAIN,
                          [base, base + 0.01 + 0.02 * seed],
                          [base, base + 0.01])
    gains = study.long_pair_gains(str(tmp_path), [0, 1], 1)
    assert gains[study.LONG_PLAIN] == pytest.approx({0: 0.01, 1: 0.03})
    lines, share = study.long_pair_lines(str(tmp_path), [0, 1])
    assert share == pytest.approx(0.02 / 0.04)
    assert lines[0] == "no-noise share, from scratch, 4,800 steps: 0.50"
    assert "validation: 0.33" in lines[1]
    assert lines[-1].startswith("noise effect (noised minus no noise), from "
                                "scratch, 4,800 steps, test: +0.0300, "
                                "+0.0100 (2 of 2 > 0;")


def test_long_pair_flagfiles_are_the_2400_pair_at_4800_steps():
    for run, base in ((study.LONG_NOISED, "hard_scratch.cfg"),
                      (study.LONG_PLAIN, "hard_no_noise.cfg")):
        text = (REPO / study.LONG_PAIR[run].flagfile).read_text()
        flags = [l for l in text.splitlines() if not l.startswith("#")]
        assert f"--flagfile=flags/fashion_mnist_ablation/{base}" in flags
        assert "--student_train_steps=4800" in flags
        argv = study.ablation_command(run, 2)
        assert argv == [f"--flagfile={study.LONG_PAIR[run].flagfile}",
                        "--seed=2", "--split_seed=2", "--overwrite"]
    assert "--noinit_student_from_teacher" in (
        REPO / study.LONG_PAIR[study.LONG_PLAIN].flagfile).read_text()
    # Kept out of the ablation study's runs and tables.
    assert not set(study.LONG_PAIR) & set(study.row_keys())
    assert "--iterations=2" in study.ablation_command("hard_labels", 0, 2)


def test_robustness_tables_are_written_only_when_asked(tmp_path,
                                                       monkeypatch):
    written = []
    monkeypatch.setattr(study, "replace_block",
                        lambda path, text, marker="ssl_study":
                        written.append((path.rsplit("/", 1)[1], marker)))
    args = study.argparse.Namespace(workdir=str(tmp_path), report_only=True,
                                    write_tables=False)
    study.robustness_main(args, [0])
    assert not written
    args.write_tables = True
    study.robustness_main(args, [0])
    assert written == [("BENCHMARKS.md", "ssl_study_robustness")]
    assert "<!-- ssl_study_robustness:begin -->" in (
        REPO / "BENCHMARKS.md").read_text()
