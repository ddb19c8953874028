"""Throughput of our RandAugment vs keras_cv's and Keras core's, in tf.data.

Run:  python bench/augment.py  [--seconds=3 --rounds=3 --magnitude=10]

All three run in the same tf.data pipeline on the same uint8 images (random
square crops of scikit-image's sample photos, resized), N=2 layers at the same
magnitude (ours: M on the 0..10 scale; keras_cv / Keras: M/10 on their 0..1
scale, see `augment.keras_cv_magnitude`), at 32 px and 224 px:

  source (64 images, repeat) -> [batch 32] -> map(augment, AUTOTUNE)
                                           -> [batch 32] -> prefetch

How each is used (its best fair use):
  * ours: mapped over batches of 32; it draws an op per image inside a batch.
  * keras_cv.layers.RandAugment: measured both over batches of 32 and per
    image; the faster of the two is its score (it also draws ops per image
    in a batch).
  * keras.layers.RandAugment: per image. Mapped over a batch it applies the
    same two ops to every image of the batch, which is not RandAugment's
    per-image noise, so that use would not be a fair comparison.

Each measurement builds a fresh iterator, skips warm-up batches (tracing,
autotuning), then counts images for `--seconds`. Methods are interleaved in
`--rounds` rounds and the median per method is reported, since other
processes share this machine's cores. The last line is
`RESULT augment ratio_vs_keras_cv_224=<x> ratio_vs_keras_cv_32=<y>`.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from noisy_student.data import randaugment  # pylint: disable=g-import-not-at-top

BATCH = 32
POOL = 64


def sample_images(size, count=POOL, seed=0):
    """`count` uint8 [size, size, 3] crops of scikit-image's sample photos."""
    import skimage.data  # pylint: disable=g-import-not-at-top
    photos = [skimage.data.astronaut(), skimage.data.chelsea(),
              skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y = rng.integers(0, h - side + 1)
        x = rng.integers(0, w - side + 1)
        crop = photo[y:y + side, x:x + side]
        crops.append(tf.image.resize(crop, [size, size], antialias=True))
    images = tf.stack(crops)
    return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)


def build_pipeline(images, fn, per_image):
    """The shared pipeline: `fn` mapped per image or per batch of 32."""
    ds = tf.data.Dataset.from_tensor_slices(images).repeat()
    if per_image:
        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(BATCH, drop_remainder=True)
    else:
        ds = ds.batch(BATCH, drop_remainder=True)
        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(1)


def measure(ds, seconds, warmup_batches):
    """Images per second from a fresh iterator, warm-up excluded."""
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    count = 0
    start = time.perf_counter()
    while True:
        batch = next(it)
        count += int(batch.shape[0])
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    del it
    return count / elapsed


def make_methods(num_layers, magnitude):
    """name -> (fn(uint8 image(s)) -> uint8, per_image)."""
    import keras  # pylint: disable=g-import-not-at-top

    ours = randaugment.make_augmenter("randaugment", num_layers, magnitude,
                                  seed=0)
    kcv = randaugment.make_augmenter("keras_cv", num_layers, magnitude, seed=0)
    core = keras.layers.RandAugment(
        value_range=(0, 255), num_ops=num_layers,
        factor=randaugment.keras_cv_magnitude(magnitude), seed=0)

    def core_fn(image):
        out = core(tf.cast(image, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    return {
        "ours (batch 32)": (lambda x: ours(x), False),
        "keras_cv (batch 32)": (lambda x: kcv(x), False),
        "keras_cv (per image)": (lambda x: kcv(x), True),
        "keras (per image)": (core_fn, True),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="Timed seconds per measurement.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Interleaved rounds; the median is reported.")
    parser.add_argument("--magnitude", type=float, default=10.0,
                        help="M on the paper's 0..10 scale.")
    parser.add_argument("--num_layers", type=int, default=2, help="N.")
    parser.add_argument("--sizes", default="32,224", help="Image sizes (px).")
    args = parser.parse_args(argv)

    methods = make_methods(args.num_layers, args.magnitude)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    t0 = time.perf_counter()
    for size in sizes:
        images = sample_images(size)
        pipelines = {name: build_pipeline(images, fn, per_image)
                     for name, (fn, per_image) in methods.items()}
        rates = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, ds in pipelines.items():
                warmup = 2 if methods[name][1] else 3
                rates[name].append(measure(ds, args.seconds, warmup))
        results[size] = {name: statistics.median(r) for name, r in
                         rates.items()}
        print(f"# {size} px done ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)

    names = list(methods)
    print(f"\nRandAugment N={args.num_layers}, M={args.magnitude:g} "
          f"(keras: {randaugment.keras_cv_magnitude(args.magnitude):g}), "
          f"images/s, median of {args.rounds} x {args.seconds:g} s, "
          f"{os.cpu_count()} CPUs")
    header = f"{'method':24s}" + "".join(f"{s:>10d}px" for s in sizes)
    print(header)
    for name in names:
        print(f"{name:24s}" + "".join(f"{results[s][name]:12.0f}"
                                      for s in sizes))
    ratios = {}
    for size in sizes:
        best_kcv = max(results[size]["keras_cv (batch 32)"],
                       results[size]["keras_cv (per image)"])
        ratios[size] = results[size]["ours (batch 32)"] / best_kcv
        core = results[size]["keras (per image)"]
        print(f"{size} px: ours / best keras_cv = {ratios[size]:.2f}x, "
              f"ours / keras = "
              f"{results[size]['ours (batch 32)'] / core:.1f}x")
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(f"RESULT augment ratio_vs_keras_cv_224={ratios.get(224, 0.0):.2f} "
          f"ratio_vs_keras_cv_32={ratios.get(32, 0.0):.2f}")


if __name__ == "__main__":
    main()
