"""`protoquant info`: what a cache holds and whether it is complete; the extraction summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.cache import Cache

console = Console()


def describe(path: str | Path) -> dict:
    """A JSON-able description of a cache: provenance, splits (shape, shards done, skipped), completeness."""
    cache = Cache(path)
    splits = {}
    for name in cache.splits:
        split = cache.split(name)
        done = split.done()
        splits[name] = {
            "shape": list(split.features.shape),
            "views": int(split.views.shape[1]) if split.views is not None else 0,
            "shards_done": int(done.sum()),
            "shards": int(done.size),
            "skipped": int((~split.ok & _done_rows(split, done)).sum()),
            "gigabytes": round(split.nbytes / 1e9, 4),
            "annotations": sorted(split.annotations() or {}),
        }
    return {
        "path": str(cache.path),
        "complete": all(s["shards_done"] == s["shards"] for s in splits.values()),
        "fingerprint": cache.fingerprint,
        "provenance": cache.provenance,
        "source": cache.attrs.get("source"),
        "classes": cache.classes,
        "part_names": cache.attrs.get("part_names"),
        "splits": splits,
    }


def _done_rows(split, done: np.ndarray) -> np.ndarray:
    """(N,) bool: rows that belong to a shard marked done."""
    rows = np.zeros(split.n, dtype=bool)
    for shard in np.flatnonzero(done):
        r = split.layout.shard_rows(int(shard))
        rows[r.start:r.stop] = True
    return rows


def print_description(d: dict) -> None:
    prov = d["provenance"]
    state = "[green]complete[/]" if d["complete"] else "[yellow]incomplete - run the same extract command again to resume[/]"
    console.print(f"[bold]{d['path']}[/]  {state}  fingerprint {d['fingerprint']}")
    console.print(f"backbone [bold]{prov['backbone']}[/]  weights {prov['weights']}  grid {prov['grid'][0]}x{prov['grid'][1]}  "
                  f"dim {prov['dim']}  input {prov['data_config']['input_size'][-1]} px  timm {prov['timm_version']}")
    console.print(f"source {d['source']['kind']}: {d['source']['path']}")
    names = d["classes"]
    console.print(f"{len(names)} classes: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    table = Table("split", "features", "views", "shards", "skipped", "GB", "annotations")
    for name, s in d["splits"].items():
        table.add_row(name, "x".join(map(str, s["shape"])), str(s["views"]),
                      f"{s['shards_done']}/{s['shards']}", str(s["skipped"]), f"{s['gigabytes']:.3f}",
                      ", ".join(s["annotations"]) or "-")
    console.print(table)


def print_extract_summary(summary) -> None:
    table = Table("split", "features (N, H, W, D)", title=f"cached to {summary.path}")
    for name, shape in summary.splits.items():
        table.add_row(name, str(shape))
    console.print(table)
    resumed = f", {summary.resumed_shards} shards kept from an earlier run" if summary.resumed_shards else ""
    console.print(f"{summary.images} images in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s), "
                  f"{summary.gigabytes:.3f} GB{resumed}")
    if summary.skipped:
        console.print(f"[yellow]skipped {len(summary.skipped)} bad files:[/] {', '.join(summary.skipped[:10])}"
                      f"{' ...' if len(summary.skipped) > 10 else ''}")
    console.print(f"next: protoquant info {summary.path}")
