"""tf.distribute strategies by name, and what the training loop asks of them.

Names (the `--strategy` flag of the training stage):
  default                the no-op default strategy: one device, no copies.
  one_device             OneDeviceStrategy on the first GPU, else the CPU.
  mirrored               MirroredStrategy over all local GPUs; with no GPU,
                         over all logical CPU devices (tests split the CPU in
                         two to exercise the multi-replica code path).
  multi_worker_mirrored  MultiWorkerMirroredStrategy; the cluster comes from
                         the TF_CONFIG environment variable. It must be made
                         before any other TensorFlow op runs in the process.
  tpu                    TPUStrategy on the TPU named by `tpu` (`local` on a
                         TPU VM, a name or grpc:// address otherwise).
"""

import tensorflow as tf

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored",
              "tpu")


def make_strategy(name, tpu=None):
    """Builds the tf.distribute strategy called `name`.

    Args:
      name: One of `STRATEGIES`.
      tpu: The TPU for `name='tpu'`: `local` on a TPU VM, or a TPU name or
        grpc:// address. Ignored by the other strategies.

    Returns:
      A `tf.distribute.Strategy`.

    Raises:
      ValueError: for an unknown name, or `tpu` missing for `name='tpu'`.
      RuntimeError: when no TPU answers at `tpu`. This takes well under a
        second with `tpu='local'` on a machine without a TPU.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Expected a strategy in {list(STRATEGIES)}. Received: "
            f"strategy={name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(
            gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus)
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return _make_tpu_strategy(tpu)


def _make_tpu_strategy(tpu):
    if not tpu:
        # An empty name would make the resolver query the GCE metadata server
        # for a TPU name; fail at once instead.
        raise ValueError(
            "Expected a TPU address for strategy='tpu' ('local' on a TPU VM, "
            f"or a TPU name / grpc:// address). Received: tpu={tpu!r}")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:
        # With no TPU, TF reports e.g. NotFoundError from deep inside the TPU
        # runtime; say what was asked for instead.
        raise RuntimeError(
            f"Expected a reachable TPU for strategy='tpu'. Received: "
            f"tpu={tpu!r}, which failed with {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy):
    """True on the worker that writes summaries, exports and config files.

    Single-worker strategies have one worker, the chief. In a multi-worker
    cluster it is the `chief` task, or worker 0 when there is none.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if isinstance(strategy, tf.distribute.TPUStrategy) or task_type is None:
        return True
    if task_type == "chief":
        return True
    jobs = resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in jobs


def is_multi_worker(strategy):
    """True when the strategy spans more than one worker process."""
    extended = strategy.extended
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())


def task_id(strategy):
    """This worker's task index (0 for single-worker strategies)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)
