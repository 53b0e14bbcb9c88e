"""Predict raw image files end to end: the cache's backbone (same weights, same preprocessing), then the head.

The backbone comes from the provenance the cache recorded at extraction; the run keeps a copy in its
config.json, so predicting needs the cache only to check it (when it is still where the run says, or
given with `cache`). Each prediction lists the codes that contributed most to the predicted class
(relu(W[c, k]) * p[k], METHOD.md "Explanations") and the grid cell where each code fired.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.backbones import extract_grid, load_backbone_for_cache
from pipeline.cache import Cache
from pipeline.errors import ProtoquantError
from pipeline.images import decode_rgb
from pipeline.model import peak_locations
from pipeline.training import check_run_matches_cache, open_run, resolve_device


@dataclass
class CodeEvidence:
    """One code's part in a prediction."""

    code: int
    contribution: float        # relu(W[c, k]) * p[k], in logit units
    presence: float            # p[k] in [0, 1]
    cell: tuple[int, int]      # (row, column) of the grid where the code fired most
    box: tuple[float, float, float, float]  # that cell in network-input pixels: x0, y0, x1, y1


@dataclass
class Prediction:
    image: str
    label: str
    probability: float
    top_classes: list[tuple[str, float]]
    evidence: list[CodeEvidence]

    def to_json(self) -> dict:
        return asdict(self)


def _provenance(run, cache: str | Path | None) -> dict:
    """The backbone's provenance: from the cache when it is there (checked against the run), else the run's copy."""
    path = Path(cache) if cache is not None else Path(run.config["cache"]["path"])
    if cache is not None or (path / "zarr.json").is_file():
        store = Cache(path)
        check_run_matches_cache(run, store)
        return store.provenance
    return run.config["cache"]["provenance"]


def _load_images(paths: list[Path]):
    images = []
    for path in paths:
        if not path.is_file():
            raise ProtoquantError(f"image {path} does not exist: pass paths of image files")
        images.append(decode_rgb(path.read_bytes(), str(path)))
    return images


@torch.no_grad()
def predict(run_path: str | Path, images: list[str | Path], *, cache: str | Path | None = None, top: int = 5,
            weights: str | Path | None = None, device: str = "auto", batch_size: int = 16) -> list[Prediction]:
    """Class, probability, top classes and the top `top` contributing codes for each image file."""
    if not images:
        raise ProtoquantError("predict needs at least one IMAGE file")
    run = open_run(run_path)
    where = resolve_device(device)
    backbone = load_backbone_for_cache(_provenance(run, cache), weights=weights, device=str(where))
    head = run.head.to(where)
    paths = [Path(p) for p in images]
    results = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        x = torch.stack([backbone.transform(image) for image in _load_images(batch)]).to(where)  # (B, 3, S, S)
        grid = extract_grid(backbone, x).float()  # (B, H, W, D)
        if grid.shape[-1] != head.codes.shape[1]:
            raise ProtoquantError(f"the backbone gives {grid.shape[-1]}-dimensional features but run {run_path} "
                                  f"expects {head.codes.shape[1]}: pass the cache the run was trained on with --cache")
        results += _explain(head, grid, batch, run.classes, top, backbone.image_size)
    return results


def _explain(head, grid: torch.Tensor, paths: list[Path], classes: list[str], top: int, size: int) -> list[Prediction]:
    activation = head.activation(grid)  # (B, K, H, W)
    presence = activation.amax(dim=(2, 3))  # (B, K)
    logits = head.logits_from_presence(presence)  # (B, C)
    probabilities = logits.softmax(dim=1)  # (B, C)
    peaks = peak_locations(activation).cpu()  # (B, K, 2) as (row, column)
    h, w = grid.shape[1:3]
    out = []
    for b, path in enumerate(paths):
        label = int(logits[b].argmax())
        contributions = (head.effective_weight()[label] * presence[b]).cpu()  # (K,)
        ranked = contributions.argsort(descending=True)[:top]
        evidence = []
        for code in ranked.tolist():
            if contributions[code] <= 0:
                break
            row, col = (int(v) for v in peaks[b, code])
            box = (col * size / w, row * size / h, (col + 1) * size / w, (row + 1) * size / h)
            evidence.append(CodeEvidence(code, float(contributions[code]), float(presence[b, code]), (row, col), box))
        ranked_classes = probabilities[b].argsort(descending=True)[:min(5, len(classes))].tolist()
        out.append(Prediction(str(path), classes[label], float(probabilities[b, label]),
                              [(classes[c], float(probabilities[b, c])) for c in ranked_classes], evidence))
    return out


def print_predictions(predictions: list[Prediction]) -> None:
    """One small table per image: the codes behind the predicted class."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for p in predictions:
        table = Table(title=f"{p.image}: [bold]{p.label}[/] ({p.probability:.3f})", title_justify="left")
        for column in ("code", "contribution", "presence", "cell (row, col)", "input box (x0, y0, x1, y1)"):
            table.add_column(column, justify="right")
        for e in p.evidence:
            table.add_row(str(e.code), f"{e.contribution:.3f}", f"{e.presence:.3f}", f"{e.cell[0]}, {e.cell[1]}",
                          ", ".join(f"{v:.0f}" for v in e.box))
        console.print(table)
