"""Image sources, each named by one spec string that every stage accepts.

    tfds:NAME[:SPLIT]   a TensorFlow Datasets builder, e.g. tfds:svhn_cropped:train
                        or tfds:cifar10:train[:4000]; `data_dir` may be gs://.
    folder:PATH         one sub-folder per class holding JPEG, PNG, GIF, BMP,
                        WebP or JPEG XL files (sorted folder names give the
                        label ids and the class names); an unlabeled folder
                        may hold its images at any depth. Files are decoded
                        upright (JPEG EXIF orientation) by
                        `preprocess.decode_image`, as the SavedModel's
                        serve_bytes does. Every file is checked once before
                        use (`image_scan`): undecodable ones are skipped,
                        named in the log and in skipped_images.json, and not
                        counted; other image types are listed as ignored.
    tfrecord:PATTERN[,OPTION=VALUE...]
                        TFRecord shards (local or gs:// glob) of
                        tf.train.Example: the encoded image under
                        image/encoded, the class under image/class/label
                        (options image_key=, label_key=; first_label=1 for
                        ImageNet's 1-based labels, never guessed; names=FILE
                        of class names). Streamed; checked and counted once
                        (`tfrecords.scan_records`, cached beside the folder
                        scans): bad records are skipped and named like
                        undecodable folder files; the stored bytes pass
                        through to the prediction records.
    list:FILE[,names=FILE]
                        a text or CSV file of `path[,label]` lines (paths
                        relative to FILE's folder, or absolute, or gs://);
                        labels are ids or class names, the names from a
                        `# classes: a,b,...` header or names=FILE
                        (`file_lists`). Files checked once as a folder's.
    npz:PATH            arrays `x` (uint8, NHWC or NHW) and `y` (integers).
    idx:DIR[:SPLIT]     MNIST-format files (train-images-idx3-ubyte.gz, ...),
                        as Debian's dataset-fashion-mnist installs under
                        /usr/share/datasets/fashion-mnist. SPLIT: train | test.
    digits[:SPLIT]      scikit-learn's handwritten digits (shipped in its
                        wheel): 1,797 8x8 grey images, 10 classes, split with
                        seed 0 into train (1,437) and test (360).

A labeled source yields {"image": uint8 [H, W, C], "label": int32 []}; an
unlabeled one yields {"image": uint8 [H, W, C]} and never opens labels. A
`Subset` carves a seeded, class-balanced labeled part out of a source, and
the rest into validation and unlabeled parts (the standard SSL protocol).
"""

import dataclasses
import hashlib
import json

from absl import logging
import numpy as np
import tensorflow as tf

from noisy_student.data import arrays
from noisy_student.data import file_lists
from noisy_student.data import folders
from noisy_student.data import image_scan
from noisy_student.data import preprocess
from noisy_student.data import tfrecords

IMAGE_EXTENSIONS = image_scan.IMAGE_EXTENSIONS
# Data sets whose labels change under a horizontal flip (digits, house
# numbers, letters): training must not flip them.
NO_FLIP_NAMES = ("digits", "mnist", "svhn", "emnist", "kmnist", "idx")
PARTS = ("labeled", "unlabeled", "validation")


@dataclasses.dataclass(frozen=True)
class Subset:
    """A seeded split of one labeled source into SSL parts.

    Attributes:
      part: "labeled" (`per_class` images of every class), "validation"
        (`validation_size` images of the rest) or "unlabeled" (all others).
      per_class: Labeled images per class.
      validation_size: Images held out of the unlabeled part for choosing
        hyper-parameters.
      seed: Seed of the split; the three parts of one seed are disjoint.
    """
    part: str
    per_class: int
    validation_size: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(
                f"Expected a subset part in {PARTS}. Received: part={self.part!r}")
        if self.per_class <= 0:
            raise ValueError(
                f"Expected per_class > 0. Received: per_class={self.per_class}")
        if self.validation_size < 0:
            raise ValueError("Expected validation_size >= 0. Received: "
                             f"validation_size={self.validation_size}")


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """A loaded source.

    Attributes:
      dataset: Unbatched dicts, in a deterministic order.
      num_examples: Number of elements, when known.
      num_classes: Number of classes, when known (labeled sources).
      image_shape: (H, W, C) when every image has that shape, else None.
      allows_flip: Whether a horizontal flip keeps the labels valid.
      spec: The spec string it was loaded from.
      class_names: Names of the classes in label order, when the source has
        them (a folder's sorted sub-folder names, a TFDS label's names).
      scan: A folder source's `image_scan.ScanResult` (what it decoded,
        skipped and ignored), else None.
      files: A folder source's image paths in data set order, else None.
      content: A short hash of what the source yields (`content_key`):
        the images it reads, their labels and order, its subset and
        channels; another value means other data. None when unknown.
      read_range: A function (start, stop) -> the dataset of elements
        start..stop-1 that reads only those (folder, list, tfrecord and
        array sources), else None (`range` skips through the dataset).
    """
    dataset: tf.data.Dataset
    num_examples: int | None
    num_classes: int | None
    image_shape: tuple | None
    allows_flip: bool
    spec: str
    class_names: tuple | None = None
    scan: image_scan.ScanResult | None = None
    files: tuple | None = None
    content: str | None = None
    read_range: object = dataclasses.field(default=None, repr=False,
                                           compare=False)

    def range(self, start, stop):
        """The elements start..stop-1 of `dataset`, the same values.

        Args:
          start, stop: Element positions, 0 <= start <= stop.

        Returns:
          A tf.data.Dataset; a source with `read_range` reads only these
          elements (a Beam worker's block), others read and drop the ones
          before `start`.
        """
        if self.read_range is not None:
            return self.read_range(start, stop)
        return self.dataset.skip(start).take(stop - start)


def content_key(*parts):
    """A short hash of JSON-able `parts` (and of the bytes of any NumPy
    arrays among them): what identifies a source's content cheaply.

    A folder source counts by its scan's listing key (every file's path,
    size and modification time) and the files it keeps, an array source by
    its arrays' bytes, a TFDS source by its builder's name, version and
    split: a stage that resumes from earlier work compares this to the
    value it recorded (stages.check_inputs).
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(str((part.dtype, part.shape)).encode("utf-8"))
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True,
                                     default=str).encode("utf-8"))
    return digest.hexdigest()[:16]


def parse_spec(spec):
    """Splits "kind:rest" into (kind, path or name, split or None).

    Raises:
      ValueError: for an empty spec or an unknown kind.
    """
    if not spec:
        raise ValueError(f"Expected a data source spec. Received: spec={spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        return kind, "", rest or None
    if kind not in ("tfds", "folder", "npz", "idx", "tfrecord",
                    "list") or not rest:
        raise ValueError(
            "Expected a data source spec tfds:NAME[:SPLIT], folder:PATH, "
            "tfrecord:PATTERN[,OPTION=VALUE...], list:FILE[,names=FILE], "
            f"npz:PATH, idx:DIR[:SPLIT] or digits[:SPLIT]. Received: "
            f"spec={spec!r}")
    if kind == "tfds":
        name, _, split = rest.partition(":")
        return kind, name, split or None
    if kind == "idx":
        # A gs:// path keeps its own colon: split on the last one only when
        # what follows looks like a split name.
        head, sep, tail = rest.rpartition(":")
        if sep and head and "/" not in tail:
            return kind, head, tail
    return kind, rest, None


def load_source(spec, *, labeled=True, subset=None, channels=None,
                num_classes=None, data_dir=None, skip_corrupt=True,
                keep_encoded=False, class_names=None, scan_dir=None):
    """Loads the source named by `spec`.

    Args:
      spec: A spec string (see the module docstring).
      labeled: Whether to yield labels.
      subset: An optional `Subset` of a labeled source.
      channels: Output channels (1 or 3); grey images are repeated to 3,
        colour ones converted to 1. None keeps the source's.
      num_classes: If given, labels must lie in [0, num_classes).
      data_dir: TFDS data folder (local or gs://).
      skip_corrupt: Folder, list and tfrecord sources: leave out the
        files (records) the decoder rejects, named in the log and in
        scan_dir's skipped_images.json (True), or raise before any
        reading (False).
      keep_encoded: Folder, list and tfrecord sources also yield each
        file's (record's) image bytes as
        "encoded" (string []), and TFDS sources the bytes their Image
        feature stores (read with skip-decoding and decoded here by
        `preprocess.decode_image`, the records' own decoder), for records
        that keep them instead of re-encoding (the predict stage).
      class_names: The model's classes, in label order, for a folder source
        scored against a trained model (a test set): each sub-folder is
        labelled by its name's position here, so a folder holding some of
        the classes keeps their labels; a sub-folder of another name is an
        error. None numbers the sorted sub-folders (a training set).
      scan_dir: Folder of a folder source's scan report and cache
        (`image_scan.REPORT_FILE`); None scans without writing.

    Returns:
      An `ImageSource` whose num_examples counts only decodable files.

    Raises:
      image_scan.UndecodableImagesError: with skip_corrupt=False, naming
        the first undecodable file.
      ValueError, FileNotFoundError: for bad specs, paths or contents (a
        folder or class folder with no decodable image included).
    """
    kind, path, split = parse_spec(spec)
    if channels not in (None, 1, 3):
        raise ValueError(f"Expected channels 1 or 3. Received: channels={channels}")
    need_labels = labeled or subset is not None
    if kind == "tfds":
        return _load_tfds(spec, path, split, need_labels, labeled, subset,
                          channels, data_dir, num_classes, keep_encoded)
    if kind == "folder":
        known = class_names
        scan = image_scan.scan_folder(path, scan_dir)
        folders.check_scan(spec, scan, skip_corrupt)
        files, labels, class_names = folders.list_files(scan, need_labels, known)
        if need_labels and known is None:
            # A test set scored against a model may hold some of its
            # classes; a training set must have images of every class.
            folders.check_every_class_has_images(spec, labels,
                                                      class_names)
        if subset is not None:
            keep = subset_mask(labels, subset, len(class_names))
            files = [f for f, k in zip(files, keep) if k]
            labels = labels[keep]
        n_classes = len(class_names) if need_labels else None
        _check_num_classes(spec, n_classes, num_classes)
        return _file_source(spec, path, scan, files, labels, class_names,
                            labeled, n_classes, channels, keep_encoded)
    if kind == "list":
        return _load_list(spec, path, labeled, need_labels, subset, channels,
                          num_classes, skip_corrupt, keep_encoded,
                          class_names, scan_dir)
    if kind == "tfrecord":
        return _load_tfrecord(spec, path, labeled, need_labels, subset,
                              channels, num_classes, skip_corrupt,
                              keep_encoded, scan_dir)
    if kind == "npz":
        x, y = arrays.read_npz(path, need_labels)
    elif kind == "idx":
        x, y = arrays.read_idx(path, split or "train", need_labels)
    else:
        x, y = arrays.digits(split or "train")
    return _array_source(spec, x, y, labeled, subset, channels, num_classes,
                         _allows_flip(kind + path))


def _file_source(spec, path, scan, files, labels, class_names, labeled,
                 n_classes, channels, keep_encoded):
    """The `ImageSource` of image files (a folder's or a list's)."""
    files = list(files)
    labels = labels if labeled else None

    def read_range(start, stop):
        return folders.dataset(
            files[start:stop], None if labels is None else labels[start:stop],
            channels, keep_encoded)

    content = content_key(scan.key, files, labels,
                          list(class_names) if labeled and class_names
                          else None, channels)
    return ImageSource(
        read_range(0, len(files)), len(files),
        n_classes if labeled else None, None, _allows_flip(path), spec,
        tuple(class_names) if labeled and class_names else None, scan,
        tuple(files), content, read_range)


def _load_list(spec, rest, labeled, need_labels, subset, channels,
               num_classes, skip_corrupt, keep_encoded, known, scan_dir):
    """A `list:FILE` source (see `file_lists`)."""
    path, names_file = file_lists.parse(spec, rest)
    paths, labels, names = file_lists.read_list(spec, path, names_file,
                                                need_labels)
    scan = image_scan.scan_files(f"list:{path}", paths, scan_dir)
    folders.check_scan(spec, scan, skip_corrupt)
    good = set(scan.decoded)
    keep = np.asarray([p in good for p in paths], bool)
    files = [p for p, k in zip(paths, keep) if k]
    if need_labels:
        labels = labels[keep]
        if known is not None and names is not None:
            # A test list scored against a model: its names, its ids.
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"Expected class names of the model "
                    f"{list(known)[:20]} in {spec}. Received: {unknown[:10]}")
            labels = np.asarray([list(known).index(names[l]) for l in labels],
                                np.int32)
            names = tuple(known)
        n_classes = (len(names) if names is not None
                     else int(labels.max()) + 1)
        if num_classes is not None:
            _check_labels(spec, labels, num_classes)
            n_classes = num_classes
        elif known is None:
            folders.check_every_class_has_images(
                spec, labels, names or [str(c) for c in range(n_classes)])
        if subset is not None:
            mask = subset_mask(labels, subset, n_classes)
            files = [f for f, k in zip(files, mask) if k]
            labels = labels[mask]
    else:
        n_classes = None
    _check_num_classes(spec, n_classes if labeled else None, num_classes)
    return _file_source(spec, path, scan, files, labels, names, labeled,
                        n_classes, channels, keep_encoded)


def _load_tfrecord(spec, rest, labeled, need_labels, subset, channels,
                   num_classes, skip_corrupt, keep_encoded, scan_dir):
    """A `tfrecord:PATTERN` source (see `tfrecords`)."""
    pattern, fmt = tfrecords.parse(spec, rest)
    scan = tfrecords.scan_records(pattern, fmt, need_labels, scan_dir)
    if scan.skipped and not skip_corrupt:
        raise image_scan.UndecodableImagesError(scan)
    if not scan.num_records:
        raise ValueError(f"Expected at least one decodable record in {spec}. "
                         f"Received: {scan.summary()}: "
                         + "; ".join(scan.examples(3)))
    names = tfrecords.read_names(fmt, spec) if labeled else None
    n_classes, keep = None, None
    if need_labels:
        counts = np.asarray(scan.label_counts, np.int64)
        n_classes = len(names) if names else len(counts)
        if len(counts) > n_classes:
            raise ValueError(
                f"Expected labels in [0, {n_classes}) (the names= file's "
                f"classes) in {spec}. Received: labels up to "
                f"{len(counts) - 1}")
        if num_classes is not None:
            _check_labels(spec, np.nonzero(counts)[0], num_classes)
            n_classes = num_classes
        elif labeled or subset is not None:
            missing = np.nonzero(np.pad(counts, (0, n_classes - len(counts)))
                                 == 0)[0]
            if missing.size:
                hint = (" (ImageNet-format shards store labels 1..1000: add "
                        "first_label=1)" if missing[0] == 0 else "")
                raise ValueError(
                    f"Expected labels 0..K-1 with at least one image each in "
                    f"{spec}. Received: no image of class "
                    f"{missing[:20].tolist()}{hint}")
        if subset is not None:
            keep = subset_mask(tfrecords.read_labels(scan, fmt), subset,
                               n_classes)

    def read_range(start, stop):
        return tfrecords.dataset(scan, fmt, start, stop, labels=labeled,
                                 channels=channels,
                                 keep_encoded=keep_encoded, keep=keep)

    count = scan.num_records if keep is None else int(keep.sum())
    content = content_key(scan.key, dataclasses.asdict(fmt), labeled,
                          channels, None if keep is None else keep)
    return ImageSource(read_range(0, count), count,
                       n_classes if labeled else None, None,
                       _allows_flip(pattern), spec, names, None, None,
                       content, read_range)


def subset_mask(labels, subset, num_classes=None):
    """Boolean mask of the examples in `subset.part` for these labels.

    Every class contributes `subset.per_class` labeled examples, drawn with
    `subset.seed`; `subset.validation_size` of the others form the
    validation part; the unlabeled part is everything else.

    Args:
      labels: int array [N].
      subset: A `Subset`.
      num_classes: The source's class count; every class in
        [0, num_classes) is checked (default: those with an example).

    Raises:
      ValueError: if a class has fewer than `per_class` examples (a class
        with none included).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(subset.seed)
    order = rng.permutation(len(labels))
    labeled = np.zeros(len(labels), bool)
    classes = (np.unique(labels) if num_classes is None
               else range(num_classes))
    for c in classes:
        members = order[labels[order] == c]
        if len(members) < subset.per_class:
            raise ValueError(
                f"Expected at least {subset.per_class} examples of every "
                f"class (--labels_per_class={subset.per_class}). Received: "
                f"class {c} has {len(members)}")
        labeled[members[:subset.per_class]] = True
    rest = order[~labeled[order]]
    validation = np.zeros(len(labels), bool)
    validation[rest[:subset.validation_size]] = True
    if subset.part == "labeled":
        return labeled
    if subset.part == "validation":
        return validation
    return ~labeled & ~validation


def _allows_flip(name):
    return not any(n in name.lower() for n in NO_FLIP_NAMES)


def _check_num_classes(spec, found, expected):
    if expected is not None and found is not None and found != expected:
        raise ValueError(
            f"Expected {expected} classes in {spec}. Received: {found} classes")


def _check_contiguous(spec, y):
    """Raises ValueError unless the labels are 0..K-1, each with an image.

    The class count of an array source is inferred as max label + 1, so a
    gap (labels {0, 1, 7}) would silently train classes that have no image.
    """
    missing = np.setdiff1d(np.arange(int(y.max()) + 1), y)
    if missing.size:
        raise ValueError(
            f"Expected labels 0..K-1 with at least one image each in {spec}. "
            f"Received: labels {np.unique(y)[:20].tolist()}; no image of "
            f"class {missing[:20].tolist()} (renumber the labels 0..K-1)")


def _check_labels(spec, y, num_classes):
    if y.size and (y.min() < 0 or (num_classes is not None
                                   and y.max() >= num_classes)):
        expected = ("labels >= 0" if num_classes is None
                    else f"labels in [0, {num_classes})")
        raise ValueError(
            f"Expected {expected} in {spec}. Received: "
            f"labels from {y.min()} to {y.max()}")


def _convert_channels(image, channels):
    """Repeats grey to 3 channels or converts colour to grey."""
    return preprocess.to_channels(image, channels)


def _array_source(spec, x, y, labeled, subset, channels, num_classes,
                  allows_flip):
    if x.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images in {spec}. Received: "
                         f"dtype={x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"Expected images of shape NHWC or NHW in {spec}. "
                         f"Received: shape={x.shape}")
    if y is not None:
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"Expected integer labels in {spec}. Received: "
                             f"dtype={y.dtype}")
        if len(y) != len(x):
            raise ValueError(f"Expected as many labels as images in {spec}. "
                             f"Received: {len(x)} images, {len(y)} labels")
        _check_labels(spec, y, num_classes)
    if len(x) == 0:
        raise ValueError(f"Expected at least one image in {spec}. Received: 0")
    n_classes = None if y is None else int(y.max()) + 1
    if num_classes is not None and y is not None:
        n_classes = num_classes
    elif y is not None and (labeled or subset is not None):
        _check_contiguous(spec, y)
    if subset is not None:
        keep = subset_mask(y, subset, n_classes)
        x, y = x[keep], y[keep]
    out_channels = channels or x.shape[-1]

    def read_range(start, stop):
        if labeled:
            ds = tf.data.Dataset.from_tensor_slices(
                {"image": x[start:stop],
                 "label": y[start:stop].astype(np.int32)})
        else:
            ds = tf.data.Dataset.from_tensor_slices({"image": x[start:stop]})
        if out_channels != x.shape[-1]:
            ds = ds.map(lambda d: {**d, "image": _convert_channels(
                d["image"], out_channels)})
        return ds

    content = content_key(x, y if labeled else None, out_channels)
    return ImageSource(read_range(0, len(x)), len(x),
                       n_classes if labeled else None,
                       x.shape[1:3] + (out_channels,), allows_flip, spec,
                       content=content, read_range=read_range)


def _load_tfds(spec, name, split, need_labels, labeled, subset, channels,
               data_dir, expected_classes=None, keep_encoded=False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    split = split or "train"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        info = builder.info
        # Pass-through: the Image feature's stored bytes (PNG/JPEG) go into
        # the prediction records as they are, decoded once below.
        encoded = keep_encoded and isinstance(info.features["image"],
                                              tfds.features.Image)
        ds = builder.as_dataset(
            split=split, shuffle_files=False,
            decoders=({"image": tfds.decode.SkipDecoding()} if encoded
                      else None))
    except Exception as e:  # TFDS raises many types; name the source.
        raise FileNotFoundError(
            f"Expected a prepared TFDS data set (run tfds build or give "
            f"data_dir). Received: spec={spec}, data_dir={data_dir}: {e}") from e
    label_feature = info.features["label"] if "label" in info.features else None
    if need_labels and label_feature is None:
        raise ValueError(f"Expected a 'label' feature in {spec}. Received: "
                         f"{list(info.features)}")
    num_classes = label_feature.num_classes if label_feature else None
    _check_num_classes(spec, num_classes, expected_classes)
    if subset is not None:
        labels = np.fromiter(
            (int(l) for l in ds.map(lambda d: d["label"]).as_numpy_iterator()),
            np.int64)
        keep = subset_mask(labels, subset, num_classes)
        mask = tf.constant(keep)
        ds = ds.enumerate().filter(lambda i, d: tf.gather(mask, i)).map(
            lambda i, d: d)
    out_channels = channels
    stored_channels = info.features["image"].shape[-1]

    def select(d):
        image = d["image"]
        out = {}
        if encoded:
            out["encoded"] = image
            # The channels TFDS would decode to; the records' reader
            # decodes the same bytes with the same function.
            image = preprocess.decode_image(image, channels=stored_channels)
            image.set_shape(info.features["image"].shape)
        out["image"] = _convert_channels(image, out_channels)
        if labeled:
            out["label"] = tf.cast(d["label"], tf.int32)
        return out

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    shape = info.features["image"].shape
    fixed = shape if None not in shape else None
    if fixed is not None and channels:
        fixed = fixed[:2] + (channels,)
    try:
        count = info.splits[split].num_examples
    except Exception:  # Sliced or unknown splits.
        count = None
    if subset is not None:
        count = int(keep.sum())
    logging.info("Loaded %s (%s examples)", spec, count)
    names = None
    if labeled and label_feature is not None and getattr(
            label_feature, "names", None):
        names = tuple(label_feature.names)
    content = content_key(
        name, str(info.version), split, count, labeled, out_channels,
        None if subset is None else dataclasses.asdict(subset))
    return ImageSource(ds, count, num_classes if labeled else None, fixed,
                       _allows_flip(name), spec, names, content=content)
