"""bench/gpu_check: its CPU dry run (every step, tiny sizes) and its loud failure when CUDA is asked for but absent.

The dry run is the rehearsal of what a GPU session runs first: if it breaks here, the 15 minutes on a
GPU would be spent finding out. It runs in-process (one torch import), real Lite0 weights, real zarr.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    """bench/gpu_check.py as a module (bench/ is scripts, not a package); loaded once."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, Path]:
    pytest.importorskip("faiss")  # the check compares faiss backends; CI installs .[cpu]
    out = tmp_path_factory.mktemp("gpu-check")
    report = load_gpu_check().main(["--device", "cpu", "--dry-run", "--out", str(out)])
    return report, out


def test_dry_run_passes_every_check_and_writes_one_results_file(dry_run):
    report, out = dry_run
    assert report["failed"] == []
    assert list(report["steps"]) == ["make-birds", "extract", "kmeans", "train", "stream", "sweep", "autocast"]
    written = json.loads((out / "gpu_check.json").read_text())
    assert written["steps"]["train"]["cpu_test_top1"] == report["steps"]["train"]["cpu_test_top1"]
    table = (out / "gpu_check.md").read_text()
    for step in ("extract", "kmeans", "train", "stream", "sweep"):
        assert f"| {step} |" in table
    assert "default picked: float16" in table


def test_dry_run_figures_agree_with_what_was_run(dry_run):
    steps = dry_run[0]["steps"]
    extract, kmeans, train, stream = steps["extract"], steps["kmeans"], steps["train"], steps["stream"]
    assert extract["images"] == steps["make-birds"]["images"] == 24
    assert extract["autocast"] is False  # autocast is for CUDA only
    assert extract["ratio_bare_over_extract"] == pytest.approx(extract["bare_s"] / extract["extract_s"])
    # on the CPU both k-means contenders are faiss-cpu with one seed: the very same objective
    assert kmeans["backend"] == "faiss-cpu"
    assert kmeans["device_objective"] == kmeans["cpu_objective"]
    assert 0 < kmeans["cpu_objective"] <= 1
    # both heads trained on the CPU from one seed: the same accuracy, on every test image
    assert train["device_test_top1"] == train["cpu_test_top1"]
    assert train["test_n"] == extract["images"] - 18  # make-birds keeps 2 of 8 per class for test
    assert train["device_head_epoch_s"] > 0 and train["noise_tolerance"] > 0
    assert stream["rows"] == 18 and stream["bytes"] > 18 * 2 * 2 * 1280 * 2  # 18 rows of 2x2x1280 float16, plus index
    assert stream["ratio_stream_over_raw"] == pytest.approx(stream["stream_rows_per_s"] / stream["raw_rows_per_s"])
    swept = steps["sweep"]
    assert swept["heads"] == 8 and swept["target"] == 2.0
    assert swept["ratio_sweep_over_train"] == pytest.approx(swept["sweep_s"] / swept["one_train_s"])
    assert swept["target_met"] == (swept["ratio_sweep_over_train"] <= 2.0)
    assert 1 <= swept["refit_processes"] <= min(4, torch.get_num_threads())


def test_dry_run_autocast_figures_rank_float16_closest_to_float32(dry_run):
    autocast = dry_run[0]["steps"]["autocast"]
    rows = autocast["differences"]
    floor = rows["float32 -> float16 storage (the cache's own rounding)"]["max_abs_diff"]
    assert 0 < floor < rows["float16"]["max_abs_diff"] < rows["bfloat16"]["max_abs_diff"]
    assert rows["float16"]["nonfinite_share"] == rows["bfloat16"]["nonfinite_share"] == 0.0
    assert autocast["float16_headroom"] > 16
    assert autocast["default"] == autocast["configured"] == "float16"
    assert set(autocast["gradients"]) == {"float16", "bfloat16"}
    for dtype in ("float16", "bfloat16"):  # PGD's steps follow these signs
        assert 0.5 < autocast["gradients"][dtype]["sign_agreement"] <= 1
        assert autocast["gradients"][dtype]["zero_gradient_share"] < 0.1


def test_pick_default_refuses_a_dtype_that_overflows_or_has_no_headroom():
    autocast = load_gpu_check().autocast_bench
    rows = {"float16": {"nonfinite_share": 0.0, "max_abs_diff": 0.1},
            "bfloat16": {"nonfinite_share": 0.0, "max_abs_diff": 0.9}}
    assert autocast.pick_default(rows, float16_headroom=500.0) == "float16"
    assert autocast.pick_default(rows, float16_headroom=2.0) == "bfloat16"
    rows["bfloat16"]["nonfinite_share"] = 0.01
    assert autocast.pick_default(rows, float16_headroom=2.0) == "float32"


def test_cuda_asked_for_without_one_fails_loudly_in_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # no GPU, even on a GPU machine
    result = subprocess.run([str(ROOT / "bench" / "gpu_check"), "--device", "cuda", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: --device cuda: torch ") and "sees no CUDA device" in lines[0]
    assert "--device cpu --dry-run" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing was run, nothing written


def test_a_step_that_raised_is_a_failed_row_and_the_others_stay(dry_run):
    gpu_check = load_gpu_check()
    report = json.loads(json.dumps(dry_run[0]))
    report["steps"]["kmeans"] = {"ok": False, "why": "RuntimeError: faiss GPU out of memory", "traceback": "..."}
    table = gpu_check.markdown(report)
    assert "| kmeans | FAILED: RuntimeError: faiss GPU out of memory |  |  | NO |" in table
    assert "| train | head epoch" in table and "default picked: float16" in table
