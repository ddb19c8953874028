"""Custom Keras layers used by the EfficientNet builder."""

import keras
from keras import ops

# ImageNet channel statistics on the [0, 255] pixel scale, as the official
# EfficientNet code uses them. The model normalises inside, so an exported
# model takes raw pixels.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@keras.saving.register_keras_serializable(package="noisy_student")
class StochasticDepth(keras.layers.Layer):
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

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="noisy_student")
class PixelNormalization(keras.layers.Layer):
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

    def compute_output_shape(self, input_shape):
        return input_shape

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
