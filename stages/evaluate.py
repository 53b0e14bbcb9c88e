"""Score a run on one split of its cache: accuracy, the probe's accuracy, and prototype statistics.

Nothing here is selected or tuned on what it measures: evaluate only reads a finished run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data import evaluation_source, usable_rows
from pipeline.model import ProtoQuantHead, codes_in_use, local_explanation_size
from pipeline.training import open_run_and_cache, resolve_device

LOCAL_THRESHOLD = 1e-3  # a code counts in a local explanation above this fraction of the predicted logit


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
    local_size: float         # mean number of codes above LOCAL_THRESHOLD of the predicted logit
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
    return score_head(head, probe, evaluation_source(data, batch_size=batch_size), run.classes, split=split,
                      device=where, skipped=int(data.n - len(usable_rows(data))))


def evaluate_with_metrics(run_path: str | Path, *, data: str | Path | None = None, max_images: int = 32,
                          cache: str | Path | None = None, device: str = "auto", weights: str | Path | None = None,
                          **options) -> tuple[Evaluation, dict]:
    """evaluate(), and the interpretability metrics (grounding, purity, misalignment, stability, deletion)
    when DATA is given ({} otherwise); a metric the dataset cannot support says why under its key."""
    evaluation = evaluate(run_path, cache=cache, device=device, weights=weights, **options)
    if data is None:
        return evaluation, {}
    from stages.interpret import MetricSettings, interpretability_metrics

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
        to_predicted = head.effective_weight()[predicted] * presence  # (B, K): contributions to the prediction
        sizes.append(local_explanation_size(to_predicted[:, None, :], logits.gather(1, predicted[:, None]),
                                            LOCAL_THRESHOLD).cpu())
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
    return Evaluation(
        split=split, n=int(len(labels)), top1=_mean(correct), top5=_mean(torch.cat(top5_hits).numpy() if top5_hits else []),
        probe_top1=_mean(torch.cat(probe_hits).numpy()) if probe_hits else float("nan"), per_class=per_class,
        codes_used=int(codes_in_use(head).sum()), codes_total=int(head.codes.shape[0]),
        local_size=_mean(torch.cat(sizes).float().numpy() if sizes else []),
        w_sparsity=float((weight == 0).float().mean()), skipped=skipped,
    )


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def print_evaluation(result: Evaluation, run_path: str | Path) -> None:
    """Rich tables: the summary, then per-class accuracy."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"{run_path} on the {result.split} split ({result.n} images)")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    rows = [
        ("ProtoQuant top-1", f"{result.top1:.4f}"), ("ProtoQuant top-5", f"{result.top5:.4f}"),
        ("probe top-1 (reference)", f"{result.probe_top1:.4f}"),
        ("probe minus ProtoQuant", f"{result.probe_top1 - result.top1:+.4f}"),
        ("codes in use", f"{result.codes_used} / {result.codes_total}"),
        ("mean local explanation size", f"{result.local_size:.2f} codes"),
        ("sparsity of W", f"{result.w_sparsity:.3f}"),
    ]
    if result.skipped:
        rows.append(("skipped images (not scored)", str(result.skipped)))
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    per_class = Table(title="per-class top-1")
    per_class.add_column("class")
    per_class.add_column("top-1", justify="right")
    for name, value in result.per_class.items():
        per_class.add_row(name, f"{value:.3f}")
    console.print(per_class)
