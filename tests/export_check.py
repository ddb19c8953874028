"""Serves an exported SavedModel in a fresh process, without the project.

Usage: python export_check.py SAVED_MODEL_DIR INPUT.npz OUTPUT.npz

INPUT.npz holds `images` (uint8 [N, S, S, 3] at the model's resolution) and
`big` (uint8 [M, H, W, 3] of another size). The script imports only
TensorFlow and numpy, loads the SavedModel with tf.saved_model.load, and
writes to OUTPUT.npz the outputs of every signature:
  images_*   serve_images(images)
  default_*  serving_default(images)
  png_*      serve_bytes(PNG encodings of images)
  jpeg_*     serve_bytes(JPEG encodings of images, quality 90)
  jpegpix_*  serve_images(the same JPEGs decoded here)
  big_*      serve_images(big)
plus `signatures` (the signature names) and `project_imported` (whether
noisy_student ended up in sys.modules).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def main(saved_model_dir, input_path, output_path):
    data = np.load(input_path)
    images, big = data["images"], data["big"]
    loaded = tf.saved_model.load(saved_model_dir)
    signatures = loaded.signatures
    out = {"signatures": np.array(sorted(signatures.keys()))}

    def keep(prefix, result):
        for key, value in result.items():
            value = value.numpy()
            if value.dtype == object:  # strings: saved as unicode, no pickle
                value = np.char.decode(value.astype("S"), "utf-8")
            out[f"{prefix}_{key}"] = value

    keep("images", signatures["serve_images"](images=tf.constant(images)))
    keep("default", signatures["serving_default"](images=tf.constant(images)))
    png = tf.stack([tf.io.encode_png(image) for image in images])
    keep("png", signatures["serve_bytes"](image_bytes=png))
    jpeg = tf.stack([tf.io.encode_jpeg(image, quality=90) for image in images])
    keep("jpeg", signatures["serve_bytes"](image_bytes=jpeg))
    decoded = tf.stack([tf.io.decode_jpeg(data) for data in jpeg])
    keep("jpegpix", signatures["serve_images"](images=decoded))
    out["jpeg_pixels"] = decoded.numpy()
    keep("big", signatures["serve_images"](images=tf.constant(big)))
    out["project_imported"] = np.array(
        any(name.split(".")[0] == "noisy_student" for name in sys.modules))
    np.savez(output_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
