"""Serves exported SavedModels in a fresh process that imports only TensorFlow.

Usage: python serve_check.py REQUEST.json

REQUEST.json: {"models": [{"saved_model": DIR, "out": OUT.npz}, ...],
               "files": [image file, ...], "rot90": [k, ...],
               "bad_input": [{"saved_model": DIR, "files": [file, ...],
                              "good": [index, ...], "out": OUT.npz}, ...]}
(each key optional). For each model, OUT.npz gets
  bytes_probabilities   serve_bytes(every file's bytes, one request)
  images_probabilities  serve_images(pixels) one file at a time, the pixels
                        decoded here with tf.io.decode_image in the file's own
                        channels (1, 2, 3 or 4) and turned upright by
                        tf.image.rot90(k) (what a user with an EXIF-rotated
                        photo does before sending pixels)
  class_names, top_k_names (of serve_bytes), project_imported.
For each bad_input check (a request mixing good and bad files), OUT.npz gets
every output of
  mixed_*        serve_bytes(every file's bytes, one request)
  alone_*        serve_bytes(the bytes of the files at `good` only)
  bad_*          serve_bytes(the bytes of the other files only)
  empty_bytes_*  serve_bytes(no image: string [0])
  empty_images_* serve_images(no image: uint8 [0, 20, 20, 3])
and project_imported.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def _keep(out, prefix, result):
    for key, value in result.items():
        value = value.numpy()
        if value.dtype == object:  # strings: saved as unicode, no pickle
            value = np.char.decode(value.astype("S"), "utf-8")
        out[prefix + key] = value


def serve(saved_model, files, rot90):
    loaded = tf.saved_model.load(saved_model)
    by_bytes = loaded.signatures["serve_bytes"]
    by_images = loaded.signatures["serve_images"]
    blobs = [tf.io.read_file(path) for path in files]
    out = {}
    _keep(out, "bytes_", by_bytes(image_bytes=tf.stack(blobs)))
    rows = []
    for blob, k in zip(blobs, rot90):
        pixels = tf.io.decode_image(blob, channels=0, expand_animations=False)
        pixels = tf.image.rot90(pixels, k)
        rows.append(by_images(images=pixels[None])["probabilities"][0])
    out["images_probabilities"] = np.stack([r.numpy() for r in rows])
    return out


def bad_input(saved_model, files, good):
    signatures = tf.saved_model.load(saved_model).signatures
    by_bytes = signatures["serve_bytes"]
    blobs = [tf.io.read_file(path) for path in files]
    bad = [i for i in range(len(blobs)) if i not in good]
    out = {}
    for prefix, rows in (("mixed_", range(len(blobs))), ("alone_", good),
                         ("bad_", bad)):
        _keep(out, prefix, by_bytes(
            image_bytes=tf.stack([blobs[i] for i in rows])))
    _keep(out, "empty_bytes_", by_bytes(image_bytes=tf.zeros([0], tf.string)))
    _keep(out, "empty_images_", signatures["serve_images"](
        images=tf.zeros([0, 20, 20, 3], tf.uint8)))
    _keep(out, "no_pixel_images_", signatures["serve_images"](
        images=tf.zeros([2, 0, 5, 3], tf.uint8)))
    return out


def _project_imported():
    return np.array(any(name.split(".")[0] == "noisy_student"
                        for name in sys.modules))


def main(request_path):
    with open(request_path) as f:
        request = json.load(f)
    for model in request.get("models", []):
        out = serve(model["saved_model"], request["files"], request["rot90"])
        out["project_imported"] = _project_imported()
        np.savez(model["out"], **out)
    for check in request.get("bad_input", []):
        out = bad_input(check["saved_model"], check["files"], check["good"])
        out["project_imported"] = _project_imported()
        np.savez(check["out"], **out)


if __name__ == "__main__":
    main(sys.argv[1])
