"""Stage: the prototype gallery, a static site showing every code by its nearest training patches.

    DIR/index.html, index-2.html, ...   every code in use (most used first), settings.per_page per page:
                                        its nearest training patches (receptive boxes cut from the
                                        original images, upsampled), grounding cosine, usage, and
                                        the classes that weigh it
    DIR/classes.html                    every class, with its number of prototypes
    DIR/class-NNN.html                  one class: its top-weighted prototypes
    DIR/thumbs/code-KKKKK-S.jpg         one thumbnail file per shown patch, written once
    DIR/style.css

Reads RUN (head, and grounding.safetensors, computed and stored there when missing), the cache the
run was trained on, and DATA for the pixels. Images load lazily, so thousands of codes stay fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import render
from pipeline.geometry import Preprocessing
from pipeline.grounding import Grounding, SplitImages, grounding_for_run, receptive_boxes
from pipeline.model import ProtoQuantHead, codes_in_use
from pipeline.render import esc
from stages.evaluate import open_run_and_cache

GROUNDING_TOP = 10  # nearest images computed and stored per code (pages show settings.patches of them)


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


@dataclass
class CodeView:
    """Everything a card shows about one code (thumbnail paths relative to the site root)."""

    code: int
    usage: float  # fraction of training patches whose nearest code this is
    cosine: float  # grounding: cosine to the nearest real patch
    thumbs: list[tuple[str, float]]  # (path, cosine)
    classes: list[tuple[int, float]]  # (class, relu(W)) by weight, descending


def gallery(run_path: str | Path, out: str | Path, *, cache: str | Path | None = None, data: str | Path | None = None,
            settings: GallerySettings = GallerySettings()) -> GallerySummary:
    """Write the gallery of RUN into OUT; returns what was written."""
    started = time.perf_counter()
    out = Path(out)
    run, store = open_run_and_cache(run_path, cache)
    head = run.head
    grounding = grounding_for_run(run.path, head, store, top=max(GROUNDING_TOP, settings.patches), device=settings.device)
    images = SplitImages(store, grounding.split, data)
    used = np.flatnonzero(codes_in_use(head).cpu().numpy())
    views = code_views(head, grounding, used, patches=settings.patches)
    written = write_code_thumbnails(grounding, used, store, images, out, patches=settings.patches,
                                    size=settings.thumb_size)
    order = sorted(used.tolist(), key=lambda k: (-views[k].usage, k))
    pages = max(1, -(-len(order) // settings.per_page))
    page_of = {code: i // settings.per_page + 1 for i, code in enumerate(order)}
    render.write_style(out)
    subtitle = _subtitle(run, store, head, grounding, used)
    for number in range(1, pages + 1):
        chunk = order[(number - 1) * settings.per_page:number * settings.per_page]
        render.write_text(out / index_name(number), index_page(views, chunk, number, pages, run.classes, subtitle))
    render.write_text(out / "classes.html", classes_page(head, run.classes, subtitle))
    weights = head.effective_weight().detach().cpu().numpy()
    for c, name in enumerate(run.classes):
        render.write_text(out / class_name(c), class_page(c, name, weights[c], views, page_of, settings.class_top))
    return GallerySummary(out=out, index=out / "index.html", codes=len(order), pages=pages, classes=len(run.classes),
                          thumbnails=written, grounding=grounding.summary(codes_in_use(head).cpu().numpy()),
                          seconds=round(time.perf_counter() - started, 3))


def index_name(number: int) -> str:
    """File of index page `number` (1-based)."""
    return "index.html" if number == 1 else f"index-{number}.html"


def class_name(c: int) -> str:
    """File of class `c`'s page."""
    return f"class-{c:03d}.html"


def thumb_name(code: int, slot: int) -> str:
    """Thumbnail file of a code's `slot`-th nearest patch (relative to the site root)."""
    return f"thumbs/code-{code:05d}-{slot}.jpg"


def code_views(head: ProtoQuantHead, grounding: Grounding, codes: np.ndarray, *, patches: int) -> dict[int, CodeView]:
    """Card data for every code in `codes`."""
    weights = head.effective_weight().detach().cpu().numpy()  # (C, K)
    views = {}
    for k in codes.tolist():
        valid = grounding.nearest.valid[k][:patches]
        thumbs = [(thumb_name(k, s), float(grounding.nearest.scores[k, s])) for s in np.flatnonzero(valid)]
        classes = [(int(c), float(weights[c, k])) for c in np.argsort(-weights[:, k]) if weights[c, k] > 0]
        views[k] = CodeView(code=k, usage=float(grounding.usage[k]) / max(grounding.n_patches, 1),
                            cosine=float(grounding.cosine[k]), thumbs=thumbs, classes=classes)
    return views


def write_code_thumbnails(grounding: Grounding, codes: np.ndarray, cache, images: SplitImages, out: Path, *,
                          patches: int, size: int) -> int:
    """One JPEG per shown patch of each code in `codes`: the receptive box cut from its original image."""
    data = cache.split(grounding.split)
    annotations = data.annotations() or {}
    rows = grounding.nearest.rows[codes, :patches]  # (n, T)
    boxes = receptive_boxes(Preprocessing.from_cache(cache), rows, grounding.nearest.cells[codes, :patches],
                            data.image_size, annotations.get("boxes"))
    slots = [(thumb_name(int(k), s), int(rows[i, s]), tuple(boxes[i, s]))
             for i, k in enumerate(codes) for s in range(rows.shape[1]) if rows[i, s] >= 0]
    return render.write_patch_thumbnails(slots, images.load, out, size=size)


def _subtitle(run, store, head: ProtoQuantHead, grounding: Grounding, used: np.ndarray) -> str:
    backbone = store.provenance.get("backbone", "?")
    return (f"run {esc(run.path.name)} &middot; backbone {esc(backbone)} &middot; {len(used)} of "
            f"{head.codes.shape[0]} codes in use &middot; {len(run.classes)} classes &middot; patches from the "
            f"{esc(grounding.split)} split")


def code_card(view: CodeView, classes: list[str], *, class_href: Callable[[int], str] | None = class_name,
              max_classes: int = 4, extra: str = "", link: str | None = None) -> str:
    """One code as a card: nearest patches, grounding, usage, classes that weigh it."""
    warn = " warn" if view.cosine < 0.9 else ""
    title = f'<a href="{esc(link)}">Code {view.code}</a>' if link else f"Code {view.code}"
    figures = "".join(f'<figure>{render.img(path, f"nearest patch {i + 1} of code {view.code}", width=56, height=56, title=f"cosine {cos:.3f}")}'
                      f"<figcaption>{cos:.2f}</figcaption></figure>" for i, (path, cos) in enumerate(view.thumbs))
    shown = view.classes[:max_classes]
    items = "".join(f"<li>{_class_link(classes[c], class_href(c) if class_href else None)}<span>{w:.2f}</span></li>"
                    for c, w in shown)
    more = f'<li class="muted">+ {len(view.classes) - len(shown)} more classes</li>' if len(view.classes) > len(shown) else ""
    weighed = f'<ul class="classes">{items}{more}</ul>' if view.classes else '<p class="muted">no class weighs it</p>'
    if max_classes == 0:
        weighed = ""
    return (f'<div class="card" id="code-{view.code}"><h3>{title}<span class="pill{warn}" title="cosine to the '
            f'nearest training patch">grounding {view.cosine:.3f}</span></h3>'
            f'<div class="meta">usage {100 * view.usage:.2f}% of training patches{extra}</div>'
            f'<div class="patches">{figures}</div>{weighed}</div>')


def _class_link(name: str, href: str | None) -> str:
    return f'<a href="{esc(href)}">{esc(name)}</a>' if href else f'<a title="{esc(name)}">{esc(name)}</a>'


def index_page(views: dict[int, CodeView], chunk: list[int], number: int, pages: int, classes: list[str],
               subtitle: str) -> str:
    """One page of the paginated code index."""
    nav = render.pagination(number, pages, index_name)
    cosines = np.array([v.cosine for v in views.values()]) if views else np.zeros(1)
    figures = render.stats([(str(len(views)), "codes in use"), (f"{cosines.mean():.3f}", "mean grounding cosine"),
                            (str(int((cosines < 0.9).sum())), "codes below cosine 0.9"),
                            (str(len(classes)), "classes")])
    cards = "".join(code_card(views[k], classes) for k in chunk)
    body = (f'{figures}<p><a href="classes.html">All classes &rarr;</a> &middot; page {number} of {pages}; codes '
            f'ordered by usage. Each patch is the receptive cell of a training image nearest the code '
            f'(its cosine below it).</p>{nav}<div class="cards">{cards}</div>{nav}')
    return render.page("Prototype gallery", body, subtitle=subtitle)


def classes_page(head: ProtoQuantHead, classes: list[str], subtitle: str) -> str:
    """Every class with how many prototypes weigh it."""
    weights = head.effective_weight().detach().cpu().numpy()
    rows = [[f'<a href="{esc(class_name(c))}">{esc(name)}</a>', str(int((weights[c] > 0).sum())),
             f"{weights[c].max():.2f}" if weights[c].size else "0"] for c, name in enumerate(classes)]
    body = ('<p><a href="index.html">&larr; all prototypes</a></p>'
            + render.table(["class", "prototypes weighing it", "largest weight"], rows))
    return render.page("Classes", body, subtitle=subtitle)


def class_page(c: int, name: str, weights: np.ndarray, views: dict[int, CodeView], page_of: dict[int, int],
               top: int) -> str:
    """One class: its top-weighted prototypes."""
    ranked = [int(k) for k in np.argsort(-weights) if weights[k] > 0 and int(k) in views][:top]
    cards = "".join(code_card(views[k], [], max_classes=0, extra=f" &middot; weight {weights[k]:.3f}",
                              link=f"{index_name(page_of[k])}#code-{k}") for k in ranked)
    total = int((weights > 0).sum())
    body = (f'<p><a href="classes.html">&larr; all classes</a> &middot; <a href="index.html">all prototypes</a></p>'
            f"<p>The {len(ranked)} prototypes with the largest weights relu(W) for this class ({total} weigh it).</p>"
            f'<div class="cards">{cards or "<p>No prototype weighs this class.</p>"}</div>')
    return render.page(f"Class {name}", body, subtitle=f"class {c}")
