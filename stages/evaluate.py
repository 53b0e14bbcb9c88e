"""Score a run on one split of its cache: accuracy, the probe's accuracy, and prototype statistics; with
DATA, the interpretability metrics too.

    evaluate(RUN) -> Evaluation                         from the cache alone
    interpretability_metrics(RUN, DATA) -> {"grounding", "purity", "purity_strict", "evidence_on_defining_parts",
                                            "misalignment", "stability", "deletion"}
        grounding, both purities (they need part keypoints) and the evidence on defining parts (it needs
        the parts that define each class: make-birds' class_attributes.txt) come from the cache alone;
        the other three run up to settings.max_images test images through the backbone. A metric
        whose annotations are missing is {"skipped": "why"}.

Local explanation size has two published definitions, and evaluate reports both, by name:
    local_size_weights_above_0_1   per class, the weights relu(W) > 0.1 (the authors' calculate_local_size),
                                   averaged over classes
    local_size_pipnet              per image, the codes with presence >= 0.1 whose contribution to the
                                   predicted class exceeds 1e-3 (PIP-Net), averaged over images
    local_size                     the first again, for readers written before the split

Nothing here is selected or tuned on what it measures: evaluate only reads a finished run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import Cache
from pipeline.cards import GROUNDING_TOP
from pipeline.data import evaluation_source, usable_rows
from pipeline.devices import resolve_device
from pipeline.errors import ProtoquantError
from pipeline.geometry import Preprocessing
from pipeline.grounding import SplitImages, grounding_for_run
from pipeline.inference import ImageModel
from pipeline.metrics import (MisalignmentSettings, PartImage, deletion, evidence_on_defining_parts, misalignment,
                              network_view, purity, stability)
from pipeline.model import ProtoQuantHead, codes_in_use, local_size_per_class, local_size_per_image
from pipeline.run import open_run_and_cache

@dataclass
class Evaluation:
    """What `protoquant evaluate` reports (fractions, not percentages)."""

    split: str
    n: int
    top1: float
    top5: float
    probe_top1: float
    per_class: dict[str, float]
    codes_used: int           # codes with a positive weight to some class
    codes_total: int
    local_size_weights_above_0_1: float  # mean over classes of the weights relu(W) > 0.1 (authors' definition)
    local_size_pipnet: float  # mean over images of the codes present (>= 0.1) contributing > 1e-3 (PIP-Net)
    local_size: float         # = local_size_weights_above_0_1, kept for readers written before the split
    w_sparsity: float         # fraction of relu(W) entries that are zero (removed codes' columns included)
    skipped: int              # rows left out because their image was skipped at extraction

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(run_path: str | Path, *, cache: str | Path | None = None, split: str = "test", batch_size: int = 256,
             device: str = "auto", weights: str | Path | None = None) -> Evaluation:
    """Top-1/top-5, per-class accuracy and probe accuracy of RUN on `split` of its cache."""
    run, store = open_run_and_cache(run_path, cache)
    store.require_complete()
    data = store.split(split)
    where = resolve_device(device)
    head = run.head.to(where)
    probe = run.reference_head(weights=weights, device=where)
    return score_head(head, probe, evaluation_source(data, batch_size=batch_size, verify=True), run.classes, split=split,
                      device=where, skipped=int(data.n - len(usable_rows(data))))


def evaluate_with_metrics(run_path: str | Path, *, data: str | Path | None = None, max_images: int = 32,
                          cache: str | Path | None = None, device: str = "auto", weights: str | Path | None = None,
                          **options) -> tuple[Evaluation, dict]:
    """evaluate(), and the interpretability metrics (grounding, purity, misalignment, stability, deletion)
    when DATA is given ({} otherwise); a metric the dataset cannot support says why under its key."""
    evaluation = evaluate(run_path, cache=cache, device=device, weights=weights, **options)
    if data is None:
        return evaluation, {}
    settings = MetricSettings(max_images=max_images, device=str(resolve_device(device)))
    return evaluation, interpretability_metrics(run_path, data, cache=cache, weights=weights, settings=settings)


@torch.no_grad()
def score_head(head: ProtoQuantHead, probe: torch.nn.Module | None, source, classes: list[str], *, split: str,
               device: torch.device, skipped: int = 0) -> Evaluation:
    """Run head (and probe, when given) over every batch of source and summarise."""
    labels_all, top5_hits, sizes, probe_hits = [], [], [], []
    predicted_all = []
    k5 = min(5, len(classes))
    for features, labels in source.batches(0):
        f = features.to(device)
        presence = head.presence(f)  # (B, K)
        logits = head.logits_from_presence(presence)  # (B, C)
        predicted = logits.argmax(dim=1)  # (B,)
        sizes.append(local_size_per_image(head, presence, predicted).cpu())
        top5_hits.append((logits.topk(k5, dim=1).indices.cpu() == labels[:, None]).any(dim=1))
        if probe is not None:
            probe_hits.append(probe(f).argmax(dim=1).cpu() == labels)
        predicted_all.append(predicted.cpu())
        labels_all.append(labels)
    labels = torch.cat(labels_all).numpy() if labels_all else np.empty(0, dtype=np.int64)
    predicted = torch.cat(predicted_all).numpy() if predicted_all else np.empty(0, dtype=np.int64)
    correct = predicted == labels
    per_class = {name: float(correct[labels == c].mean()) for c, name in enumerate(classes) if (labels == c).any()}
    weight = head.effective_weight()
    per_class_size = float(local_size_per_class(head).float().mean())
    return Evaluation(
        split=split, n=int(len(labels)), top1=_mean(correct), top5=_mean(torch.cat(top5_hits).numpy() if top5_hits else []),
        probe_top1=_mean(torch.cat(probe_hits).numpy()) if probe_hits else float("nan"), per_class=per_class,
        codes_used=int(codes_in_use(head).sum()), codes_total=int(head.codes.shape[0]),
        local_size_weights_above_0_1=per_class_size, local_size_pipnet=_mean(torch.cat(sizes).float().numpy() if sizes else []),
        local_size=per_class_size,
        w_sparsity=float((weight == 0).float().mean()), skipped=skipped,
    )


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


# ---- interpretability metrics (evaluate --data) ----------------------------------------------------------

@dataclass(frozen=True)
class MetricSettings:
    """Options of the interpretability metrics (bounded so they run in seconds on a CPU)."""

    max_images: int = 32  # test images for misalignment, stability and deletion
    purity_top: int = 10  # PIP-Net: top training images per code
    sigma: float = 0.05  # stability: Gaussian noise std on pixels in [0, 1]
    codes_per_image: int = 10  # stability: top contributions checked per image
    eps: float = 8 / 255  # misalignment: PGD L-inf radius (pixels in [0, 1])
    step: float = 2 / 255
    steps: int = 5
    batch_size: int = 8
    split: str = "test"
    seed: int = 0
    device: str = "cpu"


def interpretability_metrics(run_path: str | Path, data: str | Path, *, cache: str | Path | None = None,
                             weights: str | Path | None = None, settings: MetricSettings = MetricSettings()) -> dict:
    """Grounding, both purities, evidence on defining parts, misalignment, stability and deletion of RUN;
    DATA provides the pixels (and, for a cache extracted before extract recorded them, the class parts)."""
    run, store = open_run_and_cache(run_path, cache)
    store.require_complete()
    head = run.head.eval()
    result: dict = {}
    grounding = grounding_for_run(run.path, head, store, top=GROUNDING_TOP, device=settings.device)
    result["grounding"] = grounding.summary(codes_in_use(head).cpu().numpy())
    has_parts = "part_locs" in (store.split("train").annotations() or {})
    no_parts = {"skipped": "the dataset has no part keypoints (parts/part_locs.txt)"}
    if has_parts:
        result.update(purity(head, store, top=settings.purity_top, device=settings.device))
    else:
        result["purity"], result["purity_strict"] = no_parts, no_parts
    result["evidence_on_defining_parts"] = _defining_parts_evidence(head, store, data, settings, has_parts)

    items = load_part_images(store, settings.split, data, settings.max_images)
    preprocessing = Preprocessing.from_cache(store)
    model = ImageModel.for_cache(store.provenance, head, weights=weights, device=settings.device)
    pixels = torch.stack([model.pixels(network_view(item, preprocessing)) for item in items])
    labels = torch.tensor([item.label for item in items])
    attack = MisalignmentSettings(eps=settings.eps, step=settings.step, steps=settings.steps,
                                  batch_size=settings.batch_size)
    result["misalignment"] = misalignment(model, pixels, labels, attack)
    result["stability"] = stability(model, pixels, sigma=settings.sigma, codes_per_image=settings.codes_per_image,
                                    seed=settings.seed, batch_size=settings.batch_size)
    with_parts = [item for item in items if item.part_locs.size]
    result["deletion"] = (deletion(model, with_parts, preprocessing, seed=settings.seed) if with_parts
                          else {"skipped": "the dataset has no part keypoints (parts/part_locs.txt)"})
    return result


def class_parts_of(cache: Cache, data: str | Path | None) -> list[list[str]] | None:
    """Which parts define each class: recorded in the cache by extract, else read from DATA."""
    recorded = cache.attrs.get("class_parts")
    if recorded is not None or data is None:
        return recorded
    from pipeline.datasets import open_dataset

    dataset = open_dataset(data)
    if dataset.class_parts is not None and dataset.classes != list(cache.attrs.get("classes") or []):
        raise ProtoquantError(f"{data} has other classes than {cache.path}: pass --data with the dataset the cache "
                              "was extracted from")
    return dataset.class_parts


def _defining_parts_evidence(head: ProtoQuantHead, cache: Cache, data: str | Path | None, settings: MetricSettings,
                             has_parts: bool) -> dict:
    class_parts = class_parts_of(cache, data)
    if class_parts is None:
        return {"skipped": "the dataset does not say which parts define each class (class_attributes.txt, "
                           "written by `protoquant make-birds`)"}
    if not has_parts:
        return {"skipped": "the dataset has no part keypoints (parts/part_locs.txt)"}
    return evidence_on_defining_parts(head, cache, class_parts, split=settings.split, device=settings.device)


def load_part_images(cache: Cache, split: str, data: str | Path, limit: int) -> list[PartImage]:
    """The first `limit` usable rows of a split (rows are a random permutation, so a random sample),
    read from DATA with their annotations from the cache."""
    rows = usable_rows(cache.split(split))[:limit]
    images = SplitImages(cache, split, data)
    annotations = cache.split(split).annotations() or {}
    labels = cache.split(split).labels
    items = []
    for row in rows.tolist():
        boxes, locs, part_boxes = (annotations.get(k) for k in ("boxes", "part_locs", "part_boxes"))
        items.append(PartImage(
            image=images.load(row), label=int(labels[row]),
            bird_box=None if boxes is None else tuple(float(v) for v in boxes[row]),
            part_locs=np.zeros((0, 3)) if locs is None else locs[row],
            part_boxes=None if part_boxes is None else part_boxes[row],
        ))
    return items
