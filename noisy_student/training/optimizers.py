"""Optimizers, learning-rate schedules and the moving average of the weights.

Recipe (official EfficientNet code, tensorflow/tpu models/official/efficientnet
utils.py / main.py, which google-research/noisystudent reuses):
- RMSProp with rho 0.9, momentum 0.9, epsilon 1e-3;
- learning rate `base_learning_rate * batch_size / 256` (0.016 per 256
  labeled images),
  linear warm-up over 5 epochs, then x0.97 every 2.4 epochs (staircase) or a
  cosine decay over the whole run;
- an exponential moving average (EMA) of the weights, decay 0.9999, used for
  evaluation, export and teaching.
"""

import math

import keras
import tensorflow as tf

from noisy_student.model import layers

OPTIMIZERS = ("rmsprop", "sgd", "adam", "adamw")
LR_SCHEDULES = ("exponential", "cosine", "constant")


@keras.saving.register_keras_serializable(package="noisy_student")
class WarmupDecaySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then exponential (staircase), cosine or constant.

    At 0-based step t:
      t < warmup_steps:  peak_lr * (t + 1) / warmup_steps
      exponential:       peak_lr * decay_rate ** floor(t / decay_steps)
      cosine:            peak_lr * (1 + cos(pi * t / total_steps)) / 2
      constant:          peak_lr
    As in the official code the decay counts from step 0, warm-up included.
    The warm-up uses t + 1 (the official code uses t), so that the first step
    already moves the weights and the last warm-up step reaches peak_lr.

    Args:
      peak_lr: Learning rate after warm-up.
      warmup_steps: Steps of linear warm-up (0: none).
      decay: One of `LR_SCHEDULES`.
      decay_steps: Steps per exponential decay (2.4 epochs in the recipe).
      decay_rate: Factor per `decay_steps` (0.97 in the recipe).
      total_steps: Length of the cosine decay (the whole run).
    """

    def __init__(self, peak_lr, warmup_steps=0, decay="exponential",
                 decay_steps=1.0, decay_rate=0.97, total_steps=1):
        if decay not in LR_SCHEDULES:
            raise ValueError(f"Expected decay in {list(LR_SCHEDULES)}. "
                             f"Received: decay={decay!r}")
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.decay_steps = float(decay_steps)
        self.decay_rate = float(decay_rate)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.decay == "exponential":
            lr = self.peak_lr * tf.pow(
                self.decay_rate, tf.floor(step / self.decay_steps))
        elif self.decay == "cosine":
            progress = tf.minimum(step / float(self.total_steps), 1.0)
            lr = 0.5 * self.peak_lr * (1.0 + tf.cos(math.pi * progress))
        else:
            lr = tf.constant(self.peak_lr, tf.float32)
        if self.warmup_steps > 0:
            warm = self.peak_lr * (step + 1.0) / float(self.warmup_steps)
            lr = tf.where(step < float(self.warmup_steps), warm, lr)
        return lr

    def get_config(self):
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps,
                "decay": self.decay, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "total_steps": self.total_steps}


@keras.saving.register_keras_serializable(package="noisy_student")
class FusedRMSprop(keras.optimizers.RMSprop):
    """keras.optimizers.RMSprop whose update is one fused TF kernel per weight.

    Same arithmetic as Keras' RMSprop (and TF's ResourceApplyRMSProp):
      ms  = rho * ms + (1 - rho) * g^2
      mom = momentum * mom + lr * g / sqrt(ms + epsilon)
      w   = w - mom
    Keras runs this as about a dozen small ops per weight; the fused kernel
    does it in one pass, which matters on CPUs where the ~200 weights of an
    EfficientNet make per-op overhead a visible share of a step. Centered
    RMSprop, momentum 0 and sparse gradients fall back to Keras' code.
    (The TF1 RMSPropOptimizer of the official code starts `ms` at 1, Keras at
    0; this class keeps Keras' 0, the warm-up covers the difference.)
    """

    def update_step(self, gradient, variable, learning_rate):
        if (self.centered or self.momentum <= 0
                or isinstance(gradient, tf.IndexedSlices)):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyRMSProp(
            var=variable.handle,
            ms=self._velocities[index].handle,
            mom=self._momentums[index].handle,
            lr=tf.cast(learning_rate, dtype),
            rho=tf.cast(self.rho, dtype),
            momentum=tf.cast(self.momentum, dtype),
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))


def build_optimizer(name, learning_rate, *, momentum=0.9, rho=0.9,
                    epsilon=1e-3, decoupled_weight_decay=None,
                    no_decay_variables=(), loss_scale=False):
    """Builds a Keras 3 optimizer by name.

    Args:
      name: One of `OPTIMIZERS`: rmsprop (`FusedRMSprop`, the paper's),
        sgd (with momentum), adam, adamw.
      learning_rate: A float or a LearningRateSchedule.
      momentum: Momentum of rmsprop and sgd.
      rho: RMSprop's decay of the squared-gradient average.
      epsilon: RMSprop's epsilon (1e-3 in the recipe). Adam uses Keras'.
      decoupled_weight_decay: AdamW's decoupled weight decay.
      no_decay_variables: Variables AdamW must not decay (batch norm).
      loss_scale: Wrap in a dynamic `LossScaleOptimizer` (mixed_float16).

    Returns:
      An unbuilt `keras.optimizers.Optimizer`.
    """
    if name == "rmsprop":
        optimizer = FusedRMSprop(learning_rate, rho=rho, momentum=momentum,
                                 epsilon=epsilon)
    elif name == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum)
    elif name == "adam":
        optimizer = keras.optimizers.Adam(learning_rate)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(
            learning_rate, weight_decay=decoupled_weight_decay or 0.0)
        if no_decay_variables:
            optimizer.exclude_from_weight_decay(
                var_list=list(no_decay_variables))
    else:
        raise ValueError(f"Expected an optimizer in {list(OPTIMIZERS)}. "
                         f"Received: optimizer={name!r}")
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def ema_decay_at(decay, num_updates, warmup=True):
    """The EMA decay used by update number `num_updates` (1-based).

    With `warmup`, `min(decay, (1 + n) / (10 + n))`, as TF's
    ExponentialMovingAverage(num_updates=global_step) in the official code
    does: early averages follow the weights closely, so short runs get a
    useful average instead of one stuck near the random initialisation.

    Args:
      decay: The final decay (0.9999 in the recipe).
      num_updates: int or tensor, updates made so far including this one.
      warmup: Apply the warm-up.

    Returns:
      A float32 tensor.
    """
    decay = tf.constant(decay, tf.float32)
    if not warmup:
        return decay
    n = tf.cast(num_updates, tf.float32)
    return tf.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_source_variables(model):
    """The variables whose moving average is kept, in `model.weights` order.

    Trainable weights plus the moving statistics of trainable batch-norm
    layers, like the official code (trainable variables + moving mean and
    variance). Frozen layers never change, so they need no average; the
    random-number state of dropout / stochastic depth is not a weight.
    """
    sources = {id(v) for v in model.trainable_variables}
    for layer in layers.all_layers(model):
        if (isinstance(layer, keras.layers.BatchNormalization)
                and layer.trainable):
            sources.update({id(layer.moving_mean), id(layer.moving_variance)})
    return [v for v in model.weights if id(v) in sources]


class ExponentialMovingAverage:
    """Moving averages of a list of variables, under any tf.distribute strategy.

    Build it inside `strategy.scope()`. The averages start at the variables'
    current values. `update` is called inside the replica step (after the
    optimizer); it moves into the cross-replica context with `merge_call` and
    updates every device's copy from that device's copy of the variable with
    `strategy.extended.update`, so no cross-device traffic is added (the same
    scheme Keras' optimizer uses for its own EMA).

    Attributes:
      averages: The average variables (checkpoint these).
      sources: The averaged model variables.
    """

    def __init__(self, variables, decay=0.9999, warmup=True):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.sources = list(variables)
        self._strategy = tf.distribute.get_strategy()
        self.averages = []
        for v in self.sources:
            source = _tf_variable(v)
            with self._strategy.extended.colocate_vars_with(source):
                self.averages.append(tf.Variable(
                    source.read_value(), trainable=False,
                    name="ema/" + getattr(v, "path", source.name).replace(
                        ":", "_")))
        self._swap_fn = tf.function(self._swap)

    def update(self, num_updates):
        """Moves every average toward its variable.

        Args:
          num_updates: Updates made so far including this one (the 1-based
            training step), for the warm-up.
        """
        one_minus_decay = 1.0 - ema_decay_at(self.decay, num_updates,
                                             self.warmup)

        def merge_fn(strategy, one_minus_decay):
            for average, source in zip(self.averages, self.sources):
                strategy.extended.update(
                    average, _ema_step, args=(_tf_variable(source),
                                              one_minus_decay),
                    group=False)

        replica_context = tf.distribute.get_replica_context()
        if replica_context is None:
            merge_fn(self._strategy, one_minus_decay)
        else:
            replica_context.merge_call(merge_fn, args=(one_minus_decay,))

    def swap(self):
        """Exchanges model weights and averages on every device.

        Call it twice to undo: evaluate with EMA weights in between.
        """
        self._swap_fn()

    def _swap(self):
        for average, source in zip(self.averages, self.sources):
            self._strategy.extended.update(
                _tf_variable(source), _swap_pair, args=(average,),
                group=False)

    def numpy_averages(self):
        """{id(source variable): numpy average} (the first replica's)."""
        return {id(s): a.numpy() for s, a in zip(self.sources, self.averages)}


def _ema_step(average, source, one_minus_decay):
    # average -= (1 - decay) * (average - source), as one fused kernel.
    return tf.raw_ops.ResourceApplyGradientDescent(
        var=average.handle, alpha=tf.cast(one_minus_decay, average.dtype),
        delta=average.read_value() - tf.cast(source, average.dtype))


def _swap_pair(a, b):
    a_value = tf.identity(a.read_value())
    a.assign(b.read_value())
    b.assign(a_value)


def _tf_variable(variable):
    """The tf.Variable (possibly distributed) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable

