"""Stage: local explanations of new images, end to end (backbone + head), as static pages.

For every image: the prediction, its top contributing codes (relu(W[c,k]) * p[k], METHOD.md
"Explanations": local), where each fired (its receptive box and activation heatmap over the image)
and each code's nearest training patches beside it ("this looks like that"); then the runner-up class
with its own top codes, for contrast.

    DIR/index.html              every image with its prediction
    DIR/image-NNN.html          one image explained
    DIR/images/NNN-*.jpg        the image with numbered boxes, one heatmap per shown code
    DIR/thumbs/code-KKKKK-S.jpg nearest training patches (the same files as the gallery's)
    DIR/explanations.json       the numbers on the pages
    DIR/style.css

The backbone is rebuilt from the cache's provenance; images are fed whole through the cache's
preprocessing (a cache made with --crop-to-box saw box crops; new images have no box).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import render
from pipeline.backbones import load_backbone_for_cache
from pipeline.errors import ProtoquantError
from pipeline.geometry import ImageGeometry, Preprocessing
from pipeline.grounding import SplitImages, grounding_for_run
from pipeline.images import decode_rgb
from pipeline.metrics import ImageModel, Outputs
from pipeline.model import peak_locations
from pipeline.render import esc
from stages.evaluate import open_run_and_cache
from stages.gallery import GROUNDING_TOP, thumb_name, write_code_thumbnails


@dataclass(frozen=True)
class ExplainSettings:
    """What `protoquant explain` shows."""

    top_codes: int = 5  # contributions shown for the predicted class
    runner_up_codes: int = 3  # contributions shown for the runner-up class
    patches: int = 5  # nearest training patches beside each code
    thumb_size: int = 96
    display_size: int = 480  # longest side of the pictures on the pages
    device: str = "cpu"


@dataclass
class Reason:
    """One code's part in a class score."""

    code: int
    weight: float  # relu(W[c, k])
    presence: float  # p[k]
    contribution: float  # weight * presence
    cell: tuple[int, int]  # (h, w) where the code fired most
    box: tuple[float, float, float, float]  # its receptive box in the image (x, y, w, h)


@dataclass
class Explanation:
    """One image explained."""

    image: str
    page: str
    predicted: str
    probability: float
    score: float
    reasons: list[Reason]
    runner_up: str | None = None
    runner_up_probability: float = 0.0
    runner_up_score: float = 0.0
    runner_up_reasons: list[Reason] = field(default_factory=list)


@dataclass
class ExplainSummary:
    """Where the pages are and what they say."""

    out: Path
    index: Path
    explanations: list[Explanation]
    seconds: float


def explain(run_path: str | Path, images: list[str | Path], out: str | Path, *, cache: str | Path | None = None,
            data: str | Path | None = None, weights: str | Path | None = None,
            settings: ExplainSettings = ExplainSettings()) -> ExplainSummary:
    """Explain every image in `images` with RUN; write the pages into OUT."""
    started = time.perf_counter()
    out = Path(out)
    if not images:
        raise ProtoquantError("explain needs at least one IMAGE")
    run, store = open_run_and_cache(run_path, cache)
    backbone = load_backbone_for_cache(store.provenance, weights=weights, device=settings.device)
    model = ImageModel(backbone, run.head.to(settings.device))
    preprocessing = Preprocessing.from_provenance(store.provenance, crop_to_box=False)
    explanations, pictures = [], []
    for number, path in enumerate(images, start=1):
        image = _read_image(Path(path))
        with torch.no_grad():
            outputs = model.outputs(model.pixels(image)[None])
        geometry = preprocessing.image(image.size)
        explanation = _explain_one(model, outputs, geometry, run.classes, Path(path).name, number, settings)
        explanations.append(explanation)
        pictures.append(_write_pictures(out, number, image, outputs, geometry, explanation, settings))

    grounding = grounding_for_run(run.path, run.head, store, top=max(GROUNDING_TOP, settings.patches),
                                  device=settings.device)
    shown = sorted({r.code for e in explanations for r in e.reasons + e.runner_up_reasons})
    write_code_thumbnails(grounding, np.asarray(shown, dtype=np.int64), store, SplitImages(store, grounding.split, data),
                          out, patches=settings.patches, size=settings.thumb_size)
    patches = {k: [(thumb_name(k, s), float(grounding.nearest.scores[k, s]))
                   for s in np.flatnonzero(grounding.nearest.valid[k][:settings.patches])] for k in shown}
    render.write_style(out)
    note = ("" if not store.attrs.get("crop_to_box") else
            " &middot; the cache saw images cropped to their bird box; these images are used whole")
    subtitle = f"run {esc(run.path.name)} &middot; backbone {esc(backbone.name)}{note}"
    for explanation, picture in zip(explanations, pictures):
        render.write_text(out / explanation.page, image_page(explanation, picture, patches, subtitle))
    render.write_text(out / "index.html", index_page(explanations, pictures, subtitle))
    render.write_text(out / "explanations.json", json.dumps([asdict(e) for e in explanations], indent=2) + "\n")
    return ExplainSummary(out=out, index=out / "index.html", explanations=explanations,
                          seconds=round(time.perf_counter() - started, 3))


def _read_image(path: Path):
    if not path.is_file():
        raise ProtoquantError(f"IMAGE {path} does not exist: pass paths of image files")
    return decode_rgb(path.read_bytes(), str(path))


def reasons_for(model: ImageModel, outputs: Outputs, geometry: ImageGeometry, cls: int, top: int) -> list[Reason]:
    """The `top` largest positive contributions relu(W[cls, k]) * p[k] of one image (batch of one)."""
    weight = model.head.effective_weight()[cls].detach().cpu()  # (K,)
    presence = outputs.presence[0].cpu()
    contribution = weight * presence
    cells = peak_locations(outputs.activation)[0].cpu()  # (K, 2)
    reasons = []
    for k in contribution.argsort(descending=True)[:top].tolist():
        if contribution[k] <= 0:
            break
        h, w = (int(v) for v in cells[k])
        box = tuple(float(v) for v in geometry.cell_box(h, w))
        reasons.append(Reason(code=k, weight=float(weight[k]), presence=float(presence[k]),
                              contribution=float(contribution[k]), cell=(h, w), box=box))
    return reasons


def _explain_one(model: ImageModel, outputs: Outputs, geometry: ImageGeometry, classes: list[str], name: str,
                 number: int, settings: ExplainSettings) -> Explanation:
    logits = outputs.logits[0].cpu()
    probabilities = logits.softmax(dim=0)
    ranked = logits.argsort(descending=True).tolist()
    best = ranked[0]
    explanation = Explanation(image=name, page=f"image-{number:03d}.html", predicted=classes[best],
                              probability=float(probabilities[best]), score=float(logits[best]),
                              reasons=reasons_for(model, outputs, geometry, best, settings.top_codes))
    if len(ranked) > 1:
        second = ranked[1]
        explanation.runner_up = classes[second]
        explanation.runner_up_probability = float(probabilities[second])
        explanation.runner_up_score = float(logits[second])
        explanation.runner_up_reasons = reasons_for(model, outputs, geometry, second, settings.runner_up_codes)
    return explanation


def _write_pictures(out: Path, number: int, image, outputs: Outputs, geometry: ImageGeometry, explanation: Explanation,
                    settings: ExplainSettings) -> dict[str, str]:
    """The image with numbered boxes, and one heatmap per shown code; -> {"main": path, code: path}."""
    display, scale = render.fit(image, settings.display_size)
    boxes = [(r.box, render.BOX_COLOURS[i % len(render.BOX_COLOURS)], str(i + 1)) for i, r in enumerate(explanation.reasons)]
    paths = {"main": f"images/{number:03d}-boxes.jpg"}
    render.save_image(render.draw_boxes(display, boxes, scale=scale), out / paths["main"])
    input_box = tuple(v * scale for v in geometry.input_box())
    for i, reason in enumerate(explanation.reasons + explanation.runner_up_reasons):
        name = f"images/{number:03d}-code-{reason.code:05d}.jpg"
        if name in paths.values():
            continue
        heat = outputs.activation[0, reason.code].detach().cpu().numpy()
        overlay = render.heatmap_overlay(display, heat, input_box)
        colour = render.BOX_COLOURS[i % len(render.BOX_COLOURS)] if i < len(explanation.reasons) else (255, 255, 255)
        render.save_image(render.draw_boxes(overlay, [(reason.box, colour, "")], scale=scale), out / name)
        paths[str(reason.code)] = name
    return paths


def _reason_block(index: int | None, reason: Reason, picture: str, patches: list[tuple[str, float]]) -> str:
    colour = render.BOX_COLOURS[index % len(render.BOX_COLOURS)] if index is not None else (160, 160, 160)
    swatch = f'<span class="swatch" style="background: rgb{colour}"></span>'
    label = f"{index + 1}. " if index is not None else ""
    thumbs = "".join(f'<figure>{render.img(path, f"training patch near code {reason.code}", width=56, height=56, title=f"cosine {cos:.3f}")}'
                     f"<figcaption>{cos:.2f}</figcaption></figure>" for path, cos in patches)
    return (f'<div class="reason">{render.img(picture, f"where code {reason.code} fired", width=170)}<div>'
            f"<h4>{swatch}{label}Code {reason.code}: contribution {reason.contribution:.3f}</h4>"
            f'<div class="muted">weight {reason.weight:.3f} &times; presence {reason.presence:.3f} &middot; fired at '
            f"cell {reason.cell} &middot; this looks like these training patches:</div>"
            f'<div class="patches">{thumbs or "<span class=muted>none</span>"}</div></div></div>')


def image_page(e: Explanation, pictures: dict[str, str], patches: dict[int, list], subtitle: str) -> str:
    """One image explained: prediction, top codes, runner-up."""
    reasons = "".join(_reason_block(i, r, pictures[str(r.code)], patches[r.code]) for i, r in enumerate(e.reasons))
    contrast = ""
    if e.runner_up is not None:
        blocks = "".join(_reason_block(None, r, pictures[str(r.code)], patches[r.code]) for r in e.runner_up_reasons)
        contrast = (f"<h2>Runner-up: {esc(e.runner_up)} (p = {e.runner_up_probability:.3f}, score "
                    f"{e.runner_up_score:.3f})</h2>{blocks or '<p class=muted>No code contributes to it.</p>'}")
    total = sum(r.contribution for r in e.reasons)
    body = (f'<p><a href="index.html">&larr; all images</a></p>'
            f'<div class="explain"><figure>{render.img(pictures["main"], f"{e.image} with the top codes boxed")}'
            f'<figcaption class="muted">Numbered boxes: where the top codes fired.</figcaption></figure><div>'
            f"<h2>Predicted {esc(e.predicted)} (p = {e.probability:.3f}, score {e.score:.3f})</h2>"
            f'<p class="muted">Score = sum over codes of relu(W) &times; presence; the {len(e.reasons)} codes below give '
            f"{total:.3f} of it.</p>{reasons}{contrast}</div></div>")
    return render.page(f"Explanation: {e.image}", body, subtitle=subtitle)


def index_page(explanations: list[Explanation], pictures: list[dict[str, str]], subtitle: str) -> str:
    """Every explained image with its prediction."""
    items = "".join(f'<a href="{esc(e.page)}">{render.img(p["main"], e.image)}<div><b>{esc(e.image)}</b></div>'
                    f'<div class="muted">{esc(e.predicted)} ({e.probability:.2f})</div></a>'
                    for e, p in zip(explanations, pictures))
    body = f'<p>{len(explanations)} images; open one to see why.</p><div class="thumbs">{items}</div>'
    return render.page("Explanations", body, subtitle=subtitle)
