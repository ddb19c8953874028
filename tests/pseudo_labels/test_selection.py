"""Tests of the select stage (filter + balance) and the selected-set reader."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from noisy_student.utils import storage
from noisy_student.pseudo_labels import records
from noisy_student.pseudo_labels import selection
from noisy_student.pseudo_labels import selection_report
from prediction_records import probs_for
from prediction_records import write_predictions

NUM_CLASSES = 5
K = 50


def synthetic_probs(seed=0):
    """303 images over 5 classes built to exercise every selection case.

    class 0: 200 images, 40 in bin 950, 120 in bin 900, 40 in bin 800:
             K=50 keeps the 40 + the first 10 of bin 900 (threshold 0.9).
    class 1: 20 confident + 10 below 0.3: kept 20, duplication 2.5.
    class 2: 15 images, all below 0.3: no confident image.
    class 3: 49 confident + one at exactly 0.3 (kept) + one at 0.2995
             (dropped): exactly K, duplication 1.
    class 4: 7 images: duplication 50/7.
    """
    rng = np.random.default_rng(seed)
    parts = [
        (0, rng.uniform(0.9501, 0.9508, 40)),
        (0, rng.uniform(0.9001, 0.9008, 120)),
        (0, rng.uniform(0.8001, 0.8008, 40)),
        (1, rng.uniform(0.4, 0.99, 20)),
        (1, rng.uniform(0.22, 0.29, 10)),
        (2, rng.uniform(0.21, 0.29, 15)),
        (3, rng.uniform(0.31, 0.99, 49)),
        (3, [0.3, 0.2995]),
        (4, rng.uniform(0.5, 0.6, 7)),
    ]
    labels = np.concatenate([np.full(len(c), k) for k, c in parts])
    confidences = np.concatenate([np.asarray(c, np.float32) for _, c in parts])
    order = rng.permutation(len(labels))
    return probs_for(labels[order], confidences[order], NUM_CLASSES)


def read_selected(out_dir):
    """All selected records of a folder, parsed to numpy, with their file."""
    rows = []
    info = json.loads(open(os.path.join(out_dir, records.SELECTION_FILE)).read())
    for name in info["files"]:
        for raw in tf.data.TFRecordDataset(os.path.join(out_dir, name)):
            f = tf.io.parse_single_example(raw, records.SELECTED_FEATURES)
            rows.append({
                "file": name, "index": int(f["index"]),
                "copy": int(f["copy"]), "label": int(f["label"]),
                "target": np.frombuffer(f["target"].numpy(), "<f2"),
            })
    return rows


def expected_kept(labels, confidences, per_class, min_bin=300):
    """Brute force: per class the K best by (bin desc, index asc)."""
    bins = records.confidence_bins(confidences, records.DEFAULT_NUM_BINS)
    kept = set()
    for c in range(NUM_CLASSES):
        idx = [i for i in range(len(labels))
               if labels[i] == c and bins[i] >= min_bin]
        idx.sort(key=lambda i: (-bins[i], i))
        kept.update(idx[:per_class])
    return kept


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    pred_dir = str(tmp_path_factory.mktemp("pred"))
    probs = synthetic_probs()
    labels, confidences = write_predictions(pred_dir, probs)
    return pred_dir, probs, labels, confidences


def test_balancing_exact_counts_thresholds_and_report(synthetic, tmp_path):
    pred_dir, _, labels, confidences = synthetic
    out_dir = str(tmp_path / "sel")
    report = selection.select(selection.SelectConfig(
        pred_dir, out_dir, per_class=K, min_confidence=0.3, seed=3,
        num_files=4))
    per_class = report["per_class"]
    assert [r["confident"] for r in per_class] == [200, 20, 0, 50, 7]
    assert [r["kept_unique"] for r in per_class] == [50, 20, 0, 50, 7]
    # Capped and exactly-K classes are not duplicated: exact totals.
    assert per_class[0]["kept_total"] == K
    assert per_class[3]["kept_total"] == K
    assert per_class[0]["threshold"] == pytest.approx(0.9)
    assert per_class[0]["boundary_take"] == 10
    assert per_class[3]["threshold"] == pytest.approx(0.3)
    dup = [r["duplication_factor"] for r in per_class]
    assert dup[0] == 1.0 and dup[3] == 1.0 and dup[2] is None
    assert dup[1] == pytest.approx(2.5) and dup[4] == pytest.approx(50 / 7)
    # The class with no confident image is reported, not a crash.
    assert report["classes_without_confident_images"] == [2]
    assert per_class[2]["kept_total"] == 0 and per_class[2]["predicted"] == 15

    rows = read_selected(out_dir)
    firsts = {r["index"] for r in rows if r["copy"] == 0}
    assert firsts == expected_kept(labels, confidences, K)
    # Below-min_confidence images are gone (class 1's ten, class 2, 0.2995).
    assert not any(confidences[i] < 0.3 for i in firsts)
    copies = collections.Counter(r["index"] for r in rows)
    for index, count in copies.items():
        expected = selection.stochastic_copies(
            [dup[labels[index]]], [index], seed=3)[0]
        assert count == expected
        if labels[index] in (0, 3):
            assert count == 1
    assert {copies[i] for i in firsts if labels[i] == 1} <= {2, 3}
    assert {copies[i] for i in firsts if labels[i] == 4} <= {7, 8}
    totals = report["totals"]
    assert totals["unique"] == 127 and totals["total"] == len(rows)
    assert totals["images_predicted"] == 303
    assert sum(r["kept_total"] for r in per_class) == len(rows)
    # Copies of one image go to different files (4 files >= 3 copies).
    by_index = collections.defaultdict(list)
    for r in rows:
        by_index[r["index"]].append(r["file"])
    for index, files in by_index.items():
        if labels[index] == 1:
            assert len(set(files)) == len(files)

    for name in ("report.json", "report.md", "report.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 100
    assert open(os.path.join(out_dir, "report.png"), "rb").read(4) == (
        b"\x89PNG")
    on_disk = json.loads(open(os.path.join(out_dir, "report.json")).read())
    assert on_disk["totals"]["unique"] == 127
    markdown = open(os.path.join(out_dir, "report.md")).read()
    assert "127 unique" in markdown and "no confident image" in markdown


def test_duplication_expectation_over_seeds():
    indices = np.arange(40)
    for factor in (2.5, 50 / 7, 1.2):
        draws = np.stack([
            selection.stochastic_copies(np.full(40, factor), indices, seed)
            for seed in range(300)])
        assert set(np.unique(draws)) <= {np.floor(factor),
                                         np.floor(factor) + 1}
        # 12,000 draws: the mean's standard error is < 0.005.
        assert draws.mean() == pytest.approx(factor, abs=0.03)
    # Different seeds give different draws; the same seed the same.
    a = selection.stochastic_copies(np.full(40, 2.5), indices, 1)
    assert np.array_equal(a, selection.stochastic_copies(np.full(40, 2.5),
                                                    indices, 1))
    assert not np.array_equal(a, selection.stochastic_copies(np.full(40, 2.5),
                                                       indices, 2))


def test_plan_from_histogram_alone():
    hist = np.zeros((3, 1000), np.int64)
    hist[0, 990] = 5
    hist[0, 500] = 10
    hist[0, 100] = 50   # below min_confidence
    hist[1, 700] = 3
    hist[2, 200] = 4    # no confident image
    plan = selection.plan_selection(hist, per_class=8, min_confidence=0.3)
    assert plan.kept_unique.tolist() == [8, 3, 0]
    assert plan.boundary_bin.tolist() == [500, -1, -1]
    assert plan.boundary_take.tolist() == [3, 0, 0]
    assert plan.threshold[0] == pytest.approx(0.5)
    assert plan.duplication[1] == pytest.approx(8 / 3)
    assert plan.expected_total.tolist() == pytest.approx([8, 8, 0])
    # min_confidence is rounded up to the next bin edge.
    assert selection.min_bin_of(0.3, 1000) == 300
    assert selection.min_bin_of(0.3004, 1000) == 301
    plan = selection.plan_selection(hist, per_class=None, min_confidence=0.3)
    assert plan.kept_unique.tolist() == [15, 3, 0]
    assert plan.duplication.tolist() == [1.0, 1.0, 0.0]


def test_targets_sum_to_one_and_temperature(synthetic, tmp_path):
    pred_dir, probs, labels, _ = synthetic
    probs16 = probs.astype(np.float16).astype(np.float32)

    out_dir = str(tmp_path / "soft")
    selection.select(selection.SelectConfig(pred_dir, out_dir, per_class=K, num_files=2))
    rows = read_selected(out_dir)
    for r in rows:
        # Stored float16 targets: sum to 1 within float16 tolerance, and
        # T = 1 keeps the teacher's probabilities.
        assert r["target"].astype(np.float32).sum() == pytest.approx(
            1.0, abs=2e-3)
        np.testing.assert_allclose(r["target"], probs16[r["index"]],
                                   atol=1e-3)
    dataset = records.selected_dataset(out_dir)
    assert dataset.element_spec["target"].shape == (NUM_CLASSES,)
    assert dataset.element_spec["image"].shape.as_list() == [None, None, 1]
    count = 0
    for element in dataset:
        target = element["target"].numpy()
        assert target.dtype == np.float32
        assert target.sum() == pytest.approx(1.0, abs=1e-5)
        index = int(element["image"].numpy()[0, 0, 0]) + 256 * int(
            element["image"].numpy()[0, 1, 0])
        np.testing.assert_allclose(target, probs16[index], atol=1e-3)
        count += 1
    assert count == len(rows)

    hard_dir = str(tmp_path / "hard")
    selection.select(selection.SelectConfig(pred_dir, hard_dir, per_class=K,
                                label_type="hard", num_files=1))
    for r in read_selected(hard_dir):
        assert r["target"].tolist() == np.eye(NUM_CLASSES)[
            labels[r["index"]]].tolist()

    p = np.array([[0.5, 0.3, 0.2, 0.0, 0.0]], np.float32)
    sharp = selection.make_targets(p, [0], "soft", 0.5)
    np.testing.assert_allclose(sharp[0], p[0] ** 2 / (p[0] ** 2).sum(),
                               rtol=1e-6)
    flat = selection.make_targets(p, [0], "soft", 2.0)
    assert flat[0, 0] < p[0, 0] < sharp[0, 0]
    near_zero = selection.make_targets(p, [0], "soft", 0.01)
    np.testing.assert_allclose(near_zero[0], [1, 0, 0, 0, 0], atol=1e-6)
    for t in (0.05, 0.3, 1.0, 3.0):
        targets = selection.make_targets(probs[:50], labels[:50], "soft", t)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
        assert np.array_equal(targets.argmax(axis=1), labels[:50])
    # T -> 0 approaches one-hot monotonically.
    tops = [selection.make_targets(probs[:50], labels[:50], "soft", t).max(axis=1)
            .min() for t in (1.0, 0.5, 0.1, 0.01, 0.001)]
    assert tops == sorted(tops) and tops[-1] > 0.999


def test_clear_errors(synthetic, tmp_path):
    pred_dir = synthetic[0]
    out_dir = str(tmp_path / "none")
    with pytest.raises(ValueError, match="min_confidence"):
        selection.select(selection.SelectConfig(pred_dir, out_dir, per_class=K,
                                    min_confidence=0.99))
    assert not os.path.exists(os.path.join(out_dir, records.SELECTION_FILE))
    with pytest.raises(ValueError, match="label_type"):
        selection.select(selection.SelectConfig(pred_dir, out_dir, label_type="soft-ish"))
    with pytest.raises(ValueError, match="temperature"):
        selection.select(selection.SelectConfig(pred_dir, out_dir, temperature=0.0))
    with pytest.raises(ValueError, match="num_classes"):
        selection.select(selection.SelectConfig(pred_dir, out_dir), num_classes=7)
    with pytest.raises(FileNotFoundError, match="pred_dir"):
        selection.select(selection.SelectConfig(str(tmp_path / "nowhere"), out_dir))
    with pytest.raises(FileNotFoundError, match="selection"):
        records.selected_dataset(str(tmp_path))

    # An unfinished prediction folder (a block without its histogram).
    partial = str(tmp_path / "partial")
    write_predictions(partial, synthetic[1][:100], records_per_file=32)
    os.remove(os.path.join(partial, records.histogram_name(2)))
    with pytest.raises(ValueError, match=r"missing blocks \[2\]"):
        selection.select(selection.SelectConfig(partial, out_dir))


def test_reselect_replaces_previous_selection(synthetic, tmp_path):
    pred_dir = synthetic[0]
    out_dir = str(tmp_path / "sel")
    selection.select(selection.SelectConfig(pred_dir, out_dir, per_class=K, num_files=3))
    # A leftover temporary file of a killed run is cleaned up.
    open(os.path.join(out_dir, storage.temp_path("selected-x")), "wb").close()
    report = selection.select(selection.SelectConfig(
        pred_dir=pred_dir, out_dir=out_dir, per_class=10, num_files=2))
    assert [r["kept_unique"] for r in report["per_class"]] == [10, 10, 0, 10,
                                                               7]
    names = sorted(os.listdir(out_dir))
    assert [n for n in names if n.endswith(".tfrecord")] == [
        "selected-00000-of-00002.tfrecord", "selected-00001-of-00002.tfrecord"]
    assert not any(storage.is_temp(n) for n in names)
    assert sum(1 for _ in records.selected_dataset(out_dir)) == len(
        read_selected(out_dir))


def test_cli_per_class_zero_keeps_every_confident_image(synthetic, tmp_path):
    # ns-select --per_class=0 means "no cap" (the no-filter ablation's flag
    # file needs a value that undoes a flagfile's --per_class).
    pred_dir = synthetic[0]
    out_dir = str(tmp_path / "cli")
    subprocess.run([sys.executable, "-m", "noisy_student.cli.select",
                    f"--pred_dir={pred_dir}", f"--out_dir={out_dir}",
                    "--per_class=0", "--min_confidence=0.3"], check=True,
                   capture_output=True)
    kept = len(read_selected(out_dir))
    confident = int((synthetic[3] >= 0.3).sum())
    assert kept == confident


def test_class_names_and_contact_sheets(tmp_path):
    """The report names the classes; each class gets a contact sheet of its
    most and least confident kept images (ties broken by index)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    confidences = rng.uniform(0.4, 1.0, 60).round(3)
    pred_dir, out_dir = str(tmp_path / "pred"), str(tmp_path / "sel")
    write_predictions(pred_dir, probs_for(labels, confidences, 3))
    names = ["circle", "square", "triangle"]
    storage.write_json(os.path.join(pred_dir, "class_names.json"), names)
    report = selection.select(selection.SelectConfig(pred_dir, out_dir, min_confidence=0.3))
    assert report["class_names"] == names
    with open(os.path.join(out_dir, "report.md")) as f:
        text = f.read()
    assert all(f"| {c} {name} |" in text for c, name in enumerate(names))
    stored = confidences.astype(np.float32)  # as the records store them
    for row in report["per_class"]:
        c = row["class"]
        assert row["name"] == names[c]
        members = np.nonzero(labels == c)[0]
        by_most = sorted(members, key=lambda i: (-stored[i], i))
        by_least = sorted(members, key=lambda i: (stored[i], i))
        assert row["most_confident_indices"] == [
            int(i) for i in by_most[:selection_report.CONTACT_SHEET_IMAGES]]
        assert row["least_confident_indices"] == [
            int(i) for i in by_least[:selection_report.CONTACT_SHEET_IMAGES]]
        path = os.path.join(out_dir, "contact_sheets", f"class-{c:04d}.png")
        image = tf.io.decode_png(open(path, "rb").read())
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert report["contact_sheets"] == [
        f"contact_sheets/class-{c:04d}.png" for c in range(3)]
