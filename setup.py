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
        "timm>=1.0",  # the MiDaS backbone of the depth model (its checkpoint keys follow timm 1.0's names)
        "scipy",  # the beta noise schedule's quantiles
    ],
    extras_require={
        # The web UI (scripts/webui.py); its tests drive it with gradio_client and Playwright (the
        # browser itself is the system's Chromium: apt-get install chromium).
        "webui": ["gradio>=6,<7", "gradio_client>=2"],
        "test": ["pytest", "pytest-timeout", "hypothesis", "diffusers>=0.30", "transformers>=4.30", "gradio>=6,<7", "gradio_client>=2", "playwright", "kornia", "torchsde", "openvino"],
        "xformers": ["xformers"],
        "controlnet": ["kornia"],  # --preprocess canny
        "openvino": ["openvino"],  # --compile_backend openvino
        "watermark": ["invisible-watermark"],
    },
)
