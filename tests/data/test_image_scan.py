"""Folder sources scan their files once and name every file they skip.

Issue 19, fault 6: corrupt, truncated or zero-byte images were skipped with
warnings that never named the file, the image count included them, and
--noskip_corrupt failed inside the training loop. A folder source now checks
every file with the pipeline's own decoder before any work, counts only the
files it yields, logs and writes (WORKDIR/skipped_images.json) every file
it skips, and reuses that scan on a rerun.
"""

import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from noisy_student.pipeline import stages
from noisy_student.data import image_scan
from noisy_student.data import preprocess
from noisy_student.data import sources


def _pixels(seed, height=10, width=12):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                                dtype=np.uint8)


def _jpeg_bytes(seed):
    buffer = io.BytesIO()
    Image.fromarray(_pixels(seed)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def mixed_folder(tmp_path):
    """cat: 2 good, a zero-byte .png, a truncated .jpg; dog: a good .png, a
    text file named .jpg, a lossless .webp (decodable), a .tif (not)."""
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    Image.fromarray(_pixels(0)).save(root / "cat" / "a_good.png")
    (root / "cat" / "b_good.jpg").write_bytes(_jpeg_bytes(1))
    (root / "cat" / "c_empty.png").write_bytes(b"")
    (root / "cat" / "d_truncated.jpg").write_bytes(_jpeg_bytes(2)[:300])
    Image.fromarray(_pixels(3)).save(root / "dog" / "a_good.png")
    (root / "dog" / "b_text.jpg").write_text("not an image\n")
    Image.fromarray(_pixels(4)).save(root / "dog" / "c_photo.webp",
                                     lossless=True)
    Image.fromarray(_pixels(5)).save(root / "dog" / "d_scan.tif")
    return root


BAD = {"cat/c_empty.png": "empty file",
       "cat/d_truncated.jpg": "Invalid JPEG data",
       "dog/b_text.jpg": "Unknown image file format"}


def test_count_is_the_decodable_files(mixed_folder):
    source = sources.load_source(f"folder:{mixed_folder}", channels=3)
    elements = list(source.dataset.as_numpy_iterator())
    # 2 good cats, the good dog PNG and the WebP.
    assert source.num_examples == len(elements) == 4
    assert [int(e["label"]) for e in elements] == [0, 0, 1, 1]
    unlabeled = sources.load_source(f"folder:{mixed_folder}", labeled=False)
    assert unlabeled.num_examples == len(list(unlabeled.dataset)) == 4


def test_webp_is_read_and_tif_reported_as_unsupported(mixed_folder):
    source = sources.load_source(f"folder:{mixed_folder}", labeled=False)
    images = [e["image"] for e in source.dataset.as_numpy_iterator()]
    np.testing.assert_array_equal(images[-1], _pixels(4))  # lossless WebP
    ignored = source.scan.ignored
    assert list(ignored) == [f"{mixed_folder}/dog/d_scan.tif"]
    assert "unsupported type" in ignored[f"{mixed_folder}/dog/d_scan.tif"]


def test_skipped_files_are_logged_and_written_with_reasons(
        mixed_folder, tmp_path, caplog):
    # On absl's logger: parsed absl flags (other tests) set its level.
    caplog.set_level(logging.WARNING, logger="absl")
    work = tmp_path / "work"
    sources.load_source(f"folder:{mixed_folder}", scan_dir=str(work))
    warnings = "\n".join(r.getMessage() for r in caplog.records
                         if r.levelno == logging.WARNING)
    assert f"folder:{mixed_folder}: 4 decoded, 3 skipped" in warnings
    for name, reason in BAD.items():
        assert f"{mixed_folder}/{name}: " in warnings, name
    assert "d_scan.tif: ignored: unsupported type" in warnings
    report = json.loads((work / image_scan.REPORT_FILE).read_text())
    entry = report[str(mixed_folder)]
    assert entry["decoded"] == 4
    assert set(entry["skipped"]) == {f"{mixed_folder}/{n}" for n in BAD}
    for name, reason in BAD.items():
        assert reason in entry["skipped"][f"{mixed_folder}/{name}"], name
    assert list(entry["ignored"]) == [f"{mixed_folder}/dog/d_scan.tif"]


def test_noskip_corrupt_names_the_first_bad_file_before_any_reading(
        mixed_folder):
    with pytest.raises(ValueError, match=r"c_empty\.png: empty file") as e:
        sources.load_source(f"folder:{mixed_folder}", skip_corrupt=False)
    assert "and 2 more" in str(e.value)
    data = stages.DataConfig(labeled=f"folder:{mixed_folder}",
                             skip_corrupt=False)
    with pytest.raises(ValueError, match=r"^--labeled=folder:") as e:
        data.labeled_source()
    assert "--noskip_corrupt" in str(e.value)
    assert f"{mixed_folder}/cat/c_empty.png: empty file" in str(e.value)
    assert "\n" not in str(e.value)  # One line.


def test_folder_without_a_decodable_image_names_the_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.png").write_text("text")
    data = stages.DataConfig(unlabeled=f"folder:{folder}")
    with pytest.raises(ValueError, match=r"--unlabeled=folder:.*broken.*"
                                         r"0 decoded, 2 skipped"):
        data.unlabeled_source()


def test_class_folder_with_only_bad_files_is_refused(mixed_folder):
    (mixed_folder / "dog" / "a_good.png").unlink()
    (mixed_folder / "dog" / "c_photo.webp").unlink()
    with pytest.raises(ValueError, match=r"no decodable image in \['dog'\]"):
        sources.load_source(f"folder:{mixed_folder}")


def test_rerun_reuses_the_scan_until_a_file_changes(mixed_folder, tmp_path,
                                                    monkeypatch):
    work = str(tmp_path / "work")
    spec = f"folder:{mixed_folder}"
    first = sources.load_source(spec, scan_dir=work)
    assert not first.scan.cached
    image_scan.clear_memory_cache()  # As a new process would start.
    checks = []
    real = image_scan._decodable  # pylint: disable=protected-access

    def counting(paths, *args, **kwargs):
        checks.append(len(paths))
        return real(paths, *args, **kwargs)
    monkeypatch.setattr(image_scan, "_decodable", counting)
    again = sources.load_source(spec, scan_dir=work)
    assert again.scan.cached and not checks
    assert again.num_examples == first.num_examples
    # A changed file (new size and mtime) is a new listing: scanned again.
    (mixed_folder / "cat" / "c_empty.png").write_bytes(
        (mixed_folder / "cat" / "a_good.png").read_bytes())
    image_scan.clear_memory_cache()
    changed = sources.load_source(spec, scan_dir=work)
    assert checks and not changed.scan.cached
    assert changed.num_examples == 5


def test_scan_logs_progress(mixed_folder, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    image_scan.scan_folder(str(mixed_folder), log_every_s=0.0)
    assert any("4 of 7 files decoded so far" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("fmt, ext", [
    ("PNG", ".png"), ("JPEG", ".jpg"), ("GIF", ".gif"), ("BMP", ".bmp"),
    ("WEBP", ".webp"), ("TIFF", ".tif"), ("PPM", ".ppm"), ("ICO", ".ico"),
    ("JPEG2000", ".jp2")])
def test_folder_sources_read_exactly_what_serving_decodes(fmt, ext):
    """serve_bytes decodes with preprocess.decode_image: a type it decodes
    is read by folder sources, a type it cannot is reported as ignored."""
    buffer = io.BytesIO()
    Image.fromarray(_pixels(0, 16, 16)).save(buffer, fmt)
    try:
        preprocess.decode_image(tf.constant(buffer.getvalue()))
        serving_decodes = True
    except tf.errors.InvalidArgumentError:
        serving_decodes = False
    assert (ext in sources.IMAGE_EXTENSIONS) == serving_decodes
    assert (ext in image_scan.UNSUPPORTED_EXTENSIONS) == (not serving_decodes)


def test_images_outside_the_class_folders_are_named(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="absl")
    for name in ("cat", "dog"):
        os.makedirs(tmp_path / name)
        Image.fromarray(_pixels(1)).save(tmp_path / name / "a.png")
    Image.fromarray(_pixels(2)).save(tmp_path / "top.png")
    source = sources.load_source(f"folder:{tmp_path}")
    assert source.num_examples == 2
    warnings = "\n".join(r.getMessage() for r in caplog.records
                         if r.levelno == logging.WARNING)
    assert (f"1 decodable images are not in a class sub-folder and are not "
            f"used as labeled images: {tmp_path}/top.png") in warnings
    # Unlabeled, every image is used and nothing is said.
    caplog.clear()
    assert sources.load_source(f"folder:{tmp_path}",
                               labeled=False).num_examples == 3
    assert "not in a class sub-folder" not in caplog.text


def test_unreadable_files_are_skipped_with_a_reason(tmp_path, monkeypatch):
    """Issue 32, 4b: a dangling symlink refused the whole run (the listing's
    stat failed) while undecodable files were skipped. Now every file that
    cannot be stat'ed or read (dangling or looping symlink, removed after
    the listing, unreadable sub-folder) is skipped, named and counted."""
    root = tmp_path / "images"
    for name in ("cat", "dog", "bird"):
        (root / name).mkdir(parents=True)
        Image.fromarray(_pixels(0)).save(root / name / "a_good.png")
    Image.fromarray(_pixels(1)).save(root / "dog" / "b_gone.png")
    os.symlink(tmp_path / "nowhere.png", root / "cat" / "dangling.png")
    os.symlink("loop.jpg", root / "dog" / "loop.jpg")
    real_list = image_scan._list  # pylint: disable=protected-access
    real_listdir = tf.io.gfile.listdir

    def list_then_remove(folder):  # A file removed after the listing.
        listing = real_list(folder)
        if folder == str(root):
            (root / "dog" / "b_gone.png").unlink()
        return listing

    def listdir(path):  # A sub-folder that cannot be listed.
        if str(path).rstrip("/").endswith("/bird"):
            raise tf.errors.PermissionDeniedError(
                None, None, f"{path}; Permission denied")
        return real_listdir(path)
    monkeypatch.setattr(image_scan, "_list", list_then_remove)
    monkeypatch.setattr(tf.io.gfile, "listdir", listdir)
    work = tmp_path / "work"
    source = sources.load_source(f"folder:{root}/cat", labeled=False,
                                 scan_dir=str(work))
    assert source.num_examples == 1
    assert source.scan.skipped == {
        f"{root}/cat/dangling.png":
            f"dangling symlink (to {tmp_path}/nowhere.png)"}
    image_scan.clear_memory_cache()
    source = sources.load_source(f"folder:{root}", labeled=False,
                                 scan_dir=str(work))
    assert source.num_examples == 2  # cat/a_good.png, dog/a_good.png
    skipped = json.loads((work / image_scan.REPORT_FILE).read_text())[
        str(root)]["skipped"]
    assert skipped == {
        f"{root}/bird/": "unreadable folder: Permission denied",
        f"{root}/cat/dangling.png":
            f"dangling symlink (to {tmp_path}/nowhere.png)",
        f"{root}/dog/b_gone.png": "unreadable: No such file or directory",
        f"{root}/dog/loop.jpg":
            "unreadable: Too many levels of symbolic links"}
    # --noskip_corrupt refuses them as it refuses undecodable files.
    monkeypatch.setattr(image_scan, "_list", real_list)
    image_scan.clear_memory_cache()
    with pytest.raises(image_scan.UndecodableImagesError,
                       match=r"cat/dangling\.png: dangling symlink"):
        sources.load_source(f"folder:{root}/cat", skip_corrupt=False,
                            labeled=False)
    # The symlink mended is a new listing: scanned again, and read.
    Image.fromarray(_pixels(2)).save(tmp_path / "nowhere.png")
    image_scan.clear_memory_cache()
    mended = sources.load_source(f"folder:{root}/cat", labeled=False,
                                 scan_dir=str(work))
    assert mended.num_examples == 2 and not mended.scan.skipped


def test_files_and_folders_without_read_permission_are_skipped(tmp_path):
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    Image.fromarray(_pixels(1)).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_pixels(2)).save(tmp_path / "sub" / "c.png")
    os.chmod(tmp_path / "b.png", 0)
    os.chmod(tmp_path / "sub", 0)
    # Root reads any file: run as root without the capabilities to.
    command = [sys.executable, "-c", SCAN_SKIPPED, str(tmp_path)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv reads any file")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={caps}",
                   f"--inh-caps={caps}", "--", *command]
    out = subprocess.run(command, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ROOT},
                         timeout=300).stdout
    os.chmod(tmp_path / "sub", 0o755)  # So that pytest can remove it.
    assert json.loads(out.splitlines()[-1]) == {
        f"{tmp_path}/b.png": "unreadable: Permission denied",
        f"{tmp_path}/sub/": "unreadable folder: Permission denied"}


ROOT = str(pathlib.Path(__file__).resolve().parents[2])
SCAN_SKIPPED = """
import json, sys
from noisy_student.data import sources
print(json.dumps(sources.load_source("folder:" + sys.argv[1],
                                     labeled=False).scan.skipped))
"""


def test_a_named_pipe_or_other_special_file_is_skipped_not_read(tmp_path):
    """A named pipe with an image's name hung every command that scanned
    the folder (opening it waits for a writer). Files that are not regular
    files are skipped, named, without being opened."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(_pixels(0)).save(root / "a_good.png")
    os.mkfifo(root / "pipe.png")
    os.symlink(root / "pipe.png", root / "to_pipe.jpg")
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from noisy_student.data import sources\n"
        f"s = sources.load_source('folder:{root}', labeled=False)\n"
        "print(json.dumps([s.num_examples, s.scan.skipped]))\n")
    result = subprocess.run([sys.executable, "-c", script], timeout=60,
                            capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    count, skipped = json.loads(result.stdout.strip().splitlines()[-1])
    assert count == 1
    reason = "not a regular file (a named pipe, socket or device)"
    assert skipped == {f"{root}/pipe.png": reason,
                       f"{root}/to_pipe.jpg": reason}
