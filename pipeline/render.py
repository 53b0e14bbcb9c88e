"""Static pages and the pictures in them: thumbnails, heatmaps, HTML pages, the folders that hold them.

Pages are rendered from the Jinja2 templates in pipeline/templates/ with autoescaping on, so every
class name, file name and run name reaches the page as text, never as markup. They share one
stylesheet (style.css beside them) and have no JavaScript; pictures are JPEG/PNG files next to the
pages, referenced by relative paths, loaded lazily.

A pages folder (gallery, explain, an edit report) is built in a temporary folder inside --out and its
files are moved into place at the end, so a failure leaves nothing half written. The folder then
holds a marker (.protoquant-pages.json) listing the files protoquant wrote: a later run may replace
exactly those files, and an existing non-empty --out without the marker is refused.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import jinja2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import ProtoquantError
from pipeline.io import read_json, write_bytes_atomic, write_json, write_text_atomic
from pipeline.paths import check_output

Box = tuple[float, float, float, float]  # x, y, width, height in original pixels

STYLE_FILE = "style.css"
TEMPLATES = Path(__file__).with_name("templates")
PAGES_MARKER = ".protoquant-pages.json"
PAGES_FORMAT = "protoquant-pages"
PAGES_VERSION = 1
_WORK_PREFIX = ".protoquant-pages.tmp-"
# Distinct, readable colours for numbered boxes drawn over an image.
BOX_COLOURS = ((230, 57, 70), (29, 130, 230), (46, 160, 67), (240, 160, 20), (150, 70, 200), (20, 170, 170),
               (220, 90, 160), (120, 120, 120))
# Heatmap colours from cold to hot (dark violet -> red -> yellow), interpolated linearly.
_HEAT_STOPS = np.array([[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]], dtype=np.float64)


# ---- files -------------------------------------------------------------------------------------------

def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    write_text_atomic(path, text)


def save_image(image: Image.Image, path: Path, *, quality: int = 88) -> None:
    """Save a JPEG or PNG (by suffix) atomically."""
    buffer = io.BytesIO()
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def write_style(directory: Path) -> None:
    """The one stylesheet every page links to, copied beside them."""
    write_text(directory / STYLE_FILE, (TEMPLATES / STYLE_FILE).read_text(encoding="utf-8"))


# ---- pictures ------------------------------------------------------------------------------------------

def _pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) whole pixels covering a continuous box, clipped to the image, never empty."""
    x, y, w, h = box
    left, top = int(math.floor(x)), int(math.floor(y))
    right, bottom = int(math.ceil(x + w)), int(math.ceil(y + h))
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = max(min(right, width), left + 1), max(min(bottom, height), top + 1)
    return left, top, right, bottom


def patch_thumbnail(image: Image.Image, box: Box, size: int) -> Image.Image:
    """The receptive box cut from the original image, upsampled so its longer side is `size` pixels."""
    patch = image.crop(_pixel_box(box, image.width, image.height))
    scale = size / max(patch.width, patch.height)
    return patch.resize((max(1, round(patch.width * scale)), max(1, round(patch.height * scale))),
                        Image.Resampling.LANCZOS)


def fit(image: Image.Image, longest: int) -> tuple[Image.Image, float]:
    """Scale (down or up) so the longer side is `longest` pixels; returns (image, scale applied).

    Small images are enlarged too, so boxes and labels drawn on the copy stay legible.
    """
    scale = longest / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC), scale


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3) on a dark-violet-to-yellow scale."""
    position = np.clip(values, 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_HEAT_STOPS) - 2)
    frac = (position - low)[..., None]
    return np.round(_HEAT_STOPS[low] * (1 - frac) + _HEAT_STOPS[low + 1] * frac).astype(np.uint8)


def heatmap_overlay(image: Image.Image, heat: np.ndarray, input_box: Box, *, alpha: float = 0.5) -> Image.Image:
    """Blend a grid map (H, W), scaled to [0, 1] by its maximum, over the part of `image` the network saw.

    input_box is the network input in the image's pixels (pipeline.geometry.ImageGeometry.input_box);
    the grid is upsampled smoothly over it.
    """
    peak = float(heat.max())
    scaled = heat / peak if peak > 0 else np.zeros_like(heat)
    left, top, right, bottom = _pixel_box(input_box, image.width, image.height)
    colours = Image.fromarray(heat_colours(scaled)).resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    base = image.convert("RGB")
    region = base.crop((left, top, right, bottom))
    base.paste(Image.blend(region, colours, alpha), (left, top))
    return base


def draw_boxes(image: Image.Image, boxes: Iterable[tuple[Box, tuple[int, int, int], str]], *, scale: float = 1.0,
               width: int = 3, font_size: int = 15) -> Image.Image:
    """Draw (box, colour, label) rectangles (original pixels, times `scale`) with a label tag."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=font_size)
    for box, colour, label in boxes:
        x, y, w, h = (v * scale for v in box)
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=width)
        if label:
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            draw.rectangle([x, y, x + right + 6, y + bottom + 4], fill=colour)
            draw.text((x + 3, y + 1), label, fill=(255, 255, 255), font=font)
    return out


def write_patch_thumbnails(slots: list[tuple[str, int, Box]], load: Callable[[int], Image.Image], directory: Path,
                           *, size: int) -> int:
    """Write one thumbnail file per (file name, cache row, box) slot, opening each image once.

    load(row) returns the original image of a training row. Returns the number of files written.
    """
    by_row: dict[int, list[tuple[str, Box]]] = {}
    for name, row, box in slots:
        by_row.setdefault(row, []).append((name, box))
    for row, wanted in by_row.items():
        image = load(row)
        for name, box in wanted:
            save_image(patch_thumbnail(image, box, size), directory / name)
    return sum(len(v) for v in by_row.values())


# ---- HTML ------------------------------------------------------------------------------------------------

@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_page(template: str, *, title: str, subtitle: Iterable[str] = (), style_href: str = STYLE_FILE,
                **context) -> str:
    """A whole HTML document from pipeline/templates/`template`; subtitle parts are joined by middle dots."""
    return _environment().get_template(template).render(title=title, subtitle=list(subtitle), style_href=style_href,
                                                         **context)


@dataclass(frozen=True)
class PageLink:
    """One entry of a pagination bar: a link, the current page, or a gap (no href)."""

    label: str
    href: str | None = None
    current: bool = False


def pagination(current: int, total: int, href: Callable[[int], str]) -> list[PageLink]:
    """Page links 1..total (current highlighted, far pages elided), with previous / next; [] for one page."""
    if total <= 1:
        return []
    links = [PageLink("\u2190 previous", href(current - 1))] if current > 1 else []
    for number in range(1, total + 1):
        if number == current:
            links.append(PageLink(str(number), current=True))
        elif abs(number - current) <= 3 or number in (1, total):
            links.append(PageLink(str(number), href(number)))
        elif abs(number - current) == 4:
            links.append(PageLink("\u2026"))
    if current < total:
        links.append(PageLink("next \u2192", href(current + 1)))
    return links


# ---- pages folders -----------------------------------------------------------------------------------------

def _listed_files(marker: Path) -> list[str]:
    """The files a pages marker says protoquant wrote (relative paths, checked to stay inside the folder)."""
    what = f"it marks a pages folder protoquant wrote; delete {marker.parent} yourself or pass another --out"
    record = read_json(marker, what)
    files = record.get("files")
    if record.get("format") != PAGES_FORMAT or not isinstance(files, list):
        raise ProtoquantError(f"{marker} is not a protoquant pages marker: {what}")
    for name in files:
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or name == PAGES_MARKER:
            raise ProtoquantError(f"{marker} lists {name!r}, which is not a file inside the folder: {what}")
    return files


def _is_pages_folder(path: Path) -> bool:
    """Ours: it holds the marker, or only our temporary folders (a first run that was killed)."""
    return (path / PAGES_MARKER).is_file() or all(p.name.startswith(_WORK_PREFIX) for p in path.iterdir())


def check_pages_out(out: Path, option: str = "--out") -> list[str]:
    """Refuse an OUT that protoquant did not make and that holds files (pipeline.paths' rule, which also
    guards the current and home folders); -> the files an earlier run wrote there."""
    ours = check_output(out, is_ours=_is_pages_folder, what="a pages folder", overwrite=False, option=option)
    return _listed_files(out / PAGES_MARKER) if ours and (out / PAGES_MARKER).is_file() else []


@contextmanager
def pages_folder(out: str | Path, kind: str, option: str = "--out") -> Iterator[Path]:
    """A temporary folder to write a whole site into; on success its files replace the previous site in OUT.

    On any error the temporary folder goes, and so does OUT when this call created it: nothing is half
    written. Files in OUT that protoquant did not list in its marker are never touched.
    """
    out = Path(out)
    previous = check_pages_out(out, option)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=out))
    try:
        yield work
        _publish(work, out, previous, kind)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    for leftover in out.glob(f"{_WORK_PREFIX}*"):  # our own temporary folders, from runs that were killed
        shutil.rmtree(leftover, ignore_errors=True)


def _publish(work: Path, out: Path, previous: list[str], kind: str) -> None:
    files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    marker = {"format": PAGES_FORMAT, "version": PAGES_VERSION, "kind": kind}
    # Listed first, so that a crash while moving still leaves every file of ours named in the marker.
    write_json(out / PAGES_MARKER, {**marker, "files": sorted(set(previous) | set(files))})
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(work / name, out / name)
    for name in sorted(set(previous) - set(files)):
        _remove_file_of_ours(out, name)
    write_json(out / PAGES_MARKER, {**marker, "files": files})


def _remove_file_of_ours(out: Path, name: str) -> None:
    """Delete a file an earlier run wrote, then the folders it leaves empty (up to OUT)."""
    path = out / name
    path.unlink(missing_ok=True)
    folder = path.parent
    while folder != out and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
