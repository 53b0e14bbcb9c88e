"""The one rule for `--device`, shared by every command: auto, cpu, cuda or cuda:N."""

from __future__ import annotations

import os
import re

import torch

from pipeline.errors import ProtoquantError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_text(text: str) -> str:
    """Refuse anything that is not auto/cpu/cuda/cuda:N (before any model is built)."""
    if not _DEVICE.match(text):
        raise ProtoquantError(f"--device {text!r}: choose {DEVICE_CHOICES}")
    return text


def resolve_device(text: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU (this rank's one under torchrun), else cpu; cuda without one is refused."""
    text = check_device_text(text)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ProtoquantError(f"--device {text}: no CUDA device is visible; use --device cpu or auto")
        if text == "cuda" and "LOCAL_RANK" in os.environ:
            text = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ProtoquantError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                                  "use --device cuda or auto")
    return torch.device(text)
