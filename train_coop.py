"""CoOp's train.py with the harness's trainers: same arguments, same logs (docs: docs/coop.md).

    python train_coop.py --trainer ZSCLIP --root DATA \
        --dataset-config-file third_party/CoOp/configs/datasets/oxford_pets.yaml \
        --config-file trainers/configs/backbones/vit_b16.yaml \
        --output-dir output/zsclip/oxford_pets/seed1 --seed 1 DATASET.SUBSAMPLE_CLASSES new
"""
import sys

from common import cli
from trainers.coop_runner import main

if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
