"""CLIP preprocessing, as DomainBed's datasets get it for the harness's algorithms."""
from __future__ import annotations

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T


def clip_transform(image_size: int, train: bool):
    """CLIP preprocessing (AlignCLIP README step 3). Eval: Resize(bicubic)+CenterCrop;
    train: RandomResizedCrop(scale 0.7-1)+HorizontalFlip; both CLIP mean/std."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        head = [T.RandomResizedCrop(image_size, scale=(0.7, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose(head + [T.Lambda(_to_rgb), T.ToTensor(),
                             T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


def _to_rgb(img):
    return img.convert("RGB")


