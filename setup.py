"""Package metadata for noisy-student."""

import setuptools

setuptools.setup(
    name="noisy-student",
    version="0.1.0",
    description=("Noisy Student self-training (Xie et al., CVPR 2020) in "
                 "Keras 3 / TensorFlow 2, from absl-flag commands."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["noisy_student",
                                               "noisy_student.*"]),
    # C++ source of the CPU kernels, compiled on first use (kernels/loader.py).
    package_data={"noisy_student.kernels": ["*.cc"]},
    install_requires=[
        "tensorflow>=2.16,<3",
        "keras>=3.3,<4",
        "keras-cv>=0.9",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets imports it at run time without declaring it.
        "importlib_resources",
        "absl-py>=1.0",
        "numpy>=1.26",
        # Ships the built-in `digits` data set inside its wheel.
        "scikit-learn>=1.3",
        # Report plots (PNG) of the selection and pipeline stages.
        "matplotlib>=3.7",
    ],
    extras_require={
        # A faster runtime for the teacher's forward pass in the predict
        # stage (--inference_runtime=openvino): the stage labels about 2.3x
        # the images per second of TensorFlow on CPUs for B0 at 224 px
        # (BENCHMARKS.md, "The teacher's runtime").
        "openvino": ["openvino>=2024.0"],
        # --beam_pipeline_options: the predict and select stages as Apache
        # Beam pipelines (Dataflow, Flink, Spark, the DirectRunner). Never
        # its [tensorflow] extra, which pins tensorflow<2.22 and pulls in
        # tfx-bsl; the stages run the project's own TensorFlow code.
        "beam": ["apache-beam>=2.50"],
        "test": [
            "pytest>=8",
            # Runs the suite on every core (up to 4), one test module per
            # worker so a module's fixtures are built once.
            "pytest-xdist>=3",
            # Reference implementations the augmentation ops are checked
            # against, and real sample images.
            "pillow>=10",
            "scikit-image>=0.22",
        ],
    },
    entry_points={"console_scripts": [
        "noisy-student=noisy_student.cli.pipeline:run",
        "ns-train=noisy_student.cli.train:run",
        "ns-predict=noisy_student.cli.predict:run",
        "ns-select=noisy_student.cli.select:run",
        "ns-eval=noisy_student.cli.evaluate:run",
        "ns-export=noisy_student.cli.export:run",
        "ns-convert=noisy_student.cli.convert:run",
    ]},
)
