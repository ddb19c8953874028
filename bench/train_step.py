"""Training images/s: our loop + our B0 vs keras.applications B0 + model.fit.

Same random data (batch 64, 32x32 and 64x64, 10 classes), same optimizer
settings (RMSProp rho 0.9, momentum 0.9, epsilon 1e-3), standard strides (not
the small-image variant), trainable parameter counts asserted equal. Our side
runs the full recipe step: label smoothing, L2 weight decay, stochastic depth,
dropout and the EMA of the weights. Warm-up (tracing, the first loop / epoch)
is excluded: each side runs 1 + TIMED windows of WINDOW steps (our log
windows, Keras' epochs) and reports its best timed window, which keeps the
numbers stable when other jobs share the CPU.

--precision (float32 | mixed_float16 | bfloat16) and --jit_compile apply to
both sides (Keras: the global dtype policy and compile(jit_compile=...)), for
accelerators; on this CPU keep the defaults (XLA is several times slower
here).

It also times the evidence study's student step (w0.5-d0.5, small-image
strides, 32 px, 64 labeled + 128 unlabeled random images per step, soft
targets; no RandAugment: the step alone), and, for each case, the fraction
of this machine's fp32 matmul throughput the step achieves: FLOPs per
trained image (3x the forward FLOPs TF's profiler counts, a multiply-add
being 2 FLOPs; the backward pass costing twice the forward is the usual
estimate, e.g. Kaplan et al. 2020, "Scaling laws", section 2.1) times
images/s, over the best GFLOP/s of a 1024x1024 fp32 matmul measured in the
same run.

On CPU in float32 it also times our loop with --nocpu_kernels (TF's own
ops instead of noisy_student/kernels/cpu_kernels.cc) at both sizes, in
the same run, so the kernels' share of the ratio is measured, not assumed.

Optionally (--diagnose) it also times our loop at 32 px without the EMA, with
one step per tf.function call, and with Keras' own RMSprop instead of the
fused kernel, to show where time goes.

    python bench/train_step.py [--diagnose] [--precision=P] [--jit_compile]

Last line: RESULT train ratio_vs_keras_fit_32=<x> ratio_vs_keras_fit_64=<y>
study_model_img_s=<z> peak_fraction_32=<f>
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from noisy_student.training import optimizers as optim  # pylint: disable=g-import-not-at-top
from noisy_student.training import config as train_config  # pylint: disable=g-import-not-at-top
from noisy_student.utils import reports  # pylint: disable=g-import-not-at-top
from noisy_student.training import loop as train_lib  # pylint: disable=g-import-not-at-top
from noisy_student.training import state  # pylint: disable=g-import-not-at-top

BATCH = 64
CLASSES = 10
WINDOW = {32: 10, 64: 5}
TIMED = 3
RMSPROP = dict(rho=0.9, momentum=0.9, epsilon=1e-3)


def random_data(size, count=4 * BATCH, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, count).astype("int32")
    return images, labels


def trainable_params(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


STUDY = dict(width=0.5, depth=0.5, small_images=True, unlabel_ratio=2)


def our_config(size, **overrides):
    values = dict(variant="b0", image_size=size, small_images=False,
                  num_classes=CLASSES, batch_size=BATCH,
                  images_per_epoch=4 * BATCH,
                  train_steps=(1 + TIMED) * WINDOW[size],
                  log_every=WINDOW[size], steps_per_loop=WINDOW[size],
                  checkpoint_every=0, verbose=False)
    values.update(overrides)
    return train_config.TrainConfig.from_fields(**values)


def time_ours(size, **overrides):
    """Best img/s over `train`'s log windows after the first (it traces).

    Images are labeled + unlabeled ones (a student, unlabel_ratio > 0, gets
    random soft targets for its unlabeled part).
    """
    config = our_config(size, **overrides)
    images, labels = random_data(size)
    ratio = config.loop.unlabel_ratio
    targets = tf.nn.softmax(tf.random.stateless_normal(
        [len(images), CLASSES], seed=[0, 1]))

    def dataset_fn(input_context):
        per_replica = input_context.get_per_replica_batch_size(BATCH)
        labeled = tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": labels}).repeat().batch(
                per_replica, drop_remainder=True)
        if not ratio:
            return labeled.map(lambda b: {"labeled": b}).prefetch(2)
        unlabeled = tf.data.Dataset.from_tensor_slices(
            {"image": images, "target": targets}).repeat().batch(
                per_replica * ratio, drop_remainder=True)
        return tf.data.Dataset.zip(labeled, unlabeled).map(
            lambda a, b: {"labeled": a, "unlabeled": b}).prefetch(2)

    with tempfile.TemporaryDirectory() as model_dir:
        train_lib.train_and_evaluate(config, model_dir, dataset_fn)
        rates = reports.read_tensorboard_scalars(
            os.path.join(model_dir, "logs", "train"), "images_per_sec")
    return max(rate for step, rate in rates.items()
               if step > config.loop.log_every)


def forward_flops(model, size):
    """FLOPs of one image's inference pass, as TF's profiler counts them."""
    from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-import-not-at-top
    function = tf.function(lambda x: model(x, training=False))
    graph = convert_to_constants.convert_variables_to_constants_v2(
        function.get_concrete_function(
            tf.TensorSpec([1, size, size, 3], tf.float32))).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options
                                         ).total_float_ops


def matmul_flops_per_s(n=1024, repeats=20):
    """Best fp32 FLOP/s of an n x n matmul on this machine (2 n^3 FLOPs)."""
    a = tf.random.stateless_normal([n, n], seed=[1, 2])
    b = tf.random.stateless_normal([n, n], seed=[3, 4])
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    matmul().numpy()  # Traces.
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul().numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def time_keras_fit(size, precision="float32", jit_compile=False):
    """Best img/s over model.fit's epochs of WINDOW steps after the first."""
    images, labels = random_data(size)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(train_config.PRECISIONS[precision])
    try:
        model = keras.applications.EfficientNetB0(
            weights=None, input_shape=(size, size, 3), classes=CLASSES)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-3, **RMSPROP),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit_compile)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    dataset = dataset.batch(BATCH, drop_remainder=True).prefetch(2)
    timer = _EpochTimer()
    model.fit(dataset, epochs=1 + TIMED, steps_per_epoch=WINDOW[size],
              verbose=0, callbacks=[timer])
    return WINDOW[size] * BATCH / min(timer.seconds[1:]), model


class _KerasRMSpropBuilder:
    """Temporarily makes our loop use Keras' RMSprop (unfused) instead."""

    def __enter__(self):
        self.saved = optim.FusedRMSprop.update_step
        optim.FusedRMSprop.update_step = keras.optimizers.RMSprop.update_step

    def __exit__(self, *exc):
        optim.FusedRMSprop.update_step = self.saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diagnose", action="store_true",
                        help="also time variants of our loop at 32 px")
    parser.add_argument("--precision", default="float32",
                        choices=sorted(train_config.PRECISIONS))
    parser.add_argument("--jit_compile", action="store_true")
    args = parser.parse_args()
    setting = dict(precision=args.precision, jit_compile=args.jit_compile)
    print(f"TF {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs (shared with other jobs: load average "
          f"{os.getloadavg()[0]:.1f} at start)")
    ratios, fractions = {}, {}
    peak = matmul_flops_per_s()
    print(f"fp32 matmul 1024x1024: {peak / 1e9:.1f} GFLOP/s (best of 20)")
    for size in (32, 64):
        ours_model = state.build_model(our_config(size))
        keras_rate, keras_model = time_keras_fit(size, **setting)
        ours_params = trainable_params(ours_model)
        keras_params = trainable_params(keras_model)
        assert ours_params == keras_params, (ours_params, keras_params)
        step_flops = 3 * forward_flops(ours_model, size)
        del ours_model, keras_model
        ours_rate = time_ours(size, **setting)
        ratios[size] = ours_rate / keras_rate
        fractions[size] = step_flops * ours_rate / peak
        print(f"{size}x{size}, batch {BATCH}, {args.precision}"
              f"{', XLA' if args.jit_compile else ''}, {ours_params:,} trainable "
              f"params: ours {ours_rate:.1f} img/s, keras fit "
              f"{keras_rate:.1f} img/s, ratio {ratios[size]:.2f}; "
              f"{step_flops / 1e6:.1f} MFLOPs per trained image, "
              f"{fractions[size]:.3f} of the matmul peak", flush=True)
        if setting["precision"] == "float32" and not args.jit_compile:
            plain_rate = time_ours(size, cpu_kernels=False)
            print(f"{size}x{size}: ours without the CPU kernels "
                  f"(--nocpu_kernels) {plain_rate:.1f} img/s: the kernels "
                  f"give {ours_rate / plain_rate:.2f}x, TF's ops alone "
                  f"{plain_rate / keras_rate:.2f}x Keras fit", flush=True)
    study_config = our_config(32, **STUDY)
    study_flops = 3 * forward_flops(state.build_model(study_config), 32)
    study_rate = time_ours(32, **STUDY, **setting)
    print(f"study student (w0.5-d0.5, small-image strides, 32 px, 64 + 128 "
          f"images per step): {study_rate:.1f} img/s, "
          f"{study_flops / 1e6:.1f} MFLOPs per trained image, "
          f"{study_flops * study_rate / peak:.3f} of the matmul peak",
          flush=True)
    if args.diagnose:
        base = time_ours(32)
        print(f"diagnose 32x32: full recipe {base:.1f} img/s", flush=True)
        for label, overrides in (("no EMA", {"ema_decay": 0.0}),
                                 ("1 step per tf.function",
                                  {"steps_per_loop": 1})):
            rate = time_ours(32, **overrides)
            print(f"diagnose 32x32: {label}: {rate:.1f} img/s "
                  f"({rate / base:.2f}x)", flush=True)
        with _KerasRMSpropBuilder():
            rate = time_ours(32)
        print(f"diagnose 32x32: Keras' unfused RMSprop: {rate:.1f} img/s "
              f"({rate / base:.2f}x)", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print(f"RESULT train ratio_vs_keras_fit_32={ratios[32]:.2f} "
          f"ratio_vs_keras_fit_64={ratios[64]:.2f} "
          f"study_model_img_s={study_rate:.1f} "
          f"peak_fraction_32={fractions[32]:.3f}")


if __name__ == "__main__":
    main()
