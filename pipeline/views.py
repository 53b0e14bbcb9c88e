"""Augmented views cached at extraction (METHOD.md pitfall 5: several explicit views, never one baked-in draw)."""

from __future__ import annotations

from torchvision import transforms

from timm.data.transforms import str_to_interp_mode


def view_transform(data_config: dict, *, scale: tuple[float, float] = (0.35, 1.0)) -> transforms.Compose:
    """Random resized crop + horizontal flip at the model's input size, then its normalisation.

    Randomness comes from torch's global generator: the caller seeds it per (image, view).
    """
    size = int(data_config["input_size"][-1])
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=scale, interpolation=str_to_interp_mode(data_config["interpolation"])),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data_config["mean"], data_config["std"]),
    ])
