"""The training and evaluation steps, built apart from the loop that runs them.

`make_train_loop(state, config, strategy, metrics)` returns a tf.function
that runs `num_steps` training steps over a distributed iterator in one call
(a `tf.range` loop, the TPU host-loop pattern), so Python runs once per loop,
not once per step. One step, per replica: forward the labeled and unlabeled
images as one batch (as the official code does, so batch norm sees both),
loss (see noisy_student.training.losses) divided by the *global* labeled batch,
gradients plus the L2 weight decay's gradient on non-BN weights, optimizer
(gradients summed over replicas by Keras; RMSProp as one fused kernel per
weight), EMA update, metric sums in SyncOnRead variables (`Metrics`).

`make_eval_loop` returns a tf.function that sums top-1 / top-5 hits of the
model over a distributed finite dataset (call it with the EMA weights
swapped in).
"""

import dataclasses
import inspect

import tensorflow as tf

from noisy_student.training import losses

# Order of the per-replica training sums kept in one SyncOnRead vector.
SUMS = ("loss", "labeled_ce", "unlabeled_ce", "correct", "n_labeled",
        "n_unlabeled")
# Order of the evaluation sums.
EVAL_SUMS = ("top1", "top5", "count")


@dataclasses.dataclass
class Metrics:
    """Per-replica sums the steps add to (SyncOnRead: read sums replicas).

    Attributes:
      sums: float32 [len(SUMS)]: the training sums since the last reset.
      eval_sums: float32 [3]: top-1 hits, top-5 hits, images.
      first_bad_step: int64 scalar: the first 1-based step whose loss was
        not finite, or -1. Every replica sees the same all-reduced loss, so
        the first replica's copy tells it.
    """
    sums: tf.Variable
    eval_sums: tf.Variable
    first_bad_step: tf.Variable


def create_metrics(strategy):
    """The `Metrics` variables, made in `strategy`'s scope."""
    on_read = dict(synchronization=tf.VariableSynchronization.ON_READ,
                   trainable=False)
    with strategy.scope():
        sums = tf.Variable(tf.zeros([len(SUMS)]), name="train_sums",
                           aggregation=tf.VariableAggregation.SUM, **on_read)
        eval_sums = tf.Variable(tf.zeros([len(EVAL_SUMS)]), name="eval_sums",
                                aggregation=tf.VariableAggregation.SUM,
                                **on_read)
        first_bad_step = tf.Variable(
            tf.constant(-1, tf.int64), name="first_bad_step",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, **on_read)
    return Metrics(sums, eval_sums, first_bad_step)


def _forward_loss(model, batch, config):
    """(logits, loss, labeled_ce, unlabeled_ce, n_labeled, labels) of one
    replica's batch; the loss is over the *global* labeled batch."""
    labeled = batch["labeled"]
    images = tf.cast(labeled["image"], tf.float32)
    labels = tf.cast(labeled["label"], tf.int32)
    n_labeled = tf.shape(images)[0]
    smoothing = config.optimizer.label_smoothing
    if config.loop.is_student:
        unlabeled = batch["unlabeled"]
        images = tf.concat(
            [images, tf.cast(unlabeled["image"], tf.float32)], axis=0)
    logits = tf.cast(model(images, training=True), tf.float32)
    if config.loop.is_student:
        loss, labeled_ce, unlabeled_ce = losses.noisy_student_loss(
            labels, logits[:n_labeled], config.loop.batch_size,
            targets=unlabeled["target"], unlabeled_logits=logits[n_labeled:],
            label_smoothing=smoothing,
            labeled_loss_weight=config.optimizer.labeled_loss_weight)
    else:
        loss, labeled_ce, unlabeled_ce = losses.noisy_student_loss(
            labels, logits, config.loop.batch_size, label_smoothing=smoothing)
    return logits, loss, labeled_ce, unlabeled_ce, n_labeled, labels


def make_replica_step(state, config, replicas, metrics):
    """The per-replica training step `fn(batch, step)` (`step` 0-based int64).

    Args:
      state: A `training.state.TrainState`.
      config: A `train_config.TrainConfig`.
      replicas: Replicas in sync (each adds its share of the L2 gradient).
      metrics: The `Metrics` the step adds to.

    Returns:
      The function (XLA-compiled with loop.jit_compile).
    """
    trainable = state.model.trainable_variables
    l2_ids = {id(v) for v in state.l2_variables}
    l2_mask = [id(v) in l2_ids for v in trainable]
    optimizer = state.optimizer

    def replica_step(batch, step):
        with tf.GradientTape() as tape:
            logits, loss, labeled_ce, unlabeled_ce, n_labeled, labels = (
                _forward_loss(state.model, batch, config))
            scaled_loss = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, trainable)
        if state.l2_variables:
            # The L2 term's gradient, weight_decay * w, added directly: the
            # same update as differentiating the term, with fewer ops.
            # Gradients are summed over replicas, so each adds its share,
            # and scaled like the loss (mixed_float16).
            coefficient = optimizer.scale_loss(tf.constant(
                config.optimizer.weight_decay / replicas, tf.float32))
            grads = [g + tf.cast(coefficient, g.dtype) * v if decay else g
                     for g, v, decay in zip(grads, trainable, l2_mask)]
        optimizer.apply_gradients(zip(grads, trainable))
        if state.ema is not None:
            state.ema.update(step + 1)
        _add_train_sums(metrics, step, logits, loss, labeled_ce, unlabeled_ce,
                        n_labeled, labels)

    if config.loop.jit_compile:
        return tf.function(replica_step, jit_compile=True)
    return replica_step


def _add_train_sums(metrics, step, logits, loss, labeled_ce, unlabeled_ce,
                    n_labeled, labels):
    """Adds one step's sums to `metrics` and notes a non-finite loss."""
    replica_context = tf.distribute.get_replica_context()
    global_loss = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, loss)
    predicted = tf.argmax(logits[:n_labeled], axis=-1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
    metrics.sums.assign_add(tf.stack([
        loss, tf.reduce_sum(labeled_ce), tf.reduce_sum(unlabeled_ce),
        correct, tf.cast(n_labeled, tf.float32),
        tf.cast(tf.shape(unlabeled_ce)[0], tf.float32)]))
    metrics.first_bad_step.assign(tf.where(
        (metrics.first_bad_step < 0) & ~tf.math.is_finite(global_loss),
        step + 1, metrics.first_bad_step))


def make_train_loop(state, config, strategy, metrics):
    """The training loop function of one host (the TPU host-loop pattern).

    Args:
      state: A `training.state.TrainState`.
      config: A `train_config.TrainConfig`.
      strategy: The run's tf.distribute strategy.
      metrics: The `Metrics` the steps add to.

    Returns:
      A tf.function `fn(iterator, start_step, num_steps)` that runs
      `num_steps` (int32) steps from `start_step` (int64, 0-based) on the
      distributed `iterator` and advances `state.step` by them.
    """
    replica_step = make_replica_step(
        state, config, strategy.num_replicas_in_sync, metrics)

    def train_loop(iterator, start_step, num_steps):
        for i in tf.range(num_steps):
            strategy.run(replica_step,
                         args=(next(iterator),
                               start_step + tf.cast(i, tf.int64)))
        state.step.assign_add(tf.cast(num_steps, tf.int64))

    return tf.function(train_loop)


def make_eval_loop(model, num_classes, strategy, dataset, metrics):
    """The evaluation loop function.

    Args:
      model: The model to evaluate (swap the EMA weights in first).
      num_classes: K; top-5 is top-min(5, K).
      strategy: The run's tf.distribute strategy.
      dataset: A distributed finite dataset of batches
        {"image": [b, S, S, C] in [0, 255], "label": [b] int}.
      metrics: The `Metrics` whose eval_sums the loop adds to.

    Returns:
      A tf.function `fn()` that adds the top-1 hits, top-5 hits and image
      count of every batch to `metrics.eval_sums`.
    """
    k = min(5, num_classes)

    def eval_step(batch):
        logits = tf.cast(model(tf.cast(batch["image"], tf.float32),
                               training=False), tf.float32)
        labels = tf.cast(tf.reshape(batch["label"], [-1]), tf.int32)
        top1 = tf.math.in_top_k(labels, logits, 1)
        top5 = tf.math.in_top_k(labels, logits, k)
        metrics.eval_sums.assign_add(tf.stack([
            tf.reduce_sum(tf.cast(top1, tf.float32)),
            tf.reduce_sum(tf.cast(top5, tf.float32)),
            tf.cast(tf.shape(labels)[0], tf.float32)]))

    def eval_loop():
        for batch in dataset:
            strategy.run(eval_step, args=(batch,))

    return tf.function(eval_loop)


def checked_dataset_fn(dataset_fn, config, start_step):
    """`dataset_fn` from `start_step` on, checked against the step's input.

    Args:
      dataset_fn: The `train_dataset_fn` of `training.loop.train_and_evaluate`
        (with or without a `start_step` keyword).
      config: A `train_config.TrainConfig`.
      start_step: The batch to start from (a resumed run's step).

    Returns:
      `fn(input_context) -> tf.data.Dataset` for
      `strategy.distribute_datasets_from_function`; the dataset raises
      ValueError when built if its element_spec does not fit the config.
    """
    takes_start = _takes_start_step(dataset_fn)

    def fn(input_context):
        if takes_start:
            dataset = dataset_fn(input_context, start_step=start_step)
        else:
            dataset = dataset_fn(input_context)
            if start_step:
                dataset = dataset.skip(start_step)
        per_replica = input_context.get_per_replica_batch_size(
            config.loop.batch_size)
        _check_element_spec(dataset.element_spec, config, per_replica)
        return dataset
    return fn


def _takes_start_step(dataset_fn):
    """True if `dataset_fn` accepts a `start_step` keyword."""
    try:
        parameters = inspect.signature(dataset_fn).parameters
    except (TypeError, ValueError):
        return False
    return "start_step" in parameters or any(
        p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _check(cond, expected, received):
    if not cond:
        raise ValueError(f"Expected train_dataset_fn to yield {expected}. "
                         f"Received: {received}")


def _check_element_spec(spec, config, per_replica):
    """Raises ValueError unless `spec` matches the batch contract."""
    size = config.model.resolved_image_size
    _check(isinstance(spec, dict) and "labeled" in spec,
           'dicts {"labeled": {...}, "unlabeled": {...}}',
           f"element_spec={spec}")
    labeled = spec["labeled"]
    _check(isinstance(labeled, dict) and {"image", "label"} <= set(labeled),
           'a "labeled" dict with "image" and "label"',
           f"labeled spec={labeled}")
    image = labeled["image"].shape
    _check(image.rank == 4 and image[1:3].as_list() in ([size, size],
                                                        [None, None]),
           f"labeled images of shape [batch, {size}, {size}, channels]",
           f"shape={image}")
    _check(image[0] in (None, per_replica),
           f"per-replica labeled batches of {per_replica} (batch_size="
           f"{config.loop.batch_size} over the replicas)",
           f"labeled image shape={image}")
    if not config.loop.is_student:
        _check("unlabeled" not in spec,
               'no "unlabeled" part for a teacher (unlabel_ratio=0)',
               f"keys={sorted(spec)}")
        return
    _check_unlabeled_spec(spec, config, per_replica)


def _check_unlabeled_spec(spec, config, per_replica):
    """The student's half of `_check_element_spec`."""
    ratio = config.loop.unlabel_ratio
    _check("unlabeled" in spec,
           f'an "unlabeled" part for a student (unlabel_ratio={ratio})',
           f"keys={sorted(spec)}")
    unlabeled = spec["unlabeled"]
    _check(isinstance(unlabeled, dict)
           and {"image", "target"} <= set(unlabeled),
           'an "unlabeled" dict with "image" and "target"',
           f"unlabeled spec={unlabeled}")
    expected = per_replica * ratio
    _check(unlabeled["image"].shape[0] in (None, expected),
           f"per-replica unlabeled batches of {expected} (batch x "
           "unlabel_ratio)",
           f"unlabeled image shape={unlabeled['image'].shape}")
    classes = config.model.num_classes
    _check(unlabeled["target"].shape[-1] in (None, classes),
           f"targets over {classes} classes",
           f"target shape={unlabeled['target'].shape}")
