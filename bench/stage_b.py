"""A stage B training step, three ways side by side, at the shapes of the demo and of Fashion-MNIST.

Contenders, on the same batch (a multi-map grid as `--layers auto` writes it: the stride-16 map's channels
vary cell by cell, the stride-32 map's are copied over 2 x 2 cells), the same head (default settings: a
128-dimensional projection learning on the fine channels, trainable codes, the anchor term) and AdamW:
- reference: S in the paper's (B, K, H, W) notation (METHOD.md), from an einsum, S / tau, the removed codes
  masked, the softmax over dim 1, every cell projected: what protoquant computed before;
- codes-last: protoquant's head with every cell projected (what validation and a saved head compute);
- codes-last + blocks: protoquant's training step (the coarse map projected once per 2 x 2 block, no
  gradient for the columns that do not learn).
Each step is timed interleaved, `--repeats` rounds of `--steps` steps, the total kept per contender; the
losses of the first step are compared (same math: differences are float rounding).

    python bench/stage_b.py [--steps 10] [--repeats 5] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codebook import COSINE_EPS  # noqa: E402
from pipeline.model import ProtoQuantHead  # noqa: E402
from pipeline.training import _keep_columns  # noqa: E402

SHAPES = {  # name: (batch, grid side, fine channels, coarse channels, K, classes); Lite0 at 224 px and 96 px
    "make-birds 14x14x432, K=128": (64, 14, 112, 320, 128, 6),
    "Fashion-MNIST 6x6x432, K=256": (64, 6, 112, 320, 256, 10),
}
DIM = 128  # the projection's default size


def layered_batch(batch: int, side: int, fine: int, coarse: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    fine_part = torch.randn(batch, side, side, fine, generator=g)
    coarse_part = torch.randn(batch, side // 2, side // 2, coarse, generator=g)
    coarse_part = coarse_part.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return torch.cat([fine_part, coarse_part], dim=-1).half(), torch.randint(0, classes, (batch,), generator=g)


def reference_presence(head: ProtoQuantHead, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (B, K, H, W), presence (B, K)) in the paper's layout."""
    f_unit = F.normalize(head.projection(f.float()), dim=-1, eps=COSINE_EPS)
    s = torch.einsum("bhwd,kd->bkhw", f_unit, F.normalize(head.codes, dim=-1, eps=COSINE_EPS))
    scores = (s / head.tau).masked_fill(~head.code_mask[None, :, None, None], float("-inf"))
    return s, scores.softmax(dim=1).amax(dim=(2, 3))


def ours_presence(head: ProtoQuantHead, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = head.similarity(f)
    return s, head.activation_from_similarity(s).amax(dim=(2, 3))


def contender(shape: tuple, blocks: bool, device: torch.device):
    batch, side, fine, coarse, k, classes = shape
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(DIM, fine + coarse, generator=g) * 0.05, torch.zeros(DIM)
    head = ProtoQuantHead(torch.randn(k, DIM, generator=g), classes, train_codes=True,
                          projection=(weight, bias)).to(device)
    kept = torch.arange(fine + coarse, device=device) >= fine
    _keep_columns(head.projection.weight, kept)
    if blocks:
        head.grid_maps = [(0, fine, 1, 1, True), (fine, fine + coarse, 2, 2, False)]
    return head, torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)


def step(head, optimizer, presence_fn, f, y) -> float:
    s, p = presence_fn(head, f)
    loss = F.cross_entropy(head.logits_from_presence(p), y, label_smoothing=0.1) + head.anchor_penalty(s)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (each step ends in a sync: "
                                                       "the loss is read back, as train's finiteness check does)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    print(f"stage B training step (forward, backward, AdamW), batch 64, projection to {DIM}, {args.device}, "
          f"{args.threads} threads; {args.repeats} interleaved rounds of {args.steps} steps")
    print("| shape | reference ms | codes-last ms | codes-last + blocks ms | ratio codes-last | ratio + blocks | first-step loss diff |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        f, y = (t.to(device) for t in layered_batch(*shape[:4], shape[5]))
        runs = {"reference": (contender(shape, False, device), reference_presence),
                "codes-last": (contender(shape, False, device), ours_presence),
                "blocks": (contender(shape, True, device), ours_presence)}
        first = {key: step(*pair, fn, f, y) for key, (pair, fn) in runs.items()}
        seconds = dict.fromkeys(runs, 0.0)
        for _ in range(args.repeats):
            for key, (pair, fn) in runs.items():
                begin = time.perf_counter()
                for _ in range(args.steps):
                    step(*pair, fn, f, y)
                seconds[key] += time.perf_counter() - begin
        ms = {key: 1000 * value / (args.repeats * args.steps) for key, value in seconds.items()}
        diff = max(abs(first[key] - first["reference"]) for key in runs)
        print(f"| {name} | {ms['reference']:.1f} | {ms['codes-last']:.1f} | {ms['blocks']:.1f} | "
              f"{ms['codes-last'] / ms['reference']:.2f}x | {ms['blocks'] / ms['reference']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
