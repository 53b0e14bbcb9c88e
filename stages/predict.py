"""Predict raw image files end to end: the cache's backbone (same weights, same preprocessing), then the head.

The backbone comes from the provenance the cache recorded at extraction; the run keeps a copy in its
config.json, so predicting needs the cache only to check it (when it is still where the run says, or
given with `cache`). Images go through the one inference path (pipeline/inference.py: the RECORDED
data config, extraction's autocast). Each prediction lists the codes that contributed most to the
predicted class (relu(W[c, k]) * p[k], pipeline/model.py top_contributions) with the grid cell where
each fired and that cell's receptive box, (x, y, width, height) in the image's own pixels (the one box
convention, pipeline/geometry.py). Images are used whole, as in explain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.cache import Cache
from pipeline.devices import resolve_device
from pipeline.errors import ProtoquantError
from pipeline.geometry import Preprocessing
from pipeline.images import check_image_path, read_image_file
from pipeline.inference import ImageModel, Outputs
from pipeline.model import top_contributions
from pipeline.run import check_run_matches_cache, open_run


@dataclass
class CodeEvidence:
    """One code's part in a prediction."""

    code: int
    contribution: float        # relu(W[c, k]) * p[k], in logit units
    presence: float            # p[k] in [0, 1]
    cell: tuple[int, int]      # (row, column) of the grid where the code fired most
    box: tuple[float, float, float, float]  # that cell's receptive box in image pixels: x, y, width, height


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


@torch.no_grad()
def predict(run_path: str | Path, images: list[str | Path], *, cache: str | Path | None = None, top: int = 5,
            weights: str | Path | None = None, device: str = "auto", batch_size: int = 16) -> list[Prediction]:
    """Class, probability, top classes and the top `top` contributing codes for each image file."""
    if not images:
        raise ProtoquantError("predict needs at least one IMAGE file")
    paths = [check_image_path(p) for p in images]  # a wrong path is refused before the model loads
    run = open_run(run_path)
    where = resolve_device(device)
    provenance = _provenance(run, cache)
    model = ImageModel.for_cache(provenance, run.head, weights=weights, device=where)
    if model.backbone.dim != model.head.feature_dim:
        raise ProtoquantError(f"the backbone gives {model.backbone.dim}-dimensional features but run {run_path} "
                              f"expects {model.head.feature_dim}: pass the cache the run was trained on with --cache")
    preprocessing = Preprocessing.from_provenance(provenance, crop_to_box=False)
    results = []
    for start in range(0, len(paths), batch_size):
        batch = [read_image_file(path) for path in paths[start:start + batch_size]]
        outputs = model.outputs(model.batch(batch))
        results += _explain(model, outputs, paths[start:start + batch_size], batch, preprocessing, run.classes, top)
    return results


def _explain(model: ImageModel, outputs: Outputs, paths: list[Path], images, preprocessing: Preprocessing,
             classes: list[str], top: int) -> list[Prediction]:
    probabilities = outputs.logits.softmax(dim=1).cpu()  # (B, C)
    predicted = outputs.logits.argmax(dim=1)  # (B,)
    evidence = top_contributions(model.head, outputs.activation, outputs.presence, predicted, top)
    presence = outputs.presence.cpu()
    out = []
    for b, (path, image) in enumerate(zip(paths, images)):
        geometry = preprocessing.image(image.size)
        label = int(predicted[b])
        codes = []
        for code, value, shown, (row, col) in zip(evidence.codes[b].tolist(), evidence.values[b].tolist(),
                                                  evidence.shown[b].tolist(), evidence.cells[b].tolist()):
            if not shown:
                break
            box = tuple(float(v) for v in geometry.cell_box(row, col))
            codes.append(CodeEvidence(code, value, float(presence[b, code]), (row, col), box))
        ranked = probabilities[b].argsort(descending=True)[:min(5, len(classes))].tolist()
        out.append(Prediction(str(path), classes[label], float(probabilities[b, label]),
                              [(classes[c], float(probabilities[b, c])) for c in ranked], codes))
    return out
