"""The one inference path from pixels: the cache's backbone, fed exactly as at extraction, then a head.

predict, explain and every image metric go through `ImageModel`, so new images see what the cached
ones saw:

    preprocessing  the data config RECORDED in the cache (input size, interpolation, crop, mean/std),
                   not the one the installed timm resolves (a difference is a PreprocessingWarning)
    weights        the recorded identity (load_backbone_for_cache refuses other weights)
    grid           the recorded --layers, concatenated on the recorded (finest) grid, crop as recorded
    compute        on CUDA, channels-last input under AUTOCAST_DTYPE (float16) autocast, as stages/extract.py runs it
    features       rounded to float16, as the cache stores them

Pixels are in [0, 1]; normalisation happens in torch, so PGD (pipeline/metrics.py) can differentiate
through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform

from pipeline.backbones import AUTOCAST_DTYPE, Backbone, extract_grid, load_backbone_for_cache
from pipeline.model import ProtoQuantHead


@dataclass
class Outputs:
    """One forward pass: activation (B, K, H, W), presence (B, K), logits (B, C)."""

    activation: torch.Tensor
    presence: torch.Tensor
    logits: torch.Tensor


class ImageModel:
    """The frozen backbone and a ProtoQuant head, taking pixels in [0, 1] of the network input size.

    Build it with `for_cache` (or from a backbone made by load_backbone_for_cache, which carries the
    recorded data config). Backbone and head must be on the same device; pixels() returns tensors there.
    """

    def __init__(self, backbone: Backbone, head: ProtoQuantHead):
        self.backbone, self.head = backbone, head.eval()
        self.device = head.codes.device
        config = backbone.data_config
        self._to_pixels = create_transform(**config, is_training=False, normalize=False)  # resize + crop, uint8
        self.mean = torch.tensor(config["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.autocast = self.device.type == "cuda"  # extraction's setting: autocast on CUDA, full precision on CPU

    @classmethod
    def for_cache(cls, provenance: dict, head: ProtoQuantHead, *, weights: str | Path | None = None,
                  device: str | torch.device = "cpu") -> ImageModel:
        """The cache's backbone (recorded weights and data config) on `device`, with `head` moved there."""
        backbone = load_backbone_for_cache(provenance, weights=weights, device=str(device))
        return cls(backbone, head.to(device))

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.backbone.data_config["input_size"]
        return int(size[-2]), int(size[-1])

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """An RGB image (already cropped to its box where the cache did so) -> (3, S, S) float in [0, 1]."""
        return (self._to_pixels(image).float() / 255.0).to(self.device)  # as ToTensor does

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> (B, 3, S, S) pixels in [0, 1]."""
        return torch.stack([self.pixels(image) for image in images])

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, H, W, D) float32 features (differentiable in the pixels)."""
        x = ((pixels - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=AUTOCAST_DTYPE, enabled=self.autocast):
            grid = extract_grid(self.backbone, x)
        return grid.float().half().float()  # the cache's float16 values: same inputs, same features

    def activation(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, K, H, W) softmax activations."""
        return self.head.activation(self.grid(pixels))

    @torch.no_grad()
    def outputs(self, pixels: torch.Tensor) -> Outputs:
        """Activation, presence and logits of (B, 3, S, S) pixels, without gradients."""
        return outputs_of(self.head, self.grid(pixels))


def outputs_of(head: ProtoQuantHead, grid: torch.Tensor) -> Outputs:
    """Activation, presence and logits of a (B, H, W, D) feature grid (cached or computed)."""
    activation = head.activation(grid)
    presence = activation.amax(dim=(2, 3))  # (B, K)
    return Outputs(activation, presence, head.logits_from_presence(presence))
