"""Stage 2: the initial codebook - spherical k-means on a sample of cached training patch embeddings.

The sample is spread evenly: the same number of images from every class (as far as a class has
them), the same number of random patches from every chosen image. k-means runs on L2-normalised
vectors (assignment is by cosine, METHOD.md stage A) with FAISS (GPU when faiss-gpu sees one) or the
torch fallback, and each unit centroid is rescaled to the mean norm of its cluster's raw vectors,
because stage A feeds the RAW codes to the frozen probe. `init="random"` gives the paper's random
orthogonal codes instead, scaled to the mean patch norm, for comparison.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import Cache, CacheSplit
from pipeline.codebook import (assign_codes_with_scores, random_orthogonal_codes, rescale_to_feature_norm,
                               save_codebook, spherical_kmeans)
from pipeline.data import usable_rows
from pipeline.errors import ProtoquantError
from pipeline.io import check_artifact_out

INITS = ("kmeans", "random")


@dataclass(frozen=True)
class CodebookSettings:
    """Options of `protoquant codebook`."""

    k: int
    sample: int = 100_000      # at most this many patch vectors go into k-means
    iters: int = 20
    seed: int = 0
    init: str = "kmeans"       # "kmeans" or "random" (the paper's orthogonal init)
    backend: str = "auto"      # "auto" (faiss when installed), "faiss" or "torch"
    device: str | None = None  # "cpu", "cuda[:N]"; None: cuda when torch sees a GPU


@dataclass
class CodebookResult:
    path: Path
    k: int
    dim: int
    sample: int
    objective: float           # mean cosine of each sample vector to its nearest code
    backend: str
    seconds: float


def sample_plan(labels: np.ndarray, rows: np.ndarray, cells: int, budget: int, seed: int) -> tuple[np.ndarray, int]:
    """Choose (images, patches per image) so that images * patches <= budget, spread evenly.

    Every class contributes the same number of images (fewer when it has fewer); each chosen image
    gives the same number of patches (at most its `cells`). Returns (sorted rows, patches per image).
    """
    rng = np.random.default_rng([seed, 0xC0DE])
    if budget < 1:
        raise ProtoquantError(f"--sample must be at least 1, got {budget}")
    per_image = max(1, min(cells, budget // max(1, len(rows))))
    n_images = min(len(rows), budget // per_image)
    by_class = {c: rng.permutation(rows[labels[rows] == c]) for c in np.unique(labels[rows])}
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n_images:  # round robin over classes: the same count from each while it lasts
        for members in by_class.values():
            if depth < len(members) and len(chosen) < n_images:
                chosen.append(int(members[depth]))
        depth += 1
    return np.sort(np.array(chosen, dtype=np.int64)), per_image


def read_sample(split: CacheSplit, rows: np.ndarray, per_image: int, seed: int) -> np.ndarray:
    """`per_image` random patch vectors of each row, read chunk by chunk -> float32 (len(rows) * per_image, D)."""
    rng = np.random.default_rng([seed, 0x9A7C])
    h, w, d = split.features.shape[1:]
    out = np.empty((len(rows) * per_image, d), dtype=np.float32)
    r = split.layout.rows_per_chunk
    filled = 0
    for chunk in np.unique(rows // r):
        start, stop = int(chunk) * r, min(int(chunk) * r + r, split.n)
        selected = rows[(rows >= start) & (rows < stop)]
        grids = split.read_features(start, stop)[selected - start].reshape(len(selected), h * w, d)  # (n, H*W, D)
        cells = np.stack([rng.choice(h * w, per_image, replace=False) for _ in selected])  # (n, P)
        picked = np.take_along_axis(grids, cells[:, :, None], axis=1)  # (n, P, D)
        out[filled:filled + picked.shape[0] * per_image] = picked.reshape(-1, d)
        filled += picked.shape[0] * per_image
    return out


def _check_enough_patches(settings: CodebookSettings, available: int) -> None:
    """k-means needs k sample vectors: say which limit binds, the cache's patches or --sample."""
    if settings.init != "kmeans" or settings.k <= min(available, settings.sample):
        return
    if settings.k > available:
        raise ProtoquantError(f"-k {settings.k}: the cache's train split holds only {available} patches "
                              f"(images x grid cells), so k-means can find at most {available} codes: lower -k")
    raise ProtoquantError(f"-k {settings.k} is above --sample {settings.sample}: raise --sample to at least "
                          f"{settings.k} (the cache holds {available} patches) or lower -k")


def build_codebook(cache_path: str | Path, out: str | Path, settings: CodebookSettings) -> CodebookResult:
    """Sample the cache's training split, run the chosen init, save codes (K, D) + metadata to `out`."""
    started = time.perf_counter()
    if settings.init not in INITS:
        raise ProtoquantError(f"--init {settings.init!r}: choose one of {', '.join(INITS)}")
    if settings.k < 1:
        raise ProtoquantError(f"-k must be at least 1, got {settings.k}")
    cache = Cache(cache_path)
    check_artifact_out(out, kind="codebook", inside_forbidden=[cache.path])
    cache.require_complete()
    split = cache.split("train")
    rows = usable_rows(split)
    if len(rows) == 0:
        raise ProtoquantError(f"{cache.path}: the train split holds no usable images")
    h, w = cache.grid
    _check_enough_patches(settings, available=len(rows) * h * w)
    chosen, per_image = sample_plan(split.labels, rows, h * w, settings.sample, settings.seed)
    sample = read_sample(split, chosen, per_image, settings.seed)  # (n, D)
    if settings.init == "kmeans":
        result = spherical_kmeans(sample, settings.k, iters=settings.iters, seed=settings.seed, backend=settings.backend,
                                  device=settings.device)
        codes = rescale_to_feature_norm(result.codes, result.mean_norms)  # (K, D) raw magnitude for stage A
        objective, backend = result.objective, result.backend
    else:
        scale = float(np.linalg.norm(sample, axis=1).mean())
        codes = random_orthogonal_codes(settings.k, cache.dim, seed=settings.seed, scale=scale)
        _, cosines = assign_codes_with_scores(torch.from_numpy(sample), codes)
        objective, backend = float(cosines.mean()), "random-orthogonal"
    seconds = time.perf_counter() - started
    save_codebook(out, codes, {
        "cache_fingerprint": cache.fingerprint, "cache": str(cache.path.resolve()), "k": settings.k,
        "sample": int(sample.shape[0]), "sample_limit": settings.sample, "images": int(len(chosen)),
        "patches_per_image": per_image, "iters": settings.iters, "seed": settings.seed, "init": settings.init,
        "objective": objective, "backend": backend, "seconds": round(seconds, 3),
    })
    return CodebookResult(path=Path(out), k=settings.k, dim=cache.dim, sample=int(sample.shape[0]),
                          objective=objective, backend=backend, seconds=seconds)
