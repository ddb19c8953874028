"""Switching one model's layers to the CPU kernels' layers.

The switch changes layer classes and activation functions of the model it
is given, in place: no variables change (checkpoints and the placement of
variables already created under a tf.distribute strategy are untouched) and
no other model, class attribute or global is affected. `training.state`
calls it for a training model on CPU devices in float32 without XLA (the
kernels have no GPU, TPU or XLA kernel); exports are built fresh from the
model builder, so they never hold these layers.
"""

import keras

from noisy_student.kernels import layers as kernel_layers
from noisy_student.kernels import loader
from noisy_student.model import layers


def use_cpu_kernels(model):
    """Switches the model's batch norm + SiLU pairs, other SiLU activations,
    depthwise convolutions and squeeze-and-excitation gates to the CPU
    kernels (one kernel each way for each), when those kernels build on
    this machine. Call it after `training.state.use_fused_batch_norm` (only
    fused batch norms are paired with their SiLU).

    Args:
      model: A Keras model.

    Returns:
      The number of layers switched (0 when the kernels are unavailable).
    """
    if loader.library() is None:
        return 0
    switched = _fuse_batch_norm_silu(model)
    for layer in layers.all_layers(model):
        if getattr(layer, "activation", None) is keras.activations.silu:
            layer.activation = loader.silu
            switched += 1
        if type(layer) is layers.SmallMapDepthwiseConv2D:  # pylint: disable=unidiomatic-typecheck
            layer.__class__ = kernel_layers.KernelDepthwiseConv2D
            switched += 1
        if type(layer) is keras.layers.Multiply:  # pylint: disable=unidiomatic-typecheck
            layer.__class__ = kernel_layers.GateMultiply
            switched += 1
    return switched


def _fuse_batch_norm_silu(model):
    """Switches each fused batch norm whose only consumer is a SiLU
    activation to `kernel_layers.BatchNormSilu`, and that activation to the
    identity. Returns the number of layers switched."""
    switched = 0
    for layer in layers.all_layers(model):
        if not (isinstance(layer, keras.layers.Activation)
                and layer.activation is keras.activations.silu
                and len(layer._inbound_nodes) == 1):  # pylint: disable=protected-access
            continue
        parents = layer._inbound_nodes[0].parent_nodes  # pylint: disable=protected-access
        producer = parents[0].operation if len(parents) == 1 else None
        if (type(producer) is layers.FusedBatchNormalization  # pylint: disable=unidiomatic-typecheck
                and len(producer._outbound_nodes) == 1):  # pylint: disable=protected-access
            producer.__class__ = kernel_layers.BatchNormSilu
            layer.activation = keras.activations.linear
            switched += 2
    return switched
