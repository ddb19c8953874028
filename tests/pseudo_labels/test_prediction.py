"""Tests of the predict stage: sharding, resume after a kill, errors."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.serving import export
from noisy_student.utils import storage
from noisy_student.model import loading
from noisy_student.pseudo_labels import prediction
from noisy_student.pseudo_labels import writer
from noisy_student.pseudo_labels import records as pl

_WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                       "predict_worker.py")
_spec = importlib.util.spec_from_file_location("predict_worker", _WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

NUM_IMAGES = 300  # 10 blocks of 32, the last one partial (12 images).
NUM_BLOCKS = 10


def _predict(model, out_dir, num_images=NUM_IMAGES, **kwargs):
    kwargs.setdefault("batch_size", worker.BATCH_SIZE)
    kwargs.setdefault("records_per_file", worker.RECORDS_PER_FILE)
    return prediction.predict(model, worker.make_dataset(num_images), out_dir,
                      worker.NUM_CLASSES, **kwargs)


def _files(folder):
    """Contents of the final prediction files (done markers excluded)."""
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder))
            if not name.startswith("done-")}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("teacher")
    keras_model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=worker.NUM_CLASSES)
    keras_model.save(str(model_dir / "model.keras"))
    return str(model_dir), keras_model


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    """One uninterrupted single-worker run."""
    out_dir = str(tmp_path_factory.mktemp("reference"))
    summary = _predict(teacher[0], out_dir)
    return out_dir, summary


def test_records_hold_the_teachers_predictions(teacher, reference):
    out_dir, summary = reference
    assert summary.num_images == NUM_IMAGES
    assert summary.images_written == NUM_IMAGES
    assert summary.blocks_written == NUM_BLOCKS
    images = worker.make_images(NUM_IMAGES)
    expected = tf.nn.softmax(teacher[1].predict(
        tf.image.resize(images, [16, 16]), verbose=0)).numpy()
    records = list(pl.prediction_dataset(out_dir))
    assert [int(r["index"]) for r in records] == list(range(NUM_IMAGES))
    probs = np.stack([r["probs"].numpy() for r in records])
    np.testing.assert_allclose(probs, expected, atol=2e-3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=2e-3)
    labels = np.array([int(r["label"]) for r in records])
    confidences = np.array([float(r["confidence"]) for r in records])
    np.testing.assert_allclose(confidences, expected.max(axis=1), atol=1e-5)
    # Near-uniform random-init probabilities: argmax may only differ on ties.
    agree = labels == expected.argmax(axis=1)
    assert agree.mean() > 0.95
    # The ORIGINAL image is stored, not the resized one.
    for r in records[:20]:
        assert np.array_equal(r["image"].numpy(), images[int(r["index"])])
    # Histograms count every image once, by argmax class and bin.
    hist = sum(pl.read_histogram(os.path.join(
        out_dir, pl.histogram_name(b)))[0] for b in range(NUM_BLOCKS))
    expected_hist = np.zeros_like(hist)
    np.add.at(expected_hist, (labels, pl.confidence_bins(confidences, 1000)),
              1)
    assert np.array_equal(hist, expected_hist)
    info = pl.check_predictions(out_dir)
    assert info["num_blocks"] == NUM_BLOCKS and info["channels"] == 3


def test_three_shards_give_the_same_records_as_one(teacher, reference,
                                                   tmp_path):
    out_dir = str(tmp_path / "sharded")
    summaries = [_predict(teacher[1], out_dir, shard_index=k, num_shards=3)
                 for k in range(3)]
    # Block b goes to worker b % 3: blocks 0,3,6,9 / 1,4,7 / 2,5,8.
    assert [s.blocks_written for s in summaries] == [4, 3, 3]
    assert sum(s.images_written for s in summaries) == NUM_IMAGES
    assert _files(out_dir) == _files(reference[0])
    assert len([n for n in os.listdir(out_dir) if n.startswith("done-")]) == 3


def test_resume_skips_complete_blocks_and_redoes_the_rest(teacher, reference,
                                                          tmp_path):
    out_dir = str(tmp_path / "resumed")
    shutil.copytree(reference[0], out_dir)
    ref_files = _files(reference[0])
    for name in os.listdir(out_dir):
        if name.startswith("done-"):
            os.remove(os.path.join(out_dir, name))
    # Killed between the records' rename and the histogram: incomplete.
    os.remove(os.path.join(out_dir, pl.histogram_name(2)))
    # Killed while writing block 4: only a half-written temp file.
    os.remove(os.path.join(out_dir, pl.records_name(4)))
    os.remove(os.path.join(out_dir, pl.histogram_name(4)))
    half = ref_files[pl.records_name(4)][:1000]
    with open(os.path.join(out_dir, ".tmp-0badf00d-" + pl.records_name(4)),
              "wb") as f:
        f.write(half)
    # Killed while writing block 7 (another worker's when num_shards=2).
    os.remove(os.path.join(out_dir, pl.records_name(7)))
    os.remove(os.path.join(out_dir, pl.histogram_name(7)))
    stray = os.path.join(out_dir, ".tmp-0badf00d-" + pl.records_name(7))
    with open(stray, "wb") as f:
        f.write(b"garbage")
    kept = os.path.join(out_dir, pl.records_name(0))
    os.utime(kept, (1, 1))  # Untouched blocks must stay as they are.

    first = _predict(teacher[1], out_dir, shard_index=0, num_shards=2)
    assert first.blocks_written == 2 and first.blocks_skipped == 3  # 2, 4
    assert os.path.exists(stray)  # Worker 0 leaves worker 1's temp alone.
    with pytest.raises(ValueError, match=r"missing blocks \[7\]"):
        pl.check_predictions(out_dir)
    second = _predict(teacher[1], out_dir, shard_index=1, num_shards=2)
    assert second.blocks_written == 1 and second.blocks_skipped == 4
    assert not any(storage.is_temp(n) for n in os.listdir(out_dir))
    assert os.path.getmtime(kept) == 1
    assert _files(out_dir) == ref_files
    # Nothing left to do: a rerun writes nothing and reads nothing.
    again = _predict(teacher[1], out_dir)
    assert again.images_written == 0 and again.blocks_skipped == NUM_BLOCKS


def test_kill_9_and_resume(teacher, reference, tmp_path):
    out_dir = str(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, _WORKER, teacher[0], out_dir, str(NUM_IMAGES),
         "0.02"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and process.poll() is None:
            # Kill while a block is half-written (a temp file exists).
            if len(pl.complete_blocks(out_dir)) >= 2 and any(
                    storage.is_temp(n) for n in os.listdir(out_dir)):
                break
            time.sleep(0.05)
        assert process.poll() is None, "the worker ended before the kill"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    complete = pl.complete_blocks(out_dir)
    assert 2 <= len(complete) < NUM_BLOCKS
    assert any(storage.is_temp(n) for n in os.listdir(out_dir))
    assert not any(n.startswith("done-") for n in os.listdir(out_dir))
    with pytest.raises(ValueError, match="finished prediction worker"):
        pl.check_predictions(out_dir)

    summary = _predict(teacher[1], out_dir)
    assert summary.blocks_skipped == len(complete)
    assert summary.blocks_written == NUM_BLOCKS - len(complete)
    assert not any(storage.is_temp(n) for n in os.listdir(out_dir))
    assert _files(out_dir) == _files(reference[0])


def _probs(pred_dir, take=None):
    """float32 [N, K] probabilities of a prediction folder (its first
    `take` records)."""
    records = pl.prediction_dataset(pred_dir)
    if take is not None:
        records = records.take(take)
    return np.stack([r["probs"].numpy() for r in records])


def test_savedmodel_teacher(teacher, reference, tmp_path):
    export_dir = str(tmp_path / "export")
    teacher[1].export(export_dir, verbose=False)
    loaded = loading.load_model(export_dir, what="teacher")
    assert isinstance(loaded, loading.SavedModelClassifier)
    out_dir = str(tmp_path / "from_savedmodel")
    config = prediction.PredictConfig(teacher=export_dir, out_dir=out_dir,
                              num_classes=worker.NUM_CLASSES, batch_size=16,
                              records_per_file=32)
    summary = prediction.run_predict(config, worker.make_dataset(64))
    assert summary.images_written == 64 and summary.blocks_written == 2
    ours, ref = _probs(out_dir), _probs(reference[0], 64)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_teacher_exported_by_ns_export(teacher, reference, tmp_path):
    # export.export's serving signatures return a dict of three outputs;
    # the teacher must be read through its serve_logits function.
    export_dir = export.export(teacher[1], str(tmp_path / "exported"))
    loaded = loading.load_model(export_dir, what="teacher")
    assert isinstance(loaded, loading.SavedModelClassifier)
    assert loading.image_size(loaded) == 16
    assert loading.num_classes(loaded) == worker.NUM_CLASSES
    out_dir = str(tmp_path / "from_export")
    summary = _predict(export_dir, out_dir, num_images=64)
    assert summary.images_written == 64 and summary.blocks_written == 2
    ours, ref = _probs(out_dir), _probs(reference[0], 64)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_clear_errors(teacher, tmp_path):
    out_dir = str(tmp_path / "out")
    with pytest.raises(ValueError, match="num_classes=5"):
        prediction.predict(teacher[1], worker.make_dataset(8), out_dir, 5)
    assert not os.path.exists(out_dir)  # Nothing written.

    empty = tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros((0, 12, 12, 3), np.uint8)})
    with pytest.raises(ValueError, match="non-empty"):
        prediction.predict(teacher[1], empty, out_dir, worker.NUM_CLASSES)
    unknown_size = worker.make_dataset(8).filter(lambda x: False)
    with pytest.raises(ValueError, match="non-empty"):
        prediction.predict(teacher[1], unknown_size, out_dir, worker.NUM_CLASSES)
    assert not any(n.startswith("done-") for n in os.listdir(out_dir))
    floats = tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros((2, 12, 12, 3), np.float32)})
    with pytest.raises(ValueError, match="uint8"):
        prediction.predict(teacher[1], floats, out_dir, worker.NUM_CLASSES)
    with pytest.raises(ValueError, match="shard_index"):
        prediction.predict(teacher[1], worker.make_dataset(8), out_dir,
                   worker.NUM_CLASSES, shard_index=3, num_shards=3)
    with pytest.raises(ValueError, match="records_per_file=32"):
        # The folder already holds predictions with 1024 per file.
        prediction.predict(teacher[1], worker.make_dataset(8), out_dir,
                   worker.NUM_CLASSES, records_per_file=32)

    with pytest.raises(FileNotFoundError, match="teacher="):
        loading.load_model(str(tmp_path / "nowhere"), what="teacher")
    with pytest.raises(FileNotFoundError, match="teacher="):
        # A folder without a model.
        loading.load_model(str(tmp_path), what="teacher")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.keras").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="readable Keras model"):
        loading.load_model(str(broken), what="teacher")
    with pytest.raises(ValueError, match="readable Keras model"):
        prediction.predict(str(broken), worker.make_dataset(8), out_dir,
                   worker.NUM_CLASSES)


def test_writer_thread_errors_surface_and_leave_no_block(tmp_path):
    class FailingSink(writer.BlockSink):

        def add(self, *args):
            super().add(*args)
            raise OSError("disk full")

    sink = writer.ThreadedSink(FailingSink(
        str(tmp_path), 32, worker.NUM_CLASSES, 1000))
    probs = np.full((4, worker.NUM_CLASSES), 0.1, np.float32)
    pngs = np.array([b"png"] * 4, object)
    sink.add(np.arange(4), pngs, probs, np.zeros(4, int), probs[:, 0])
    with pytest.raises(OSError, match="disk full"):
        sink.finish()
    # The block in progress was dropped: no records, no temp file.
    assert os.listdir(tmp_path) == []
