"""The codebook stage and using a run: evaluate, predict, prune and the CLI (torchrun: tests/test_ddp.py).

Everything runs on a real cache of the generated "parts" dataset (tests/test_train.py), extracted
once per session with a random-init timm model (the parts_store fixture of tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.backbones import load_backbone_for_cache
from pipeline.cache import Cache
from pipeline.codebook import code_usage, load_codebook
from pipeline.data import evaluation_source
from pipeline.errors import ProtoquantError
from pipeline.geometry import Preprocessing
from pipeline.images import decode_rgb
from pipeline.model import backbone_head, load_head
from pipeline.run import open_run
from stages.codebook import CodebookSettings, build_codebook, sample_plan
from stages.evaluate import evaluate
from stages.extract import extract
from stages.predict import predict
from stages.prune import PruneSettings, parse_codes, prune
from stages.train import TrainSettings, train
from tests.test_train import FAST

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(parts_store, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("stages3") / "run"
    train(parts_store["cache"], parts_store["codebook"], run, FAST)
    return {**parts_store, "run": run}


# --- stage 2: codebook -----------------------------------------------------------------------------------

def test_codebook_same_seed_same_codes_with_metadata(trained, tmp_path) -> None:
    settings = CodebookSettings(k=16, seed=0, sample=200)
    build_codebook(trained["cache"], tmp_path / "a.safetensors", settings)
    build_codebook(trained["cache"], tmp_path / "b.safetensors", settings)
    build_codebook(trained["cache"], tmp_path / "c.safetensors", replace(settings, seed=1))
    a, meta = load_codebook(tmp_path / "a.safetensors")
    b, _ = load_codebook(tmp_path / "b.safetensors")
    c, _ = load_codebook(tmp_path / "c.safetensors")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, Cache(trained["cache"]).dim)
    assert meta["cache_fingerprint"] == Cache(trained["cache"]).fingerprint
    assert meta["k"] == 16 and meta["seed"] == 0 and meta["init"] == "kmeans" and meta["sample"] <= 200
    assert 0 < meta["objective"] <= 1 and "created_utc" in meta and meta["seconds"] >= 0
    # codes carry the patches' magnitude (stage A feeds them raw to the probe), not unit length
    patch_norm = float(np.linalg.norm(Cache(trained["cache"]).split("train").features[:8].astype(np.float32), axis=-1).mean())
    assert a.norm(dim=1).mean().item() == pytest.approx(patch_norm, rel=0.3)


def test_random_init_gives_orthogonal_codes_of_patch_norm(trained, tmp_path) -> None:
    build_codebook(trained["cache"], tmp_path / "r.safetensors", CodebookSettings(k=16, init="random", seed=0))
    codes, meta = load_codebook(tmp_path / "r.safetensors")
    unit = codes / codes.norm(dim=1, keepdim=True)
    assert torch.allclose(unit @ unit.T, torch.eye(16), atol=1e-5)
    assert torch.allclose(codes.norm(dim=1), codes.norm(dim=1)[0].expand(16))
    assert meta["init"] == "random" and meta["backend"] == "random-orthogonal"


def test_sample_plan_spreads_evenly_over_classes_and_images() -> None:
    labels = np.array([0] * 10 + [1] * 10 + [2] * 2)  # class 2 has only two images
    rows = np.arange(22)
    chosen, per_image = sample_plan(labels, rows, cells=4, budget=32, seed=0)
    assert per_image == 1 and len(chosen) == 22  # fewer vectors than cells x images: one per image
    chosen, per_image = sample_plan(labels, rows, cells=4, budget=12, seed=0)
    assert per_image == 1 and np.bincount(labels[chosen]).tolist() == [5, 5, 2]
    chosen, per_image = sample_plan(labels, rows, cells=4, budget=1000, seed=0)
    assert per_image == 4 and len(chosen) == 22  # the whole split fits: every cell of every image


# --- evaluate --------------------------------------------------------------------------------------------

def test_evaluate_json_reports_the_required_fields(trained) -> None:
    result = runner.invoke(app, ["evaluate", str(trained["run"]), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("top1", "top5", "probe_top1", "n", "codes_used", "local_size", "per_class", "w_sparsity"):
        assert key in report
    assert report["n"] == 32 and report["top1"] >= 0.75 and report["top5"] == 1.0  # 4 classes: top-5 is everything
    assert 0 < report["local_size"] <= report["codes_used"] <= 16
    assert set(report["per_class"]) == {f"class_{c}" for c in range(4)}
    on_val = evaluate(trained["run"], split="train", device="cpu")
    assert on_val.n == 96  # the skipped corrupt file is not scored


# --- predict -----------------------------------------------------------------------------------------------

def test_predict_end_to_end_agrees_with_the_cached_features(trained) -> None:
    cache = Cache(trained["cache"])
    test = cache.split("test")
    rows = np.arange(8)
    images = [trained["data"] / str(test.ids[r]) for r in rows]
    predictions = predict(trained["run"], images, top=3, device="cpu")
    head, classes, _ = load_head(trained["run"] / "head.safetensors")
    cached = torch.from_numpy(test.features[:8].astype(np.float32))  # (8, H, W, D)
    expected = [classes[i] for i in head(cached).argmax(dim=1).tolist()]
    assert [p.label for p in predictions] == expected  # backbone recomputed from pixels = the cache
    h, w = cache.grid
    for p in predictions:
        assert 0 < p.probability <= 1 and p.top_classes[0] == (p.label, p.probability)
        assert 1 <= len(p.evidence) <= 3
        contributions = [e.contribution for e in p.evidence]
        assert contributions == sorted(contributions, reverse=True)
        assert all(0 <= e.cell[0] < h and 0 <= e.cell[1] < w for e in p.evidence)
        # the one box convention: (x, y, width, height) of the cell's receptive box in the image's own pixels
        geometry = Preprocessing.from_cache(cache).image(decode_rgb(Path(p.image).read_bytes(), p.image).size)
        for e in p.evidence:
            assert e.box == pytest.approx(tuple(geometry.cell_box(*e.cell)))
        x, y, width, height = p.evidence[0].box
        assert 0 <= x and x + width <= 48 and 0 < width < 48 and 0 < height < 48


def test_predict_cli_json_and_a_missing_image(trained) -> None:
    image = next((trained["data"] / "test" / "class_1").iterdir())
    result = runner.invoke(app, ["predict", str(trained["run"]), str(image), "--json", "--top", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    [one] = json.loads(result.stdout)
    assert one["image"] == str(image) and len(one["evidence"]) <= 2
    result = runner.invoke(app, ["predict", str(trained["run"]), "nowhere.png", "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")  # cli.py prints it as one line
    assert "image nowhere.png does not exist" in result.stderr


# --- prune -------------------------------------------------------------------------------------------------

def test_prune_top_k_keeps_accuracy_and_dead_weights_stay_dead(trained, tmp_path) -> None:
    result = prune(trained["run"], tmp_path / "k4", PruneSettings(top_k_per_class=4), device="cpu")
    head, _, _ = load_head(tmp_path / "k4" / "head.safetensors")
    assert ((head.weight > 0).sum(dim=1) <= 4).all()
    assert result.after["test_top1"] >= result.before["test_top1"] - 0.15
    assert result.after["codes_in_use"] <= 16

    tuned = prune(trained["run"], tmp_path / "k2ft", PruneSettings(top_k_per_class=2, finetune_epochs=3), device="cpu")
    tuned_head, _, _ = load_head(tmp_path / "k2ft" / "head.safetensors")
    assert ((tuned_head.weight > 0).sum(dim=1) <= 2).all()  # fine-tuning revived no zeroed weight
    assert tuned.after["val_top1"] >= 0.5  # chance is 0.25
    assert len((tmp_path / "k2ft" / "log.jsonl").read_text().splitlines()) == 3
    config = json.loads((tmp_path / "k2ft" / "config.json").read_text())
    assert config["command"] == "prune" and config["prune"]["top_k_per_class"] == 2
    assert evaluate(tmp_path / "k2ft", device="cpu").n == 32  # a pruned run is a run


def test_prune_removes_named_and_rarely_used_codes_counted_on_train(trained, tmp_path) -> None:
    settings = PruneSettings(drop_codes=parse_codes("3,5"), min_usage=0.05)
    result = prune(trained["run"], tmp_path / "edited", settings, device="cpu")
    head, _, _ = load_head(tmp_path / "edited" / "head.safetensors")
    assert not head.code_mask[3] and not head.code_mask[5]
    # usage by hand: argmax among the remaining codes over every usable row of the TRAIN split
    original, _, _ = load_head(trained["run"] / "head.safetensors")
    keep = original.code_mask.clone()  # the push after stage B may already have removed duplicate codes
    keep[[3, 5]] = False
    existing = keep.nonzero().flatten()
    train_split = Cache(trained["cache"]).split("train")
    patches = (original.embed(f) for f, _ in evaluation_source(train_split, batch_size=64).batches(0))  # as the codes see them
    counts = code_usage(original.codes[existing], patches)
    rare = existing[counts.float() / counts.sum() < 0.05].tolist()
    assert result.removed_by_usage == rare
    already_gone = set(original.code_mask.logical_not().nonzero().flatten().tolist())
    assert set(head.code_mask.logical_not().nonzero().flatten().tolist()) == {3, 5, *rare} | already_gone
    with pytest.raises(ProtoquantError, match="codes 0..15"):
        prune(trained["run"], tmp_path / "bad", PruneSettings(drop_codes=(16,)), device="cpu")
    with pytest.raises(ProtoquantError, match="--drop-codes"):
        parse_codes("3,x")


# --- the CLI -----------------------------------------------------------------------------------------------

def test_cli_codebook_and_train_record_every_default(trained, tmp_path) -> None:
    codebook = tmp_path / "cb.safetensors"
    result = runner.invoke(app, ["codebook", str(trained["cache"]), "-k", "8", "--out", str(codebook), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["k"] == 8
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(trained["cache"]), "-c", str(codebook), "--out", str(run), "--epochs", "2",
                                 "--probe-epochs", "1", "--codebook-epochs", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["k"] == 8
    recorded = json.loads((run / "config.json").read_text())["settings"]
    passed = {"epochs": 2, "probe_epochs": 1, "codebook_epochs": 1, "device": "cpu"}
    assert recorded == {**asdict(TrainSettings()), **passed}  # the CLI's defaults are the library's


def test_cli_bad_input_is_one_clear_line(trained, tmp_path) -> None:
    done = subprocess.run([sys.executable, "cli.py", "evaluate", str(tmp_path / "missing-run")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: run ") and "does not exist" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    result = runner.invoke(app, ["train", str(tmp_path / "no-cache"), "-c", str(trained["codebook"]),
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a feature cache" in result.stderr


# --- --use-backbone-head -------------------------------------------------------------------------------------

def test_backbone_head_is_the_models_own_classifier_on_the_cached_grid(trained, tmp_path) -> None:
    """A timm model built for the dataset's 4 classes: its forward_head on the cached grid = its full forward."""
    cache = tmp_path / "own.zarr"
    extract(trained["data"], cache, backbone="test_resnet", image_size=64, workers=0, skip_bad=True,
            model_kwargs={"num_classes": 4}, layers="final")  # the map the model's own head reads
    codebook = tmp_path / "cb.safetensors"
    build_codebook(cache, codebook, CodebookSettings(k=8))
    run = tmp_path / "run"
    train(cache, codebook, run, replace(FAST, use_backbone_head=True, epochs=2, codebook_epochs=1))
    assert not (run / "probe.safetensors").exists()  # nothing trained: rebuilt from the cache's backbone
    reference = open_run(run).reference_head()
    store = Cache(cache)
    backbone = load_backbone_for_cache(store.provenance)
    test = store.split("test")
    image = decode_rgb((trained["data"] / str(test.ids[0])).read_bytes(), "x")
    with torch.no_grad():
        full = backbone.model(backbone.transform(image)[None])  # (1, 4) plain timm
        from_cache = reference(torch.from_numpy(test.features[:1].astype(np.float32)))  # (1, 4)
    assert torch.allclose(full, from_cache, atol=2e-2)  # the cache holds float16
    with torch.no_grad():  # evaluate rebuilds the same classifier: its probe_top1 is this one's accuracy on test
        predicted = reference(torch.from_numpy(test.features[:].astype(np.float32))).argmax(dim=1).numpy()
    by_hand = float((predicted == test.labels[:]).mean())
    assert evaluate(run, device="cpu").probe_top1 == pytest.approx(by_hand)
    # extract's default grid (--layers auto: stride 16 + 32) is not the map the head reads: one line, not a shape error
    default = tmp_path / "default.zarr"
    extract(trained["data"], default, backbone="test_resnet", image_size=64, workers=0, skip_bad=True,
            model_kwargs={"num_classes": 4})
    with pytest.raises(ProtoquantError, match=r"--use-backbone-head: the cache's grid is --layers 3,4, .*--layers final"):
        backbone_head(Cache(default).provenance, 4)
