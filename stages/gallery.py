"""Stage: the prototype gallery, a static site showing every code by its nearest training patches.

    DIR/index.html, index-2.html, ...   every code in use (most used first), settings.per_page per page:
                                        its nearest training patches (receptive boxes cut from the
                                        original images, upsampled), grounding cosine, usage, and
                                        the classes that weigh it
    DIR/classes.html                    every class, with its number of prototypes
    DIR/class-NNN.html                  one class: its top-weighted prototypes
    DIR/thumbs/code-KKKKK-S.jpg         one thumbnail file per shown patch, written once
    DIR/style.css
    DIR/.protoquant-pages.json          the files protoquant wrote here (a later gallery replaces them)

DIR must be new, empty, or a folder protoquant wrote pages into: the user's own files are never
overwritten. Reads RUN (head, and grounding.safetensors, computed and stored there when missing), the cache the
run was trained on, and DATA for the pixels. Images load lazily, so thousands of codes stay fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import render
from pipeline.cards import GROUNDING_TOP, CodeView, code_views, write_code_thumbnails
from pipeline.grounding import Grounding, SplitImages, grounding_for_run
from pipeline.model import ProtoQuantHead, codes_in_use
from pipeline.run import open_run_and_cache


@dataclass(frozen=True)
class GallerySettings:
    """What `protoquant gallery` shows."""

    patches: int = 6  # nearest training patches shown per code
    per_page: int = 100  # codes per index page
    class_top: int = 10  # prototypes shown per class page
    thumb_size: int = 96  # thumbnail side in pixels
    device: str = "cpu"


@dataclass
class GallerySummary:
    """What the gallery wrote: where, how many codes, pages and thumbnails, and the grounding figures."""

    out: Path
    index: Path
    codes: int
    pages: int
    classes: int
    thumbnails: int
    grounding: dict
    seconds: float


def gallery(run_path: str | Path, out: str | Path, *, cache: str | Path | None = None, data: str | Path | None = None,
            settings: GallerySettings = GallerySettings()) -> GallerySummary:
    """Write the gallery of RUN into OUT (a new folder, or one protoquant wrote pages into); returns what was written."""
    started = time.perf_counter()
    out = Path(out)
    render.check_pages_out(out)  # before the grounding is computed: refuse early
    run, store = open_run_and_cache(run_path, cache)
    head = run.head
    grounding = grounding_for_run(run.path, head, store, top=max(GROUNDING_TOP, settings.patches), device=settings.device)
    images = SplitImages(store, grounding.split, data)
    used = np.flatnonzero(codes_in_use(head).cpu().numpy())
    views = code_views(head, grounding, used, patches=settings.patches)
    order = sorted(used.tolist(), key=lambda k: (-views[k].usage, k))
    pages = max(1, -(-len(order) // settings.per_page))
    subtitle = _subtitle(run, store, head, grounding, used)
    with render.pages_folder(out, "gallery") as work:
        written = write_code_thumbnails(grounding, used, store, images, work, patches=settings.patches,
                                        size=settings.thumb_size)
        _write_pages(work, head, run.classes, views, order, settings, subtitle)
    return GallerySummary(out=out, index=out / "index.html", codes=len(order), pages=pages, classes=len(run.classes),
                          thumbnails=written, grounding=grounding.summary(codes_in_use(head).cpu().numpy()),
                          seconds=round(time.perf_counter() - started, 3))


def _write_pages(site: Path, head: ProtoQuantHead, classes: list[str], views: dict[int, CodeView], order: list[int],
                 settings: GallerySettings, subtitle: list[str]) -> None:
    pages = max(1, -(-len(order) // settings.per_page))
    page_of = {code: i // settings.per_page + 1 for i, code in enumerate(order)}
    render.write_style(site)
    for number in range(1, pages + 1):
        chunk = order[(number - 1) * settings.per_page:number * settings.per_page]
        render.write_text(site / index_name(number), index_page(views, chunk, number, pages, classes, subtitle))
    weights = head.effective_weight().detach().cpu().numpy()
    render.write_text(site / "classes.html", classes_page(weights, classes, subtitle))
    for c, name in enumerate(classes):
        render.write_text(site / class_name(c), class_page(c, name, weights[c], views, page_of, settings.class_top))


def index_name(number: int) -> str:
    """File of index page `number` (1-based)."""
    return "index.html" if number == 1 else f"index-{number}.html"


def class_name(c: int) -> str:
    """File of class `c`'s page."""
    return f"class-{c:03d}.html"


def _subtitle(run, store, head: ProtoQuantHead, grounding: Grounding, used: np.ndarray) -> list[str]:
    return [f"run {run.path.name}", f"backbone {store.provenance.get('backbone', '?')}",
            f"{len(used)} of {head.codes.shape[0]} codes in use", f"{len(run.classes)} classes",
            f"patches from the {grounding.split} split"]


def index_page(views: dict[int, CodeView], chunk: list[int], number: int, pages: int, classes: list[str],
               subtitle: list[str]) -> str:
    """One page of the paginated code index."""
    cosines = np.array([v.cosine for v in views.values()]) if views else np.zeros(1)
    figures = [(str(len(views)), "codes in use"), (f"{cosines.mean():.3f}", "mean grounding cosine"),
               (str(int((cosines < 0.9).sum())), "codes below cosine 0.9"), (str(len(classes)), "classes")]
    return render.render_page("gallery_index.html", title="Prototype gallery", subtitle=subtitle, figures=figures,
                              number=number, pages=pages, nav=render.pagination(number, pages, index_name),
                              views=[views[k] for k in chunk], classes=classes, class_href=class_name)


def classes_page(weights: np.ndarray, classes: list[str], subtitle: list[str]) -> str:
    """Every class with how many prototypes weigh it; weights is relu(W), (C, K)."""
    rows = [{"href": class_name(c), "name": name, "prototypes": int((weights[c] > 0).sum()),
             "largest": float(weights[c].max()) if weights[c].size else 0.0} for c, name in enumerate(classes)]
    return render.render_page("gallery_classes.html", title="Classes", subtitle=subtitle, rows=rows)


def class_page(c: int, name: str, weights: np.ndarray, views: dict[int, CodeView], page_of: dict[int, int],
               top: int) -> str:
    """One class: its top-weighted prototypes."""
    ranked = [int(k) for k in np.argsort(-weights) if weights[k] > 0 and int(k) in views][:top]
    cards = [{"view": views[k], "weight": float(weights[k]), "link": f"{index_name(page_of[k])}#code-{k}"}
             for k in ranked]
    return render.render_page("gallery_class.html", title=f"Class {name}", subtitle=[f"class {c}"], cards=cards,
                              total=int((weights > 0).sum()))
