from setuptools import find_packages, setup

setup(
    name="megatron_m2d",
    version="0.1.0",
    description="Turn a trained Mixture-of-Experts LM into a dense LM and distill it back to quality.",
    packages=find_packages(include=["megatron_m2d", "megatron_m2d.*"]),
    package_data={"megatron_m2d": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # The Megatron path (conversion, distillation at scale). The offline tool never imports these.
        # sentencepiece + protobuf: transformers converts a tokenizer.model-only tokenizer (Llama-2, Mixtral) with them
        # tensorboard: the distillation run's event files (torch.utils.tensorboard writes them through it)
        "megatron": ["megatron-core>=0.16.1", "nvidia-modelopt>=0.47", "requests", "sentencepiece", "protobuf",
                     "tensorboard"],
        "eval": ["lm-eval>=0.4", "datasets", "accelerate"],
        # the tests exercise the lm-eval integration and the Megatron-Core conversion (CPU, gloo) too
        # mistral-common ships Mixtral's real sentencepiece model (the preprocessing tests read it offline)
        "dev": ["pytest>=8", "pytest-timeout", "lm-eval>=0.4", "datasets", "accelerate", "megatron-core>=0.16.1",
                "sentencepiece", "protobuf", "mistral-common", "hypothesis", "tensorboard"],
    },
    entry_points={"console_scripts": ["m2d=megatron_m2d.cli:main"]},
)
