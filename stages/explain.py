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
    DIR/.protoquant-pages.json  the files protoquant wrote here (a later explain replaces them)

DIR must be new, empty, or a folder protoquant wrote pages into: the user's own files are never
overwritten. Every image is decoded before anything is written, and the site is built in a
temporary folder, so a bad image or a crash leaves DIR as it was.

The backbone is rebuilt from the cache's provenance; images are fed whole through the cache's
preprocessing (a cache made with --crop-to-box saw box crops; new images have no box).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import render
from pipeline.cards import GROUNDING_TOP, code_thumbs, write_code_thumbnails
from pipeline.errors import ProtoquantError
from pipeline.geometry import ImageGeometry, Preprocessing
from pipeline.grounding import SplitImages, grounding_for_run
from pipeline.images import read_image_file
from pipeline.inference import ImageModel, Outputs
from pipeline.model import top_contributions
from pipeline.run import open_run_and_cache
from pipeline.io import write_json


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
    render.check_pages_out(out)
    decoded = [_read_image(Path(path)) for path in images]  # a bad image is refused before anything is written
    run, store = open_run_and_cache(run_path, cache)
    model = ImageModel.for_cache(store.provenance, run.head, weights=weights, device=settings.device)
    backbone = model.backbone
    preprocessing = Preprocessing.from_provenance(store.provenance, crop_to_box=False)
    explanations, pictures = [], []
    with render.pages_folder(out, "explain") as site:
        for number, (path, image) in enumerate(zip(images, decoded), start=1):
            with torch.no_grad():
                outputs = model.outputs(model.pixels(image)[None])
            geometry = preprocessing.image(image.size)
            explanation = _explain_one(model, outputs, geometry, run.classes, Path(path).name, number, settings)
            explanations.append(explanation)
            pictures.append(_write_pictures(site, number, image, outputs, geometry, explanation, settings))
        grounding = grounding_for_run(run.path, run.head, store, top=max(GROUNDING_TOP, settings.patches),
                                      device=settings.device)
        shown = sorted({r.code for e in explanations for r in e.reasons + e.runner_up_reasons})
        write_code_thumbnails(grounding, np.asarray(shown, dtype=np.int64), store,
                              SplitImages(store, grounding.split, data), site, patches=settings.patches,
                              size=settings.thumb_size)
        patches = {k: code_thumbs(grounding, k, settings.patches) for k in shown}
        subtitle = [f"run {run.path.name}", f"backbone {backbone.name}"]
        if store.attrs.get("crop_to_box"):
            subtitle.append("the cache saw images cropped to their bird box; these images are used whole")
        _write_pages(site, explanations, pictures, patches, subtitle)
    return ExplainSummary(out=out, index=out / "index.html", explanations=explanations,
                          seconds=round(time.perf_counter() - started, 3))


def _write_pages(site: Path, explanations: list[Explanation], pictures: list[dict[str, str]],
                 patches: dict[int, list[tuple[str, float]]], subtitle: list[str]) -> None:
    render.write_style(site)
    for explanation, picture in zip(explanations, pictures):
        render.write_text(site / explanation.page, image_page(explanation, picture, patches, subtitle))
    render.write_text(site / "index.html", index_page(explanations, pictures, subtitle))
    write_json(site / "explanations.json", [asdict(e) for e in explanations])


def _read_image(path: Path):
    if path.is_dir():
        raise ProtoquantError(f"IMAGE {path} is a directory: pass image files (e.g. {path}/*.jpg)")
    if not path.is_file():
        raise ProtoquantError(f"IMAGE {path} does not exist: pass paths of image files")
    return read_image_file(path)


def reasons_for(model: ImageModel, outputs: Outputs, geometry: ImageGeometry, cls: int, top: int) -> list[Reason]:
    """The `top` largest positive contributions relu(W[cls, k]) * p[k] of one image (batch of one)."""
    weight = model.head.effective_weight()[cls].detach().cpu()  # (K,)
    presence = outputs.presence[0].cpu()
    best = top_contributions(model.head, outputs.activation, outputs.presence,
                             torch.tensor([cls], device=outputs.presence.device), top)
    reasons = []
    for k, value, shown, (h, w) in zip(best.codes[0].tolist(), best.values[0].tolist(), best.shown[0].tolist(),
                                       best.cells[0].tolist()):
        if not shown:
            break
        box = tuple(float(v) for v in geometry.cell_box(h, w))
        reasons.append(Reason(code=k, weight=float(weight[k]), presence=float(presence[k]),
                              contribution=value, cell=(h, w), box=box))
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


def image_page(e: Explanation, pictures: dict[str, str], patches: dict[int, list], subtitle: list[str]) -> str:
    """One image explained: prediction, top codes, runner-up."""
    return render.render_page("explain_image.html", title=f"Explanation: {e.image}", subtitle=subtitle, e=e,
                              pictures=pictures, patches_of=patches, colours=render.BOX_COLOURS,
                              total=sum(r.contribution for r in e.reasons))


def index_page(explanations: list[Explanation], pictures: list[dict[str, str]], subtitle: list[str]) -> str:
    """Every explained image with its prediction."""
    items = [(e, p["main"]) for e, p in zip(explanations, pictures)]
    return render.render_page("explain_index.html", title="Explanations", subtitle=subtitle, items=items)
