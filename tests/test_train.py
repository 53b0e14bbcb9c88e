"""Stage 3 from a real cache: batches from RAM and streamed, schedules, training, resume, refusals.

One small generated dataset ("parts": the class is the colour of a square placed anywhere on a grey
noise background, so only one grid cell carries it) is extracted once per module with the real
extract stage and a random-init timm model; one training file is corrupt and skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cache import Cache
from pipeline.codebook import load_codebook, save_codebook
from pipeline.data import (FeatureSource, RamRows, SourceSettings, carve_validation, open_training_data, parse_memory,
                           usable_rows, view_choices)
from pipeline.errors import ProtoquantError
from pipeline.model import load_head
from pipeline.run import work_dir_for
from pipeline.training import lr_factor
from stages.codebook import CodebookSettings, build_codebook
from stages.evaluate import evaluate
from stages.extract import extract
from stages.train import TrainSettings, train

COLOURS = ((220, 40, 40), (40, 190, 60), (50, 70, 230), (230, 210, 40))
# Short phases: the tiny dataset learns in a few epochs; the probe's rate suits the random-init features' scale.
# The final map, timm's crop: a 2 x 2 x 96 grid at 64 px, small and fast (runs repeat bit for bit on any grid
# since stage A's gather is index_select: pipeline/model.py quantize).
PLAIN_GRID = {"layers": "final", "crop_mode": None, "crop_pct": None}
FAST = TrainSettings(epochs=20, probe_epochs=4, codebook_epochs=2, batch_size=16, probe_lr=3e-2, val_fraction=0.2,
                     device="cpu")


def make_parts_dataset(root: Path, *, per_class: dict[str, int], size: int = 48, seed: int = 0,
                       corrupt: bool = True) -> list[str]:
    """ImageFolder DATA/<split>/class_<c>/*.png: grey noise plus a square of the class colour anywhere.

    With corrupt, one training file is not an image (extract --skip-bad leaves its row NaN).
    Returns the class names.
    """
    rng = np.random.default_rng(seed)
    classes = [f"class_{c}" for c in range(len(COLOURS))]
    for split, count in per_class.items():
        for label, colour in enumerate(COLOURS):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(90, 160, size=(size, size, 3)).astype(np.uint8)
                side = size // 3
                x, y = rng.integers(0, size - side, size=2)
                pixels[y:y + side, x:x + side] = np.clip(np.array(colour) + rng.integers(-20, 20, size=3), 0, 255)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    if corrupt:
        (root / "train" / classes[0] / "broken.png").write_bytes(b"not an image at all")
    return classes


def build_parts_cache(root: Path, *, views: int = 2) -> Path:
    """The dataset above, extracted with test_resnet at 64 px (2 x 2 grid, 96 dims), small chunks."""
    data = root / "data"
    make_parts_dataset(data, per_class={"train": 24, "test": 8})
    cache = root / "cache.zarr"
    extract(data, cache, backbone="test_resnet", image_size=64, workers=0, batch_size=32, views=views, **PLAIN_GRID,
            skip_bad=True, rows_per_shard=16)
    return cache


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parts")
    cache = build_parts_cache(root)
    codebook = root / "codebook.safetensors"
    build_codebook(cache, codebook, CodebookSettings(k=16, seed=0))
    return {"root": root, "cache": cache, "codebook": codebook}


def _head_tensors(run: Path) -> dict[str, torch.Tensor]:
    head, _, _ = load_head(run / "head.safetensors")
    return {name: t.clone() for name, t in head.state_dict().items()}


# --- data: rows, validation, memory ------------------------------------------------------------------


def without_timings(value):
    """Metrics with every wall-clock entry (keys ending in "seconds") left out: the rest must repeat exactly."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value

def test_parse_memory_units() -> None:
    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5g") == 1_500_000_000
    assert parse_memory("0") == 0
    assert parse_memory("auto") > 0
    with pytest.raises(ProtoquantError, match="--max-memory"):
        parse_memory("lots")


def test_validation_is_stratified_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), 20)  # (60,) 20 rows per class
    rows = np.arange(60)
    train_rows, val_rows = carve_validation(rows, labels, 0.1, seed=7)
    assert np.bincount(labels[val_rows]).tolist() == [2, 2, 2]
    assert set(train_rows) | set(val_rows) == set(rows) and not set(train_rows) & set(val_rows)
    assert np.array_equal(carve_validation(rows, labels, 0.1, seed=7)[1], val_rows)
    assert not np.array_equal(carve_validation(rows, labels, 0.1, seed=8)[1], val_rows)


def test_skipped_rows_are_never_read(parts) -> None:
    split = Cache(parts["cache"]).split("train")
    rows = usable_rows(split)
    assert split.n == 97 and len(rows) == 96  # the corrupt file's row is NaN and left out
    source = FeatureSource(split, rows, SourceSettings(batch_size=10, views=True))
    seen = sum(len(labels) for _, labels in source.batches(0))
    assert seen == 96
    assert all(torch.isfinite(f).all() for f, _ in source.batches(1))


# --- data: RAM and streaming agree --------------------------------------------------------------------

def _rows_by_content(source: FeatureSource, epoch: int) -> tuple[list[tuple[str, int]], list[int]]:
    """Every (grid digest, label) of an epoch, sorted, and the batch sizes."""
    items, sizes = [], []
    for features, labels in source.batches(epoch):
        sizes.append(len(labels))
        items += [(hashlib.sha1(f.numpy().tobytes()).hexdigest(), int(y)) for f, y in zip(features, labels)]
    return sorted(items), sizes


def test_ram_and_stream_give_the_same_rows_and_views(parts) -> None:
    split = Cache(parts["cache"]).split("train")
    rows = usable_rows(split)[5:]  # any subset of rows
    settings = SourceSettings(batch_size=12, views=True, seed=3, buffer_chunks=2)
    ram = FeatureSource(split, rows, settings, ram=RamRows.load(split, rows, with_views=True))
    stream = FeatureSource(split, rows, settings)
    for epoch in (0, 1):
        ram_items, ram_sizes = _rows_by_content(ram, epoch)
        stream_items, stream_sizes = _rows_by_content(stream, epoch)
        assert ram_items == stream_items  # same rows, same view drawn for each row in this epoch
        assert len(ram_items) == len(rows) and sum(stream_sizes) == len(rows)
        assert ram_sizes[:-1] == stream_sizes[:-1] == [12] * (len(ram_sizes) - 1)  # full batches but the last
    assert _rows_by_content(ram, 0)[0] != _rows_by_content(ram, 1)[0]  # a new view draw each epoch
    first = [f.sum().item() for f, _ in stream.batches(0)]
    assert first == [f.sum().item() for f, _ in stream.batches(0)]  # same seed, same order
    assert first != [f.sum().item() for f, _ in stream.batches(1)]


def test_unshuffled_sources_agree_exactly(parts) -> None:
    split = Cache(parts["cache"]).split("train")
    rows = usable_rows(split)
    settings = SourceSettings(batch_size=7, shuffle=False)
    ram = list(FeatureSource(split, rows, settings, ram=RamRows.load(split, rows)).batches(0))
    stream = list(FeatureSource(split, rows, settings).batches(0))
    assert len(ram) == len(stream)
    for (f1, y1), (f2, y2) in zip(ram, stream):
        assert torch.equal(f1, f2) and torch.equal(y1, y2)


@pytest.mark.parametrize("in_ram", [True, False])
def test_ranks_take_disjoint_shares_in_step(parts, in_ram: bool) -> None:
    split = Cache(parts["cache"]).split("train")
    rows = usable_rows(split)
    settings = SourceSettings(batch_size=8, seed=1)
    loaded = RamRows.load(split, rows) if in_ram else None
    shares = [FeatureSource(split, rows, settings, ram=loaded, rank=r, world=2) for r in (0, 1)]
    assert shares[0].steps(0) == shares[1].steps(0) > 0
    seen = [_rows_by_content(s, 0)[0] for s in shares]
    assert len(seen[0]) + len(seen[1]) <= len(rows)
    assert not set(seen[0]) & set(seen[1])


def test_view_choice_is_seeded_per_epoch() -> None:
    assert np.array_equal(view_choices(50, 2, seed=0, epoch=3), view_choices(50, 2, seed=0, epoch=3))
    assert set(view_choices(500, 2, seed=0, epoch=0)) == {0, 1, 2}  # the original grid is one of the choices
    assert not view_choices(50, 0, seed=0, epoch=0).any()


# --- schedule ------------------------------------------------------------------------------------------

def test_lr_warms_up_then_follows_a_cosine_to_zero() -> None:
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup) == pytest.approx(0.1)  # the very first step already has a rate
    assert lr_factor(9, total, warmup) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(99, total, warmup) == pytest.approx(0.5 * (1 + np.cos(np.pi * 89 / 90)))
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


# --- training ---------------------------------------------------------------------------------------------

def test_train_learns_is_reproducible_and_writes_the_run(parts, tmp_path) -> None:
    first = train(parts["cache"], parts["codebook"], tmp_path / "a", FAST)
    second = train(parts["cache"], parts["codebook"], tmp_path / "b", FAST)
    a, b = _head_tensors(tmp_path / "a"), _head_tensors(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)  # same seed, same head, bit for bit
    third = train(parts["cache"], parts["codebook"], tmp_path / "c", replace(FAST, seed=1))
    assert not torch.equal(_head_tensors(tmp_path / "c")["weight"], a["weight"])

    run = tmp_path / "a"
    assert {p.name for p in run.iterdir()} == {"head.safetensors", "probe.safetensors", "config.json",
                                                "metrics.json", "log.jsonl", "sparsity.svg"}
    assert not work_dir_for(run).exists()  # the work dir was renamed onto RUN
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]["fingerprint"] == Cache(parts["cache"]).fingerprint
    assert config["settings"]["seed"] == 0 and config["validation"]["rows"] == 20
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["probe"] * 4 + ["codebook"] * 2 + ["head"] * 20
    head_lrs = [r["lr"] for r in log if r["phase"] == "head"]
    assert head_lrs[0] == pytest.approx(FAST.head_lr, rel=0.01)  # warm-up ends with epoch 1
    assert head_lrs == sorted(head_lrs, reverse=True)  # then decays every epoch, not one late
    assert first.metrics["val_top1"]["head"] >= 0.8 and first.metrics["data_path"] == "ram"
    assert first.metrics["views"] == 2 and first.metrics["n_train"] + first.metrics["n_val"] == 96
    assert without_timings(second.metrics) == without_timings(first.metrics)  # same seed, same run
    assert third.metrics["val_top1"]["head"] >= 0.8

    test = evaluate(run, split="test", device="cpu")
    assert test.n == 32 and test.top1 >= 0.75  # chance is 0.25


def shuffle_train_labels(data: Path, seed: int) -> None:
    """Move every training image into a random class folder (a permutation: class counts stay the same)."""
    files = sorted((data / "train").glob("*/*.png"))
    targets = np.random.default_rng(seed).permutation([f.parent.name for f in files])
    for i, (file, target) in enumerate(zip(files, targets)):
        file.rename(data / "train" / target / f"shuffled_{i:03d}.png")


def test_a_head_trained_on_shuffled_labels_scores_chance_on_test(tmp_path) -> None:
    """Training labels carry no signal, test labels are true: only a leak of test labels could score well."""
    data = tmp_path / "data"
    make_parts_dataset(data, per_class={"train": 16, "test": 8}, corrupt=False)
    shuffle_train_labels(data, seed=0)
    cache, codebook = tmp_path / "cache.zarr", tmp_path / "codebook.safetensors"
    extract(data, cache, backbone="test_resnet", image_size=64, workers=0, batch_size=32, **PLAIN_GRID)
    build_codebook(cache, codebook, CodebookSettings(k=16, seed=0))
    train(cache, codebook, tmp_path / "run", FAST)
    test = evaluate(tmp_path / "run", split="test", device="cpu")
    # chance is 0.25 (P(top-1 > 0.5) by luck is about 3e-4); the same recipe on true labels reaches >= 0.75 above
    assert test.n == 32 and test.top1 <= 0.5


def test_streaming_training_matches_ram_quality(parts, tmp_path) -> None:
    ram = train(parts["cache"], parts["codebook"], tmp_path / "ram", FAST)
    streamed = train(parts["cache"], parts["codebook"], tmp_path / "stream", replace(FAST, max_memory="0"))
    assert ram.metrics["data_path"] == "ram" and streamed.metrics["data_path"] == "stream"
    test_ram = evaluate(tmp_path / "ram", device="cpu").top1
    test_stream = evaluate(tmp_path / "stream", device="cpu").top1
    assert test_ram >= 0.75 and test_stream >= 0.75
    assert abs(test_ram - test_stream) <= 0.15


def test_resume_continues_to_the_same_head(parts, tmp_path) -> None:
    settings = replace(FAST, epochs=4)
    train(parts["cache"], parts["codebook"], tmp_path / "full", settings)

    seen = []

    def stop_in_stage_a(record: dict) -> None:
        seen.append(record)
        if record["phase"] == "codebook" and record["epoch"] == 1:
            raise KeyboardInterrupt  # as if the process were stopped after this epoch's checkpoint

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(parts["cache"], parts["codebook"], out, settings, on_epoch=stop_in_stage_a)
    assert not out.exists() and (work_dir_for(out) / "checkpoint.safetensors").is_file()
    with pytest.raises(ProtoquantError, match="other settings"):
        train(parts["cache"], parts["codebook"], out, replace(settings, head_lr=0.5), resume=True)
    resumed_records = []
    result = train(parts["cache"], parts["codebook"], out, settings, resume=True, on_epoch=resumed_records.append)
    assert result.resumed
    assert [(r["phase"], r["epoch"]) for r in resumed_records][0] == ("codebook", 2)  # nothing redone
    full, resumed = _head_tensors(tmp_path / "full"), _head_tensors(out)
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    log = (out / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 + 2 + 4  # the whole history, both halves
    with pytest.raises(ProtoquantError, match="no stopped run"):
        train(parts["cache"], parts["codebook"], tmp_path / "never", settings, resume=True)


def test_resume_ignores_the_projections_options_only_without_a_projection() -> None:
    """A raw-cosine run stopped before --projection-learns existed resumes with today's default for it."""
    from dataclasses import asdict

    from pipeline.training import with_legacy_settings
    from stages.train import _compared_settings

    today = asdict(replace(FAST, projection_dim=0, ground=False))
    recorded = {k: v for k, v in today.items() if k != "projection_learns"}  # legacy: "all"
    assert _compared_settings(with_legacy_settings(recorded)) == _compared_settings(today)
    projected = {**today, "projection_dim": 64}
    assert _compared_settings(with_legacy_settings({**recorded, "projection_dim": 64})) != _compared_settings(projected)


def test_existing_run_is_refused_without_overwrite(parts, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"format": "protoquant-run", "command": "train"}')
    (tmp_path / "run" / "head.safetensors").write_bytes(b"")
    with pytest.raises(ProtoquantError, match="already exists"):
        train(parts["cache"], parts["codebook"], tmp_path / "run", FAST)


# --- refusals ---------------------------------------------------------------------------------------------

def test_codebook_or_run_from_another_cache_is_refused(parts, tmp_path) -> None:
    other = tmp_path / "other"
    make_parts_dataset(other / "data", per_class={"train": 3, "test": 1}, seed=5, corrupt=False)
    other_cache = other / "cache.zarr"
    extract(other / "data", other_cache, backbone="test_resnet", image_size=64, workers=0, **PLAIN_GRID)
    with pytest.raises(ProtoquantError, match="fingerprint"):
        train(other_cache, parts["codebook"], tmp_path / "run", FAST)

    codes, meta = load_codebook(parts["codebook"])
    narrow = tmp_path / "narrow.safetensors"
    save_codebook(narrow, codes[:, :32], meta)  # right cache, wrong dimension
    with pytest.raises(ProtoquantError, match="32-dimensional"):
        train(parts["cache"], narrow, tmp_path / "run", FAST)

    train(parts["cache"], parts["codebook"], tmp_path / "run", replace(FAST, epochs=1, probe_epochs=1, codebook_epochs=0))
    with pytest.raises(ProtoquantError, match="fingerprint"):
        evaluate(tmp_path / "run", cache=other_cache, device="cpu")


def test_backbone_head_is_refused_when_classes_differ(parts, tmp_path) -> None:
    with pytest.raises(ProtoquantError, match="predicts 1000 classes but the dataset has 4"):
        train(parts["cache"], parts["codebook"], tmp_path / "run", replace(FAST, use_backbone_head=True))


def test_open_training_data_uses_views_only_for_training(parts) -> None:
    split = Cache(parts["cache"]).split("train")
    data = open_training_data(split, val_fraction=0.2, seed=0, batch_size=16, max_memory=10**9)
    assert data.in_ram and data.views == 2
    assert data.train.settings.views and not data.val.settings.views and not data.val.settings.shuffle
    assert len(data.val_rows) == 20 and len(data.train_rows) == 76


@pytest.mark.parametrize("rule", ["deviance", "accuracy"])
def test_default_head_is_sparse_and_the_chosen_point_obeys_its_rule(parts, tmp_path, rule) -> None:
    settings = replace(FAST, epochs=4, path_points=12)
    if rule != TrainSettings().sparsity_rule:
        settings = replace(settings, sparsity_rule=rule)
    result = train(parts["cache"], parts["codebook"], tmp_path / "run", settings)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    sparsity, grounding = metrics["sparsity"], metrics["grounding"]
    curve, chosen, margin = sparsity["curve"], sparsity["chosen"], sparsity["margin"]
    assert sparsity["rule_name"] == rule
    assert len(curve) == 12 and curve[0]["nonzero_weights"] == 0  # the whole path, from the empty head
    if rule == "deviance":  # within one standard error of the lowest validation cross-entropy
        lowest = min(curve, key=lambda p: p["val_loss"])
        assert margin == pytest.approx(lowest["val_loss_se"]) and margin > 0
        eligible = [p for p in curve if p["val_loss"] <= lowest["val_loss"] + margin + 1e-12]
    else:  # within max(tolerance, one standard error) of the best validation top-1
        best = max(p["val_top1"] for p in curve)
        assert margin == pytest.approx(max(sparsity["tolerance"], math.sqrt(best * (1 - best) / sparsity["n_val"])))
        eligible = [p for p in curve if p["val_top1"] >= best - margin - 1e-12]
    assert chosen == curve[sparsity["chosen_index"]] and chosen in eligible
    assert chosen["local_size"] == min(p["local_size"] for p in eligible)
    head, _, _ = load_head(tmp_path / "run" / "head.safetensors")
    per_class = (head.effective_weight() > 0.1).sum(dim=1).float()
    assert float(per_class.mean()) == pytest.approx(chosen["local_size"])
    assert metrics["val_top1"]["head"] == pytest.approx(chosen["val_top1"], abs=1e-6)
    assert grounding["pushed"] and grounding["mean_max_cosine_in_use"] > 1 - 1e-5  # grounded: codes are patches
    assert head.projection is not None and not head.train_codes
    assert (tmp_path / "run" / "sparsity.svg").read_text().startswith("<svg")


@pytest.mark.parametrize("projection_dim", [0, 24], ids=["raw", "projected"])
def test_ground_pushes_every_code_onto_a_training_patch_before_the_refit(parts, tmp_path, projection_dim) -> None:
    settings = replace(FAST, epochs=4, path_points=12, ground=True, projection_dim=projection_dim)
    train(parts["cache"], parts["codebook"], tmp_path / "run", settings)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    grounding = metrics["grounding"]
    assert grounding["pushed"] and grounding["mean_max_cosine_in_use"] >= 1 - 1e-5  # every code is a real patch
    assert grounding["mean_cosine_before"] < grounding["mean_max_cosine_in_use"]  # stage B had moved them off
    head, _, _ = load_head(tmp_path / "run" / "head.safetensors")
    assert not head.train_codes and len(metrics["sparsity"]["curve"]) == 12  # frozen patches, then the path
    if projection_dim:  # each code is a training patch's projection, and the projection is the head's own
        assert head.codes.shape[1] == 24 and head.feature_dim == Cache(parts["cache"]).dim
        split = Cache(parts["cache"]).split("train")
        grids = torch.from_numpy(split.features[:].astype(np.float32))[torch.from_numpy(usable_rows(split))]
        patches = head.embed(grids.flatten(0, 2))  # (N*H*W, 24), the usable rows' (the skipped one holds no features)
        distance = torch.cdist(head.codes[head.code_mask], patches, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        assert float(distance.max()) < 1e-4 * float(patches.norm(dim=1).mean())
    else:
        assert head.projection is None


def test_the_anchor_keeps_trained_codes_nearer_real_patches(parts, tmp_path) -> None:
    fast = replace(FAST, epochs=6, codes_lr=0.3, sparsity="none", ground=False)  # the push would make both 1.0
    cosines = {}
    for anchor in (0.0, 3.0):
        metrics = train(parts["cache"], parts["codebook"], tmp_path / f"a{anchor}", replace(fast, anchor=anchor)).metrics
        cosines[anchor] = metrics["grounding"]["mean_max_cosine"]
    assert cosines[3.0] > cosines[0.0] + 0.01, cosines


def test_stage_2b_cuts_drops_unused_codes_fine_tunes_and_resumes(parts, tmp_path) -> None:
    settings = replace(FAST, epochs=2, sparsity="topk", sparsity_k=2, finetune_epochs=3, ground=False)
    train(parts["cache"], parts["codebook"], tmp_path / "full", settings)
    head, _, _ = load_head(tmp_path / "full" / "head.safetensors")
    assert int((head.effective_weight() > 0).sum(dim=1).max()) <= 2
    used = (head.effective_weight() > 0).any(dim=0)
    assert torch.equal(head.code_mask, used)  # exactly the codes no class uses were removed

    def stop_in_finetune(record: dict) -> None:
        if record["phase"] == "finetune" and record["epoch"] == 1:
            raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(parts["cache"], parts["codebook"], out, settings, on_epoch=stop_in_finetune)
    records = []
    train(parts["cache"], parts["codebook"], out, settings, resume=True, on_epoch=records.append)
    assert [(r["phase"], r["epoch"]) for r in records] == [("finetune", 2), ("finetune", 3)]
    full, resumed = _head_tensors(tmp_path / "full"), _head_tensors(out)
    assert all(torch.equal(full[name], resumed[name]) for name in full)


def test_sweep_sparsity_prints_the_curve_and_bad_methods_are_one_line(parts, tmp_path) -> None:
    from typer.testing import CliRunner

    import cli

    common = [str(parts["cache"]), "--codebook", str(parts["codebook"]), "--epochs", "1", "--probe-epochs", "2",
              "--codebook-epochs", "1", "--batch-size", "16", "--device", "cpu"]
    result = CliRunner().invoke(cli.app, ["train", *common, "--out", str(tmp_path / "run"), "--sweep-sparsity"])
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if line[:1].isdigit()]
    assert len(table) == TrainSettings().path_points and sum("<- chosen" in line for line in table) == 1
    assert "weights > 0.1 per class" in result.output and "the sparse refit used" not in result.output
    assert "on the raw cosine" not in result.output  # the default pushes through the projection: no note
    pushed = CliRunner().invoke(cli.app, ["train", *common, "--out", str(tmp_path / "pushed"), "--projection-dim", "0"])
    assert pushed.exit_code == 0 and "note: the push (--ground) on the raw cosine cost 8 to 19 points" in pushed.output
    raw = CliRunner().invoke(cli.app, ["train", *common, "--out", str(tmp_path / "raw"), "--projection-dim", "0",
                                       "--no-ground"])
    assert raw.exit_code == 0 and "on the raw cosine" not in raw.output
    sampled = CliRunner().invoke(cli.app, ["train", *common, "--out", str(tmp_path / "sampled"), "--refit-memory", "12KB"])
    assert sampled.exit_code == 0, sampled.output
    recorded = json.loads((tmp_path / "sampled" / "metrics.json").read_text())["sparsity"]
    assert recorded["refit_budget_bytes"] == 12_000 and recorded["refit_share"] < 1
    assert (f"the sparse refit used a stratified {recorded['refit_share']:.1%} of the rows ({recorded['refit_rows']} "
            f"of {recorded['of_rows']}) to stay within --refit-memory 12KB (12.0 KB)") in " ".join(sampled.output.split())
    bad = CliRunner().invoke(cli.app, ["train", *common, "--out", str(tmp_path / "bad"), "--sparsity", "lasso"])
    assert bad.exit_code == 2 and "choose one of path, topk, none" in bad.output
    assert not (tmp_path / "bad").exists()
