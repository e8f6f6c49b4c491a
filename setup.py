from setuptools import find_packages, setup

setup(
    name="ldm-sd2",
    version="0.1.0",
    description="Stable Diffusion 2 / 2.1, faithful to the original ldm code and fast on PyTorch 2",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm": ["demo/*", "modules/encoders/open_clip_configs/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.3",
        "numpy",
        "omegaconf>=2.1",
        "open_clip_torch>=2.20",
        "safetensors>=0.4",
        "tqdm",
        "pillow",
        "pytorch-lightning>=2.6",  # Trainer.fit(weights_only=...), resumable loaders
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "diffusers>=0.30", "transformers>=4.30", "kornia"],
        "xformers": ["xformers"],
        "watermark": ["invisible-watermark"],
    },
)
