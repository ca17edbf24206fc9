"""asd_jax: Adversarial Self-Distillation for one-step causal video generation, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="asd_jax",
    version="0.1.0",
    description=("Adversarial Self-Distillation for few-step causal video generation "
                 "(Wan 2.1) in JAX/Flax, for TPU pods and GPUs."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["asd_jax", "asd_jax.*"]),
    package_data={"asd_jax.demo": ["static/*"]},  # the demo's page
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "einops",
        "transformers",
        "tensorflow-datasets",
        "array_record",
        "imageio-ffmpeg<0.8",
        "safetensors",
        "numpy",
        "scipy",
        "ml_dtypes",
        "tqdm",
        "matplotlib",  # the toy ablation's plots
    ],
    extras_require={
        "convert": ["torch"],
        "test": [
            "torch==2.13.0",
            "diffusers",
            "accelerate",
            "sentencepiece",
            "pytest",
            "psutil",
            "libtpu",  # compiles for TPU targets from a CPU (asd_jax.targets)
            "aiohttp", "pillow",  # the demo extra: its tests serve the page to a browser
        ],
        # Compiles for TPU targets from any machine (asd_jax.targets, python -m asd_jax.plan).
        "tpu": ["libtpu"],
        # Compiles for NVIDIA GPU targets from a machine without a GPU (asd_jax.targets): jax's CUDA
        # plugin with ptxas and cuDNN, about 4.9 GB installed. Match the installed jax's version.
        "aot-gpu": ["jax[cuda12]"],
        # python -m asd_jax.demo: the web server and WebSocket (aiohttp), JPEG frames (Pillow).
        "demo": ["aiohttp>=3.9", "pillow"],
    },
)
