"""Custom Keras layers used by the EfficientNet builder and its training."""

import keras
from keras import ops
import numpy as np
import tensorflow as tf

# ImageNet channel statistics on the [0, 255] pixel scale, as the official
# EfficientNet code uses them. The model normalises inside, so an exported
# model takes raw pixels.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def all_layers(model):
    """Every layer under `model`, nested models included (depth first)."""
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        yield layer
        stack.extend(getattr(layer, "layers", []) or [])


class _SameShape(keras.layers.Layer):
    """A layer whose output has its input's shape (told to Keras directly,
    so that Keras need not trace `call` to infer it)."""

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="noisy_student")
class StochasticDepth(_SameShape):
    """Drops a residual branch for whole samples (Huang et al., 2016).

    At training time each sample's branch is kept with probability
    `keep = 1 - rate` and, when kept, scaled by `1 / keep`, so the expected
    output equals the input. At inference the layer is the identity.

    Args:
        rate: Probability of dropping a sample's branch, in [0, 1).
        seed: Optional integer seed for the per-sample keep mask.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        rate = float(rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(
                    f"Expected StochasticDepth rate in [0, 1). Received: rate={rate}")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        mask_shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        # The mask is drawn in float32 so that float16 rounding cannot shift the
        # keep probability under mixed precision.
        mask = ops.floor(keep + keras.random.uniform(
                mask_shape, seed=self.seed_generator, dtype="float32"))
        return inputs * ops.cast(mask / keep, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="noisy_student")
class PixelNormalization(_SameShape):
    """Maps [0, 255] pixels to per-channel zero mean and unit variance.

    Args:
        mean: Per-channel mean on the [0, 255] scale.
        stddev: Per-channel standard deviation on the [0, 255] scale.
    """

    def __init__(self, mean=IMAGENET_MEAN_RGB, stddev=IMAGENET_STDDEV_RGB,
                              **kwargs):
        super().__init__(**kwargs)
        if len(mean) != len(stddev):
            raise ValueError(
                    "Expected mean and stddev of the same length. Received: "
                    f"mean={mean}, stddev={stddev}")
        self.mean = tuple(float(m) for m in mean)
        self.stddev = tuple(float(s) for s in stddev)

    def call(self, inputs):
        mean = ops.convert_to_tensor(self.mean, dtype=inputs.dtype)
        stddev = ops.convert_to_tensor(self.stddev, dtype=inputs.dtype)
        return (inputs - mean) / stddev

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="noisy_student")
class PointwiseConv2D(keras.layers.Conv2D):
    """A 1x1, stride-1 Conv2D computed as one matrix product.

    Same weights, names and outputs as `keras.layers.Conv2D(filters, 1)`;
    checkpoints of either load into the other. The difference is speed on
    CPU: TF's Conv2DBackpropInput kernel is slow on small feature maps (the
    squeeze-and-excitation convs see 1x1 maps, the last blocks 1x1 or 2x2 at
    32 px), e.g. 30 ms for a 1x1x320 -> 1280 conv on 64 images where the
    equivalent matmul gradient takes 1.5 ms. It compiles under XLA like
    any matmul (the jit-compiled train step test covers it).
    """

    def __init__(self, filters, **kwargs):
        kwargs.setdefault("kernel_size", 1)
        super().__init__(filters, **kwargs)
        if (self.kernel_size != (1, 1) or self.strides != (1, 1)
                or self.dilation_rate != (1, 1) or self.groups != 1
                or self.data_format != "channels_last"):
            raise ValueError(
                "Expected a 1x1, stride-1, ungrouped, channels_last conv. "
                f"Received: kernel_size={self.kernel_size}, strides="
                f"{self.strides}, dilation_rate={self.dilation_rate}, "
                f"groups={self.groups}, data_format={self.data_format}")

    def convolution_op(self, inputs, kernel):
        channels_in, channels_out = kernel.shape[-2:]
        shape = ops.shape(inputs)
        outputs = ops.matmul(ops.reshape(inputs, (-1, channels_in)),
                             ops.reshape(kernel, (channels_in, channels_out)))
        return ops.reshape(outputs, (*shape[:-1], channels_out))


# Feature maps of at most this many pixels take SmallMapDepthwiseConv2D's
# gather path (measured: faster than TF's CPU kernel for 1x1 and 2x2 maps,
# slower from 4x4 on; see BENCHMARKS.md, training speed).
SMALL_MAP_PIXELS = 4


@keras.saving.register_keras_serializable(package="noisy_student")
class SmallMapDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """A depthwise conv that is fast on CPU for feature maps of 1x1 or 2x2.

    Same weights, names and outputs (to float rounding) as
    `keras.layers.DepthwiseConv2D`; checkpoints of either load into the
    other. On a map of at most `SMALL_MAP_PIXELS` pixels (static shape),
    every output pixel p is a per-channel weighted sum of the input pixels q
    it sees through the kernel: out[b, p, c] = sum_q x[b, q, c] * T[p, q, c],
    where T gathers the kernel tap that joins p and q under "same" padding
    (zero where none does). That is one broadcast multiply and a sum, whose
    gradients are elementwise too, where TF's depthwise kernels and their
    gradients cost 2-10x more on such maps (the last stages of an
    EfficientNet at 32-64 px are 1x1 or 2x2). Larger maps, and any
    non-static shape, use the standard op.

    Supports what the EfficientNet uses: depth_multiplier 1, "same"
    padding, channels_last, no dilation.
    """

    def __init__(self, kernel_size, **kwargs):
        super().__init__(kernel_size, **kwargs)
        if (self.depth_multiplier != 1 or self.padding != "same"
                or self.data_format != "channels_last"
                or self.dilation_rate != (1, 1)):
            raise ValueError(
                "Expected depth_multiplier=1, padding='same', channels_last "
                f"and no dilation. Received: depth_multiplier="
                f"{self.depth_multiplier}, padding={self.padding}, "
                f"data_format={self.data_format}, dilation_rate="
                f"{self.dilation_rate}")

    def call(self, inputs):
        if not self.is_small_map(inputs):
            return self.call_large_map(inputs)
        height, width = inputs.shape[1], inputs.shape[2]
        taps, out_height, out_width = _tap_index(
            height, width, self.kernel_size, self.strides)
        channels = inputs.shape[-1]
        kernel = ops.reshape(ops.cast(self.kernel, inputs.dtype),
                             (-1, channels))
        # Index len(kernel) is a zero tap: pixel pairs no tap joins.
        kernel = ops.concatenate(
            [kernel, ops.zeros((1, channels), inputs.dtype)], axis=0)
        matrix = ops.take(kernel, taps, axis=0)  # [P, Q, C]
        pixels = ops.reshape(inputs, (-1, 1, height * width, channels))
        outputs = ops.sum(pixels * matrix, axis=2)
        return self._finish(
            ops.reshape(outputs, (-1, out_height, out_width, channels)))

    @staticmethod
    def is_small_map(inputs):
        """Whether `inputs` (NHWC) has a static map of at most
        `SMALL_MAP_PIXELS` pixels."""
        height, width = inputs.shape[1], inputs.shape[2]
        return (height is not None and width is not None
                and height * width <= SMALL_MAP_PIXELS)

    def call_large_map(self, inputs):
        """The standard depthwise op (subclasses swap in their own)."""
        return super().call(inputs)

    def _finish(self, outputs):
        if self.use_bias:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


def _tap_index(height, width, kernel_size, strides):
    """[P, Q] kernel-tap index joining output pixel p and input pixel q.

    "same" padding as TF computes it: out = ceil(in / stride), total padding
    max((out - 1) * stride + kernel - in, 0), the smaller half before.
    Pairs no tap joins get index kh * kw (the zero tap).
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    out_h, out_w = -(-height // sh), -(-width // sw)
    top = max((out_h - 1) * sh + kh - height, 0) // 2
    left = max((out_w - 1) * sw + kw - width, 0) // 2
    index = np.full((out_h * out_w, height * width), kh * kw, np.int32)
    for oy in range(out_h):
        for ox in range(out_w):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * sh + ky - top, ox * sw + kx - left
                    if 0 <= iy < height and 0 <= ix < width:
                        index[oy * out_w + ox, iy * width + ix] = ky * kw + kx
    return index, out_h, out_w


@keras.saving.register_keras_serializable(package="noisy_student")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training step is one fused kernel.

    Keras 3 computes batch norm in training as a dozen separate ops (moments,
    rsqrt, scale, shift, and their gradients); TF's FusedBatchNormV3 does the
    forward and the backward pass in one kernel each (oneDNN on CPU, cuDNN on
    GPU, XLA on TPU). In A/B runs on this project's 2-core CPU it made a B0
    training step about 1.1x (32 px) and 1.2-1.3x (64 px) faster. Same
    arithmetic as Keras: batch statistics in float32, moving averages of the
    batch mean and the *biased* batch variance. Inference, frozen layers, masks and
    synchronized (cross-replica) batch norm use Keras' own code.
    """

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
            epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # The kernel returns the unbiased variance; Keras averages the biased.
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
        self._update_moving_averages(mean, variance * (count - 1.0) / count)
        return tf.cast(outputs, self.compute_dtype)

    def _fusable(self, inputs, training, mask):
        """Whether this call normalises an NHWC batch by its own statistics
        in a way the fused kernels cover."""
        axis = self.axis if self.axis >= 0 else len(inputs.shape) + self.axis
        return bool(training and self.trainable and mask is None
                    and not self.synchronized and not self.renorm
                    and len(inputs.shape) == 4 and axis == 3
                    and self.scale and self.center)

    def _update_moving_averages(self, mean, variance):
        """Keras' update, from the batch mean and *biased* variance."""
        self.moving_mean.assign(self.moving_mean * self.momentum
                                + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum
                                    + variance * (1.0 - self.momentum))
