from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="bert4keras",
    version="0.1.0",
    description="Pretrained transformers (BERT, RoBERTa, ALBERT, RoFormer, ...) for Keras 3",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["bert4keras", "bert4keras.*"]),
    python_requires=">=3.9",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.8",
        "numpy",
        "h5py",
        "tokenizers>=0.15",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest",
            "jax[cpu]",
            "snownlp",
            "sentencepiece",
            "jieba",
            "scikit-learn",
            "starlette>=0.37",
            "uvicorn>=0.29",
            "tf2onnx>=1.17",
            "onnxruntime>=1.17",
        ],
        "examples": ["snownlp", "jieba", "sentencepiece", "scikit-learn"],
        "serve": ["starlette>=0.37", "uvicorn>=0.29"],
        "export": ["tf2onnx>=1.17", "onnxruntime>=1.17"],
    },
    entry_points={"console_scripts": ["bert4keras=bert4keras.cli:main"]},
)
