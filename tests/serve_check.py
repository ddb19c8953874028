"""Serves exported SavedModels in a fresh process that imports only TensorFlow.

Usage: python serve_check.py REQUEST.json

REQUEST.json: {"models": [{"saved_model": DIR, "out": OUT.npz}, ...],
               "files": [image file, ...], "rot90": [k, ...]}.
For each model, OUT.npz gets
  bytes_probabilities   serve_bytes(every file's bytes, one request)
  images_probabilities  serve_images(pixels) one file at a time, the pixels
                        decoded here with tf.io.decode_image in the file's own
                        channels (1, 2, 3 or 4) and turned upright by
                        tf.image.rot90(k) (what a user with an EXIF-rotated
                        photo does before sending pixels)
  class_names, top_k_names (of serve_bytes), project_imported.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def serve(saved_model, files, rot90):
    loaded = tf.saved_model.load(saved_model)
    by_bytes = loaded.signatures["serve_bytes"]
    by_images = loaded.signatures["serve_images"]
    blobs = [tf.io.read_file(path) for path in files]
    result = by_bytes(image_bytes=tf.stack(blobs))
    out = {}
    for key, value in result.items():
        value = value.numpy()
        if value.dtype == object:  # strings: saved as unicode, no pickle
            value = np.char.decode(value.astype("S"), "utf-8")
        out["bytes_" + key] = value
    rows = []
    for blob, k in zip(blobs, rot90):
        pixels = tf.io.decode_image(blob, channels=0, expand_animations=False)
        pixels = tf.image.rot90(pixels, k)
        rows.append(by_images(images=pixels[None])["probabilities"][0])
    out["images_probabilities"] = np.stack([r.numpy() for r in rows])
    return out


def main(request_path):
    with open(request_path) as f:
        request = json.load(f)
    for model in request["models"]:
        out = serve(model["saved_model"], request["files"], request["rot90"])
        out["project_imported"] = np.array(any(
            name.split(".")[0] == "noisy_student" for name in sys.modules))
        np.savez(model["out"], **out)


if __name__ == "__main__":
    main(sys.argv[1])
