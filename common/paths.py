"""Where things live. Generated data and caches go under data/, everything a run
produces (demo sweeps, tables, figures) under output/; both are git-ignored."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
OUTPUT = REPO / "output"

WORLD = DATA / "world"                  # the generated dataset (clipworld)
CLIP_CACHE = DATA / "clip_cache"        # pretrained tiny CLIP checkpoints (pretraining)
FEATURE_CACHE = DATA / "feature_cache"  # frozen-encoder features and scores (algorithms)

THIRD_PARTY = REPO / "third_party"
TRAINER_CONFIGS = REPO / "trainers" / "configs"
