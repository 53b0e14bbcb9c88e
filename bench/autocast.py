"""fp16 vs bf16 autocast for extraction: how far each lands from full-precision features, on real weights.

The same preprocessed make-birds images go through the same frozen backbone three times: in float32
(the reference), under float16 autocast and under bfloat16 autocast. For each autocast dtype it reports
the largest and mean absolute difference from the reference grid (the cache stores float16, so the
reference's own float16 rounding is printed as the floor), the lowest cosine between a patch and its
reference, and the share of non-finite values. The float32 pass also records the largest magnitude of
any layer's output: float16 overflows at 65504, so that ratio is the model's float16 headroom.

    python bench/autocast.py [--images 32] [--device cpu|cuda] [--image-size 224] [--gradient-images 2] [--data DIR] [--json FILE]

Torch's CPU autocast runs both dtypes (bf16 is slow on CPUs without AMX/AVX-512-BF16: read the
differences, not the times); `bench/gpu_check.py` runs the same comparison on CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbones import Backbone, extract_grid, load_backbone  # noqa: E402
from pipeline.birds import make_birds  # noqa: E402
from pipeline.datasets import load_image, open_dataset  # noqa: E402

AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FLOAT16_MAX = float(torch.finfo(torch.float16).max)
MIN_HEADROOM = 16.0  # float16 is picked only when every layer stays this far below its overflow


def dataset_batch(net: Backbone, data: Path, n: int) -> torch.Tensor:
    """The first n images of any dataset protoquant reads, preprocessed as extraction does: (n, 3, S, S)."""
    records = [r for records in open_dataset(data).splits.values() for r in records][:n]
    return torch.stack([net.transform(load_image(r)) for r in records])


def birds_batch(net: Backbone, folder: Path, n: int, seed: int = 0) -> torch.Tensor:
    """n make-birds images (drawn at the network's input size, 64 px at least), preprocessed: (n, 3, S, S)."""
    classes = 4
    make_birds(folder, classes=classes, per_class=max(2, -(-n // classes) + 1), size=max(64, net.image_size), seed=seed)
    return dataset_batch(net, folder, n)


@contextmanager
def largest_layer_output(model: torch.nn.Module):
    """Track the largest |value| any leaf module outputs while the block runs: yields a one-item list."""
    largest = [0.0]

    def record(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            largest[0] = max(largest[0], float(output.detach().abs().max()))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        yield largest
    finally:
        for handle in handles:
            handle.remove()


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on the device's type; None: full precision (no autocast at all)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grid_under(net: Backbone, images: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
               batch_size: int = 16) -> tuple[torch.Tensor, float]:
    """(n, H, W, D) float32 features on the CPU under `dtype` autocast (None: full precision), and seconds."""
    grids, start = [], time.perf_counter()
    with torch.inference_mode(), autocast_to(device, dtype):
        for first in range(0, len(images), batch_size):
            x = images[first:first + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            grids.append(extract_grid(net, x).float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(grids), time.perf_counter() - start


def difference(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """How far candidate (n, H, W, D) lies from reference: absolute, per-patch cosine, non-finite share."""
    finite = torch.isfinite(candidate)
    gap = (candidate - reference).abs()[finite]
    cosine = F.cosine_similarity(candidate.flatten(0, -2), reference.flatten(0, -2), dim=-1)  # (n*H*W,)
    return {
        "max_abs_diff": float(gap.max()) if gap.numel() else float("nan"),
        "mean_abs_diff": float(gap.mean()) if gap.numel() else float("nan"),
        "relative_max_diff": float(gap.max() / reference.abs().max()) if gap.numel() else float("nan"),
        "min_patch_cosine": float(cosine.nan_to_num(-1.0).min()),
        "nonfinite_share": float(1.0 - finite.float().mean()),
    }


def activation_objective(grid: torch.Tensor, codes: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """What PGD lowers in the misalignment metric: code 0's softmax activation at its best cell, per image."""
    cosine = F.normalize(grid.float(), dim=-1) @ F.normalize(codes, dim=-1).T  # (B, H, W, K)
    return torch.softmax(cosine / tau, dim=-1)[..., 0].flatten(1).amax(dim=1)  # (B,)


def pixel_gradient(net: Backbone, images: torch.Tensor, codes: torch.Tensor, device: torch.device,
                   dtype: torch.dtype | None) -> torch.Tensor:
    """d objective / d input under `dtype` autocast (None: full precision), on the CPU: (n, 3, S, S)."""
    x = images.to(device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with autocast_to(device, dtype):
        grid = extract_grid(net, x)
    (gradient,) = torch.autograd.grad(activation_objective(grid, codes.to(device)).sum(), x)
    return gradient.float().cpu()


def gradient_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """PGD steps by the gradient's sign: how often the sign matches float32's, and how much underflows to 0."""
    moving = reference != 0
    return {"sign_agreement": float((candidate.sign() == reference.sign())[moving].float().mean()),
            "zero_gradient_share": float(((candidate == 0) & moving).float().sum() / moving.float().sum().clamp_min(1))}


def compare_gradients(net: Backbone, images: torch.Tensor, patches: torch.Tensor, device: torch.device) -> dict:
    """Pixel gradients of a code activation under each autocast dtype against float32's; up to 16 codes
    are taken from `patches` (n, H, W, D), spread over them (identical codes would leave no gradient)."""
    rows = patches.flatten(0, -2)  # (n*H*W, D)
    codes = rows[torch.linspace(0, len(rows) - 1, min(16, len(rows))).long().unique()]
    reference = pixel_gradient(net, images, codes, device, None)
    return {name: gradient_agreement(reference, pixel_gradient(net, images, codes, device, dtype))
            for name, dtype in AUTOCAST_DTYPES.items()}


def compare_autocast(net: Backbone, images: torch.Tensor, device: torch.device, gradient_images: int = 2) -> dict:
    """Every autocast dtype against float32 on the same images; the float16 storage floor; headroom."""
    with largest_layer_output(net.model) as largest:
        reference, fp32_seconds = grid_under(net, images, device, None)
    storage = reference.half().float()
    rows = {"float32 -> float16 storage (the cache's own rounding)": difference(reference, storage)}
    timings = {"float32": fp32_seconds}
    for name, dtype in AUTOCAST_DTYPES.items():
        grid, seconds = grid_under(net, images, device, dtype)
        rows[name] = difference(reference, grid.half().float())  # what the cache would hold
        timings[name] = seconds
    gradients = compare_gradients(net, images[:gradient_images], reference, device) if gradient_images else {}
    return {
        "device": str(device), "backbone": net.name, "weights": net.weights, "images": len(images),
        "image_size": net.image_size, "grid": list(net.grid), "dim": net.dim,
        "largest_layer_output": largest[0], "float16_headroom": FLOAT16_MAX / max(largest[0], 1e-30),
        "differences": rows, "gradients": gradients, "seconds": timings, "default": pick_default(rows, FLOAT16_MAX / max(largest[0], 1e-30)),
    }


def pick_default(rows: dict, float16_headroom: float) -> str:
    """The autocast dtype closest to float32 among those that stay finite; float16 also needs headroom,
    because an overflow on other images would stop an extraction (it refuses non-finite features)."""
    allowed = [name for name in AUTOCAST_DTYPES if rows[name]["nonfinite_share"] == 0.0
               and (name != "float16" or float16_headroom >= MIN_HEADROOM)]
    if not allowed:
        return "float32"
    return min(allowed, key=lambda name: rows[name]["max_abs_diff"])


def markdown(result: dict) -> str:
    lines = [f"autocast: {result['images']} {result.get('source', 'make-birds')} images, {result['backbone']} ({result['weights']}) @ "
             f"{result['image_size']}px, grid {result['grid'][0]}x{result['grid'][1]}x{result['dim']}, on {result['device']}",
             "| features vs float32 | max abs diff | relative max diff | mean abs diff | min patch cosine | non-finite | s |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["differences"].items():
        seconds = result["seconds"].get(name)
        lines.append(f"| {name} | {row['max_abs_diff']:.4g} | {row['relative_max_diff']:.3g} | {row['mean_abs_diff']:.3g} "
                     f"| {row['min_patch_cosine']:.5f} | {row['nonfinite_share']:.3g} | "
                     f"{'' if seconds is None else f'{seconds:.2f}'} |")
    for name, row in result["gradients"].items():
        lines.append(f"pixel gradient of a code activation under {name}: sign agrees with float32 on "
                     f"{row['sign_agreement']:.3f} of pixels, {row['zero_gradient_share']:.3g} underflow to 0")
    lines.append(f"largest layer output in float32 = {result['largest_layer_output']:.4g} "
                 f"(float16 headroom {result['float16_headroom']:.0f}x); default picked: {result['default']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient-images", type=int, default=2, help="images whose pixel gradients are compared")
    parser.add_argument("--data", type=Path, help="take the images from this dataset (default: generated make-birds)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    net = load_backbone(args.backbone, pretrained=args.backbone == "tf_efficientnet_lite0",
                        image_size=args.image_size, device=str(device))
    if args.data:
        images = dataset_batch(net, args.data, args.images)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            images = birds_batch(net, Path(tmp) / "birds", args.images)
    result = compare_autocast(net, images, device, args.gradient_images)
    result["source"] = args.data.name if args.data else "make-birds"
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
