"""Interpretability for other stages: the metrics `protoquant evaluate --data DATA` adds, and the
report page of an edit (`protoquant prune`).

    interpretability_metrics(RUN, DATA) -> {"grounding", "purity", "misalignment", "stability", "deletion"}
        grounding and purity come from the cache alone (purity needs part keypoints); the other three
        run up to settings.max_images test images through the backbone. A metric whose annotations
        are missing is {"skipped": "why"}.
    prune_report(RUN_BEFORE, RUN_AFTER, DIR) -> DIR/index.html: which codes went, their nearest
        training patches, accuracy before and after, and the test predictions that changed;
        edit_report(run, edited_head, cache, DIR) does the same for a head not saved yet.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import render
from pipeline.backbones import load_backbone_for_cache
from pipeline.cache import Cache
from pipeline.data import evaluation_source, usable_rows
from pipeline.geometry import Preprocessing
from pipeline.grounding import SplitImages, grounding_for_run
from pipeline.metrics import (ImageModel, MisalignmentSettings, PartImage, deletion, misalignment, network_view, purity,
                              stability)
from pipeline.model import ProtoQuantHead, codes_in_use
from pipeline.render import esc
from pipeline.training import Run, check_run_matches_cache, open_run
from stages.evaluate import open_run_and_cache
from stages.gallery import GROUNDING_TOP, code_card, code_views, write_code_thumbnails


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
    """Grounding, purity, misalignment, stability and deletion of RUN; DATA provides the pixels."""
    run, store = open_run_and_cache(run_path, cache)
    store.require_complete()
    head = run.head.eval()
    result: dict = {}
    grounding = grounding_for_run(run.path, head, store, top=GROUNDING_TOP, device=settings.device)
    result["grounding"] = grounding.summary(codes_in_use(head).cpu().numpy())
    has_parts = "part_locs" in (store.split("train").annotations() or {})
    result["purity"] = (purity(head, store, top=settings.purity_top, device=settings.device) if has_parts
                        else {"skipped": "the dataset has no part keypoints (parts/part_locs.txt)"})

    items = load_part_images(store, settings.split, data, settings.max_images)
    preprocessing = Preprocessing.from_cache(store)
    backbone = load_backbone_for_cache(store.provenance, weights=weights, device=settings.device)
    model = ImageModel(backbone, head.to(settings.device))
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


# ---- the prune / edit report ------------------------------------------------------------------------------

@dataclass
class PruneReport:
    """What an edit report found, and where it is."""

    out: Path
    index: Path
    accuracy_before: float
    accuracy_after: float
    removed: list[int]  # codes in use before, not after
    changed: int  # test predictions that changed
    seconds: float


@torch.no_grad()
def predictions(head: ProtoQuantHead, cache: Cache, split: str, *, batch_size: int = 256,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, predicted classes) over the usable rows of a split, in row order."""
    data = cache.split(split)
    rows = usable_rows(data)
    labels, predicted = [], []
    head = head.eval().to(device)
    for features, y in evaluation_source(data, batch_size=batch_size, rows=rows).batches(0):
        predicted.append(head(features.to(device)).argmax(dim=1).cpu())
        labels.append(y)
    return rows, torch.cat(labels).numpy(), torch.cat(predicted).numpy()


def prune_report(before_run: str | Path, after_run: str | Path, out: str | Path, *, cache: str | Path | None = None,
                 data: str | Path | None = None, split: str = "test", patches: int = 5, max_changed: int = 200,
                 device: str = "cpu") -> PruneReport:
    """Write DIR/index.html comparing two runs on the same cache: before and after an edit."""
    before, store = open_run_and_cache(before_run, cache)
    after = open_run(after_run)
    check_run_matches_cache(after, store)
    title = f"{Path(before_run).name} → {Path(after_run).name}"
    return edit_report(before, after.head, store, out, data=data, split=split, patches=patches,
                       max_changed=max_changed, device=device, title=title)


def edit_report(before: Run, after: ProtoQuantHead, cache: Cache, out: str | Path, *, data: str | Path | None = None,
                split: str = "test", patches: int = 5, max_changed: int = 200, device: str = "cpu",
                title: str = "") -> PruneReport:
    """Write DIR/index.html for an edited head (e.g. before the pruned run is saved): the codes in use
    before and not after with their nearest training patches, accuracy on `split` before and after,
    and the predictions that changed (at most max_changed shown; DIR/report.json has the counts)."""
    started = time.perf_counter()
    out = Path(out)
    used_before, used_after = codes_in_use(before.head).cpu().numpy(), codes_in_use(after).cpu().numpy()
    removed = np.flatnonzero(used_before & ~used_after)
    grounding = grounding_for_run(before.path, before.head, cache, top=max(GROUNDING_TOP, patches), device=device)
    write_code_thumbnails(grounding, removed, cache, SplitImages(cache, grounding.split, data), out,
                          patches=patches, size=96)
    rows, labels, predicted_before = predictions(before.head, cache, split, device=device)
    _, _, predicted_after = predictions(after, cache, split, device=device)
    changed = np.flatnonzero(predicted_before != predicted_after)
    test_images = SplitImages(cache, split, data)
    shown = changed[:max_changed]
    for i in shown.tolist():
        picture, _ = render.fit(test_images.load(int(rows[i])), 96)
        render.save_image(picture, out / _test_image(int(rows[i])))

    accuracy = (float((predicted_before == labels).mean()), float((predicted_after == labels).mean()))
    figures = {"accuracy_before": accuracy[0], "accuracy_after": accuracy[1], "split": split, "images": int(len(rows)),
               "codes_in_use_before": int(used_before.sum()), "codes_in_use_after": int(used_after.sum()),
               "removed_codes": removed.tolist(), "changed_predictions": int(len(changed)),
               "fixed": int(((predicted_after == labels) & (predicted_before != labels)).sum()),
               "broken": int(((predicted_before == labels) & (predicted_after != labels)).sum())}
    render.write_style(out)
    removed_mask = ~after.code_mask.cpu().numpy()
    views = code_views(before.head, grounding, removed, patches=patches)
    body = _report_body(figures, views, removed_mask, before.classes, cache.split(split).ids, rows, labels,
                        predicted_before, predicted_after, shown, len(changed))
    subtitle = f"{esc(title or before.path.name)} &middot; {esc(split)} split"
    render.write_text(out / "index.html", render.page("Edit report", body, subtitle=subtitle))
    render.write_text(out / "report.json", json.dumps(figures, indent=2) + "\n")
    return PruneReport(out=out, index=out / "index.html", accuracy_before=accuracy[0], accuracy_after=accuracy[1],
                       removed=removed.tolist(), changed=int(len(changed)), seconds=round(time.perf_counter() - started, 3))


def _test_image(row: int) -> str:
    return f"images/test-{row:06d}.jpg"


def _report_body(figures: dict, views: dict, removed_mask: np.ndarray, classes: list[str], ids: np.ndarray,
                 rows: np.ndarray, labels: np.ndarray, before: np.ndarray, after: np.ndarray, shown: np.ndarray,
                 n_changed: int) -> str:
    numbers = render.stats([
        (f"{figures['accuracy_before']:.3f}", "accuracy before"), (f"{figures['accuracy_after']:.3f}", "accuracy after"),
        (f"{figures['codes_in_use_before']} → {figures['codes_in_use_after']}", "codes in use"),
        (str(n_changed), "predictions changed"), (str(figures["fixed"]), "fixed"), (str(figures["broken"]), "broken"),
    ])
    cards = "".join(code_card(views[k], classes, class_href=None, extra=(" &middot; removed from the head" if removed_mask[k]
                                                        else " &middot; no class weighs it any more"))
                    for k in sorted(views))
    changed_rows = []
    for i in shown.tolist():
        verdict = "fixed" if after[i] == labels[i] else ("broken" if before[i] == labels[i] else "still wrong")
        image_id = str(ids[rows[i]])
        changed_rows.append([render.img(_test_image(int(rows[i])), image_id, width=64),
                             f'<span title="{esc(image_id)}">{esc(image_id.rsplit("/", 1)[-1])}</span>',
                             esc(classes[labels[i]]), esc(classes[before[i]]), esc(classes[after[i]]), verdict])
    more = f"<p class=muted>First {len(shown)} of {n_changed} shown; report.json has the counts.</p>" if n_changed > len(shown) else ""
    table = (render.table(["", "image", "true class", "before", "after", ""], changed_rows) if changed_rows
             else "<p>No prediction changed.</p>")
    return (f"{numbers}<h2>Codes removed ({len(views)})</h2><p class=muted>Codes in use before the edit and not after, "
            f"each with its nearest training patches and the classes that weighed it before.</p>"
            f'<div class="cards">{cards or "<p>None.</p>"}</div><h2>Test predictions that changed</h2>{table}{more}')
