"""ComAlign's detector region source: a torchvision detector whose weights are a local
file. Imported only when a `detector:FILE` region source is asked for
(algorithms/comalign/data.py region_source)."""
from __future__ import annotations

import os

import torch

from algorithms.comalign.regions import Regions, file_fingerprint


class DetectorRegions:
    """A torchvision detector (default fasterrcnn_resnet50_fpn, 91 COCO classes) whose
    weights are a local file (loaded weights_only); detections above `threshold`."""
    name = "detector"

    def __init__(self, weights_file, arch="fasterrcnn_resnet50_fpn", num_classes=91,
                 threshold=0.3, device="cpu"):
        import torchvision
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"detector weights not found: {weights_file}")
        self.weights_file, self.arch, self.threshold = str(weights_file), arch, threshold
        builder = getattr(torchvision.models.detection, arch)
        self.model = builder(weights=None, weights_backbone=None, num_classes=num_classes)
        self.model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        self.model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, item: dict) -> Regions:
        from PIL import Image
        from torchvision.transforms.functional import to_tensor
        img = to_tensor(Image.open(item["path"]).convert("RGB")).to(self.device)
        out = self.model([img])[0]
        keep = out["scores"] >= self.threshold
        return Regions(out["boxes"][keep].cpu().numpy(), out["scores"][keep].cpu().numpy())

    def describe(self):
        return {"source": self.name, "arch": self.arch, "threshold": self.threshold,
                "file": file_fingerprint(self.weights_file)}
