"""`protoquant sweep`: many heads per pass equal the heads `train` gives, read each chunk once, resume, and
write ordinary runs plus a table page. Real cache (the shared parts store), real codebooks, real runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from pipeline.cache import Cache, CacheSplit, SplitPlan, create_cache, write_shard
from pipeline.data import FeatureSource, SourceSettings, carve_validation, usable_rows
from pipeline.errors import ProtoquantError
from pipeline.io import read_json
from pipeline.model import load_head, load_probe
from pipeline.multihead import shared_batches
from stages.codebook import CodebookSettings, build_codebook
from stages.evaluate import evaluate
from stages.sweep import SweepGrid, sweep
from stages.train import train
from tests.test_train import FAST

# Stage B only on both sides, on the raw cosine: the shared product is compared before any refit (the
# projected heads, train's default, each take their own product: test_a_projected_sweep_head_...).
SHORT = replace(FAST, epochs=4, probe_epochs=3, codebook_epochs=2, projection_dim=0, ground=False, sparsity="none",
                l1=0.0)
GRID = SweepGrid(seeds=(0, 1), l1=(0.0,), tau=(0.1,))
TOLERANCE = 1e-5  # the shared similarity product adds in another order than one head's


@pytest.fixture(scope="module")
def store(parts_store, tmp_path_factory) -> dict:
    """The shared parts cache, its 16-code codebook, an 8-code one, and a finished 2 x 2 sweep from RAM."""
    root = tmp_path_factory.mktemp("sweep")
    small = root / "k8.safetensors"
    build_codebook(parts_store["cache"], small, CodebookSettings(k=8, seed=1))
    books = [parts_store["codebook"], small]
    result = sweep(parts_store["cache"], books, root / "sweep", SHORT, GRID)
    return {**parts_store, "root": root, "books": books, "result": result}


def _head_name(codebook: int, k: int, seed: int) -> str:
    return f"cb{codebook}-k{k}-seed{seed}-l1_0-tau0.1"


def _assert_same_run(a: Path, b: Path) -> None:
    head_a, head_b = load_head(a / "head.safetensors")[0], load_head(b / "head.safetensors")[0]
    torch.testing.assert_close(head_a.weight, head_b.weight, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(head_a.codes, head_b.codes, atol=TOLERANCE, rtol=0)
    probe_a, probe_b = load_probe(a / "probe.safetensors")[0], load_probe(b / "probe.safetensors")[0]
    torch.testing.assert_close(probe_a.linear.weight, probe_b.linear.weight, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("codebook, k, seed", [(1, 8, 1), (0, 16, 0)])
def test_a_sweep_head_equals_the_head_train_gives(store, tmp_path, codebook, k, seed) -> None:
    run = tmp_path / "train-run"
    trained = train(store["cache"], store["books"][codebook], run, replace(SHORT, seed=seed))
    swept = store["root"] / "sweep" / _head_name(codebook, k, seed)
    _assert_same_run(swept, run)
    metrics = read_json(swept / "metrics.json", "")
    for phase in ("probe", "quantized_probe", "head"):
        assert metrics["val_top1"][phase] == pytest.approx(trained.metrics["val_top1"][phase])
    assert metrics["best_epoch"] == {p: trained.metrics["best_epoch"][p] for p in ("probe", "codebook", "head")}


@pytest.mark.parametrize("pushed", [False, True], ids=["stage-b", "pushed-and-refit"])
def test_a_projected_sweep_head_equals_the_head_train_gives(store, tmp_path, pushed) -> None:
    projected = replace(SHORT, projection_dim=12)  # each head takes its own similarity product and grounding
    if pushed:  # train's default tail: the push in the projection's space, then the path refit
        projected = replace(projected, ground=True, sparsity="path", path_points=8)
    sweep(store["cache"], store["books"], tmp_path / "sweep", projected, SweepGrid(seeds=(0,), l1=(0.0,), tau=(0.1,)))
    train(store["cache"], store["books"][1], tmp_path / "run", projected)
    swept = tmp_path / "sweep" / _head_name(1, 8, 0)
    _assert_same_run(swept, tmp_path / "run")
    heads = [load_head(run / "head.safetensors")[0] for run in (swept, tmp_path / "run")]
    torch.testing.assert_close(heads[0].projection.weight, heads[1].projection.weight, atol=TOLERANCE, rtol=0)
    assert heads[0].codes.shape == (8, 12)
    groundings = [read_json(run / "metrics.json", "")["grounding"] for run in (swept, tmp_path / "run")]
    assert groundings[0]["mean_max_cosine_in_use"] == pytest.approx(groundings[1]["mean_max_cosine_in_use"], abs=1e-5)
    assert groundings[0]["pushed"] is groundings[1]["pushed"] is pushed
    if pushed:
        assert groundings[0]["mean_max_cosine_in_use"] > 1 - 1e-5


@pytest.mark.parametrize("sampled", [False, True], ids=["every-row-two-workers", "refit-sampled"])
def test_sweep_heads_take_trains_sparse_refit_and_match_it(store, tmp_path, monkeypatch, sampled) -> None:
    refit = replace(SHORT, sparsity="path", path_points=8)
    books = store["books"][:1]
    if not sampled:  # two heads of one seed: their paths solved side by side, here and in a worker process
        books = store["books"]
        monkeypatch.setenv("PROTOQUANT_REFIT_WORKERS", "2")
    if sampled:  # a refit budget of half what every row needs: train and sweep take the same stratified sample
        from pipeline.sparsity import refit_bytes

        split = Cache(store["cache"]).split("train")
        refit = replace(refit, refit_memory=str(refit_bytes(len(usable_rows(split)), 16, len(Cache(store["cache"]).classes)) // 2))
    sweep(store["cache"], books, tmp_path / "sweep", refit, SweepGrid(seeds=(0,), l1=(0.0,), tau=(0.1,)))
    train(store["cache"], store["books"][0], tmp_path / "run", refit)
    swept = tmp_path / "sweep" / _head_name(0, 16, 0)
    _assert_same_run(swept, tmp_path / "run")
    curves = [read_json(run / "metrics.json", "")["sparsity"]["curve"] for run in (swept, tmp_path / "run")]
    assert len(curves[0]) == 8
    for key in ("val_top1", "local_size", "penalty"):
        assert [p[key] for p in curves[0]] == pytest.approx([p[key] for p in curves[1]], abs=1e-6)
    assert (swept / "sparsity.svg").read_text().startswith("<svg")
    trained = read_json(tmp_path / "run" / "metrics.json", "")["val_top1"]
    assert read_json(swept / "metrics.json", "")["val_top1"]["head"] == pytest.approx(trained["head"], abs=1e-6)
    records = [read_json(run / "metrics.json", "")["sparsity"] for run in (swept, tmp_path / "run")]
    if sampled:
        assert 0.4 < records[1]["refit_share"] <= 0.5 and records[1]["refit_rows"] < records[1]["of_rows"]
        assert {k: records[0][k] for k in ("refit_share", "refit_rows", "n_val")} == \
            {k: records[1][k] for k in ("refit_share", "refit_rows", "n_val")}
    else:
        assert [record["refit_share"] for record in records] == [1.0, 1.0]
        # both heads of the seed, whichever process solved them: bitwise the sweep that solves them one by one
        # (the k8 head is compared with that, not with train: its stage B shares the raw product with the k16
        # head's, and on this tiny set the path turns that rounding into other weights)
        monkeypatch.setenv("PROTOQUANT_REFIT_WORKERS", "1")
        sweep(store["cache"], books, tmp_path / "one-by-one", refit, SweepGrid(seeds=(0,), l1=(0.0,), tau=(0.1,)))
        for name in (_head_name(0, 16, 0), _head_name(1, 8, 0)):
            side_by_side, one_by_one = (load_head(tmp_path / run / name / "head.safetensors")[0]
                                        for run in ("sweep", "one-by-one"))
            assert torch.equal(side_by_side.weight, one_by_one.weight)


def test_streamed_sweep_equals_train_for_its_first_seed(store, tmp_path) -> None:
    streamed = replace(SHORT, max_memory="0")
    result = sweep(store["cache"], store["books"][:1], tmp_path / "sweep", streamed, GRID)
    assert {row["name"] for row in result.rows} == {_head_name(0, 16, 0), _head_name(0, 16, 1)}
    assert read_json(tmp_path / "sweep" / _head_name(0, 16, 0) / "metrics.json", "")["data_path"] == "stream"
    train(store["cache"], store["books"][0], tmp_path / "run", replace(streamed, seed=0))
    _assert_same_run(tmp_path / "sweep" / _head_name(0, 16, 0), tmp_path / "run")


def _sources(split: CacheSplit, seeds: tuple[int, ...]) -> list[FeatureSource]:
    rows = usable_rows(split)
    return [FeatureSource(split, carve_validation(rows, split.labels, 0.2, seed)[0],
                          SourceSettings(8, shuffle=True, seed=seed, buffer_chunks=2)) for seed in seeds]


def _row_fingerprints(batches) -> np.ndarray:
    return np.sort(np.concatenate([f.double().sum(dim=(1, 2, 3)).numpy() for f, _ in batches]))


def test_shared_stream_reads_each_chunk_once_and_gives_every_source_its_rows(store, monkeypatch) -> None:
    split = Cache(store["cache"]).split("train")
    sources = _sources(split, (3, 4))
    reads = []
    real_read = CacheSplit.read_features
    monkeypatch.setattr(CacheSplit, "read_features", lambda self, a, b, **kw: reads.append(a) or real_read(self, a, b, **kw))
    got = list(shared_batches(sources, epoch=1))
    chunks = split.layout.rows_per_chunk
    needed = set(np.concatenate([s.rows // chunks for s in sources]).tolist())
    assert sorted(reads) == sorted(c * chunks for c in needed)  # each needed chunk exactly once
    monkeypatch.setattr(CacheSplit, "read_features", real_read)
    first = [batch for i, batch in got if i == 0]
    alone = list(sources[0].batches(1))
    assert len(first) == len(alone) == sources[0].steps(1)
    for (f, y), (g, z) in zip(first, alone):  # the first source: exactly its own batches, in its own order
        assert torch.equal(f, g) and torch.equal(y, z)
    second = [batch for i, batch in got if i == 1]
    assert len(second) == sources[1].steps(1)
    np.testing.assert_array_equal(_row_fingerprints(second), _row_fingerprints(sources[1].batches(1)))


@pytest.mark.parametrize("with_views", [True, False])
def test_shared_stream_of_whole_chunks_gives_the_first_source_its_own_batches(tmp_path, with_views) -> None:
    """Every row of a chunk wanted (without views: the copy straight from the chunk; with them: a view drawn
    per row): the first source's batches are bitwise FeatureSource's, the other source gets each row once."""
    n, views = 45, 2
    rng = np.random.default_rng(0)
    plan = SplitPlan(ids=[f"i{i}" for i in range(n)], labels=(np.arange(n) % 3).astype(np.int32), views=views)
    cache = create_cache(tmp_path / "c.zarr", settings={"t": 1}, attrs={"classes": ["a", "b", "c"]},
                         splits={"train": plan}, grid=(2, 2), dim=8, rows_per_shard=16)
    split = cache.split("train")
    for shard in range(split.layout.n_shards):
        rows = split.layout.shard_rows(shard)
        write_shard(split.group, split.directory, shard, rows, {
            "features": rng.standard_normal((len(rows), 2, 2, 8)).astype(np.float16),
            "views": rng.standard_normal((len(rows), views, 2, 2, 8)).astype(np.float16),
            "ok": np.ones(len(rows), np.uint8), "image_size": np.full((len(rows), 2), 8, np.int32)})
    split = Cache(tmp_path / "c.zarr").split("train")
    assert split.layout.rows_per_chunk < n
    every = FeatureSource(split, np.arange(n), SourceSettings(7, shuffle=True, views=with_views, seed=3, buffer_chunks=2))
    some = FeatureSource(split, np.arange(1, n, 3), SourceSettings(5, shuffle=False, seed=3, buffer_chunks=3))
    for epoch in (0, 1):
        got = list(shared_batches([every, some], epoch=epoch))
        first = [batch for i, batch in got if i == 0]
        alone = list(every.batches(epoch))
        assert len(first) == len(alone) == every.steps(epoch)
        for (f, y), (g, z) in zip(first, alone):
            assert torch.equal(f, g) and torch.equal(y, z)
        second = [batch for i, batch in got if i == 1]
        np.testing.assert_array_equal(_row_fingerprints(second), _row_fingerprints(some.batches(epoch)))


class _Stop(Exception):
    pass


def test_a_stopped_sweep_continues_with_resume(store, tmp_path) -> None:
    out = tmp_path / "sweep"

    def stop_in_stage_b(line: str) -> None:
        if line.startswith("head: epoch 2/"):
            raise _Stop

    with pytest.raises(_Stop):
        sweep(store["cache"], store["books"], out, SHORT, GRID, progress=stop_in_stage_b)
    assert (out / ".sweep.partial" / "checkpoint.safetensors").is_file()
    with pytest.raises(ProtoquantError, match="--resume"):
        sweep(store["cache"], store["books"], out, SHORT, GRID)
    with pytest.raises(ProtoquantError, match="other settings"):
        sweep(store["cache"], store["books"], out, replace(SHORT, epochs=5), GRID, resume=True)
    seen = []
    result = sweep(store["cache"], store["books"], out, SHORT, GRID, resume=True, progress=seen.append)
    assert result.resumed and seen[0] == "head: epoch 3/4 (4 models)"  # probe and stage A were not redone
    assert not (out / ".sweep.partial").exists()
    for row in result.rows:
        _assert_same_run(out / row["name"], store["root"] / "sweep" / row["name"])


def test_sweep_runs_are_ordinary_runs_and_the_page_shows_every_head(store) -> None:
    out, rows = store["root"] / "sweep", store["result"].rows
    assert [r["name"] for r in rows] == [_head_name(cb, k, s) for cb, k in ((0, 16), (1, 8)) for s in (0, 1)]
    for row in rows:
        scored = evaluate(out / row["name"], split="test", device="cpu")
        assert scored.top1 == pytest.approx(row["top1"]) and scored.probe_top1 == pytest.approx(row["probe_top1"])
        assert row["local_size"] <= row["k"] and 0 < row["train_seconds"]
    page = (out / "index.html").read_text()
    assert all(row["name"] in page for row in rows) and "<svg" in page and (out / "style.css").is_file()
    marker = read_json(out / "sweep.json", "")
    assert marker["status"] == "done" and [r["name"] for r in marker["heads"]] == [r["name"] for r in rows]
    config = read_json(out / rows[0]["name"] / "config.json", "")
    assert config["command"] == "train" and config["settings"]["seed"] == 0 and config["sweep"]["heads"] == 4


def test_sweep_refuses_a_folder_it_did_not_make_and_leaves_it(store, tmp_path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ProtoquantError, match="not a sweep"):
        sweep(store["cache"], store["books"], tmp_path / "mine", SHORT, GRID, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_sweep_prints_json_and_refuses_bad_lists_in_one_line(store, tmp_path) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli.app, ["sweep", str(store["cache"]), "-c", str(store["books"][0]), "--out",
                                  str(tmp_path / "s"), "--seeds", "0,x"])
    assert bad.exit_code == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'x'" in lines[0]
    good = runner.invoke(cli.app, ["sweep", str(store["cache"]), "-c", str(store["books"][1]), "--out",
                                   str(tmp_path / "s"), "--seeds", "2", "--l1", "0,0.01", "--epochs", "1",
                                   "--probe-epochs", "1", "--codebook-epochs", "1", "--batch-size", "16",
                                   "--l1-ratio", "0.9", "--device", "cpu", "--json"])
    assert good.exit_code == 0, good.output
    printed = json.loads(good.stdout)
    assert [h["l1"] for h in printed["heads"]] == [0.0, 0.01] and printed["resumed"] is False
    for head in printed["heads"]:  # --l1-ratio reaches every head's refit and its recorded settings
        run = tmp_path / "s" / head["name"]
        assert json.loads((run / "config.json").read_text())["settings"]["path_l1_ratio"] == 0.9
        assert json.loads((run / "metrics.json").read_text())["sparsity"]["l1_ratio"] == 0.9
    assert {h["name"] for h in printed["heads"]} == {p.name for p in (tmp_path / "s").iterdir() if p.is_dir()
                                                     and not p.name.startswith(".")}
    sampled = runner.invoke(cli.app, ["sweep", str(store["cache"]), "-c", str(store["books"][1]), "--out",
                                      str(tmp_path / "sampled"), "--seeds", "2", "--l1", "0,0.01", "--epochs", "1",
                                      "--probe-epochs", "1", "--codebook-epochs", "1", "--batch-size", "16",
                                      "--refit-memory", "12KB", "--device", "cpu"])
    assert sampled.exit_code == 0, sampled.output
    notes = [line for line in sampled.output.splitlines() if "the sparse refit used a stratified" in line]
    assert len(notes) == 2 and all("--refit-memory 12KB (12.0 KB)" in line for line in notes)  # one per head


def test_overwrite_replaces_only_what_the_sweep_wrote(store, tmp_path) -> None:
    out = tmp_path / "sweep"
    tiny = replace(SHORT, epochs=1, probe_epochs=1, codebook_epochs=0)
    sweep(store["cache"], store["books"][1:], out, tiny, SweepGrid(seeds=(0,)))
    (out / "my-notes.txt").write_text("keep me")
    result = sweep(store["cache"], store["books"][1:], out, tiny, SweepGrid(seeds=(5,)), overwrite=True)
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [result.rows[0]["name"]] == [_head_name(0, 8, 5)]
