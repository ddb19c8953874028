"""Pretrained weights in: official checkpoints, Keras weight files, ours.

Three kinds of source give an EfficientNet its starting weights, detected from
the path (local or gs://):

- `tf1`: a TF1 checkpoint of the official EfficientNet code
  (tensorflow/tpu `models/official/efficientnet`), which the released Noisy
  Student checkpoints (google-research/noisystudent) use too: a folder with a
  `checkpoint` file, or a prefix such as `.../model.ckpt` (its `.index` file
  exists). Variables are named `efficientnet-bX/stem/conv2d/kernel`,
  `.../blocks_N/{conv2d,conv2d_1,depthwise_conv2d,se/conv2d,se/conv2d_1}/...`,
  `.../tpu_batch_normalization{,_1,_2}/...` and `.../head/{conv2d,dense}/...`
  (efficientnet_model.py creates a block's convolutions and batch norms in
  that order). Where a `.../ExponentialMovingAverage` copy exists it is
  loaded, as the official evaluation does; EMA-only checkpoints (the released
  L2) load too. The pixels are normalised as the official code does (ImageNet
  mean/stddev in 0-255 units), or scaled to [-1, 1] for AdvProp checkpoints
  (`normalization="advprop"`).
- `keras_h5`: a Keras applications EfficientNetB0-B7 weight file (`.h5`,
  `.weights.h5`, with or without its top), read by Keras itself into a
  `keras.applications` model. Its `normalization` layer stores the ImageNet
  *stddev* as its variance; `keras.applications` corrects it with an extra
  `Rescaling(1/sqrt(stddev))` when it loads ImageNet weights (keras-team's
  note on TF issue 49930). When the stored variance equals those stddev
  values, they are taken as the stddev (the function the weights were trained
  for); otherwise the variance is a variance.
- `model.keras`: a model of this package (a training run's folder or a
  `.keras` file); its own normalisation is kept.

`read` turns any of them into `PretrainedWeights` (arrays keyed by our layer
and variable names, which are keras.applications' names), `apply` copies them
into a model built by `noisy_student.model.efficientnet`, and `convert` writes the
result as `model.keras`, loadable wherever a trained model is accepted.

Size: the three readers share one variable-name map, one check (missing,
extra, wrongly shaped variables) and one `apply`; kept together so that the
name map is written once. A module per reader is the natural split when a
fourth kind of source comes.
"""

import dataclasses
import re

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from noisy_student.model import efficientnet
from noisy_student.model import layers as ns_layers
from noisy_student.utils import storage

TF1 = "tf1"
KERAS_H5 = "keras_h5"
MODEL_KERAS = "model.keras"
MODEL_FILE = "model.keras"
CONVERT_FILE = "convert.json"
HEAD = "predictions"
NORMALIZE = "normalize"
EMA_SUFFIX = "/ExponentialMovingAverage"

# Pixel normalisation (mean, stddev) in 0-255 units per RGB channel.
# imagenet: the official EfficientNet code's MEAN_RGB / STDDEV_RGB.
# advprop: AdvProp checkpoints were trained on pixels scaled to [-1, 1].
NORMALIZATIONS = {
    "imagenet": (ns_layers.IMAGENET_MEAN_RGB, ns_layers.IMAGENET_STDDEV_RGB),
    "advprop": ((127.5,) * 3, (127.5,) * 3),
}
# What keras.applications' EfficientNet stores as its normalisation
# "variance" (the stddev, on the [0, 1] scale).
_KERAS_STORED_STDDEV = (0.229, 0.224, 0.225)
_BN_RE = re.compile(r"^(?:tpu_)?batch_normalization(?:_(\d+))?$")
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """Weights of one source, in this package's names.

    Attributes:
      path: The source path.
      kind: `TF1`, `KERAS_H5` or `MODEL_KERAS`.
      weights: {layer name: {variable name: np.ndarray}}, e.g.
        weights["block2a_expand_conv"]["kernel"] of shape [1, 1, 16, 96].
      mean, stddev: Pixel normalisation per channel, 0-255 units.
      num_classes: Classes of the source's head; None without a head.
      small_images: The source's stride layout (False for ImageNet
        checkpoints: standard strides).
      ema: For TF1 sources, whether EMA copies were loaded.
    """
    path: str
    kind: str
    weights: dict
    mean: tuple
    stddev: tuple
    num_classes: int | None
    small_images: bool
    ema: bool | None = None

    def summary(self):
        """JSON-able description (no arrays)."""
        return {"path": self.path, "kind": self.kind,
                "num_classes": self.num_classes, "mean": list(self.mean),
                "stddev": list(self.stddev), "ema": self.ema,
                "small_images": self.small_images}


def detect_kind(path, what="checkpoint"):
    """The kind of source at `path`.

    Args:
      path: The source path.
      what: The flag or argument that gave it, for messages.

    Returns:
      `TF1`, `KERAS_H5` or `MODEL_KERAS`.

    Raises:
      FileNotFoundError: if nothing usable is at `path`.
      ValueError: for a TF2 object checkpoint or a SavedModel (not a source
        of weights here), naming what to pass instead.
    """
    path = str(path).rstrip("/")
    try:
        return _detect_kind(path, what)
    except tf.errors.OpError as e:  # e.g. gs:// unreachable or forbidden
        raise FileNotFoundError(
            f"Expected a readable checkpoint ({type(e).__name__}: "
            f"{e.message}). Received: {what}={path}") from e


def _detect_kind(path, what):
    if path.endswith(".keras") and tf.io.gfile.exists(path):
        return MODEL_KERAS
    if path.endswith(".h5") and tf.io.gfile.exists(path):
        return KERAS_H5
    if tf.io.gfile.isdir(path):
        if tf.io.gfile.exists(storage.join(path, MODEL_FILE)):
            return MODEL_KERAS
        if tf.io.gfile.exists(storage.join(path, "saved_model.pb")):
            raise ValueError(
                "Expected pretrained weights (a TF1 checkpoint, a Keras .h5 "
                "file or model.keras); a SavedModel is for serving. Pass the "
                f"training folder it was exported from. Received: "
                f"{what}={path}")
        prefix = tf.train.latest_checkpoint(path)
        if prefix is not None:
            return _tf_kind(prefix, path, what)
    elif tf.io.gfile.exists(path + ".index"):
        return _tf_kind(path, path, what)
    raise FileNotFoundError(
        "Expected a TF1 checkpoint (a folder with a `checkpoint` file, or a "
        "prefix like .../model.ckpt), a Keras applications .h5 weight file, "
        "or model.keras (or a folder holding it). Received: "
        f"{what}={path}")


def _tf_kind(prefix, path, what):
    names = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    if "_CHECKPOINTABLE_OBJECT_GRAPH" in names:
        raise ValueError(
            "Expected a TF1 checkpoint of the official EfficientNet code. "
            "Received a TF2 object checkpoint (a training run's checkpoints/?"
            " pass the run's folder, which holds model.keras): "
            f"{what}={path}")
    return TF1


def source_small_images(path):
    """The stride layout of a source: False for ImageNet checkpoints (TF1,
    Keras files), the model's own for model.keras.

    Raises:
      FileNotFoundError, ValueError: as `detect_kind`.
    """
    if detect_kind(path) != MODEL_KERAS:
        return False
    return _read_model_keras(str(path).rstrip("/")).small_images


def fingerprint(path):
    """What identifies a source's content cheaply: each file's size and mtime.

    Returns:
      {"path": path, "files": [[name, bytes, mtime_ns], ...]}, sorted.

    Raises:
      FileNotFoundError: as `detect_kind`.
    """
    path = str(path).rstrip("/")
    kind = detect_kind(path)
    if tf.io.gfile.isdir(path):
        if kind == MODEL_KERAS:
            files = [storage.join(path, MODEL_FILE)]
        else:
            files = tf.io.gfile.glob(tf.train.latest_checkpoint(path) + "*")
    elif kind == TF1:
        files = tf.io.gfile.glob(path + ".*")
    else:
        files = [path]
    entries = []
    for name in sorted(files):
        stat = tf.io.gfile.stat(name)
        entries.append([name, int(stat.length), int(stat.mtime_nsec)])
    return {"path": path, "files": entries}


def read(path, model, normalization="imagenet", what="checkpoint"):
    """Reads the weights of any source kind for an EfficientNet `model`.

    Args:
      path: Source path (see the module docstring).
      model: Model name of the target: b0..b8, l2 or wW-dD. TF1 sources need
        its depth (to number the blocks); Keras files its variant (b0..b7).
      normalization: "imagenet" or "advprop": the pixel scaling a TF1
        checkpoint was trained with (ignored for the other kinds, which
        carry theirs).
      what: The flag or argument that gave `path`, for messages.

    Returns:
      A `PretrainedWeights`.

    Raises:
      FileNotFoundError: if nothing usable is at `path`.
      ValueError: for an unknown model or normalisation, or a file that does
        not fit the model (the message names the source and, where it can
        tell, the model it was made for).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Expected normalization in {sorted(NORMALIZATIONS)}."
                         f" Received: normalization={normalization!r}")
    path = str(path).rstrip("/")
    kind = detect_kind(path, what)
    if kind == TF1:
        return _read_tf1(path, model, normalization)
    if normalization != "imagenet":
        logging.warning("normalization=%s is for TF1 checkpoints; %s (%s) "
                        "carries its own and keeps it", normalization, path,
                        kind)
    if kind == KERAS_H5:
        return _read_keras_h5(path, model)
    return _read_model_keras(path)


# ----------------------------------------------------------------- TF1 ---

def _block_layout(depth):
    """[(stage, index, has_expand)] of every block, in network order."""
    layout = []
    for stage, args in enumerate(efficientnet.BLOCKS, start=1):
        for index in range(efficientnet.round_repeats(args.repeats, depth)):
            layout.append((stage, index, args.expand_ratio != 1))
    return layout


def _tf1_target(rest, layout):
    """Our (layer, variable) for an official name below the model scope.

    Returns None for a name that is not a model weight of a known block
    (the caller reports it as extra).
    """
    parts = rest.split("/")
    if parts[0] in ("stem", "head"):
        prefix = "stem_" if parts[0] == "stem" else "top_"
        if len(parts) == 3 and parts[1] == "conv2d" and parts[2] == "kernel":
            return prefix + "conv", "kernel"
        if len(parts) == 3 and parts[1] == "dense" and parts[0] == "head":
            return HEAD, parts[2]
        if len(parts) == 3 and _BN_RE.match(parts[1]) and parts[2] in _BN_VARS:
            return prefix + "bn", parts[2]
        return None
    match = re.match(r"^blocks_(\d+)$", parts[0])
    if not match or int(match.group(1)) >= len(layout):
        return None
    stage, index, has_expand = layout[int(match.group(1))]
    block = efficientnet.block_name(stage, index)
    body, var = parts[1:-1], parts[-1]
    if body == ["depthwise_conv2d"] and var == "depthwise_kernel":
        return block + "dwconv", "kernel"
    if body in (["se", "conv2d"], ["se", "conv2d_1"]) and var in ("kernel",
                                                                  "bias"):
        return block + ("se_reduce" if body[1] == "conv2d"
                        else "se_expand"), var
    convs = ["expand_conv", "project_conv"] if has_expand else ["project_conv"]
    if body == ["conv2d"] and var == "kernel":
        return block + convs[0], "kernel"
    if body == ["conv2d_1"] and var == "kernel" and has_expand:
        return block + convs[1], "kernel"
    bns = ["expand_bn", "bn", "project_bn"] if has_expand else ["bn",
                                                                 "project_bn"]
    bn = _BN_RE.match(body[0]) if len(body) == 1 else None
    if bn and var in _BN_VARS:
        position = int(bn.group(1) or 0)
        if position < len(bns):
            return block + bns[position], var
    return None


def _model_scope(names, path):
    """The official model scope (e.g. "efficientnet-b0") of the names."""
    scopes = {n.split("/stem/")[0] for n in names if "/stem/" in n}
    if len(scopes) != 1:
        raise ValueError(
            "Expected a checkpoint of the official EfficientNet code (one "
            "model scope with variables like efficientnet-b0/stem/conv2d/"
            f"kernel). Received: checkpoint={path} (scopes found: "
            f"{sorted(scopes)}; first names: {sorted(names)[:5]})")
    return scopes.pop()


def _read_tf1(path, model, normalization):
    _, _, depth = efficientnet.parse_model_name(model)
    prefix = path if not tf.io.gfile.isdir(path) else (
        tf.train.latest_checkpoint(path))
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    names = set(shapes)
    scope = _model_scope(names, path)
    layout = _block_layout(depth)
    weights, extra, used_ema = {}, [], []
    # Optimizer slots (RMSProp, Momentum) and global_step are not weights.
    model_names = sorted(n for n in names if n.startswith(scope + "/")
                         and not n.endswith(EMA_SUFFIX)
                         and not re.search(r"/(RMSProp|Momentum)(_\d+)?$", n))
    # EMA-only checkpoints name their weights only through the EMA copies.
    model_names = sorted(set(model_names) | {
        n[:-len(EMA_SUFFIX)] for n in names
        if n.startswith(scope + "/") and n.endswith(EMA_SUFFIX)})
    for name in model_names:
        target = _tf1_target(name[len(scope) + 1:], layout)
        if target is None:
            extra.append(name)
            continue
        source = name + EMA_SUFFIX if name + EMA_SUFFIX in names else name
        used_ema.append(source != name)
        layer, var = target
        weights.setdefault(layer, {})[var] = reader.get_tensor(source)
    if extra:
        raise ValueError(_mismatch_message(
            path, model, extra=extra, guess=_guess_tf1(shapes, scope)))
    head = weights.get(HEAD, {}).get("kernel")
    mean, stddev = NORMALIZATIONS[normalization]
    return PretrainedWeights(
        path=path, kind=TF1, weights=weights, mean=tuple(mean),
        stddev=tuple(stddev),
        num_classes=None if head is None else int(head.shape[-1]),
        small_images=False, ema=bool(used_ema) and all(used_ema))


def _guess_tf1(shapes, scope):
    """The variant a TF1 checkpoint is of: from its scope name or shapes."""
    named = re.fullmatch(r"efficientnet-(b\d|l2)", scope)
    if named:
        return named.group(1)
    blocks = {m.group(1) for n in shapes
              if (m := re.match(re.escape(scope) + r"/blocks_(\d+)/", n))}
    stem = shapes.get(f"{scope}/stem/conv2d/kernel")
    return _guess(stem[-1] if stem else None, len(blocks))


# ------------------------------------------------------------ Keras h5 ---

def _keras_application(variant, include_top, classes):
    builders = {f"b{i}": getattr(keras.applications, f"EfficientNetB{i}")
                for i in range(8)}
    if variant not in builders:
        return None
    size = efficientnet.get_variant(variant).resolution
    return builders[variant](
        weights=None, include_top=include_top, classes=classes or 1000,
        input_shape=(size, size, 3))


def _h5_head_classes(path):
    """Classes of the Dense head in a Keras weight file; None without one.

    The head's kernel is the only 2-D array of an EfficientNet.
    """
    import h5py  # pylint: disable=g-import-not-at-top
    found = []
    try:
        with tf.io.gfile.GFile(path, "rb") as f, h5py.File(f, "r") as h5:
            h5.visititems(lambda name, obj: found.append(obj.shape)
                          if isinstance(obj, h5py.Dataset)
                          and len(obj.shape) == 2 else None)
    except OSError as e:  # h5py's error for truncated or non-HDF5 files.
        raise ValueError(
            f"Expected a readable HDF5 weight file ({type(e).__name__}: "
            f"{e}). Received: checkpoint={path}") from e
    return int(found[0][1]) if found else None


def _read_keras_h5(path, model):
    variant, _, _ = efficientnet.parse_model_name(model)
    if variant not in {f"b{i}" for i in range(8)}:
        raise ValueError(
            "Expected --model in b0..b7 for a Keras applications weight file "
            f"(keras.applications ships EfficientNetB0-B7). Received: "
            f"model={model}, checkpoint={path}")
    classes = _h5_head_classes(path)
    source, error = _load_keras_application(path, variant, classes)
    if source is None:
        guess = next((f"b{i}" for i in range(8) if f"b{i}" != variant
                      and _load_keras_application(path, f"b{i}", classes)[0]
                      is not None), None)
        raise ValueError(_mismatch_message(
            path, model, detail=error,
            guess=f"keras.applications.EfficientNet{guess.upper()}"
            if guess else None))
    weights = {}
    for layer in source.layers:
        if layer.weights and not isinstance(layer,
                                            keras.layers.Normalization):
            weights[layer.name] = {w.name: np.asarray(w.numpy())
                                   for w in layer.weights}
    norm = next(layer for layer in source.layers
                if isinstance(layer, keras.layers.Normalization))
    # The variables, not norm.mean/variance: those are tensors Keras
    # refreshes only on some loading paths.
    values = {w.name: np.asarray(w.numpy()).reshape(-1) for w in norm.weights}
    mean, variance = values["mean"], values["variance"]
    if np.allclose(variance, _KERAS_STORED_STDDEV, atol=1e-6):
        stddev = variance  # The quirk: the "variance" is the stddev.
    else:
        stddev = np.sqrt(variance)
    return PretrainedWeights(
        path=path, kind=KERAS_H5, weights=weights,
        mean=tuple(float(m) * 255.0 for m in mean),
        stddev=tuple(float(s) * 255.0 for s in stddev),
        num_classes=classes, small_images=False)


def _load_keras_application(path, variant, classes):
    """(model, None) if the file loads into that variant, else (None, why)."""
    local = _local_copy(path)
    try:
        app = _keras_application(variant, classes is not None, classes)
        app.load_weights(local)
        return app, None
    except Exception as e:  # pylint: disable=broad-except
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def _local_copy(path):
    """h5py and Keras read local files; gs:// files are copied first."""
    if "://" not in path:
        return path
    import tempfile  # pylint: disable=g-import-not-at-top
    local = tempfile.mkdtemp(prefix="ns-h5-") + "/" + path.rsplit("/", 1)[-1]
    tf.io.gfile.copy(path, local, overwrite=True)
    return local


# --------------------------------------------------------- model.keras ---

def _read_model_keras(path):
    file = path if path.endswith(".keras") else storage.join(path, MODEL_FILE)
    source = keras.saving.load_model(file, compile=False)
    weights = {layer.name: {w.name: np.asarray(w.numpy())
                            for w in layer.weights}
               for layer in source.layers if layer.weights}
    norm = source.get_layer(NORMALIZE)
    head = weights.get(HEAD, {}).get("kernel")
    return PretrainedWeights(
        path=path, kind=MODEL_KERAS, weights=weights, mean=tuple(norm.mean),
        stddev=tuple(norm.stddev),
        num_classes=None if head is None else int(head.shape[-1]),
        small_images=has_small_image_strides(source))


def has_small_image_strides(model):
    """Whether an EfficientNet of this package has stride 1 in stage 2."""
    return tuple(model.get_layer("block2a_dwconv").strides) == (1, 1)


# --------------------------------------------------------------- apply ---

def _mismatch_message(path, model, missing=(), extra=(), shapes=(),
                      detail=None, guess=None):
    lines = [f"Expected a checkpoint of the model {model}. Received: "
             f"checkpoint={path}"]
    if guess:
        lines.append(f"  It looks like a checkpoint of {guess}: use that "
                     "model name (--model, --teacher_model or "
                     "--student_models).")
    if missing or shapes:
        lines.append("  (model variables by this package's layer names, "
                     "which are keras.applications'; block2b is stage 2, "
                     "its 2nd block: blocks_N of the official code count "
                     "all blocks in order)")
    if missing:
        lines.append(f"  {len(missing)} variables missing, first: "
                     f"{', '.join(missing[:5])}")
    if extra:
        lines.append(f"  {len(extra)} variables not in the model, first: "
                     f"{', '.join(extra[:5])}")
    for name, expected, received in shapes[:5]:
        lines.append(f"  {name}: expected shape {expected}, received "
                     f"{received}")
    if detail:
        lines.append(f"  ({detail})")
    return "\n".join(lines)


def _guess(stem_channels, num_blocks):
    """The variant with this stem width and block count, or None."""
    for name, variant in efficientnet.VARIANTS.items():
        if (efficientnet.round_filters(efficientnet.STEM_FILTERS,
                                       variant.width) == stem_channels
                and len(_block_layout(variant.depth)) == num_blocks):
            return name
    return None


def _guess_model(weights):
    """The variant whose stem width and block count match `weights`."""
    stem = weights.get("stem_conv", {}).get("kernel")
    blocks = {re.match(r"block\d(?:[a-z]|_\d+)_", name).group(0)
              for name in weights if re.match(r"block\d(?:[a-z]|_\d+)_", name)}
    return None if stem is None else _guess(stem.shape[-1], len(blocks))


def check(pretrained, model, model_name="model", partial=False):
    """Checks that `pretrained` fits `model` (all but a differing head).

    Args:
      pretrained: A `PretrainedWeights`.
      model: An EfficientNet `keras.Model` of this package.
      model_name: The target's name, for the message.
      partial: Accept a source that fits only some layers (they are copied,
        the rest keep their initialisation), as a larger student started
        from its teacher; at least one layer must fit.

    Returns:
      True if the head is copied too, False if the model keeps a fresh head
      (another class count, or a source without one).

    Raises:
      ValueError: listing the first missing / extra variables and wrong
        shapes (name, expected, received), and the model the checkpoint
        seems to be of.
    """
    small = has_small_image_strides(model)
    if small != pretrained.small_images:
        raise ValueError(
            f"Expected a model with the checkpoint's strides (small_images="
            f"{pretrained.small_images}: "
            + ("ImageNet checkpoints use the standard strides; "
               "EfficientNet takes any input size, so drop --small_images"
               if not pretrained.small_images else
               "the source model was trained with stride 1 in stages 2-3")
            + f"). Received: small_images={small}, checkpoint="
            f"{pretrained.path}")
    missing, shapes, names = [], [], set()
    head_fits = True
    for layer in model.layers:
        for w in layer.weights:
            name = f"{layer.name}/{w.name}"
            names.add(name)
            value = pretrained.weights.get(layer.name, {}).get(w.name)
            expected = tuple(w.shape)
            if layer.name == HEAD:
                head_fits = head_fits and value is not None and tuple(
                    value.shape) == expected
            elif value is None:
                missing.append(name)
            elif tuple(value.shape) != expected:
                shapes.append((name, expected, tuple(value.shape)))
    extra = sorted(f"{layer}/{var}" for layer, values in
                   pretrained.weights.items() for var in values
                   if f"{layer}/{var}" not in names and layer != HEAD)
    fitting = len(names) - len(missing) - len(shapes)
    if partial and fitting > 0:
        if missing or shapes:
            logging.info("%s: %d variables do not fit %s and keep their "
                         "initialisation", pretrained.path,
                         len(missing) + len(shapes), model_name)
        return head_fits
    if missing or extra or shapes:
        guess = _guess_model(pretrained.weights)
        raise ValueError(_mismatch_message(
            pretrained.path, model_name, missing, extra, shapes,
            guess=guess if guess != model_name else None))
    return head_fits


def apply(pretrained, model, model_name="model", partial=False):
    """Copies `pretrained` into `model` and sets its pixel normalisation.

    Every weight but the head must fit (see `check`; with `partial`, the
    fitting layers are copied); the head is copied when its shape fits, and
    otherwise kept as initialised (a fresh head).

    Args:
      pretrained: `PretrainedWeights` from `read`.
      model: A model built by `noisy_student.model.efficientnet`.
      model_name: The model's name in messages (e.g. "b0", a flag's value).
      partial: Copy the layers that fit instead of failing on the others.

    Returns:
      True if the head was copied.

    Raises:
      ValueError: as `check`.
    """
    head_copied = check(pretrained, model, model_name, partial)
    for layer in model.layers:
        values = pretrained.weights.get(layer.name, {})
        if layer.name == HEAD and not head_copied or not all(
                w.name in values and tuple(values[w.name].shape) == tuple(
                    w.shape) for w in layer.weights):
            continue  # A fresh head, or (partial) a layer that does not fit.
        for w in layer.weights:
            w.assign(values[w.name])
    norm = model.get_layer(NORMALIZE)
    if len(norm.mean) == len(pretrained.mean):
        norm.mean, norm.stddev = pretrained.mean, pretrained.stddev
    if not head_copied:
        logging.info(
            "%s: new head for %d classes (the checkpoint's: %s)",
            pretrained.path, int(model.output_shape[-1]),
            pretrained.num_classes or "none")
    return head_copied


def convert(path, model, out_dir, image_size=None, num_classes=None,
            normalization="imagenet", dropout=None, overwrite=False):
    """Writes `out_dir/model.keras` from any source kind.

    Args:
      path: The source (see the module docstring).
      model: Target model name: b0..b8, l2 or wW-dD.
      out_dir: Output folder (local or gs://).
      image_size: Input side; default the variant's resolution (224 for
        wW-dD). EfficientNet is resolution-agnostic: any size loads.
      num_classes: Classes of the head; default the source's. Another count
        builds a fresh head on the loaded backbone.
      normalization: For TF1 sources: "imagenet" or "advprop".
      dropout: Head dropout of the model; default the variant's.
      overwrite: Replace an existing `out_dir/model.keras`.

    Returns:
      The summary written to `out_dir/convert.json`.

    Raises:
      FileExistsError: if the output exists and not `overwrite`.
      ValueError: for a source without a head and no `num_classes`, or a
        source that does not fit the model.
    """
    for name, value in (("num_classes", num_classes),
                        ("image_size", image_size)):
        if value is not None and not (isinstance(value, int) and value >= (
                2 if name == "num_classes" else 1)):
            raise ValueError(
                f"Expected {name} >= {2 if name == 'num_classes' else 1} (or "
                f"unset: the checkpoint's). Received: {name}={value!r}")
    target = storage.join(out_dir, MODEL_FILE)
    if tf.io.gfile.exists(target) and not overwrite:
        raise FileExistsError(
            f"Expected an out_dir without {MODEL_FILE} (or overwrite). "
            f"Received: out_dir={out_dir}")
    pretrained = read(path, model, normalization)
    classes = num_classes if num_classes is not None else (
        pretrained.num_classes)
    if not classes:
        raise ValueError(
            "Expected num_classes for a checkpoint without a head. Received: "
            f"num_classes={num_classes}, checkpoint={path}")
    variant, width, depth = efficientnet.parse_model_name(model)
    net = efficientnet.build_efficientnet(
        variant, width=None if variant else width,
        depth=None if variant else depth, num_classes=classes,
        image_size=image_size if image_size is not None else (
            224 if variant is None else None),
        small_images=pretrained.small_images, dropout_rate=dropout)
    head_copied = apply(pretrained, net, model)
    tf.io.gfile.makedirs(out_dir)
    temp = storage.temp_path(target)
    keras.saving.save_model(net, temp)
    tf.io.gfile.rename(temp, target, overwrite=True)
    summary = {"source": pretrained.summary(), "model": model.lower(),
               "image_size": int(net.input_shape[1]), "num_classes": classes,
               "head": "copied" if head_copied else "new"}
    storage.write_json(storage.join(out_dir, CONVERT_FILE), summary)
    return summary
