"""tf.data input streams for training and evaluation.

A training element (one per replica and step) is
    {"labeled":   {"image": float32 [B, S, S, C], "label": int32 [B]},
     "unlabeled": {"image": float32 [B*r, S, S, C],
                   "target": float32 [B*r, num_classes]}}
with r = `unlabel_ratio`; a teacher's elements have no "unlabeled" key. The
two streams are batched separately and zipped, so every batch holds exactly r
unlabeled images per labeled one. Each stream runs shuffle -> repeat ->
parallel map (crop, flip) -> batch (drop_remainder, static shapes) ->
RandAugment on the whole batch -> prefetch.

With a seed, batch k of a stream is a function of k alone: the shuffle order
is seeded, and image i's crop and batch k's RandAugment take the stateless
seeds [seed, i] and [seed, k]. A run resumed at step k asks for the stream
from batch k (`start_step`): the skipped images are read and shuffled but not
cropped or augmented, and the batches that follow are the ones an
uninterrupted run would have got. The stream does not depend on anything
else in the process (`seeded_shuffle`): the same config gives the same
batches whatever ran before it.
"""

import dataclasses

import tensorflow as tf

from noisy_student.data import preprocess
from noisy_student.data import randaugment as augment

AUTOTUNE = tf.data.AUTOTUNE
SMALL_IMAGE_AUGMENT = {"translate_frac": 1 / 8, "cutout_frac": 1 / 8}


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How training images are noised and shuffled: the `input` part of
    `training.config.TrainConfig` (which holds the image size, batch size,
    unlabel_ratio and seed the stream also takes).

    Attributes:
      augment: "randaugment" (ours, the paper's ops), "keras_cv" or "none"
        (`randaugment.AUGMENT_KINDS`).
      num_layers: RandAugment's N (paper: 2).
      magnitude: RandAugment's M on the paper's 0..10+ scale.
      flip: Random left-right flips (only for data sets that allow them).
      shuffle_buffer: Elements in each shuffle buffer.

    Raises:
      ValueError: for a value out of range (the message names the field).
    """
    augment: str = "randaugment"
    num_layers: int = 2
    magnitude: float = 10.0
    flip: bool = False
    shuffle_buffer: int = 10_000

    def __post_init__(self):
        if self.augment not in augment.AUGMENT_KINDS:
            raise ValueError(f"Expected augment in {augment.AUGMENT_KINDS}. "
                             f"Received: augment={self.augment!r}")
        if not (isinstance(self.num_layers, int) and self.num_layers >= 0):
            raise ValueError("Expected an integer num_layers >= 0. "
                             f"Received: num_layers={self.num_layers!r}")
        if self.magnitude < 0:
            raise ValueError("Expected magnitude >= 0. Received: "
                             f"magnitude={self.magnitude!r}")
        if not (isinstance(self.shuffle_buffer, int)
                and self.shuffle_buffer > 0):
            raise ValueError("Expected an integer shuffle_buffer > 0. "
                             f"Received: shuffle_buffer={self.shuffle_buffer!r}")


def seeded_shuffle(dataset, buffer_size, seed, op_seed):
    """`dataset.shuffle` whose order depends on its seeds alone.

    `tf.data.Dataset.shuffle(seed=op_seed)` pairs `op_seed` with the
    process's global seed (`tf.random.set_seed`, which
    `keras.utils.set_random_seed` calls) as it stands when the dataset is
    built, or with a fixed default when none was set: the same call gave
    another order after other code had seeded TensorFlow. This builds the
    same shuffle with both seeds given, which is what `shuffle` does after
    `tf.random.set_seed(seed)`: a training run's stream (built after
    `training.state.create_train_state` seeds TensorFlow with the run's seed)
    is unchanged.

    Args:
      dataset: Any tf.data.Dataset.
      buffer_size: Elements in the shuffle buffer (int > 0).
      seed: The global half of the seed pair (int).
      op_seed: The op half (int).

    Returns:
      The shuffled dataset, reshuffled on each iteration (each epoch of a
      `repeat` gets another order), with `dataset`'s element_spec.
    """
    specs = tf.nest.flatten(dataset.element_spec)
    variant = tf.raw_ops.ShuffleDatasetV3(
        input_dataset=tf.data.experimental.to_variant(dataset),
        buffer_size=tf.constant(buffer_size, tf.int64),
        seed=tf.constant(seed, tf.int64),
        seed2=tf.constant(op_seed, tf.int64),
        seed_generator=tf.raw_ops.DummySeedGenerator(),
        reshuffle_each_iteration=True,
        output_types=[spec.dtype for spec in specs],
        output_shapes=[spec.shape for spec in specs])
    return tf.data.experimental.from_variant(variant, dataset.element_spec)


def _stream(dataset, config, image_size, seed, per_replica_batch,
            input_context, augmenter, salt, start_step=0):
    """One shuffled, repeated, preprocessed, batched and augmented stream,
    from its batch `start_step` on (`config` an `InputConfig`, `seed` the
    run's or None)."""
    if input_context and input_context.num_input_pipelines > 1:
        dataset = dataset.shard(input_context.num_input_pipelines,
                                input_context.input_pipeline_id)
    run_seed, seed = seed, None
    if run_seed is None:
        dataset = dataset.shuffle(config.shuffle_buffer,
                                  reshuffle_each_iteration=True)
    else:
        pipeline_id = input_context.input_pipeline_id if input_context else 0
        seed = run_seed * 1000 + pipeline_id * 10 + salt
        dataset = seeded_shuffle(dataset, config.shuffle_buffer, run_seed,
                                 seed)
    dataset = dataset.repeat()
    # Element i is cropped with the stateless seed [seed, i]: reproducible
    # under parallel map. Without a seed, each run draws its own base seed.
    base_seed = seed if seed is not None else int(
        tf.random.uniform((), maxval=2**31 - 1, dtype=tf.int64))

    def crop(index, element):
        image = preprocess.train_image(
            element["image"], image_size, flip=config.flip,
            seed=tf.stack([tf.constant(base_seed, tf.int64), index]))
        return {**element, "image": image}

    dataset = dataset.enumerate()
    if start_step:
        # Skipped before the crop: resuming costs reading, not augmenting.
        dataset = dataset.skip(start_step * per_replica_batch)
    dataset = dataset.map(crop, num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(per_replica_batch, drop_remainder=True)
    # Whole batches are augmented at once (the ops are vectorised); with a
    # seed, batch i gets the stateless seed [seed, i], so the stream does not
    # depend on thread timing.
    dataset = augment.augment_dataset(dataset, augmenter, seed=seed,
                                      start_index=start_step)
    return dataset.map(
        lambda batch: {**batch, "image": tf.cast(batch["image"], tf.float32)},
        num_parallel_calls=AUTOTUNE)


def train_dataset_fn(labeled, config, *, image_size, batch_size,
                     unlabel_ratio=0, seed=None, unlabeled=None,
                     num_classes=None):
    """Returns `dataset_fn(input_context)` for distribute_datasets_from_function.

    Args:
      labeled: Unbatched {"image": uint8, "label": int32} dataset.
      config: An `InputConfig` (a TrainConfig's `input`).
      image_size: Side of the model's input, in pixels.
      batch_size: Labeled images per global batch.
      unlabel_ratio: Unlabeled images per labeled image in a batch (the
        paper's unlabel_ratio; 0 for a teacher).
      seed: Seed of shuffling, crops and augmentation (the run's); None for
        a random one.
      unlabeled: Unbatched {"image": uint8, "target": float32 [num_classes]}
        dataset (the selected pseudo-labels), required when
        unlabel_ratio > 0.
      num_classes: Length of the targets, checked against `unlabeled`.

    Returns:
      `dataset_fn(input_context=None, start_step=0)`: the per-replica
      training stream from its batch `start_step` on (what training.loop asks
      for when it resumes from a checkpoint at that step). With a seed, the
      stream resumed at step k equals the uninterrupted stream without its
      first k batches.

    Raises:
      ValueError: if the pseudo-labels are missing or of the wrong length,
        or keras_cv's RandAugment is asked for 1-channel images.
    """
    channels = labeled.element_spec["image"].shape[-1]
    if config.augment == "keras_cv" and channels == 1:
        # keras_cv's colour ops (RandomColorDegeneration ...) need RGB.
        raise ValueError(
            "Expected augment='randaugment' or 'none' for 1-channel images "
            "(keras_cv's RandAugment needs RGB). Received: "
            "augment='keras_cv', channels=1")
    if unlabel_ratio > 0:
        if unlabeled is None:
            raise ValueError("Expected pseudo-labeled data when "
                             f"unlabel_ratio={unlabel_ratio} > 0. "
                             "Received: unlabeled=None")
        target_len = unlabeled.element_spec["target"].shape[-1]
        if num_classes is not None and target_len not in (None, num_classes):
            raise ValueError(
                f"Expected pseudo-label targets of length {num_classes}. "
                f"Received: length {target_len}")
    # Small images take the official CIFAR/SVHN translate and cutout sizes
    # (an eighth of a side) instead of ImageNet's 100 and 40 of 224.
    sizes = SMALL_IMAGE_AUGMENT if (
        config.augment == "randaugment"
        and preprocess.uses_small_image_augment(image_size)) else {}

    def dataset_fn(input_context=None, start_step=0):
        batch = batch_size
        if input_context is not None:
            batch = input_context.get_per_replica_batch_size(batch)
        augmenter = augment.make_augmenter(
            config.augment, num_layers=config.num_layers,
            magnitude=config.magnitude,
            seed=None if seed is None else seed + 7, **sizes)

        def stream(dataset, per_replica_batch, salt):
            return _stream(dataset, config, image_size, seed,
                           per_replica_batch, input_context, augmenter, salt,
                           start_step=start_step)

        streams = {"labeled": stream(labeled, batch, salt=1)}
        if unlabel_ratio > 0:
            streams["unlabeled"] = stream(unlabeled, batch * unlabel_ratio,
                                          salt=2)
        return tf.data.Dataset.zip(streams).prefetch(AUTOTUNE)

    return dataset_fn


def eval_dataset(dataset, image_size, batch_size, *, channels=None,
                 recipe=None):
    """Batched, clean evaluation images (the last batch may be smaller).

    Args:
      dataset: Unbatched {"image": uint8 [H, W, C], ...} dataset.
      image_size: The model's input side.
      batch_size: Images per batch.
      channels: The model's input channels (None keeps the source's).
      recipe: The model's `preprocess.Recipe` (default: the default one).

    Returns:
      A dataset of {"image": float32 [b, S, S, C], ...} batches, each image
      through `preprocess.eval_image`.
    """
    def clean(element):
        image = preprocess.eval_image(element["image"], image_size,
                                      channels, recipe)
        return {**element, "image": tf.cast(image, tf.float32)}

    return dataset.map(clean, num_parallel_calls=AUTOTUNE).batch(
        batch_size).prefetch(AUTOTUNE)
