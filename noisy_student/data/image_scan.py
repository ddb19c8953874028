"""The one scan of a folder source: which of its files the pipeline decodes.

A folder source reads its files in every epoch of every stage. A file the
decoder rejects (zero bytes, truncated, not an image) used to be dropped by
tf.data with a warning that named no file, once per epoch, while the image
count (and the epoch-based learning-rate schedule) still included it. Instead,
`scan_folder` checks every file once, before any work, with the decode op
and arguments of the function the training, evaluation and prediction
inputs and the SavedModel's serve_bytes decode with
(`preprocess.decode_image`, whose other steps cannot fail), so a file the
scan accepts is one the pipeline decodes without error, and the source
yields (and counts) only those.

The result is logged (`folder:PATH: N decoded, M skipped` at WARNING, with
the first `SHOWN` files and their reasons) and written, all files listed,
to `REPORT_FILE` in the command's output folder (the pipeline's --workdir,
ns-train's --model_dir, ns-predict's --out_dir, ns-eval's --out_dir):

    {"/data/pets": {"key": "...", "files": 1002, "decoded": 1000,
                    "skipped": {"/data/pets/cat/x.jpg": "empty file (0 bytes)",
                                ...},
                    "ignored": {"/data/pets/dog/y.tif":
                                "ignored: unsupported type .tif", ...},
                    "decoder": "...", "scanned": "2026-11-30 20:40:00"}}

The same file is the cache: its entry is reused while the folder's listing
(every file's path, size and modification time; on gs:// and other remote
file systems the paths only, since a stat costs a request per file) and the
TensorFlow version are unchanged, so a rerun or a resumed run does not scan
again; within one process a listing is scanned once (each load lists the
folder again, so a changed folder is seen).

A file that cannot be read is skipped like one that does not decode, with
its reason: a dangling symlink ("dangling symlink (to TARGET)"), a file
removed after the listing, a looping symlink or one without read
permission ("unreadable: No such file or directory", ...), a named pipe,
socket or device (`SPECIAL_FILE`; never opened: reading a pipe waits for
a writer); a sub-folder that cannot be listed is one entry, its path
ending in "/" ("unreadable folder: Permission denied"). They used to fail the whole run with TF's
"PATH; No such file or directory" (the listing's stat), naming no flag.

Files with an image extension the decoder cannot read (TIFF, PPM, ICO,
JPEG 2000, HEIC, ...: `UNSUPPORTED_EXTENSIONS`) are not read and are listed
as ignored, with a count, so nothing is left out silently; serving cannot
decode them either. WebP and JPEG XL, which `tf.io.decode_image` (TF >= 2.21)
decodes, are read.

Cost, measured on the project's 2-core CPU machine (TF 2.21; files read
and decoded by tf.data with AUTOTUNE): 0.08 ms of CPU time per 32 x 32 PNG
and 1.1 ms per 500 x 375 JPEG of 77 KB (quality 90; ImageNet's typical
size), so about 25 CPU-minutes for ImageNet's 1.28M training images, once;
with the machine shared (load ~12) the wall time was 0.2-0.5 and
1.7-2.4 ms per image. Listing and hashing costs about 5 us per file
(`tf.io.gfile.stat`); a cached scan of 1,000 files took 0.01 s. Progress
is logged every `LOG_EVERY_S` seconds.
"""

import dataclasses
import hashlib
import json
import os
import re
import time

from absl import logging
import tensorflow as tf

from noisy_student.data import preprocess
from noisy_student.utils import storage

REPORT_FILE = "skipped_images.json"
# What tf.io.decode_image (preprocess.decode_image) reads in TF 2.21:
# JPEG (and its other extensions), PNG, GIF, BMP, WebP, JPEG XL.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif",
                    ".bmp", ".webp", ".jxl")
# Common image types it cannot read: listed as ignored, never silently.
UNSUPPORTED_EXTENSIONS = (
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".cur", ".jp2",
    ".j2k", ".jpx", ".jpf", ".heic", ".heif", ".avif", ".psd", ".tga",
    ".svg", ".dng", ".cr2", ".nef", ".arw", ".raw", ".exr", ".hdr", ".qoi",
    ".pcx", ".xbm", ".xpm", ".dds", ".icns", ".sgi")
SHOWN = 5  # Files named in the log; all of them are in REPORT_FILE.
SPECIAL_FILE = "not a regular file (a named pipe, socket or device)"
LOG_EVERY_S = 30.0
_SCAN_VERSION = 1  # Bump when what the scan accepts changes.

_SCANS = {}  # listing key -> ScanResult, this process's (clear_memory_cache)
_LOGGED = set()  # keys whose summary this process has logged


@dataclasses.dataclass(frozen=True)
class ScanResult:
    """What a folder holds for the pipeline.

    Attributes:
      folder: The folder (no trailing slash).
      decoded: Paths the pipeline decodes, sorted.
      skipped: {path: reason} of image files the decoder rejects or that
        cannot be read, and of sub-folders that cannot be listed ("DIR/").
      ignored: {path: reason} of files of an unsupported image type.
      key: Hash of the listing (paths, sizes, mtimes) and the decoder.
      cached: Whether this came from an earlier scan (REPORT_FILE).
      report: The REPORT_FILE written or read, or None.
    """
    folder: str
    decoded: tuple
    skipped: dict
    ignored: dict
    key: str
    cached: bool = False
    report: str | None = None

    def summary(self):
        """"N decoded, M skipped" (and the ignored count, if any)."""
        text = f"{len(self.decoded)} decoded, {len(self.skipped)} skipped"
        if self.ignored:
            text += f", {len(self.ignored)} ignored (unsupported type)"
        return text

    def examples(self, limit=SHOWN):
        """The first `limit` "path: reason" lines, skipped then ignored."""
        items = list(self.skipped.items()) + list(self.ignored.items())
        return [f"{path}: {reason}" for path, reason in items[:limit]]


class UndecodableImagesError(ValueError):
    """A folder holds files the decoder rejects, and skipping is off.

    Attributes:
      scan: The `ScanResult`.
    """

    def __init__(self, scan, setting="skip_corrupt=False"):
        self.scan = scan
        super().__init__(self.describe(setting))

    def describe(self, setting):
        """The message, naming `setting` (a flag or an argument)."""
        first, reason = next(iter(self.scan.skipped.items()))
        more = len(self.scan.skipped) - 1
        where = f"; all in {self.scan.report}" if self.scan.report else ""
        return (f"Expected only decodable images with {setting} (without "
                f"it they are skipped). Received: {first}: {reason}"
                + (f", and {more} more{where}" if more else where))


def clear_memory_cache():
    """Forgets this process's scans (the next call reads REPORT_FILE)."""
    _SCANS.clear()
    _LOGGED.clear()


def scan_folder(folder, report_dir=None, log_every_s=LOG_EVERY_S):
    """Lists `folder` (at any depth) and checks every image file decodes.

    Args:
      folder: Local or gs:// folder.
      report_dir: Folder of REPORT_FILE (read as a cache, then written);
        None: scan without writing.
      log_every_s: Seconds between progress lines of a scan.

    Returns:
      A `ScanResult`; its summary is logged once per process (WARNING when
      files were skipped or ignored, else INFO).

    Raises:
      FileNotFoundError: if `folder` is not a folder.
    """
    folder = str(folder).rstrip("/")
    if not tf.io.gfile.isdir(folder):
        raise FileNotFoundError(f"Expected a folder of images. Received: "
                                f"path={folder}")
    images, ignored, unlisted = _list(folder)
    key = _listing_key(folder, images + list(ignored) + list(unlisted))
    return _reported_scan(folder, key, images, ignored, unlisted, report_dir,
                          log_every_s)


def _reported_scan(name, key, images, ignored, unlisted, report_dir,
                   log_every_s):
    """The scan of `images` under listing `key`: from REPORT_FILE in
    `report_dir` or this process's cache when they hold it, else scanned
    (and written to REPORT_FILE); its summary logged."""
    report = f"{str(report_dir).rstrip('/')}/{REPORT_FILE}" if (
        report_dir) else None
    result = _from_report(report, name, key, images, ignored)
    if result is None:
        result = _SCANS.get(key)
        if result is None:
            result = _scan(name, key, images, ignored, unlisted, log_every_s)
        if report:
            _write_entry(report, result)
        result = dataclasses.replace(result, report=report)
    _SCANS[key] = dataclasses.replace(result, cached=True)
    _log_summary(result)
    return result


def scan_files(name, paths, report_dir=None, log_every_s=LOG_EVERY_S):
    """Checks that every file of a given list decodes (a `list:FILE` source).

    The files' own scan: as `scan_folder`, but for paths listed by the
    caller instead of found in a folder; the entry of REPORT_FILE is
    `name` and its key hashes the paths (with their sizes and modification
    times when local), so an unchanged list is not scanned again.

    Args:
      name: The entry's name in REPORT_FILE (the list file's path).
      paths: The image paths, in the source's order (repeats allowed).
      report_dir: Folder of REPORT_FILE, or None: scan without writing.
      log_every_s: Seconds between progress lines of a scan.

    Returns:
      A `ScanResult` whose `decoded` keeps `paths`' order (its `folder` is
      `name`).
    """
    unique = sorted(set(paths))
    ignored = {p: f"ignored: unsupported type {p[p.rindex('.'):].lower()}"
               for p in unique if p.lower().endswith(UNSUPPORTED_EXTENSIONS)}
    images = [p for p in unique if p not in ignored]
    key = _listing_key(name, images + list(ignored))
    result = _reported_scan(name, key, images, ignored, {}, report_dir,
                            log_every_s)
    good = set(result.decoded)
    return dataclasses.replace(
        result, decoded=tuple(p for p in paths if p in good))


def read_entry(report_dir, name):
    """The entry `name` of report_dir's REPORT_FILE, or None.

    Args:
      report_dir: A command's output folder, or None.
      name: The entry's name (a folder, a list file, a record pattern).

    Returns:
      The entry (a dict), or None when there is none or it is unreadable.
    """
    if not report_dir:
        return None
    entry = _read_report(f"{str(report_dir).rstrip('/')}/{REPORT_FILE}").get(
        name)
    return entry if isinstance(entry, dict) else None


def write_entry(report_dir, name, entry):
    """Adds (or replaces) the entry `name` of report_dir's REPORT_FILE.

    Args:
      report_dir: A command's output folder.
      name: The entry's name.
      entry: A JSON-able dict.

    Returns:
      The REPORT_FILE's path (written atomically).
    """
    report = f"{str(report_dir).rstrip('/')}/{REPORT_FILE}"
    entries = _read_report(report)
    entries[name] = entry
    storage.write_json(report, entries)
    return report


def _list(folder):
    """(sorted image paths, {path: reason} of unsupported image types,
    {"DIR/": reason} of sub-folders that cannot be listed)."""
    images, ignored, unlisted = [], {}, {}
    for root, names in _walk(folder, unlisted):
        for name in names:
            lower = name.lower()
            if lower.endswith(IMAGE_EXTENSIONS):
                images.append(f"{root}/{name}")
            elif lower.endswith(UNSUPPORTED_EXTENSIONS):
                ext = lower[lower.rindex("."):]
                ignored[f"{root}/{name}"] = f"ignored: unsupported type {ext}"
    return sorted(images), dict(sorted(ignored.items())), unlisted


def _walk(folder, unlisted):
    """Yields (folder, file names) for `folder` and its sub-folders.

    A folder that cannot be listed goes into `unlisted` ({"DIR/": reason})
    instead of failing the scan (tf.io.gfile.walk raises on one without
    read permission, and passes over one removed while walking).
    """
    try:
        names = tf.io.gfile.listdir(folder)
    except tf.errors.OpError as e:
        unlisted[f"{folder}/"] = f"unreadable folder: {_cause(e)}"
        return
    files = []
    for name in sorted(names):
        path = f"{folder}/{name.rstrip('/')}"
        # gs:// marks sub-folders with "/": no request needed for them.
        if name.endswith("/") or tf.io.gfile.isdir(path):
            yield from _walk(path, unlisted)
        else:
            files.append(name)
    yield folder, files


def _decoder_name():
    return (f"preprocess.decode_image (tf.io.decode_image, TensorFlow "
            f"{tf.__version__}), scan version {_SCAN_VERSION}")


def _listing_key(folder, paths):
    """Hash of every path with its size, mtime and whether it is readable
    (names only for remote paths)."""
    rows = []
    for path in paths:
        if "://" in folder or "://" in path:
            rows.append(path)
            continue
        try:
            stat = tf.io.gfile.stat(path)
        except tf.errors.OpError:
            # A dangling symlink, or removed since the listing: the scan
            # skips it, and says why.
            rows.append([path, None])
            continue
        # Readability too: a file made readable (chmod) keeps its size and
        # mtime, and must not stay skipped by a reused scan.
        rows.append([path, stat.length, stat.mtime_nsec,
                     os.access(path, os.R_OK)])
    text = json.dumps([_decoder_name(), folder, rows])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_report(report):
    if not report or not tf.io.gfile.exists(report):
        return {}
    try:
        entries = storage.read_json(report)
    except (ValueError, tf.errors.OpError):  # Unreadable: scan again.
        return {}
    return entries if isinstance(entries, dict) else {}


def _from_report(report, folder, key, images, ignored):
    """The cached result of this listing, or None."""
    entry = _read_report(report).get(folder)
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    skipped = {p: r for p, r in entry.get("skipped", {}).items()}
    decoded = tuple(p for p in images if p not in skipped)
    if len(decoded) != entry.get("decoded"):
        return None
    return ScanResult(folder, decoded, skipped, ignored, key, cached=True,
                      report=report)


def _write_entry(report, result):
    """Adds (or replaces) this folder's entry of REPORT_FILE, atomically."""
    entries = _read_report(report)
    entries[result.folder] = {
        "key": result.key,
        "files": len(result.decoded) + len(result.skipped),
        "decoded": len(result.decoded),
        "skipped": result.skipped,
        "ignored": result.ignored,
        "decoder": _decoder_name(),
        "scanned": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    storage.write_json(report, entries)


def _scan(folder, key, images, ignored, unlisted, log_every_s):
    start = time.time()
    # Never opened: reading a named pipe waits for a writer (forever).
    skipped = {**unlisted, **{path: SPECIAL_FILE for path in images
                              if _is_special(path)}}
    readable = [path for path in images if path not in skipped]
    good = _decodable(readable, log_every_s=log_every_s, folder=folder)
    for path in readable:
        if path not in good:
            reason = _reason(path)
            if reason is None:  # Decodes now (a passing read error).
                good.add(path)
            else:
                skipped[path] = reason
    decoded = tuple(p for p in images if p in good)
    logging.info("Scanned %s in %.1f s (%d files)", _spec(folder),
                 time.time() - start, len(images))
    return ScanResult(folder, decoded, skipped, ignored, key)


def _decodable(paths, log_every_s=LOG_EVERY_S, folder=""):
    """The set of `paths` that preprocess.decode_image decodes.

    Every file is read and decoded in parallel by tf.data; a file whose
    read or decode fails is dropped (ignore_errors) and so missing here.
    """
    if not paths:
        return set()

    def check(path):
        image = _decode_op(tf.io.read_file(path))
        # Output the shape, which needs the decode to run (an unused
        # decode would be pruned from the graph).
        return path, tf.shape(image)

    # Batched after the errors are dropped: fewer Python steps per file.
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(
        check, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False).ignore_errors().map(
            lambda path, _: path).batch(256).prefetch(1)
    good = set()
    last = start = time.time()
    for batch in dataset.as_numpy_iterator():
        good.update(path.decode("utf-8") for path in batch)
        now = time.time()
        if now - last >= log_every_s:
            last = now
            logging.info("Scanning %s: %d of %d files decoded so "
                         "far (%.0f files/s)", _spec(folder), len(good), len(paths),
                         len(good) / max(now - start, 1e-9))
    return good


def _decode_op(data):
    """The decode op of `preprocess.decode_image`, with its arguments.

    The rest of that function (EXIF orientation, channels) never fails on
    a decoded image (its byte reader pads any header), so a file this
    decodes is one the pipeline decodes; leaving it out keeps the scan
    cheaper.
    """
    return tf.io.decode_image(data, **preprocess.DECODE_ARGS)


def _is_special(path):
    """Whether a local `path` (or its symlink's target) is there but not a
    regular file: a named pipe, a socket or a device."""
    return "://" not in path and os.path.exists(path) and (
        not os.path.isfile(path))


def _reason(path):
    """Why `path` does not decode (or read), one line; None if it does now."""
    try:
        data = tf.io.read_file(path)
    except tf.errors.OpError as e:
        if isinstance(e, tf.errors.NotFoundError) and (
                "://" not in path and os.path.islink(path)):
            return f"dangling symlink (to {os.readlink(path)})"
        return f"unreadable: {_cause(e)}"
    if not len(data.numpy()):
        return "empty file (0 bytes)"
    try:
        _decode_op(data)
    except tf.errors.OpError as e:
        return _clean(e.message)
    return None


def _cause(error):
    """A file system error's reason without its path ("PATH; reason")."""
    return _clean(error.message).rpartition("; ")[2]


def _clean(message):
    """TF's op error without the graph-node prefix and op suffix."""
    message = message.split("}}", 1)[-1]
    message = re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.DOTALL)
    return " ".join(message.split())


def _spec(name):
    """The source spec of a scan's name: "folder:PATH", or a list's own
    "list:FILE"."""
    return name if name.startswith("list:") else f"folder:{name}"


def _log_summary(result):
    if result.key in _LOGGED:
        return
    _LOGGED.add(result.key)
    where = f" (all in {result.report})" if result.report else ""
    head = f"{_spec(result.folder)}: {result.summary()}"
    if result.cached:
        head += " (scan reused)"
    if not result.skipped and not result.ignored:
        logging.info("%s", head)
        return
    lines = result.examples()
    hidden = len(result.skipped) + len(result.ignored) - len(lines)
    if hidden:
        lines.append(f"... and {hidden} more{where}")
    elif where:
        lines.append(f"listed in {result.report}")
    logging.warning("%s\n  %s", head, "\n  ".join(lines))
