"""The layers that run `kernels.loader`'s CPU kernels.

Each subclasses the model's own layer and adds behaviour only (same
variables, names and checkpoints), so `kernels.switch.use_cpu_kernels` can
switch one model's layers to them in place without touching another
model: there is no process-wide switch. The model, serving and evaluation
code never import this package.
"""

import keras
from keras import ops
import tensorflow as tf

from noisy_student.kernels import loader
from noisy_student.model import layers


@keras.saving.register_keras_serializable(package="noisy_student")
class KernelDepthwiseConv2D(layers.SmallMapDepthwiseConv2D):
    """`layers.SmallMapDepthwiseConv2D` whose maps larger than
    `layers.SMALL_MAP_PIXELS` run `loader.depthwise_conv2d` (its filter
    gradient is one kernel where TF's generic one is slow on CPU) when the
    strides are equal; other strides use the standard op."""

    def call_large_map(self, inputs):
        """`loader.depthwise_conv2d` for equal strides, else the standard
        op."""
        if self.strides[0] != self.strides[1]:
            return super().call_large_map(inputs)
        return self._finish(loader.depthwise_conv2d(
            inputs, ops.cast(self.kernel, inputs.dtype), self.strides[0]))


@keras.saving.register_keras_serializable(package="noisy_student")
class GateMultiply(keras.layers.Multiply):
    """keras.layers.Multiply whose product of a [N, H, W, C] map and a
    [N, 1, 1, C] gate (squeeze-and-excitation's) runs
    `loader.channel_scale`: the gradient of both inputs in one pass
    where TF takes a broadcast multiply, another multiply and a sum.
    `kernels.switch.use_cpu_kernels` switches a training model's Multiply
    layers to it in place (no state); other inputs use Keras' own code.
    """

    def call(self, inputs):
        if len(inputs) == 2:
            x, gate = inputs
            if (len(x.shape) == 4 and tuple(gate.shape[1:3]) == (1, 1)
                    and gate.shape[-1] == x.shape[-1]):
                return loader.channel_scale(x, gate)
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="noisy_student")
class BatchNormSilu(layers.FusedBatchNormalization):
    """Batch norm followed by SiLU, trained with one CPU kernel each way.

    `kernels.switch.use_cpu_kernels` switches, in place, a
    `FusedBatchNormalization` whose only consumer is a SiLU `Activation` to
    this class and that activation to the identity, in every mode: same
    function, same variables. In training on float32 NHWC batches it runs
    `loader.batch_norm_silu` (about 2x TF's fused batch norm plus SiLU,
    forward + backward, BENCHMARKS.md "CPU kernels"); otherwise the parent's
    batch norm, then SiLU.
    """

    def call(self, inputs, training=None, mask=None):
        if not (self._fusable(inputs, training, mask)
                and inputs.dtype == tf.float32):
            return loader.silu(
                super().call(inputs, training=training, mask=mask))
        outputs, mean, variance = loader.batch_norm_silu(
            inputs, self.gamma, self.beta, self.epsilon)
        self._update_moving_averages(mean, variance)
        return outputs
