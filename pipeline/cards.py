"""Code cards: what the pages show about one code (its nearest training patches, grounding, usage, the
classes that weigh it), and the thumbnail files of those patches.

The gallery, explain and the edit report all show codes this way; the card itself is the
`code_card` macro of pipeline/templates/macros.html, fed by the CodeView built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import render
from pipeline.geometry import Preprocessing
from pipeline.grounding import Grounding, SplitImages, receptive_boxes
from pipeline.model import ProtoQuantHead

GROUNDING_TOP = 10  # nearest images computed and stored per code (pages show some of them)


@dataclass
class CodeView:
    """Everything a card shows about one code (thumbnail paths relative to the site root)."""

    code: int
    usage: float  # fraction of training patches whose nearest code this is
    cosine: float  # grounding: cosine to the nearest real patch
    thumbs: list[tuple[str, float]]  # (path, cosine)
    classes: list[tuple[int, float]]  # (class, relu(W)) by weight, descending


def thumb_name(code: int, slot: int) -> str:
    """Thumbnail file of a code's `slot`-th nearest patch (relative to the site root)."""
    return f"thumbs/code-{code:05d}-{slot}.jpg"


def code_thumbs(grounding: Grounding, code: int, patches: int) -> list[tuple[str, float]]:
    """(thumbnail path, cosine) of the first `patches` valid nearest patches of `code`."""
    valid = grounding.nearest.valid[code][:patches]
    return [(thumb_name(code, s), float(grounding.nearest.scores[code, s])) for s in np.flatnonzero(valid)]


def code_views(head: ProtoQuantHead, grounding: Grounding, codes: np.ndarray, *, patches: int) -> dict[int, CodeView]:
    """Card data for every code in `codes`."""
    weights = head.effective_weight().detach().cpu().numpy()  # (C, K)
    views = {}
    for k in np.asarray(codes).tolist():
        classes = [(int(c), float(weights[c, k])) for c in np.argsort(-weights[:, k]) if weights[c, k] > 0]
        views[k] = CodeView(code=k, usage=float(grounding.usage[k]) / max(grounding.n_patches, 1),
                            cosine=float(grounding.cosine[k]), thumbs=code_thumbs(grounding, k, patches),
                            classes=classes)
    return views


def write_code_thumbnails(grounding: Grounding, codes: np.ndarray, cache, images: SplitImages, out: Path, *,
                          patches: int, size: int) -> int:
    """One JPEG per shown patch of each code in `codes`: the receptive box cut from its original image."""
    codes = np.asarray(codes, dtype=np.int64)
    data = cache.split(grounding.split)
    annotations = data.annotations() or {}
    rows = grounding.nearest.rows[codes, :patches]  # (n, T)
    boxes = receptive_boxes(Preprocessing.from_cache(cache), rows, grounding.nearest.cells[codes, :patches],
                            data.image_size, annotations.get("boxes"))
    slots = [(thumb_name(int(k), s), int(rows[i, s]), tuple(boxes[i, s]))
             for i, k in enumerate(codes) for s in range(rows.shape[1]) if rows[i, s] >= 0]
    return render.write_patch_thumbnails(slots, images.load, out, size=size)
