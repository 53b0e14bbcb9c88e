"""Static pages and the pictures in them: thumbnails, heatmaps, HTML. No server, no network assets.

Pages are plain HTML with one shared stylesheet (style.css beside them) and no JavaScript; pictures
are JPEG/PNG files next to the pages, referenced by relative paths, loaded lazily. Every file is
written atomically (a temporary file, then os.replace), so a page is never half written.
"""

from __future__ import annotations

import html
import io
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[float, float, float, float]  # x, y, width, height in original pixels

STYLE_FILE = "style.css"
# Distinct, readable colours for numbered boxes drawn over an image.
BOX_COLOURS = ((230, 57, 70), (29, 130, 230), (46, 160, 67), (240, 160, 20), (150, 70, 200), (20, 170, 170),
               (220, 90, 160), (120, 120, 120))
# Heatmap colours from cold to hot (dark violet -> red -> yellow), interpolated linearly.
_HEAT_STOPS = np.array([[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]], dtype=np.float64)

STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --card: #ffffff; --bg: #f4f6f9; --accent: #2563c9; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: var(--bg); }
header.top { background: #1d2330; color: #fff; padding: 14px 24px; }
header.top h1 { margin: 0; font-size: 20px; font-weight: 600; }
header.top p { margin: 4px 0 0; color: #c9d1de; font-size: 13px; }
header.top a { color: #9cc2ff; }
main { padding: 18px 24px 40px; max-width: 1400px; margin: 0 auto; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
nav.pages { display: flex; flex-wrap: wrap; gap: 6px; margin: 6px 0 16px; align-items: center; }
nav.pages a, nav.pages span { padding: 3px 9px; border: 1px solid var(--line); border-radius: 6px; background: #fff;
       font-size: 13px; }
nav.pages span.current { background: var(--accent); color: #fff; border-color: var(--accent); }
.stats { display: flex; flex-wrap: wrap; gap: 10px; margin: 0 0 16px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; }
.stat b { display: block; font-size: 18px; }
.stat span { color: var(--muted); font-size: 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; min-width: 0; }
.card h3 { margin: 0 0 6px; font-size: 16px; }
.card .meta { color: var(--muted); font-size: 13px; margin: 2px 0 8px; }
.patches { display: flex; flex-wrap: wrap; gap: 4px; }
.patches img { width: 56px; height: 56px; object-fit: cover; border-radius: 4px; border: 1px solid var(--line);
       image-rendering: auto; background: #eee; }
.patches figure { margin: 0; text-align: center; font-size: 11px; color: var(--muted); }
.classes { margin: 6px 0 0; padding: 0; list-style: none; font-size: 13px; }
.classes li { display: flex; justify-content: space-between; gap: 8px; }
.classes li a { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; min-width: 0; }
.classes li span { flex-shrink: 0; color: var(--muted); }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px; background: #e8eefb; color: #24427a;
       font-size: 12px; margin-left: 4px; }
.pill.warn { background: #fdecec; color: #8a1f1f; }
table.data { border-collapse: collapse; background: #fff; border: 1px solid var(--line); margin: 8px 0 18px; }
table.data th, table.data td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left;
       vertical-align: middle; font-size: 14px; }
table.data th { background: #eef1f6; font-weight: 600; }
table.data td { overflow-wrap: anywhere; max-width: 420px; }
.scroll { overflow-x: auto; }
.explain { display: grid; grid-template-columns: minmax(280px, 420px) 1fr; gap: 22px; align-items: start; }
.explain > figure { margin: 0; }
.explain > figure img { width: 100%; height: auto; border-radius: 8px; border: 1px solid var(--line); }
.reason { display: grid; grid-template-columns: 170px 1fr; gap: 12px; align-items: center; background: #fff;
       border: 1px solid var(--line); border-radius: 10px; padding: 10px 12px; margin-bottom: 10px; }
.reason > img { width: 170px; height: auto; border-radius: 6px; }
.reason h4 { margin: 0 0 4px; font-size: 15px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin-right: 6px;
       vertical-align: -1px; }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; }
.thumbs a { display: block; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px;
       color: var(--ink); min-width: 0; overflow-wrap: anywhere; font-size: 13px; }
.thumbs img { width: 100%; height: auto; border-radius: 4px; }
.muted { color: var(--muted); }
h2 { font-size: 18px; margin: 22px 0 8px; }
"""


# ---- files -------------------------------------------------------------------------------------------

def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_image(image: Image.Image, path: Path, *, quality: int = 88) -> None:
    """Save a JPEG or PNG (by suffix) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def write_style(directory: Path) -> None:
    write_text(directory / STYLE_FILE, STYLE.lstrip())


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

def esc(value) -> str:
    """Text made safe for HTML (quotes included)."""
    return html.escape(str(value), quote=True)


def img(src: str, alt: str, *, width: int | None = None, height: int | None = None, title: str = "") -> str:
    """An <img> that loads lazily; width/height reserve its space so the page does not jump."""
    size = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    tip = f' title="{esc(title)}"' if title else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{size}{tip} loading="lazy" decoding="async">'


def page(title: str, body: str, *, subtitle: str = "", style_href: str = STYLE_FILE) -> str:
    """A whole HTML document with the shared stylesheet."""
    sub = f"<p>{subtitle}</p>" if subtitle else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f'<link rel="stylesheet" href="{esc(style_href)}">\n</head>\n<body>\n'
            f'<header class="top"><h1>{esc(title)}</h1>{sub}</header>\n<main>\n{body}\n</main>\n</body>\n</html>\n')


def pagination(current: int, total: int, href: Callable[[int], str]) -> str:
    """Page links 1..total (current highlighted), with previous / next."""
    if total <= 1:
        return ""
    parts = []
    if current > 1:
        parts.append(f'<a href="{esc(href(current - 1))}">&larr; previous</a>')
    for number in range(1, total + 1):
        if number == current:
            parts.append(f'<span class="current">{number}</span>')
        elif abs(number - current) <= 3 or number in (1, total):
            parts.append(f'<a href="{esc(href(number))}">{number}</a>')
        elif abs(number - current) == 4:
            parts.append("<span>&hellip;</span>")
    if current < total:
        parts.append(f'<a href="{esc(href(current + 1))}">next &rarr;</a>')
    return f'<nav class="pages">{"".join(parts)}</nav>'


def stats(items: list[tuple[str, str]]) -> str:
    """A row of small figure boxes: (value, label)."""
    return '<div class="stats">' + "".join(f'<div class="stat"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                                           for v, k in items) + "</div>"


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are given as HTML (escape text with esc)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
