from setuptools import setup

# `kernels/` is installed as `minidpo.kernels`: a top-level `kernels` package would
# collide with an unrelated PyPI package of that name.
setup(
    name="minidpo",
    version="0.1.0",
    description="Direct Preference Optimization from scratch in plain PyTorch",
    python_requires=">=3.10",
    packages=["minidpo", "minidpo.kernels"],
    package_dir={"minidpo": "minidpo", "minidpo.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "huggingface-hub>=0.23",
        "numpy",
        "tqdm",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers", "peft", "trl", "sentencepiece", "bitsandbytes", "torchao",
                 "gguf", "tensorboard", "wandb", "trackio"],
        "plot": ["matplotlib"],
        "gguf": ["gguf>=0.10"],
        "parquet": ["pyarrow"],
        "tensorboard": ["tensorboard"],  # --report-to tensorboard (torch.utils.tensorboard's writer)
        "wandb": ["wandb"],
        "trackio": ["trackio"],
    },
)
