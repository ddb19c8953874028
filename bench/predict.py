"""Benchmark of the predict stage.

1. Speed: our prediction stage (tf.data source -> eval preprocessing -> teacher
   in a tf.function -> PNG + float16 records + histograms written to disk)
   against `model.predict` on the same model and the same tf.data source and
   preprocessing (which only returns the logits in memory). Model:
   EfficientNet-B0 (width 1.0, depth 1.0) at 32x32 with the small-image strides
   (the SVHN recipe's teacher), 10 classes, random weights. Both are timed
   after a warm-up run, in alternating pairs; the ratio is the median of the
   per-pair ratios (robust to the load of a shared machine).
2. Pass-through at 224 px: a folder of JPEGs (made here, 256-320 px,
   quality 90), EfficientNet-B0 at 224 px (standard strides): our stage
   reading the folder (records keep each file's bytes) against
   `model.predict` on the same decoded, eval-preprocessed images; and the
   record bytes per image over the JPEG file's bytes.
3. Memory: the peak RSS (getrusage ru_maxrss) of a fresh subprocess that
   labels N and then 10 N images (tiny EfficientNet, width = depth = 0.25,
   16x16, images generated on the fly from their index so that the source
   itself holds no memory); rss_growth_10x = peak(10 N) / peak(N).

4. Beam: the predict stage through `--beam_pipeline_options` (Beam's
   DirectRunner, direct_running_mode=multi_processing, 2 worker processes)
   against the in-process stage (`stages.run_predict`, the ns-predict
   path) on the same data (BEAM_IMAGES generated 32x32 images in an npz,
   blocks of 256) and teacher (B0 at 32 px, small-image strides, saved to
   a model folder): images/s of each with its start-up left out (the
   in-process stage's labeling time; Beam's first block's start to last
   block's end over both workers), in alternating pairs; the ratio is the
   median of the per-pair ratios. Beam's start-up (pipeline, worker
   processes, teacher loading) is reported apart.

Run: python bench/predict.py   (about 7 minutes on 2 CPU cores;
  --beam-only runs part 4 alone)
Last line: RESULT predict ratio_vs_model_predict=<x> rss_growth_10x=<y>
  ratio_vs_model_predict_jpeg224=<z> bytes_ratio_jpeg224=<w> ...
  ratio_beam_vs_local=<v> beam_startup_s=<s>
"""

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
from noisy_student.data import sources  # pylint: disable=g-import-not-at-top

SPEED_IMAGES = 1024
BATCH_SIZE = 128
# Even, so that each side runs first in as many pairs as the other: on this
# machine the first run of a pair was often the slower one (N=160 JPEG run
# of 2026-11-30: 29.8 / 58.7 / 30.3 img/s for model.predict going first,
# second, first), which an odd count turns into a bias.
PAIRS = 6
RSS_IMAGES = 2000


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _keras_rate(model, dataset, preprocess, batch_size, count):
    """img/s of model.predict over the same source and eval transform."""
    batches = dataset.map(lambda x: preprocess(x["image"]),
                          num_parallel_calls=tf.data.AUTOTUNE).batch(
                              batch_size).prefetch(tf.data.AUTOTUNE)
    start = time.perf_counter()
    logits = model.predict(batches, verbose=0)
    assert logits.shape[0] == count, logits.shape
    return count / (time.perf_counter() - start)


def _alternate(ours, keras, pairs):
    """(our rates, Keras rates) of `pairs` pairs, taking turns going first
    so that load drift on a shared machine favours neither side."""
    our_rates, keras_rates = [], []
    for pair in range(pairs):
        if pair % 2:
            our_rates.append(ours())
            keras_rates.append(keras())
        else:
            keras_rates.append(keras())
            our_rates.append(ours())
    return our_rates, keras_rates


def speed():
    """images/s of our stage and of model.predict on B0 at 32 px."""
    model = efficientnet.build_efficientnet(
        "b0", image_size=32, small_images=True, num_classes=10)
    images = np.random.default_rng(0).integers(
        0, 256, (SPEED_IMAGES, 32, 32, 3), dtype=np.uint8)
    source = tf.data.Dataset.from_tensor_slices({"image": images})
    preprocess = prediction.default_preprocess(32)

    def keras_predict():
        return _keras_rate(model, source, preprocess, BATCH_SIZE,
                           SPEED_IMAGES)

    def ours():
        with tempfile.TemporaryDirectory() as out_dir:
            start = time.perf_counter()
            summary = prediction.predict(model, source, out_dir, 10,
                                 batch_size=BATCH_SIZE,
                                 records_per_file=256)
            rate = SPEED_IMAGES / (time.perf_counter() - start)
            assert summary.images_written == SPEED_IMAGES
        return rate

    keras_predict()  # Warm-up: traces and builds the predict function.
    ours()  # Warm-up: traces the teacher (cached per model).
    our_rates, keras_rates = _alternate(ours, keras_predict, PAIRS)
    ratios = np.array(our_rates) / np.array(keras_rates)
    print(f"speed (B0 32px small-image, batch {BATCH_SIZE}, {SPEED_IMAGES} "
          f"images, load average {os.getloadavg()[0]:.1f}):\n"
          f"  model.predict img/s:           "
          f"{' '.join(f'{r:.0f}' for r in keras_rates)}\n"
          f"  ours (incl. writing) img/s:    "
          f"{' '.join(f'{r:.0f}' for r in our_rates)}\n"
          f"  ratio per pair: {' '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{np.median(ratios):.2f}, ratio of medians "
          f"{np.median(our_rates) / np.median(keras_rates):.2f}", flush=True)
    return float(np.median(ratios))


# Enough images (15 batches) that per-call setup (listing, tracing the input
# pipeline, the writer thread) weighs as little as at scale, where one call
# labels millions: with 160 images the ratio swung 0.7-1.9 between runs.
JPEG_IMAGES = 480
JPEG_PAIRS = 4
JPEG_BATCH = 32


def _jpeg_folder(folder):
    """JPEG_IMAGES smooth random images, 256-320 px; returns their bytes."""
    rng = np.random.default_rng(1)
    os.makedirs(f"{folder}/unlabeled")
    total = 0
    for i in range(JPEG_IMAGES):
        h, w = rng.integers(256, 321, 2)
        # Low-frequency content (upsampled noise) compresses like a photo.
        small = rng.integers(0, 256, (h // 16, w // 16, 3)).astype(np.uint8)
        image = tf.image.resize(small, [h, w], "bicubic")
        data = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255),
                                         tf.uint8), quality=90).numpy()
        with open(f"{folder}/unlabeled/img{i:04d}.jpg", "wb") as f:
            f.write(data)
        total += len(data)
    return total


def jpeg224():
    """(median ratio ours / model.predict, record bytes / JPEG bytes)."""
    model = efficientnet.build_efficientnet("b0", num_classes=10)
    with tempfile.TemporaryDirectory() as folder:
        jpeg_bytes = _jpeg_folder(folder)
        source = sources.load_source(f"folder:{folder}/unlabeled",
                                     labeled=False, channels=3,
                                     keep_encoded=True)
        preprocess = prediction.default_preprocess(224, 3)

        def keras_predict():
            return _keras_rate(model, source.dataset, preprocess,
                               JPEG_BATCH, JPEG_IMAGES)

        def ours():
            out_dir = tempfile.mkdtemp(dir=folder)
            start = time.perf_counter()
            summary = prediction.predict(model, source.dataset, out_dir, 10,
                                 batch_size=JPEG_BATCH, records_per_file=64)
            rate = JPEG_IMAGES / (time.perf_counter() - start)
            assert summary.images_written == JPEG_IMAGES
            record_bytes = sum(
                os.path.getsize(f"{out_dir}/{name}")
                for name in os.listdir(out_dir) if name.endswith(".tfrecord"))
            return rate, record_bytes

        keras_predict()
        _, record_bytes = ours()
        our_rates, keras_rates = _alternate(lambda: ours()[0],
                                            keras_predict, JPEG_PAIRS)
    ratios = np.array(our_rates) / np.array(keras_rates)
    print(f"jpeg 224 (B0, {JPEG_IMAGES} JPEGs of 256-320 px, batch "
          f"{JPEG_BATCH}): model.predict img/s "
          f"{' '.join(f'{r:.1f}' for r in keras_rates)}; ours (records "
          f"written) {' '.join(f'{r:.1f}' for r in our_rates)}; ratio "
          f"median {np.median(ratios):.2f}; records "
          f"{record_bytes / JPEG_IMAGES:.0f} bytes per image vs JPEG "
          f"{jpeg_bytes / JPEG_IMAGES:.0f}", flush=True)
    return float(np.median(ratios)), record_bytes / jpeg_bytes


def _openvino_forward(model, batches, precision="f32"):
    """OpenVINO's own throughput mode on pre-decoded batches: the model
    converted once, compiled with the THROUGHPUT hint, one batch per
    inference request and as many requests in flight as OpenVINO advises
    (its benchmark_app's way). Returns (a function -> img/s, probabilities
    of every image)."""
    import openvino as ov  # pylint: disable=g-import-not-at-top
    spec = tf.TensorSpec([None, 224, 224, 3], tf.float32)
    probabilities = tf.function(
        lambda x: tf.nn.softmax(model(x, training=False), -1),
        input_signature=[spec])
    converted = ov.convert_model(probabilities.get_concrete_function())
    converted = ov.Model([converted.output(0)], converted.get_parameters())
    converted.reshape([JPEG_BATCH, 224, 224, 3])
    compiled = ov.Core().compile_model(
        converted, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                           "INFERENCE_PRECISION_HINT": precision})
    queue = ov.AsyncInferQueue(
        compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    outputs = np.zeros((len(batches) * JPEG_BATCH, 10), np.float32)

    def keep(request, index):
        outputs[index * JPEG_BATCH:(index + 1) * JPEG_BATCH] = (
            request.get_output_tensor(0).data)
    queue.set_callback(keep)

    def rate():
        start = time.perf_counter()
        for index, batch in enumerate(batches):
            queue.start_async({0: batch}, userdata=index)
        queue.wait_all()
        return len(batches) * JPEG_BATCH / (time.perf_counter() - start)

    rate()
    return rate, outputs


def openvino224():
    """(median ratio of our stage on OpenVINO over OpenVINO's forward pass
    alone, max |p - p_tf| of our stage's forward over the images).

    Ours: the whole predict stage (read the JPEG folder, decode,
    preprocess, the teacher on --inference_runtime=openvino in float32,
    records written). Baseline: OpenVINO float32 in throughput mode on the
    same teacher and the same images, decoded and preprocessed beforehand
    (forward only). Its one-time start-up (conversion, compilation) is
    timed apart from both sides' rates.
    """
    from noisy_student.pseudo_labels import inference_runtime  # pylint: disable=g-import-not-at-top
    model = efficientnet.build_efficientnet("b0", num_classes=10)
    with tempfile.TemporaryDirectory() as folder:
        _jpeg_folder(folder)
        source = sources.load_source(f"folder:{folder}/unlabeled",
                                     labeled=False, channels=3,
                                     keep_encoded=True)
        preprocess = prediction.default_preprocess(224, 3)
        pixels = np.stack([preprocess(e["image"]).numpy()
                           for e in source.dataset])
        batches = [np.ascontiguousarray(pixels[i:i + JPEG_BATCH])
                   for i in range(0, JPEG_IMAGES, JPEG_BATCH)]
        start = time.perf_counter()
        baseline, _ = _openvino_forward(model, batches)
        ours_fn = inference_runtime.probabilities_fn(
            model, "openvino", "float32", JPEG_BATCH, 224, 3)
        startup = time.perf_counter() - start
        reference = inference_runtime.probabilities_fn(
            model, "tensorflow", "float32", JPEG_BATCH, 224, 3)
        max_diff = max(float(np.abs(ours_fn(b) - reference(b)).max())
                       for b in batches)

        def ours():
            out_dir = tempfile.mkdtemp(dir=folder)
            begin = time.perf_counter()
            summary = prediction.predict(model, source.dataset, out_dir, 10,
                                 batch_size=JPEG_BATCH, records_per_file=64,
                                 runtime="openvino")
            assert summary.images_written == JPEG_IMAGES
            return JPEG_IMAGES / (time.perf_counter() - begin)

        ours()  # Warm-up: OpenVINO's first requests allocate.
        ours()
        our_rates, ov_rates = _alternate(ours, baseline, JPEG_PAIRS)
    ratios = np.array(our_rates) / np.array(ov_rates)
    print(f"openvino 224 (B0, {JPEG_IMAGES} JPEGs, batch {JPEG_BATCH}, "
          f"float32): OpenVINO throughput forward only img/s "
          f"{' '.join(f'{r:.1f}' for r in ov_rates)}; our stage on OpenVINO "
          f"(records written) {' '.join(f'{r:.1f}' for r in our_rates)}; "
          f"ratio median {np.median(ratios):.2f}; start-up (conversion and "
          f"compilation, both sides, not in the rates) {startup:.1f} s; max "
          f"|p - p_tensorflow| {max_diff:.1e}", flush=True)
    capabilities = __import__("openvino").Core().get_property(
        "CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        print(f"bfloat16: not measured, this CPU has none (OpenVINO "
              f"capabilities: {', '.join(capabilities)})", flush=True)
    return float(np.median(ratios)), max_diff


def rss_child(num_images):
    """Labels `num_images` generated images; prints the peak RSS in MB."""
    model = efficientnet.build_efficientnet(
        width=0.25, depth=0.25, image_size=16, small_images=True,
        num_classes=10)

    def generate(index):
        pixels = tf.random.stateless_uniform(
            [16, 16, 3], seed=tf.stack([index, tf.constant(0, tf.int64)]),
            maxval=256, dtype=tf.int32)
        return {"image": tf.cast(pixels, tf.uint8)}

    source = tf.data.Dataset.range(num_images).map(generate)
    before = _peak_rss_mb()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        summary = prediction.predict(model, source, out_dir, 10, batch_size=256,
                             records_per_file=1024)
        seconds = time.perf_counter() - start
    assert summary.images_written == num_images
    print(f"CHILD images={num_images} peak_rss_mb={_peak_rss_mb():.1f} "
          f"before_mb={before:.1f} seconds={seconds:.1f}", flush=True)


def rss_growth():
    peaks = {}
    for num_images in (RSS_IMAGES, 10 * RSS_IMAGES):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(num_images)],
            check=True, capture_output=True, text=True).stdout
        line = [l for l in out.splitlines() if l.startswith("CHILD")][-1]
        print(line, flush=True)
        fields = dict(f.split("=") for f in line.split()[1:])
        peaks[num_images] = (float(fields["peak_rss_mb"]),
                             float(fields["before_mb"]))
    small, large = peaks[RSS_IMAGES], peaks[10 * RSS_IMAGES]
    print(f"peak RSS: {small[0]:.1f} MB at {RSS_IMAGES} images, "
          f"{large[0]:.1f} MB at {10 * RSS_IMAGES}; growth during predict "
          f"{small[0] - small[1]:.1f} MB vs {large[0] - large[1]:.1f} MB",
          flush=True)
    return large[0] / small[0]


BEAM_IMAGES = 2048
BEAM_PAIRS = 2


def beam_ratio():
    """(median ratio of Beam's predict img/s over the in-process stage's,
    median Beam start-up seconds)."""
    from noisy_student.pipeline import stages  # pylint: disable=g-import-not-at-top
    work = tempfile.mkdtemp(prefix="ns-bench-beam-")
    import keras  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(0)
    model = efficientnet.build_efficientnet(
        "b0", image_size=32, small_images=True, num_classes=10)
    os.makedirs(f"{work}/teacher")
    model.save(f"{work}/teacher/model.keras")
    images = np.random.default_rng(0).integers(
        0, 256, (BEAM_IMAGES, 32, 32, 3), dtype=np.uint8)
    np.savez(f"{work}/images.npz", x=images)
    data = stages.DataConfig(labeled="", test="", channels=3,
                             unlabeled=f"npz:{work}/images.npz")
    options = ("runner=DirectRunner,direct_running_mode=multi_processing,"
               "direct_num_workers=2")
    runs = [0]

    def run(beam_options):
        runs[0] += 1
        config = prediction.PredictConfig(
            teacher=f"{work}/teacher", out_dir=f"{work}/run{runs[0]}",
            num_classes=10, batch_size=BATCH_SIZE, records_per_file=256)
        start = time.perf_counter()
        summary = stages.run_predict(config, data, beam_options=beam_options)
        wall = time.perf_counter() - start
        assert summary["images_written"] == BEAM_IMAGES
        return summary["images_per_second"], wall - summary["seconds"]

    run("")  # Warm-up of the in-process side.
    local, beam, startup = [], [], []
    for pair in range(BEAM_PAIRS):
        for side in ((0, 1) if pair % 2 else (1, 0)):
            if side:
                rate, start_up = run(options)
                beam.append(rate)
                startup.append(start_up)
            else:
                local.append(run("")[0])
    shutil.rmtree(work, ignore_errors=True)
    ratios = np.array(beam) / np.array(local)
    print(f"Beam (B0 32px, {BEAM_IMAGES} images, blocks of 256, batch "
          f"{BATCH_SIZE}, 2 worker processes, load average "
          f"{os.getloadavg()[0]:.1f}):\n"
          f"  in-process img/s: {' '.join(f'{r:.0f}' for r in local)}\n"
          f"  Beam img/s:       {' '.join(f'{r:.0f}' for r in beam)}\n"
          f"  ratio per pair: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {np.median(ratios):.2f}; Beam start-up (left out) "
          f"{' '.join(f'{s:.1f}' for s in startup)} s", flush=True)
    return float(np.median(ratios)), float(np.median(startup))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        rss_child(int(sys.argv[2]))
        return
    if sys.argv[1:] == ["--beam-only"]:
        ratio, startup = beam_ratio()
        print(f"RESULT predict_beam ratio_beam_vs_local={ratio:.2f} "
              f"beam_startup_s={startup:.1f}")
        return
    start = time.time()
    growth = rss_growth()
    ratio = speed()
    jpeg_ratio, bytes_ratio = jpeg224()
    ov_ratio, max_diff = openvino224()
    beam, beam_startup = beam_ratio()
    print(f"total {time.time() - start:.0f} s", flush=True)
    print(f"RESULT predict ratio_vs_model_predict={ratio:.2f} "
          f"rss_growth_10x={growth:.3f} "
          f"ratio_vs_model_predict_jpeg224={jpeg_ratio:.2f} "
          f"bytes_ratio_jpeg224={bytes_ratio:.3f} "
          f"ratio_vs_openvino_f32_224={ov_ratio:.2f} "
          f"max_prob_diff_f32={max_diff:.1e} "
          f"ratio_beam_vs_local={beam:.2f} beam_startup_s={beam_startup:.1f}")


if __name__ == "__main__":
    main()
