"""pipeline/codebook.py: assignment, k-means (real FAISS and the torch fallback), inits, storage."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import codebook
from pipeline.codebook import (
    assign_codes,
    assign_codes_with_scores,
    check_fingerprint,
    code_usage,
    load_codebook,
    random_orthogonal_codes,
    rescale_to_feature_norm,
    save_codebook,
    spherical_kmeans,
)
from pipeline.errors import ProtoquantError

CLUSTER_NORMS = (1.0, 2.0, 3.0, 4.0)


def four_clusters(seed: int = 0, n: int = 400, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """n points around the first 4 axes of R^dim (cluster c has norm CLUSTER_NORMS[c]) -> (x, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    directions = np.eye(dim, dtype=np.float32)[labels] + rng.normal(0, 0.03, (n, dim)).astype(np.float32)
    norms = np.asarray(CLUSTER_NORMS, dtype=np.float32)[labels, None]
    return (directions * norms).astype(np.float32), labels


# --- assignment ---------------------------------------------------------------------------------

def test_assign_codes_uses_cosine_not_distance_and_blocks_agree() -> None:
    codes = torch.tensor([[1.0, 0.0], [0.0, 10.0], [1.0, 1.0]])  # (3, 2), unequal norms
    # [0.5, 4] is L2-nearest to [1, 1] (3.04 vs 6.02) but cosine-nearest to [0, 10] (0.99 vs 0.79)
    z = torch.tensor([[1.0, 0.2], [0.5, 4.0], [2.0, 2.1], [-1.0, 0.1], [0.0, 0.001]])  # (5, 2)
    expected = torch.tensor([0, 1, 2, 1, 1])
    assert torch.equal(assign_codes(z, codes), expected)
    assert torch.equal(assign_codes(z.half(), codes, block=2), expected)
    indices, cosines = assign_codes_with_scores(z.reshape(5, 1, 2), codes, block=3)  # (5, 1) leading dims
    assert indices.shape == (5, 1) and torch.equal(indices[:, 0], expected)
    assert cosines[1, 0].item() == pytest.approx(4.0 / np.hypot(0.5, 4.0), abs=1e-6)


def test_code_usage_counts_argmax_over_batches() -> None:
    codes = torch.eye(3)  # (3, 3)
    batches = [torch.tensor([[[[1.0, 0, 0], [0, 1.0, 0]]]]),  # (1, 1, 2, 3)
               torch.tensor([[[[2.0, 0.1, 0], [5.0, 0, 0.2]]]])]
    assert code_usage(codes, batches).tolist() == [3, 1, 0]


# --- k-means ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_recovers_four_separated_clusters(backend: str) -> None:
    x, labels = four_clusters()
    result = spherical_kmeans(x, 4, iters=10, seed=0, backend=backend, device="cpu")
    assert result.backend == f"{backend}-cpu"
    assert result.codes.shape == (4, 16) and result.codes.dtype == torch.float32
    assert torch.allclose(result.codes.norm(dim=1), torch.ones(4), atol=1e-5)
    assigned = assign_codes(torch.from_numpy(x), result.codes).numpy()
    # one code per cluster: the assignment is a relabelling of the truth
    mapping = {int(c): int(assigned[labels == c][0]) for c in range(4)}
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    assert all((assigned[labels == c] == mapping[c]).all() for c in range(4))
    for c, norm in enumerate(CLUSTER_NORMS):
        code = mapping[c]
        assert result.codes[code, c].item() > 0.99
        true_mean_norm = float(np.linalg.norm(x[labels == c], axis=1).mean())  # norm, plus noise
        assert result.mean_norms[code].item() == pytest.approx(true_mean_norm, rel=1e-5)
        assert result.mean_norms[code].item() == pytest.approx(norm, rel=0.02)
    assert result.objective > 0.99


def test_kmeans_same_seed_same_codes_and_backends_agree() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    faiss_a = spherical_kmeans(x, 20, iters=10, seed=3, backend="faiss", device="cpu")
    faiss_b = spherical_kmeans(x, 20, iters=10, seed=3, backend="faiss", device="cpu")
    torch_a = spherical_kmeans(x, 20, iters=10, seed=3, backend="torch", device="cpu")
    torch_b = spherical_kmeans(x, 20, iters=10, seed=3, backend="torch", device="cpu")
    assert torch.equal(faiss_a.codes, faiss_b.codes)
    assert torch.equal(torch_a.codes, torch_b.codes)
    assert not torch.equal(torch_a.codes, spherical_kmeans(x, 20, iters=10, seed=4, backend="torch",
                                                           device="cpu").codes)
    assert faiss_a.objective == pytest.approx(torch_a.objective, rel=0.03)


def test_torch_kmeans_survives_fewer_distinct_vectors_than_k() -> None:
    x = np.repeat(np.eye(3, dtype=np.float32)[:2] * 2.0, 5, axis=0)  # (10, 3): only 2 distinct vectors
    result = spherical_kmeans(x, 3, iters=3, seed=0, backend="torch", device="cpu")  # empty cluster re-seeded
    assert torch.isfinite(result.codes).all()
    assert torch.allclose(result.codes.norm(dim=1), torch.ones(3))
    assert result.objective == pytest.approx(1.0)
    assert torch.allclose(result.mean_norms, torch.full((3,), 2.0))


def test_kmeans_needs_at_least_k_vectors() -> None:
    x = np.ones((5, 4), dtype=np.float32)
    with pytest.raises(ProtoquantError, match="lower -k or raise --sample"):
        spherical_kmeans(x, 6)


def test_kmeans_rejects_unknown_backend() -> None:
    with pytest.raises(ProtoquantError, match="auto, faiss, torch"):
        spherical_kmeans(np.ones((8, 4), dtype=np.float32), 2, backend="sklearn")


def test_kmeans_without_faiss_falls_back_to_torch_and_says_so(monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    codebook._warn_faiss_missing.cache_clear()
    x, _ = four_clusters(n=40)
    with caplog.at_level(logging.WARNING, logger="pipeline.codebook"):
        result = spherical_kmeans(x, 4, iters=5, backend="auto", device="cpu")
    assert result.backend == "torch-cpu"
    assert "faiss is not installed" in caplog.text
    with pytest.raises(ProtoquantError, match=r"pip install 'protoquant\[cpu\]'"):
        spherical_kmeans(x, 4, backend="faiss")


# --- inits and scaling --------------------------------------------------------------------------

def test_random_orthogonal_codes_are_orthogonal_and_scaled() -> None:
    codes = random_orthogonal_codes(6, 10, seed=0, scale=3.0)  # k <= d: orthogonal rows
    assert torch.allclose(codes @ codes.T, 9.0 * torch.eye(6), atol=1e-4)
    assert torch.equal(codes, random_orthogonal_codes(6, 10, seed=0, scale=3.0))
    assert not torch.equal(codes, random_orthogonal_codes(6, 10, seed=1, scale=3.0))
    wide = random_orthogonal_codes(12, 4, seed=0, scale=2.0)  # k > d: rows cannot all be orthogonal
    assert torch.allclose(wide.norm(dim=1), torch.full((12,), 2.0), atol=1e-5)


def test_rescale_to_feature_norm_per_code_and_scalar() -> None:
    unit = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # not yet unit: normalised first
    assert torch.allclose(rescale_to_feature_norm(unit, torch.tensor([10.0, 0.5])),
                          torch.tensor([[6.0, 8.0], [0.0, 0.5]]))
    assert torch.allclose(rescale_to_feature_norm(unit, 5.0), torch.tensor([[3.0, 4.0], [0.0, 5.0]]))


# --- storage and fingerprints -------------------------------------------------------------------

def test_codebook_round_trip_is_bit_exact_with_metadata(tmp_path: Path) -> None:
    codes = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    meta = {"cache_fingerprint": "a1b2c3d4e5f6a7b8", "sample": 1000, "seed": 0, "objective": 0.61,
            "backend": "faiss-cpu", "init": "kmeans", "seconds": 1.5}
    path = tmp_path / "run" / "codebook.safetensors"
    save_codebook(path, codes, meta)
    loaded, loaded_meta = load_codebook(path)
    assert torch.equal(loaded, codes)
    assert loaded_meta["k"] == 7 and loaded_meta["dim"] == 5 and loaded_meta["created_utc"].endswith("+00:00")
    assert {key: loaded_meta[key] for key in meta} == meta
    assert [p.name for p in path.parent.iterdir()] == ["codebook.safetensors"]  # no temporary left


def test_loading_a_foreign_file_names_it(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ProtoquantError, match=f"{garbage}.*not a safetensors file"):
        load_codebook(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"codes": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ProtoquantError, match=f"{plain}.*not a protoquant codebook"):
        load_codebook(plain)
    with pytest.raises(ProtoquantError, match="does not exist"):
        load_codebook(tmp_path / "missing.safetensors")


def test_check_fingerprint_refuses_another_cache() -> None:
    meta = {"cache_fingerprint": "a1b2c3d4e5f6a7b8c9d0"}
    check_fingerprint(meta, "a1b2c3d4e5f6a7b8c9d0", "codebook", "cb.safetensors")  # same: no error
    with pytest.raises(ProtoquantError) as caught:
        check_fingerprint(meta, "c3d4e5f6a7b8c9d0e1f2", "codebook", "cb.safetensors", cache="data.zarr")
    message = str(caught.value)
    assert "codebook cb.safetensors" in message
    assert "a1b2c3d4e5f6..." in message and "data.zarr has c3d4e5f6a7b8..." in message
    assert "`protoquant codebook data.zarr -k K --out CODEBOOK`" in message
    with pytest.raises(ProtoquantError, match="protoquant train data.zarr"):
        check_fingerprint(meta, "ffff", "head", "run/head.safetensors", cache="data.zarr")
    with pytest.raises(ProtoquantError, match="records no cache fingerprint"):
        check_fingerprint({}, "ffff", "codebook", "cb.safetensors")
