"""Beam runs of predict and select write the in-process stages' files.

DirectRunner only (offline): in this process, and once with
direct_running_mode=multi_processing and 2 worker processes. Blocks of 7
images with batches of 4 (a block is not a whole number of batches), 4
confidence bins (so that each class's boundary bin holds images of many
blocks and of several select tasks), 3 output files.
"""

import gc
import json
import os
import time

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

from noisy_student.model import efficientnet  # pylint: disable=g-import-not-at-top
from noisy_student.pipeline import beam as beam_lib  # pylint: disable=g-import-not-at-top
from noisy_student.pipeline import stages  # pylint: disable=g-import-not-at-top
from noisy_student.pseudo_labels import prediction  # pylint: disable=g-import-not-at-top
from noisy_student.pseudo_labels import records as pl  # pylint: disable=g-import-not-at-top
from noisy_student.pseudo_labels import selection  # pylint: disable=g-import-not-at-top

NUM_IMAGES = 53
PER_FILE = 7  # 8 blocks, the last of 4 images.
BATCH = 4
CLASSES = 4
BINS = 4
IN_PROCESS = "runner=DirectRunner"
PROCESSES = ("runner=DirectRunner,direct_running_mode=multi_processing,"
             "direct_num_workers=2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher folder (confidences spread over the bins) and an npz."""
    root = tmp_path_factory.mktemp("beam")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (NUM_IMAGES, 12, 12, 3), np.uint8)
    np.savez(root / "unlabeled.npz", x=images)
    import keras  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(0)
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=CLASSES)
    resized = keras.ops.image.resize(images.astype("float32"), (16, 16))
    logits = np.asarray(model(resized))
    head = model.get_layer("predictions")
    scale = 2.0 / logits.std(axis=0)
    head.kernel.assign(head.kernel * scale)
    head.bias.assign((head.bias - logits.mean(axis=0)) * scale)
    os.makedirs(root / "teacher")
    model.save(str(root / "teacher" / "model.keras"))
    data = stages.DataConfig(labeled="", unlabeled=f"npz:{root}/unlabeled.npz",
                             test="", channels=3)
    return {"root": root, "teacher": str(root / "teacher"), "data": data}


def _config(setup, out_dir, **kwargs):
    return prediction.PredictConfig(
        teacher=setup["teacher"], out_dir=str(out_dir),
        num_classes=CLASSES, batch_size=BATCH, records_per_file=PER_FILE,
        num_bins=BINS, **kwargs)


def _select_config(pred_dir, out_dir):
    return selection.SelectConfig(pred_dir=str(pred_dir), out_dir=str(out_dir),
                                  per_class=6, min_confidence=0.0,
                                  num_files=3)


def _files(folder, ignore=("stage_config.json", "inputs.json",
                           "report.json", "report.md")):
    """{name: bytes} of a folder's files (sub-folders included)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name not in ignore:
                path = os.path.join(root, name)
                out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def reference(setup):
    """The in-process predict and select stages."""
    pred_dir = setup["root"] / "ref-predict"
    select_dir = setup["root"] / "ref-select"
    stages.run_predict(_config(setup, pred_dir), setup["data"])
    stages.run_select(_select_config(pred_dir, select_dir))
    return pred_dir, select_dir


def test_the_case_covers_partial_batches_files_and_a_spread_boundary(
        reference):
    pred_dir, select_dir = reference
    info = pl.check_predictions(str(pred_dir))
    assert info["num_blocks"] == 8 and PER_FILE % BATCH
    plan = selection.plan_selection(
        selection.total_histogram(str(pred_dir), info), 6, 0.0)
    # Some class's boundary-bin images lie in several 2-block select tasks.
    spread = 0
    for task in range(4):
        counts = selection.boundary_counts(str(pred_dir),
                                           [2 * task, 2 * task + 1], plan)
        spread += (counts > 0) & (plan.boundary_take > 0)
    assert spread.max() >= 2, spread
    names = [n for n in os.listdir(select_dir) if pl.is_selected_file(n)]
    assert len(names) == 3


def test_beam_predict_and_select_write_the_in_process_files(setup, reference,
                                                            tmp_path):
    pred_dir, select_dir = reference
    beam_pred, beam_select = tmp_path / "predict", tmp_path / "select"
    summary = stages.run_predict(_config(setup, beam_pred), setup["data"],
                                 beam_options=IN_PROCESS)
    assert summary["images_written"] == NUM_IMAGES
    assert summary["blocks_written"] == 8
    assert _files(beam_pred) == _files(pred_dir)
    report = beam_lib.run_select(_select_config(beam_pred, beam_select),
                                 IN_PROCESS, blocks_per_task=2)
    assert report["totals"]["unique"] > 0
    want = _files(select_dir)
    assert sorted(_files(beam_select)) == sorted(want)
    assert _files(beam_select) == want
    reports = [json.load(open(folder / "report.json"))
               for folder in (select_dir, beam_select)]
    for r in reports:
        del r["seconds"]
        r["config"] = {k: v for k, v in r["config"].items()
                       if "dir" not in k}
    assert reports[0] == reports[1]
    assert not os.path.exists(beam_select / beam_lib.PARTS_DIR)


def test_beam_with_two_worker_processes(setup, reference, tmp_path):
    pred_dir, select_dir = reference
    beam_pred, beam_select = tmp_path / "predict", tmp_path / "select"
    stages.run_predict(_config(setup, beam_pred), setup["data"],
                       beam_options=PROCESSES)
    assert _files(beam_pred) == _files(pred_dir)
    stages.run_select(_select_config(beam_pred, beam_select),
                      beam_options=PROCESSES)
    assert _files(beam_select) == _files(select_dir)


def test_rerun_redoes_exactly_the_block_without_histogram(setup, reference,
                                                          tmp_path):
    pred_dir, _ = reference
    out = tmp_path / "predict"
    # Half the blocks by a manual shard, the rest by Beam.
    stages.run_predict(_config(setup, out, shard_index=0, num_shards=2),
                       setup["data"])
    summary = stages.run_predict(_config(setup, out), setup["data"],
                                 beam_options=IN_PROCESS)
    assert summary["blocks_written"] == 4 and summary["blocks_skipped"] == 4
    os.remove(out / pl.histogram_name(3))
    stale = out / f".tmp-0123abcd-{pl.records_name(3)}"
    stale.write_bytes(b"half a block")
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)
              if pl.block_of_name(n) is not None}
    time.sleep(0.05)
    summary = stages.run_predict(_config(setup, out), setup["data"],
                                 beam_options=IN_PROCESS)
    assert summary["blocks_written"] == 1
    assert summary["images_written"] == PER_FILE
    assert not stale.exists()
    changed = {n for n in os.listdir(out) if pl.block_of_name(n) is not None
               and os.stat(out / n).st_mtime_ns != before.get(n)}
    assert changed == {pl.records_name(3), pl.histogram_name(3)}
    ignore = ("stage_config.json", "inputs.json")
    done = [n for n in os.listdir(out) if n.startswith("done-")]
    assert sorted(done) == ["done-00000-of-00001.json",
                            "done-00000-of-00002.json"]
    got = {k: v for k, v in _files(out, ignore).items()
           if not k.startswith("done-")}
    want = {k: v for k, v in _files(pred_dir, ignore).items()
            if not k.startswith("done-")}
    assert got == want


def test_a_retried_block_rewrites_the_same_bytes(setup, reference, tmp_path):
    pred_dir, _ = reference
    out = tmp_path / "predict"
    config = _config(setup, out)
    job = beam_lib.PredictJob(config, setup["data"], setup["data"]
                              .unlabeled_source(keep_encoded=True).content,
                              NUM_IMAGES, 16)
    worker = beam_lib._PredictWorker(job)  # pylint: disable=protected-access
    gc.collect()  # The teacher must outlive its loading (a weak reference).
    for _ in range(2):  # The second: a retried task over a finished block.
        assert worker.label(7) == NUM_IMAGES - 7 * PER_FILE
        for name in (pl.records_name(7), pl.histogram_name(7)):
            assert (open(out / name, "rb").read()
                    == open(pred_dir / name, "rb").read())
    assert sorted(os.listdir(out)) == sorted([pl.records_name(7),
                                              pl.histogram_name(7)])


def test_options_text_and_errors(setup, tmp_path):
    options = beam_lib.pipeline_options(PROCESSES)
    assert options.get_all_options()["direct_num_workers"] == 2
    with pytest.raises(ValueError, match="--beam_pipeline_options as "
                       "key=value"):
        beam_lib.pipeline_options("runner")
    with pytest.raises(ValueError, match="--num_shards=1 with "
                       "--beam_pipeline_options"):
        stages.run_predict(_config(setup, tmp_path / "p", num_shards=2),
                           setup["data"], beam_options=IN_PROCESS)
