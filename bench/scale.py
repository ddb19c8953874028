"""Scale: predict + select over 1,000,000 generated images, several processes.

The paper labels 300M unlabeled images; this measures what our predict and
select stages cost per image and whether that cost stays flat with size.
Images are made from their index (8x8 RGB, stateless random pixels), so the
source holds no memory and every worker sees the same data. The teacher is a
tiny EfficientNet (width = depth = 0.25, 8 px, small-image strides, 10
classes, its head rescaled so that confidences spread over [0.1, 1]), saved
once and loaded by every worker, so the numbers measure the stage's own
overhead (reading, preprocessing, PNG, records, histograms), not a large
model's arithmetic (BENCHMARKS.md adds that for the extrapolation).

For each size (100,000 and 1,000,000 images) it runs `--workers` processes
at once, worker i with --shard_index=i --num_shards=N into one out_dir, then
the select stage (K = size / 20 per class, min confidence 0.3) in another
process, and checks the selection's counts exactly against a direct count
over the prediction records: per class, the confident images, the kept
unique images (min(K, confident)), the kept records with copies, and that no
image is selected twice.

    python bench/scale.py [--workers=2] [--sizes=100000,1000000]

Reports per size: wall seconds and peak RSS of each predict worker and of
select, record bytes per image. Last line:
  RESULT scale rss_growth_1m=<x> time_growth_1m=<y> images=<n>
rss_growth_1m: the largest worker peak RSS at 1M over that at 100k;
time_growth_1m: predict seconds per image at 1M over that at 100k.

The Beam case (`--beam`): the same images written as TFRecord shards of
PNGs (a `tfrecord:` source, so that a worker opens only its block's
shards), labeled and selected once in-process (`stages.run_predict`,
`selection.select`) and once through Beam's multi-processing DirectRunner
with `--workers` worker processes (`--beam_pipeline_options`), each in a
fresh process; the prediction and selection files must be identical, byte
for byte. Per size it reports the Beam predict's labeling seconds (first
block's start to last block's end, the workers' start-up excluded) and
the largest worker peak RSS (RUSAGE_CHILDREN of the launcher: its worker
processes). Last line:
  RESULT scale_beam beam_identical=<0|1> beam_rss_growth_1m=<x>
    beam_time_growth_1m=<y> images=<n>
with the growths taken between the first and the last --sizes.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from noisy_student.model import efficientnet  # pylint: disable=g-import-not-at-top
from noisy_student.pseudo_labels import prediction  # pylint: disable=g-import-not-at-top
from noisy_student.pseudo_labels import records as pl  # pylint: disable=g-import-not-at-top
from noisy_student.pseudo_labels import selection  # pylint: disable=g-import-not-at-top

SIZE = 8
CLASSES = 10
MIN_CONFIDENCE = 0.3
RECORDS_PER_FILE = 8192
BATCH = 1024


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def source(num_images):
    """{"image": uint8 [8, 8, 3]} made from the index: no memory held.

    A colour per image plus noise: images that differ as a whole, so the
    teacher's classes and confidences vary across them.
    """
    def generate(index):
        seed = tf.stack([index, tf.constant(7, tf.int64)])
        colour = tf.random.stateless_uniform([1, 1, 3], seed=seed, maxval=1.0)
        noise = tf.random.stateless_uniform([SIZE, SIZE, 3], seed=seed + 1,
                                            maxval=0.25)
        return {"image": tf.cast((colour * 0.75 + noise) * 255.0, tf.uint8)}
    return tf.data.Dataset.range(num_images).map(generate)


def make_teacher(path):
    import keras  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(0)
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=SIZE, small_images=True,
        num_classes=CLASSES)
    # A fresh head's logits barely differ between images: standardise them
    # on a sample (each class mean 0, spread 3) so that confidences spread
    # over [0.1, 1] and the confidence filter has work to do.
    sample = np.stack([d["image"].numpy() for d in source(512)])
    logits = model(sample.astype(np.float32)).numpy()
    scale = 3.0 / logits.std(axis=0)
    head = model.get_layer("predictions")
    head.kernel.assign(head.kernel * scale)
    head.bias.assign((head.bias - logits.mean(axis=0)) * scale)
    keras.saving.save_model(model, path)


def run_child(args):
    """One process: a predict worker or the select stage; prints JSON."""
    if args.child == "predict":
        import keras  # pylint: disable=g-import-not-at-top
        teacher = keras.saving.load_model(args.teacher, compile=False)
        before = _peak_rss_mb()
        start = time.perf_counter()  # The stage itself, not TF's start-up.
        summary = prediction.predict(
            teacher, source(args.images), args.pred_dir, CLASSES,
            batch_size=BATCH, shard_index=args.shard_index,
            num_shards=args.num_shards, records_per_file=RECORDS_PER_FILE,
            log_every_s=1e9)
        result = {"written": summary.images_written}
    else:
        before = _peak_rss_mb()
        start = time.perf_counter()
        report = selection.select(selection.SelectConfig(
            args.pred_dir, args.select_dir, per_class=args.per_class,
            min_confidence=MIN_CONFIDENCE))
        result = {"per_class": report["per_class"],
                  "totals": report["totals"]}
    result.update(seconds=time.perf_counter() - start,
                  peak_rss_mb=_peak_rss_mb(), before_mb=before)
    print("CHILD " + json.dumps(result), flush=True)


def write_shards(num_images, pattern_dir, shards=8):
    """The generated images as PNGs in TFRecord shards; their glob."""
    tf.io.gfile.makedirs(pattern_dir)
    per_shard = -(-num_images // shards)
    encoded = source(num_images).map(
        lambda d: tf.io.encode_png(d["image"]),
        num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    writer, written, shard = None, 0, 0
    for batch in encoded.as_numpy_iterator():
        for data in batch:
            if written % per_shard == 0:
                if writer:
                    writer.close()
                writer = tf.io.TFRecordWriter(
                    f"{pattern_dir}/shard-{shard:05d}")
                shard += 1
            writer.write(tf.train.Example(features=tf.train.Features(
                feature={"image/encoded": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[data]))}))
                         .SerializeToString())
            written += 1
    writer.close()
    return f"{pattern_dir}/shard-*"


def run_stage_child(args):
    """One process: predict + select of a tfrecord source, in-process
    (--child=local) or through Beam (--child=beam); prints JSON."""
    from noisy_student.pipeline import beam as beam_lib  # pylint: disable=g-import-not-at-top
    from noisy_student.pipeline import stages  # pylint: disable=g-import-not-at-top
    data = stages.DataConfig(labeled="", test="", channels=3,
                             unlabeled=f"tfrecord:{args.pattern}",
                             scan_dir=args.scan_dir)
    data.unlabeled_source()  # The scan (cached), outside the timing.
    config = prediction.PredictConfig(
        teacher=args.teacher, out_dir=args.pred_dir, num_classes=CLASSES,
        batch_size=BATCH, records_per_file=RECORDS_PER_FILE, log_every_s=1e9)
    select_config = selection.SelectConfig(
        args.pred_dir, args.select_dir, per_class=args.per_class,
        min_confidence=MIN_CONFIDENCE)
    options = "" if args.child == "local" else (
        "runner=DirectRunner,direct_running_mode=multi_processing,"
        f"direct_num_workers={args.num_shards}")
    start = time.perf_counter()
    summary = stages.run_predict(config, data, beam_options=options)
    predict_wall = time.perf_counter() - start
    start = time.perf_counter()
    if options:
        beam_lib.run_select(select_config, options)
    else:
        selection.select(select_config)
    select_wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("CHILD " + json.dumps({
        "predict_seconds": summary["seconds"], "predict_wall": predict_wall,
        "select_wall": select_wall, "written": summary["images_written"],
        "peak_rss_mb": _peak_rss_mb(), "worker_peak_rss_mb": children}),
          flush=True)


def _same_files(a, b):
    """Whether two folders hold the same prediction / selection files."""
    def files(folder):
        return {n: tf.io.gfile.GFile(f"{folder}/{n}", "rb").read()
                for n in tf.io.gfile.listdir(folder)
                if n.endswith((".tfrecord", ".npz")) or n == "selection.json"}
    return files(a) == files(b)


def run_beam_size(images, workers, teacher):
    work = tempfile.mkdtemp(prefix=f"ns-scale-beam-{images}-")
    try:
        pattern = write_shards(images, f"{work}/shards")
        runs = {}
        for kind in ("local", "beam"):
            runs[kind] = _result(_child(
                f"--child={kind}", f"--teacher={teacher}",
                f"--pattern={pattern}", f"--scan_dir={work}/scan",
                f"--pred_dir={work}/{kind}-predict",
                f"--select_dir={work}/{kind}-select",
                f"--num_shards={workers}", f"--per_class={images // 20}"))
        identical = (_same_files(f"{work}/local-predict",
                                 f"{work}/beam-predict")
                     and _same_files(f"{work}/local-select",
                                     f"{work}/beam-select"))
        local, beam = runs["local"], runs["beam"]
        print(f"{images:,} images: in-process predict {local['predict_seconds']:.1f} s "
              f"({images / local['predict_seconds']:.0f} img/s), select "
              f"{local['select_wall']:.1f} s, peak RSS "
              f"{local['peak_rss_mb']:.0f} MB; Beam ({workers} worker "
              f"processes) predict {beam['predict_seconds']:.1f} s labeling "
              f"({images / beam['predict_seconds']:.0f} img/s; "
              f"{beam['predict_wall']:.1f} s with start-up), select "
              f"{beam['select_wall']:.1f} s, worker peak RSS "
              f"{beam['worker_peak_rss_mb']:.0f} MB, launcher "
              f"{beam['peak_rss_mb']:.0f} MB; files identical: {identical}",
              flush=True)
        return {"identical": identical,
                "seconds": beam["predict_seconds"],
                "rss": beam["worker_peak_rss_mb"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child(*extra):
    return subprocess.Popen([sys.executable, __file__, *extra],
                            stdout=subprocess.PIPE, text=True)


def _result(proc):
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {out[-2000:]}")
    line = [l for l in out.splitlines() if l.startswith("CHILD ")][-1]
    return json.loads(line[len("CHILD "):])


def direct_counts(pred_dir, select_dir, per_class):
    """What the selection must contain, counted from the records directly."""
    bins_total = pl.check_predictions(pred_dir).get("num_bins",
                                                    pl.DEFAULT_NUM_BINS)
    labels, confidences = [], []
    for batch in pl.prediction_dataset(pred_dir, decode_image=False).batch(
            65536):
        labels.append(batch["label"].numpy())
        confidences.append(batch["confidence"].numpy())
    labels, confidences = np.concatenate(labels), np.concatenate(confidences)
    min_bin = selection.min_bin_of(MIN_CONFIDENCE, bins_total)
    passing = pl.confidence_bins(confidences, bins_total) >= min_bin
    confident = np.bincount(labels[passing], minlength=CLASSES)
    kept = np.minimum(confident, per_class)
    selected = tf.data.TFRecordDataset(
        pl.selected_files(select_dir)[0]).map(
            lambda r: tf.io.parse_single_example(r, {
                "label": tf.io.FixedLenFeature([], tf.int64),
                "index": tf.io.FixedLenFeature([], tf.int64),
                "copy": tf.io.FixedLenFeature([], tf.int64)}))
    sel_labels, sel_pairs = [], set()
    for batch in selected.batch(65536):
        sel_labels.append(batch["label"].numpy())
        pairs = zip(batch["index"].numpy().tolist(),
                    batch["copy"].numpy().tolist())
        for pair in pairs:
            if pair in sel_pairs:
                raise AssertionError(f"selected twice: {pair}")
            sel_pairs.add(pair)
    records = np.bincount(np.concatenate(sel_labels), minlength=CLASSES)
    unique = len({index for index, _ in sel_pairs})
    return {"images": int(labels.size), "confident": confident.tolist(),
            "kept_unique": kept.tolist(), "records": records.tolist(),
            "unique": unique}


def check_exact(direct, report):
    per_class = report["per_class"]
    want = {"confident": [c["confident"] for c in per_class],
            "kept_unique": [c["kept_unique"] for c in per_class],
            "records": [c["kept_total"] for c in per_class]}
    for key, values in want.items():
        if direct[key] != values:
            raise AssertionError(f"{key}: select says {values}, the records "
                                 f"say {direct[key]}")
    if direct["unique"] != report["totals"]["unique"]:
        raise AssertionError(f"unique: {report['totals']['unique']} vs "
                             f"{direct['unique']}")


def run_size(images, workers, teacher):
    work = tempfile.mkdtemp(prefix=f"ns-scale-{images}-")
    pred_dir, select_dir = f"{work}/predict", f"{work}/select"
    try:
        start = time.perf_counter()
        procs = [_child("--child=predict", f"--teacher={teacher}",
                        f"--images={images}", f"--pred_dir={pred_dir}",
                        f"--shard_index={i}", f"--num_shards={workers}")
                 for i in range(workers)]
        predicted = [_result(p) for p in procs]
        wall = time.perf_counter() - start
        # The slowest worker's stage time (the workers run at once).
        predict_seconds = max(p["seconds"] for p in predicted)
        assert sum(p["written"] for p in predicted) == images, predicted
        record_bytes = sum(
            tf.io.gfile.stat(f"{pred_dir}/{name}").length
            for name in tf.io.gfile.listdir(pred_dir)
            if name.endswith(".tfrecord") or "records" in name)
        per_class = images // 20
        selected = _result(_child(
            "--child=select", f"--pred_dir={pred_dir}",
            f"--select_dir={select_dir}", f"--per_class={per_class}"))
        direct = direct_counts(pred_dir, select_dir, per_class)
        assert direct["images"] == images, direct["images"]
        check_exact(direct, selected)
        totals = selected["totals"]
        rss_list = ", ".join(f"{p['peak_rss_mb']:.0f}" for p in predicted)
        print(f"{images:,} images, {workers} predict workers at once: "
              f"{predict_seconds:.1f} s (slowest worker's predict; "
              f"{wall:.1f} s with start-up), "
              f"{predict_seconds / images * 1e6 * workers:.1f} "
              f"process-us per image; worker peak RSS "
              f"{rss_list} MB; "
              f"records {record_bytes / images:.0f} bytes per image; select "
              f"{selected['seconds']:.1f} s, peak RSS "
              f"{selected['peak_rss_mb']:.0f} MB, kept "
              f"{totals['unique']:,} unique / {totals['total']:,} records; "
              f"counts exact", flush=True)
        return {"predict_seconds": predict_seconds,
                "rss": max(p["peak_rss_mb"] for p in predicted),
                "select_seconds": selected["seconds"],
                "select_rss": selected["peak_rss_mb"],
                "bytes_per_image": record_bytes / images}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--child", choices=["predict", "select", "local",
                                            "beam"])
    parser.add_argument("--beam", action="store_true",
                        help="the Beam case (see the docstring)")
    parser.add_argument("--pattern")
    parser.add_argument("--scan_dir")
    parser.add_argument("--teacher")
    parser.add_argument("--images", type=int)
    parser.add_argument("--pred_dir")
    parser.add_argument("--select_dir")
    parser.add_argument("--shard_index", type=int, default=0)
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--per_class", type=int)
    args = parser.parse_args()
    if args.child in ("local", "beam"):
        run_stage_child(args)
        return
    if args.child:
        run_child(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"TF {tf.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    folder = tempfile.mkdtemp(prefix="ns-scale-teacher-")
    teacher = f"{folder}/teacher.keras"
    make_teacher(teacher)
    if args.beam:
        results = {n: run_beam_size(n, args.workers, teacher) for n in sizes}
        shutil.rmtree(folder, ignore_errors=True)
        small, large = results[sizes[0]], results[sizes[-1]]
        identical = all(r["identical"] for r in results.values())
        print(f"load average at end {os.getloadavg()[0]:.1f}", flush=True)
        print(f"RESULT scale_beam beam_identical={int(identical)} "
              f"beam_rss_growth_1m={large['rss'] / small['rss']:.3f} "
              f"beam_time_growth_1m="
              f"{(large['seconds'] / sizes[-1]) / (small['seconds'] / sizes[0]):.3f}"
              f" images={sizes[-1]}")
        return
    results = {n: run_size(n, args.workers, teacher) for n in sizes}
    shutil.rmtree(folder, ignore_errors=True)
    small, large = results[sizes[0]], results[sizes[-1]]
    rss_growth = large["rss"] / small["rss"]
    time_growth = ((large["predict_seconds"] / sizes[-1])
                   / (small["predict_seconds"] / sizes[0]))
    print(f"load average at end {os.getloadavg()[0]:.1f}", flush=True)
    print(f"RESULT scale rss_growth_1m={rss_growth:.3f} "
          f"time_growth_1m={time_growth:.3f} images={sizes[-1]}")


if __name__ == "__main__":
    main()
