"""The codebook: K prototype vectors in feature space, their initialisation, assignment and storage.

    spherical_kmeans          FAISS k-means on L2-normalised samples (torch fallback without faiss)
    rescale_to_feature_norm   unit k-means directions -> raw-magnitude codes for stage A
    random_orthogonal_codes   the paper's random init, kept for comparison
    assign_codes              nearest code by cosine, blocked over rows (METHOD.md stage A argmax)
    code_usage                how often each code is the argmax (METHOD.md "Dead codes")
    save_codebook / load_codebook / check_fingerprint

Why codes are rescaled after k-means: assignment is by cosine, so k-means runs on unit vectors and
returns unit directions. Stage A substitutes the RAW code vector into the frozen probe and pulls it
toward the raw features with an MSE term (METHOD.md stage A), so both need the features' magnitude.
`KMeansResult.mean_norms` holds, per cluster, the mean L2 norm of the raw sample vectors assigned
to it; `rescale_to_feature_norm(result.codes, result.mean_norms)` gives the stage A init. The
k-means result itself stays unit-norm, so it is a plain spherical k-means, comparable across runs.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ProtoquantError
from pipeline.io import REBUILD_COMMANDS, read_artifact, write_artifact

log = logging.getLogger(__name__)

COSINE_EPS = 1e-8  # floor on a vector norm before dividing by it (all cosines in protoquant)
KMEANS_BACKENDS = ("auto", "faiss", "torch")


# --- assignment (METHOD.md stage A: k* = argmax_k cos(z, E_k), no gradient) -----------------------

@torch.no_grad()
def assign_codes_with_scores(
    z: torch.Tensor, codes: torch.Tensor, *, block: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code by cosine for every vector of z, and that cosine.

    Args:
        z: (..., D) features, any float dtype (float16 is cast per block), any device.
        codes: (K, D) codes; the compute runs on codes.device.
        block: rows per matmul; peak extra memory is block * K * 4 bytes (65536 x 2000 = 0.5 GB).

    Returns:
        (indices (...) int64, cosines (...) float32), both on codes.device.
    """
    codes_unit = F.normalize(codes.detach().float(), dim=-1, eps=COSINE_EPS)  # (K, D)
    rows = z.detach().reshape(-1, z.shape[-1])  # (..., D) -> (N, D)
    indices = torch.empty(rows.shape[0], dtype=torch.long, device=codes.device)
    cosines = torch.empty(rows.shape[0], dtype=torch.float32, device=codes.device)
    for start in range(0, rows.shape[0], block):
        chunk = rows[start:start + block].to(codes.device, torch.float32)  # (b, D)
        chunk = F.normalize(chunk, dim=-1, eps=COSINE_EPS)
        best = (chunk @ codes_unit.T).max(dim=1)  # (b, K) -> (b,)
        indices[start:start + block] = best.indices
        cosines[start:start + block] = best.values
    return indices.reshape(z.shape[:-1]), cosines.reshape(z.shape[:-1])


def assign_codes(z: torch.Tensor, codes: torch.Tensor, *, block: int = 65536) -> torch.Tensor:
    """Index of the nearest code by cosine, (..., D) -> (...) int64 on codes.device; no gradient."""
    indices, _ = assign_codes_with_scores(z, codes, block=block)
    return indices


def code_usage(
    codes: torch.Tensor, feature_batches: Iterable[torch.Tensor], *, block: int = 65536
) -> torch.Tensor:
    """How many vectors pick each code as their argmax, over all batches (METHOD.md "Dead codes").

    feature_batches yields (..., D) tensors, e.g. (B, H, W, D) grids read chunk by chunk from the
    cache. Returns (K,) int64 counts on codes.device.
    """
    counts = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    for batch in feature_batches:
        indices = assign_codes(batch, codes, block=block).flatten()  # (...) -> (N,)
        counts += torch.bincount(indices, minlength=codes.shape[0])
    return counts


# --- initialisation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class KMeansResult:
    """A spherical k-means run. codes are unit directions; see the module docstring for scaling."""

    codes: torch.Tensor       # (k, D) float32, unit norm, on the CPU
    mean_norms: torch.Tensor  # (k,) float32: mean raw L2 norm of the sample vectors in each cluster
    objective: float          # mean cosine of every sample vector to its assigned code
    backend: str              # "faiss-cpu", "faiss-gpu", "torch-cpu" or "torch-cuda"
    seconds: float


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    backend: str = "auto",
    device: str | None = None,
) -> KMeansResult:
    """Spherical k-means (cosine) on a sample of patch embeddings: the codebook init (METHOD.md stage A).

    Args:
        x: (n, D) sample of RAW patch embeddings; normalised here, raw norms give `mean_norms`.
        k: number of codes; needs n >= k.
        iters: Lloyd iterations.
        seed: same seed, same data, same backend and device -> identical codes (on CUDA the torch
            fallback sums with atomics, so there it is only reproducible up to rounding).
        backend: "auto" (faiss when importable, else torch with a logged warning), "faiss", "torch".
        device: "cpu" or "cuda"; None picks "cuda" when torch sees a GPU (faiss-gpu then uses it).

    Initial centroids: faiss uses AFK-MC2 (a cheap approximation of k-means++), the torch fallback
    uses exact k-means++; plain random init gets stuck with two centroids in one cluster.
    """
    if x.ndim != 2:
        raise ProtoquantError(f"k-means needs a (n, D) sample of vectors, got shape {x.shape}")
    if x.shape[0] < k:
        raise ProtoquantError(f"k-means with k={k} needs at least {k} sample vectors but the sample has "
                              f"{x.shape[0]}: lower -k or raise --sample")
    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    raw = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (n, D)
    unit = F.normalize(raw, dim=1, eps=COSINE_EPS)  # (n, D)
    if _resolve_backend(backend) == "faiss":
        codes, name = _faiss_kmeans(unit.numpy(), k, iters=iters, seed=seed, use_gpu=device != "cpu")
    else:
        codes = _torch_kmeans(unit.to(device), k, iters=iters, seed=seed).cpu()
        name = f"torch-{torch.device(device).type}"
    codes = F.normalize(codes, dim=1, eps=COSINE_EPS)
    indices, cosines = assign_codes_with_scores(unit.to(device), codes.to(device))  # final assignment
    mean_norms = _cluster_mean_norms(raw.norm(dim=1), indices.cpu(), k)
    return KMeansResult(codes=codes.contiguous(), mean_norms=mean_norms, objective=float(cosines.mean()),
                        backend=name, seconds=time.perf_counter() - start)


def rescale_to_feature_norm(codes_unit: torch.Tensor, norms: torch.Tensor | float) -> torch.Tensor:
    """Give each code the magnitude of the features it stands for: unit direction x norm.

    norms is (K,) per code (KMeansResult.mean_norms) or one float (e.g. the mean patch norm).
    Stage A feeds raw codes to the frozen probe, which needs feature-sized vectors (METHOD.md stage A).
    """
    scale = torch.as_tensor(norms, dtype=torch.float32, device=codes_unit.device).reshape(-1, 1)  # (K|1, 1)
    return F.normalize(codes_unit.float(), dim=1, eps=COSINE_EPS) * scale


def random_orthogonal_codes(k: int, d: int, *, seed: int, scale: float) -> torch.Tensor:
    """The paper's random init (METHOD.md stage A): orthogonal rows, each of norm `scale`.

    torch.nn.init.orthogonal_ gives orthonormal rows when k <= d. When k > d at most d vectors can be
    orthogonal: it returns orthonormal COLUMNS instead, and the rows have unequal norms (mean square
    d / k). Each row is therefore renormalised to `scale` (a no-op for k <= d); pass the mean patch
    embedding norm, since the frozen probe needs that magnitude.
    """
    generator = torch.Generator().manual_seed(seed)
    codes = torch.nn.init.orthogonal_(torch.empty(k, d), generator=generator)  # (k, d)
    return F.normalize(codes, dim=1, eps=COSINE_EPS) * scale


def _resolve_backend(backend: str) -> str:
    """'auto' -> 'faiss' when importable, else 'torch' (and say so once); check forced choices."""
    if backend not in KMEANS_BACKENDS:
        raise ProtoquantError(f"unknown k-means backend {backend!r}: choose one of {', '.join(KMEANS_BACKENDS)}")
    if backend == "torch":
        return "torch"
    try:
        import faiss  # noqa: F401  (optional dependency: the cpu / gpu extra)
    except ImportError:
        if backend == "faiss":
            raise ProtoquantError("k-means backend 'faiss' was asked for but faiss is not installed: "
                                  "pip install 'protoquant[cpu]' (or [gpu]), or choose backend 'torch'") from None
        _warn_faiss_missing()
        return "torch"
    return "faiss"


@functools.cache
def _warn_faiss_missing() -> None:
    """Log once per process that k-means runs on the torch fallback."""
    log.warning("faiss is not installed: k-means runs on the torch fallback (same algorithm, slower on "
                "CPU); install protoquant[cpu] or protoquant[gpu] to use FAISS")


def _faiss_kmeans(unit: np.ndarray, k: int, *, iters: int, seed: int, use_gpu: bool) -> tuple[torch.Tensor, str]:
    """faiss.Kmeans on unit vectors, on the whole sample (no faiss subsampling); -> (codes (k, D), name)."""
    import faiss

    gpu = use_gpu and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(
        unit.shape[1], k, niter=iters, seed=seed, spherical=True, gpu=gpu,
        max_points_per_centroid=-(-unit.shape[0] // k),  # ceil(n / k): faiss keeps every point
        init_method=faiss.ClusteringInitMethod_AFK_MC2,
    )
    kmeans.train(unit)
    return torch.from_numpy(np.array(kmeans.centroids, dtype=np.float32)), "faiss-gpu" if gpu else "faiss-cpu"


def _torch_kmeans(unit: torch.Tensor, k: int, *, iters: int, seed: int) -> torch.Tensor:
    """Spherical Lloyd iterations on unit vectors (n, D) -> unit codes (k, D), on unit.device.

    Empty clusters are re-seeded from random sample vectors. All randomness comes from one CPU
    generator seeded with `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    codes = _kmeans_plus_plus(unit, k, generator)  # (k, D)
    for _ in range(iters):
        indices = assign_codes(unit, codes)  # (n,)
        sums = torch.zeros_like(codes).index_add_(0, indices, unit)  # (k, D)
        empty = (torch.bincount(indices, minlength=k) == 0).nonzero().flatten()  # (e,)
        if len(empty):  # re-seed each empty cluster from a random sample vector
            donors = torch.randint(unit.shape[0], (len(empty),), generator=generator).to(unit.device)  # (e,)
            sums[empty] = unit[donors]
        codes = F.normalize(sums, dim=1, eps=COSINE_EPS)
    return codes


def _kmeans_plus_plus(unit: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding for unit vectors: |a - b|^2 = 2 (1 - cos), so sample by 1 - cos to the nearest.

    Cost: k passes over the sample (one matrix-vector product each).
    """
    n = unit.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance = (1 - unit @ unit[chosen[0]]).clamp_min(0)  # (n,) to the nearest chosen centroid
    for _ in range(1, k):
        cumulative = distance.cumsum(0)  # (n,)
        total = float(cumulative[-1])
        if total <= 0:  # every vector coincides with a chosen one: any pick is as good
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            target = torch.tensor([torch.rand((), generator=generator).item() * total], device=unit.device)
            pick = min(int(torch.searchsorted(cumulative, target, right=True)), n - 1)
        chosen.append(pick)
        distance = torch.minimum(distance, (1 - unit @ unit[pick]).clamp_min(0))
    return unit[torch.tensor(chosen, device=unit.device)].clone()  # (k, D)


def _cluster_mean_norms(norms: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of `norms` (n,) per cluster (k,); an empty cluster gets the overall mean norm."""
    counts = torch.bincount(indices, minlength=k).float()  # (k,)
    sums = torch.zeros(k).index_add_(0, indices, norms.float())  # (k,)
    return torch.where(counts > 0, sums / counts.clamp_min(1), norms.float().mean())


# --- storage: safetensors + JSON metadata (pipeline.io) ----------------------------------------------

def save_codebook(path: str | Path, codes: torch.Tensor, meta: dict) -> None:
    """Save codes (K, D) as float32 with `meta` (cache_fingerprint, sample size, seed, objective,
    backend, init, seconds...); k, dim and created_utc are filled in when missing."""
    meta = {"k": codes.shape[0], "dim": codes.shape[1],
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")} | meta
    write_artifact(path, {"codes": codes.float()}, kind="codebook", fields={"meta": meta})


def load_codebook(path: str | Path) -> tuple[torch.Tensor, dict]:
    """Load a codebook written by save_codebook -> (codes (K, D) float32 on the CPU, meta)."""
    tensors, fields = read_artifact(path, kind="codebook")
    if "codes" not in tensors:
        raise ProtoquantError(f"codebook {path} holds no 'codes' tensor: rebuild it with "
                              f"`{REBUILD_COMMANDS['codebook'].format(cache='CACHE')}`")
    return tensors["codes"], fields.get("meta", {})


def check_fingerprint(meta: dict, expected_fingerprint: str, what: str, path: str | Path, *,
                      cache: str | Path = "CACHE") -> None:
    """Refuse an artefact made from another cache (DESIGN.md: a clear error, not a wrong answer).

    meta is the artefact's metadata ("cache_fingerprint" key); what is its kind ("codebook", "head",
    "probe"), which picks the rebuild command quoted in the message; cache names the cache in use.
    """
    recorded = meta.get("cache_fingerprint")
    rebuild = REBUILD_COMMANDS.get(what, "protoquant ... {cache}").format(cache=cache)
    if recorded is None:
        raise ProtoquantError(f"{what} {path} records no cache fingerprint, so it cannot be checked against "
                              f"{cache}: rebuild it with `{rebuild}`")
    if recorded != expected_fingerprint:
        raise ProtoquantError(f"{what} {path} was made from a cache with fingerprint {recorded[:12]}..., but "
                              f"{cache} has {expected_fingerprint[:12]}...: rebuild it with `{rebuild}`")
