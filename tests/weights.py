"""Helpers shared by the tests that need seeded, Keras-independent weights.

Imported by test modules as `import weights` (pytest puts tests/ on
sys.path, as for train_worker.py).
"""

import numpy as np


def redraw_weights(model, seed):
    """Re-draws every kernel of `model` from a seeded numpy generator.

    Same scales as the builder's initialisers (variance 2 / fan_out for
    convolutions, 1 / (3 fan_out) for the head).

    The tests' thresholds were set on these numpy-drawn weights, which stay
    the same across Keras versions and initialiser changes.

    Args:
      model: A built keras.Model; its "kernel" weights are overwritten.
      seed: Seed of the numpy generator.

    Returns:
      The same model.
    """
    rng = np.random.RandomState(seed)
    for weight in model.weights:
        if "kernel" in weight.path:
            shape = tuple(weight.shape)
            if len(shape) == 4:
                std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
            else:
                std = np.sqrt(1.0 / (3.0 * shape[-1]))
            weight.assign(rng.normal(0.0, std, shape).astype(np.float32))
    return model
