"""`protoquant sweep`: every combination of codebooks, seeds, --l1 and --tau trained in ONE pass per epoch.

    sweep(CACHE, [CB1, CB2, ...], SWEEP, settings, SweepGrid(seeds, l1, tau)) -> SweepResult

The phases of `train` (probe, stage A, stage B) run as three rounds; in each, every block of the
cache is read once and every model of the round steps on it (pipeline/multihead.py). What is shared:
one probe per seed (it depends on no codebook), one stage A per (seed, codebook) (it depends on
neither --l1 nor --tau), and the heads of one seed go through one similarity product (on the raw
cosine; projected heads, train's default, each take their own).

SWEEP/ holds one ordinary run directory per head (the files `train` writes, so evaluate, gallery,
explain and prune take it; its config.json replays with `train --config`), plus
    sweep.json     the marker and the table: one row per head
    index.html     the table and the accuracy-vs-size plot of all heads (style.css beside it)
A stopped sweep continues from its last finished epoch with --resume (SWEEP/.sweep.partial/ holds
the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from markupsafe import Markup

from pipeline.cache import Cache, CacheSplit, grid_maps
from pipeline.codebook import check_fingerprint, load_codebook
from pipeline.data import (FeatureSource, RamRows, SourceSettings, carve_validation, evaluation_source, parse_memory,
                           rows_nbytes, usable_rows, view_count)
from pipeline.devices import resolve_device
from pipeline.distributed import Distributed
from pipeline.errors import ProtoquantError
from pipeline.io import read_artifact, read_json, write_artifact, write_json, write_log
from pipeline.model import (ProbeHead, ProtoQuantHead, codes_in_use, local_size_per_class, quantize, save_head,
                            save_probe, stage_a_loss)
from pipeline.multihead import Codes, Lane, Member, grounding_together, heads_loss, run_round, stacked_logits
from pipeline.paths import check_output, remove_ours
from pipeline.plots import Series, line_chart, sparsity_chart
from pipeline.refits import PathProblem, PathSolver, path_workers
from pipeline.render import render_page, write_style, write_text
from pipeline.run import digest, finish_run_dir, is_run_dir, prepare_run_dir, train_run_config
from pipeline.sparsity import presence_matrices
from pipeline.training import (OptimSettings, Phase, PhaseState, TrainSettings, check_train_settings,
                               classification_loss, head_phase, needs_finetune, optimizer_to_artifact,
                               path_settings, phase_state_from_artifact, push_step, sparse_step, state_to_tensors,
                               refit_rows, projection_start, stage_b_head)

__all__ = ["SweepGrid", "SweepResult", "sweep", "is_sweep_dir"]

SWEEP_FORMAT = "protoquant-sweep"
MARKER = "sweep.json"
WORK = ".sweep.partial"
CHECKPOINT = "checkpoint.safetensors"
LOCAL_WEIGHT = 0.1  # METHOD.md: local size per class = weights relu(W) > 0.1 (the authors' calculate_local_size)


@dataclass(frozen=True)
class SweepGrid:
    """The values crossed with every codebook; every other setting is shared by all heads."""

    seeds: tuple[int, ...] = (0,)
    l1: tuple[float, ...] = (0.0,)
    tau: tuple[float, ...] = (0.1,)


@dataclass(frozen=True)
class HeadSpec:
    """One head of the sweep: which codebook (index into the list), seed, L1 and tau; its run's name."""

    codebook: int
    seed: int
    l1: float
    tau: float
    k: int

    @property
    def name(self) -> str:
        return f"cb{self.codebook}-k{self.k}-seed{self.seed}-l1_{self.l1:g}-tau{self.tau:g}"

    def settings(self, base: TrainSettings) -> TrainSettings:
        return replace(base, seed=self.seed, l1=self.l1, tau=self.tau)


@dataclass
class SweepResult:
    path: Path
    rows: list[dict]
    index: Path
    resumed: bool
    seconds: float


def is_sweep_dir(path: Path) -> bool:
    """A folder protoquant wrote as a sweep: its sweep.json names the sweep format."""
    try:
        return read_json(path / MARKER, "").get("format") == SWEEP_FORMAT
    except ProtoquantError:
        return False


def sweep(cache_path: str | Path, codebook_paths: list[str | Path], out: str | Path,
          settings: TrainSettings = TrainSettings(), grid: SweepGrid = SweepGrid(), *, resume: bool = False,
          overwrite: bool = False, progress: Callable[[str], None] | None = None) -> SweepResult:
    """Train every (codebook, seed, l1, tau) head from CACHE in one pass per epoch; write SWEEP/ (see the module doc)."""
    started = time.perf_counter()
    out = Path(out)
    settings = stage_b_only(settings)
    _check_request(settings, grid, codebook_paths)
    device = resolve_device(settings.device)
    cache = Cache(cache_path)
    cache.require_complete()
    books = [_load_book(cache, path) for path in codebook_paths]
    specs = [HeadSpec(cb, seed, l1, tau, int(books[cb][0].shape[0]))
             for cb, seed, l1, tau in product(range(len(books)), grid.seeds, grid.l1, grid.tau)]
    key = _resume_key(cache, books, settings, specs)
    work, resumed = _prepare_out(out, key, overwrite=overwrite, resume=resume)
    trainer = _SweepTrainer(cache, books, specs, settings, device, work, key, progress)
    trainer.states = _read_checkpoint(work / CHECKPOINT, key) if resumed else {}
    heads, probes, codes = trainer.run()
    for spec in specs:
        run_path = out / spec.name
        _write_run(run_path, trainer, spec, heads[spec.name], probes[spec.seed], codes[(spec.seed, spec.codebook)],
                   codebook_paths[spec.codebook])
    rows = _test_rows(cache, specs, heads, probes, trainer, device)
    seconds = round(time.perf_counter() - started, 3)
    index = _write_index(out, cache, settings, specs, rows, seconds, trainer.in_ram, key)
    shutil.rmtree(work, ignore_errors=True)
    return SweepResult(path=out, rows=rows, index=index, resumed=resumed, seconds=seconds)


# --- checks ---------------------------------------------------------------------------------------------------

def _check_request(settings: TrainSettings, grid: SweepGrid, codebook_paths: list) -> None:
    if not codebook_paths:
        raise ProtoquantError("sweep needs at least one --codebook (pass --codebook several times to compare K)")
    for name in ("seeds", "l1", "tau"):
        values = getattr(grid, name)
        if not values:
            raise ProtoquantError(f"--{name} lists no value: pass e.g. --{name} " + ("0,1" if name == "seeds" else "0.1"))
        if len(set(values)) != len(values):
            raise ProtoquantError(f"--{name} lists a value twice ({', '.join(f'{v:g}' for v in values)}): each must appear once")
    for seed, l1, tau in product(grid.seeds, grid.l1, grid.tau):
        check_train_settings(replace(settings, seed=seed, l1=l1, tau=tau))
    if settings.use_backbone_head:
        raise ProtoquantError("sweep trains the linear probe as the reference; --use-backbone-head is for "
                              "`protoquant train` only")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ProtoquantError("sweep runs in one process (it shares reads between heads, not processes): run it "
                              "without torchrun")


def _load_book(cache: Cache, path) -> tuple[torch.Tensor, dict]:
    codes, meta = load_codebook(path)
    check_fingerprint(meta, cache.fingerprint, "codebook", path, cache=cache.path)
    if codes.shape[1] != cache.dim:
        raise ProtoquantError(f"codebook {path} has {codes.shape[1]}-dimensional codes but cache {cache.path} "
                              f"holds {cache.dim}-dimensional features: build the codebook from this cache")
    return codes, meta


def _resume_key(cache: Cache, books, settings: TrainSettings, specs: list[HeadSpec]) -> str:
    """What a checkpoint must match to be continued: the cache, the codes, every setting but the device."""
    record = {"cache": cache.fingerprint, "codes": [digest(codes) for codes, _ in books],
              "settings": {k: v for k, v in asdict(settings).items() if k != "device"},
              "heads": [asdict(s) for s in specs]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def _prepare_out(out: Path, key: str, *, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Create or reuse SWEEP/ (refusing what protoquant did not make) -> (work folder, resuming)."""
    ours = check_output(out, is_ours=is_sweep_dir, what="a sweep", overwrite=overwrite)
    work = out / WORK
    if ours and resume:
        if not (work / CHECKPOINT).is_file():
            raise ProtoquantError(f"--resume: {out} holds no stopped sweep to continue (no {work / CHECKPOINT}); "
                                  "start it without --resume (add --overwrite to replace the finished sweep)")
        return work, True
    if resume:
        raise ProtoquantError(f"--resume: no stopped sweep to continue at {out}; start it without --resume")
    if ours and not overwrite:
        raise ProtoquantError(f"--out {out} already holds a sweep: pass --resume to continue a stopped one, "
                              "or --overwrite to replace it")
    if ours:
        _remove_previous_sweep(out)
    work.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"format": SWEEP_FORMAT, "version": 1, "resume_key": key, "status": "running", "heads": []})
    return work, False


def _remove_previous_sweep(out: Path) -> None:
    """--overwrite: delete what an earlier sweep wrote in OUT (its runs, pages, marker, checkpoint), nothing else."""
    for child in out.iterdir():
        if child.name == WORK and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child.name in (MARKER, "index.html", "style.css") and child.is_file():
            child.unlink()
        elif is_run_dir(child) and "sweep" in read_json(child / "config.json", ""):
            remove_ours(child, is_run_dir)


# --- training ------------------------------------------------------------------------------------------------

@dataclass
class _SeedData:
    """One seed's share of the train split: its validation carve and sources (RAM rows shared by all seeds)."""

    seed: int
    train: FeatureSource
    val: FeatureSource
    train_rows: np.ndarray
    val_rows: np.ndarray
    refit: tuple = ()  # training.refit_rows of this seed's heads: (train rows, val rows, record)

    def scan(self, batch_size: int = 256, rows: np.ndarray | None = None) -> FeatureSource:
        """Rows in order (the training share by default), original grids."""
        rows = self.train_rows if rows is None else rows
        return FeatureSource(self.train.split, rows, SourceSettings(batch_size, shuffle=False), ram=self.train.ram)


class _SweepTrainer:
    """The three rounds (probe, stage A, stage B) for every seed and codebook, checkpointed after each epoch."""

    def __init__(self, cache: Cache, books, specs: list[HeadSpec], settings: TrainSettings, device: torch.device,
                 work: Path, key: str, progress):
        self.cache, self.books, self.specs, self.settings = cache, books, specs, settings
        self.device, self.work, self.key, self.progress = device, work, key, progress
        self.seeds = sorted({s.seed for s in specs}, key=[s.seed for s in specs].index)
        self.states: dict[str, PhaseState] = {}
        self.grounding: dict[str, torch.Tensor] = {}
        self.tails: dict[str, tuple[dict, dict]] = {}  # per head: (push_step, sparse_step) records
        self.current: list[str] = []
        self.data = self._open_data(cache.split("train"))
        self.in_ram = self.data[self.seeds[0]].train.ram is not None
        for seed in self.seeds:  # _tails holds a seed's heads' presence at once
            data = self.data[seed]
            data.refit = refit_rows(replace(settings, seed=seed), data.train_rows, data.val_rows, cache.split("train").labels,
                                    codes=sum(spec.k for spec in specs if spec.seed == seed), classes=len(cache.classes))

    def _open_data(self, split: CacheSplit) -> dict[int, _SeedData]:
        """pipeline.data.open_training_data for every seed, with the RAM rows loaded once."""
        s = self.settings
        rows = usable_rows(split)
        if len(rows) == 0:
            raise ProtoquantError(f"the {split.name} split holds no usable images (every file was skipped at extraction)")
        with_views = s.use_views and view_count(split) > 0
        ram = None
        if rows_nbytes(split, len(rows), with_views) <= parse_memory(s.max_memory):
            ram = RamRows.load(split, rows, with_views=with_views)
            ram.move_to_gpu_if_it_fits(self.device)
        data = {}
        for seed in self.seeds:
            train_rows, val_rows = carve_validation(rows, split.labels, s.val_fraction, seed)
            train = FeatureSource(split, train_rows, SourceSettings(s.batch_size, shuffle=True, views=with_views,
                                                                    seed=seed), ram=ram)
            val = FeatureSource(split, val_rows, SourceSettings(s.batch_size, shuffle=False, seed=seed), ram=ram)
            data[seed] = _SeedData(seed, train, val, train_rows, val_rows)
        return data

    def run(self):
        probes = self._probe_round()
        codes = self._codebook_round(probes)
        heads = self._head_round(codes)
        self.grounding = grounding_together(
            [self.data[seed].scan() for seed in self.seeds],
            [[(spec.name, heads[spec.name]) for spec in self.specs if spec.seed == seed] for seed in self.seeds],
            device=self.device)
        return heads, probes, codes

    def _round(self, name: str, lanes: list[Lane]) -> None:
        self.current = [m.key for lane in lanes for m in lane.members]

        def on_epoch(epoch: int, epochs: int) -> None:
            self._save_checkpoint()
            if self.progress is not None:
                self.progress(f"{name}: epoch {epoch}/{epochs} ({len(self.current)} models)")

        run_round(lanes, device=self.device, states=self.states, on_epoch=on_epoch)

    def _probe_round(self) -> dict[int, ProbeHead]:
        s, n_classes = self.settings, len(self.cache.classes)
        probes, lanes = {}, []
        for seed in self.seeds:
            probe = ProbeHead(self.cache.dim, n_classes).to(self.device)
            loss = classification_loss(probe, n_classes, label_smoothing=s.label_smoothing, mixup_alpha=s.mixup)
            phase = Phase("probe", probe, [{"params": list(probe.parameters())}], loss, lambda: {},
                          OptimSettings(s.probe_epochs, s.probe_lr, s.weight_decay, s.warmup_epochs, "adamw"))
            data = self.data[seed]
            lanes.append(Lane(seed, data.train, data.val, [Member(f"probe-s{seed}", phase, probe)]))
            probes[seed] = probe
        self._round("probe", lanes)
        return {seed: probe.eval().requires_grad_(False) for seed, probe in probes.items()}

    def _codebook_round(self, probes: dict[int, ProbeHead]) -> dict[tuple[int, int], torch.Tensor]:
        s = self.settings
        books, lanes = {}, []
        used_books = sorted({spec.codebook for spec in self.specs})
        for seed in self.seeds:
            members = []
            for cb in used_books:
                book = Codes(self.books[cb][0]).to(self.device)
                books[(seed, cb)] = book
                members.append(self._codebook_member(f"codebook-s{seed}-cb{cb}", book, probes[seed], s))
            data = self.data[seed]
            lanes.append(Lane(seed, data.train, data.val, members))
        self._round("codebook", lanes)
        return {key: book.codes.detach().clone() for key, book in books.items()}

    def _codebook_member(self, key: str, book: Codes, probe: ProbeHead, s: TrainSettings) -> Member:
        used = torch.zeros(book.codes.shape[0], dtype=torch.bool, device=self.device)

        def loss(f, y, rng):
            value, parts = stage_a_loss(f, book.codes, probe, y, label_smoothing=s.label_smoothing,
                                        dict_weight=s.dict_weight)
            return value, {"ce": float(parts["ce"]), "dict": float(parts["dict"])}

        def classify(f):
            q, idx = quantize(f, book.codes)
            used[idx.flatten()] = True
            return probe(q)

        def codes_picked() -> dict:
            count = int(used.sum())
            used.zero_()
            return {"codes_in_use": count}

        phase = Phase("codebook", book, [{"params": [book.codes]}], loss, lambda: {},
                      OptimSettings(s.codebook_epochs, s.codebook_lr, 0.0, s.warmup_epochs, "adam"))
        return Member(key, phase, classify, codes_picked)

    def _head_round(self, codes: dict[tuple[int, int], torch.Tensor]) -> dict[str, ProtoQuantHead]:
        base, n_classes = self.settings, len(self.cache.classes)
        heads, lanes = {}, []
        maps = grid_maps(self.cache.provenance)
        for seed in self.seeds:
            data, members, lane_heads, l1, anchor = self.data[seed], [], [], [], []
            projection = projection_start(replace(base, seed=seed), data.train_rows, data.train.split,
                                          lambda rows: data.scan(rows=rows).batches(0))  # one per seed
            for i, spec in enumerate(self.specs):
                if spec.seed != seed:
                    continue
                s = spec.settings(base)
                head = stage_b_head(codes[(seed, spec.codebook)], n_classes, s, projection, device=self.device,
                                    maps=maps)
                phase = head_phase("head", head, s, s.epochs, data.val, self.device, Distributed(device=self.device))
                members.append(Member(f"head{i}", phase, head, _codes_in_use_of(head)))
                lane_heads.append(head)
                l1.append(s.l1)
                anchor.append(s.anchor if s.train_codes else 0.0)
                heads[spec.name] = head
            joint = heads_loss(lane_heads, l1, anchor, label_smoothing=base.label_smoothing, mixup_alpha=base.mixup)
            lanes.append(Lane(seed, data.train, data.val, members, joint))
        self._round("head", lanes)
        self._tails(heads)
        return {name: head.eval() for name, head in heads.items()}

    def _tails(self, heads: dict[str, ProtoQuantHead]) -> None:
        """train's push and sparse step for every head: the pushes head by head, then seed by seed every
        head's presence in one pass per split and the heads' path refits side by side, in this process and
        worker processes, one per core (pipeline/refits.py). Memory: one seed's heads x N x K x 4 bytes at a
        time. A record's "seconds" here is the solve alone (train's also holds its presence pass)."""
        base = self.settings
        most = max(sum(spec.seed == seed for spec in self.specs) for seed in self.seeds)
        # its workers start at the first solve that has two small paths, beside this process's own solves
        with PathSolver(path_workers(most)) as solver:
            pushes = {spec.name: push_step(heads[spec.name], spec.settings(base),
                                           lambda spec=spec: self.data[spec.seed].scan().batches(0), device=self.device)
                      for spec in self.specs}
            records = {}
            for seed in self.seeds:
                solved = self._solve_paths(solver, seed, heads)
                for spec in (spec for spec in self.specs if spec.seed == seed):
                    records[spec.name] = sparse_step(heads[spec.name], spec.settings(base), solved=solved.get(spec.name))
                    if spec.name in solved:
                        records[spec.name] |= self.data[seed].refit[2]
        self.tails = {spec.name: (pushes[spec.name], records[spec.name]) for spec in self.specs}

    def _solve_paths(self, solver: PathSolver, seed: int, heads: dict[str, ProtoQuantHead]) -> dict:
        """{head name: its solved path} for the seed's heads with the path refit, their presence from one pass."""
        refit = [spec for spec in self.specs if spec.seed == seed and spec.settings(self.settings).sparsity == "path"]
        if not refit:
            return {}
        data, lane = self.data[seed], [heads[spec.name] for spec in refit]
        refit_train, refit_val, _ = data.refit
        train = presence_matrices(lane, data.scan(rows=refit_train).batches(0), device=self.device)
        val = presence_matrices(lane, data.scan(rows=refit_val).batches(0), device=self.device)
        problems = [PathProblem(t, v, int(head.weight.shape[0]), path_settings(spec.settings(self.settings)))
                    for spec, head, t, v in zip(refit, lane, train, val)]
        return dict(zip([spec.name for spec in refit], solver.solve(problems)))

    # --- checkpoint: like train's, one entry per model -------------------------------------------------------

    def _save_checkpoint(self) -> None:
        tensors, meta = {}, {}
        for key, state in self.states.items():
            tensors |= state_to_tensors(f"{key}.best", state.best)
            entry = {"epoch": state.epoch, "best_score": state.best_score, "best_epoch": state.best_epoch,
                     "history": state.history}
            if key in self.current:
                tensors |= state_to_tensors(f"{key}.model", state.model)
                opt_tensors, entry["optimizer"] = optimizer_to_artifact(f"{key}.opt", state.optimizer)
                tensors |= opt_tensors
            meta[key] = entry
        write_artifact(self.work / CHECKPOINT, tensors, kind="checkpoint",
                       fields={"resume_key": self.key, "models": meta})

    def history(self, keys: list[str]) -> list[dict]:
        return [record for key in keys if key in self.states for record in self.states[key].history]


def stage_b_only(settings: TrainSettings) -> TrainSettings:
    """A sweep has no fine-tuning phase: heads whose settings would need one (a top-k cut, or a push without
    the path refit) end at stage B, and their recorded settings say so (`train --config RUN` then replays
    exactly the head the sweep wrote)."""
    if not needs_finetune(settings):
        return settings
    return replace(settings, ground=False, sparsity="none")


def _codes_in_use_of(head: ProtoQuantHead) -> Callable[[], dict]:
    return lambda: {"codes_in_use": int(codes_in_use(head).sum())}


def _read_checkpoint(path: Path, key: str) -> dict[str, PhaseState]:
    tensors, fields = read_artifact(path, kind="checkpoint")
    if fields.get("resume_key") != key:
        raise ProtoquantError(f"--resume: the stopped sweep in {path.parent} was started with other settings, "
                              "codebooks or cache; rerun it with the same options, or start over with --overwrite")
    states = {}
    for name, entry in fields["models"].items():
        states[name] = phase_state_from_artifact(name, entry, tensors)
    return states


# --- writing the runs ------------------------------------------------------------------------------------------

def _member_keys(trainer: _SweepTrainer, spec: HeadSpec) -> dict[str, str]:
    return {"probe": f"probe-s{spec.seed}", "codebook": f"codebook-s{spec.seed}-cb{spec.codebook}",
            "head": f"head{trainer.specs.index(spec)}"}


def _score(state: PhaseState) -> float:
    return float("nan") if state.best_score < 0 else state.best_score


def _write_run(run_path: Path, trainer: _SweepTrainer, spec: HeadSpec, head: ProtoQuantHead, probe: ProbeHead,
               codes: torch.Tensor, codebook_path) -> None:
    """One ordinary run directory (the files `train` writes), through pipeline/run.py."""
    settings, cache = spec.settings(trainer.settings), trainer.cache
    keys = _member_keys(trainer, spec)
    sharing = {"probe": sum(s.seed == spec.seed for s in trainer.specs),
               "codebook": sum((s.seed, s.codebook) == (spec.seed, spec.codebook) for s in trainer.specs), "head": 1}
    states = {phase: trainer.states[key] for phase, key in keys.items()}
    data = trainer.data[spec.seed]
    grounding = trainer.grounding[spec.name]
    push, sparsity = trainer.tails[spec.name]
    per_class = local_size_per_class(head).float()
    local_size = {"mean": float(per_class.mean()), "max": int(per_class.max())}
    in_use = codes_in_use(head).cpu()
    metrics = {
        "val_top1": {"probe": _score(states["probe"]), "quantized_probe": _score(states["codebook"]),
                     "stage_b": _score(states["head"]),  # the written head: after the refit, its chosen point
                     "head": (sparsity.get("chosen") or {}).get("val_top1", _score(states["head"]))},
        "grounding": {"mean_max_cosine": float(grounding.mean()),
                      "mean_max_cosine_in_use": float(grounding[in_use].mean()) if in_use.any() else float("nan"),
                      **push},
        "sparsity": {**sparsity, "local_size": local_size},
        "best_epoch": {phase: state.best_epoch for phase, state in states.items()},
        "phase_seconds": {phase: round(sum(r["seconds"] for r in state.history) / sharing[phase], 3)
                          for phase, state in states.items()},
        "codes_in_use": int(in_use.sum()), "k": int(codes.shape[0]), "n_train": int(len(data.train_rows)),
        "n_val": int(len(data.val_rows)), "data_path": "ram" if trainer.in_ram else "stream",
        "views": view_count(cache.split("train")) if settings.use_views else 0,
        "sweep": {"heads": len(trainer.specs), "seconds_note": "epoch wall time shared out over the models trained together"},
    }
    metrics["seconds"] = round(sum(metrics["phase_seconds"].values()), 3)
    run_dir = prepare_run_dir(run_path, overwrite=True, resume=False)
    meta = {"cache_fingerprint": cache.fingerprint, "settings": asdict(settings)}
    save_head(run_dir.work / "head.safetensors", head, classes=cache.classes, meta=meta)
    save_probe(run_dir.work / "probe.safetensors", probe, classes=cache.classes, meta=meta)
    write_json(run_dir.work / "config.json", _config(cache, codebook_path, trainer.books[spec.codebook][1], codes,
                                                     settings, data, trainer, spec))
    write_json(run_dir.work / "metrics.json", metrics)
    if sparsity.get("curve"):
        write_text(run_dir.work / "sparsity.svg", sparsity_chart(metrics["sparsity"]))
    write_log(run_dir.work / "log.jsonl", trainer.history(list(keys.values())))
    finish_run_dir(run_dir.work, run_path)


def _config(cache: Cache, codebook_path, codebook_meta: dict, codes: torch.Tensor, settings: TrainSettings,
            data: _SeedData, trainer: _SweepTrainer, spec: HeadSpec) -> dict:
    """The run's config.json, as `train` writes it (so `train --config RUN` replays the head), plus the sweep."""
    data_path = {"path": "ram" if trainer.in_ram else "stream", "views": view_count(cache.split("train")),
                 "world_size": 1, "device": str(trainer.device),
                 "rows_on_gpu": bool(trainer.in_ram and data.train.ram.grids.device.type == "cuda")}
    return train_run_config(cache, codebook_path, codebook_meta, codes, settings, data.val_rows, data_path,
                            {"sweep": {"name": spec.name, "heads": len(trainer.specs), "resume_key": trainer.key}})


# --- the table ------------------------------------------------------------------------------------------------

@torch.no_grad()
def _test_rows(cache: Cache, specs: list[HeadSpec], heads: dict[str, ProtoQuantHead], probes: dict[int, ProbeHead],
               trainer: _SweepTrainer, device: torch.device) -> list[dict]:
    """Every head and probe scored on the test split in one pass (the validation split when there is no test)."""
    split_name = "test" if "test" in cache.splits else "train"
    split = cache.split(split_name)
    rows = trainer.data[specs[0].seed].val_rows if split_name == "train" else None
    source = evaluation_source(split, batch_size=256, rows=rows)
    ordered = [heads[s.name] for s in specs]
    correct = np.zeros(len(specs) + len(probes))
    total = 0
    for features, labels in source.batches(0):
        f = features.to(device)
        logits = stacked_logits(ordered, f) + [probe(f) for probe in probes.values()]
        for i, value in enumerate(logits):
            correct[i] += int((value.argmax(dim=1).cpu() == labels).sum())
        total += len(labels)
    top1 = correct / max(total, 1) if total else np.full(len(correct), np.nan)
    probe_top1 = dict(zip(probes, top1[len(specs):]))
    table = []
    for i, spec in enumerate(specs):
        head = heads[spec.name]
        metrics = read_json(trainer_run_path(trainer, spec) / "metrics.json", "the sweep's run")
        table.append({"name": spec.name, "codebook": spec.codebook, "k": spec.k, "seed": spec.seed, "l1": spec.l1,
                      "tau": spec.tau, "split": split_name, "top1": float(top1[i]),
                      "probe_top1": float(probe_top1[spec.seed]),
                      "local_size": float((head.effective_weight() > LOCAL_WEIGHT).sum(dim=1).float().mean()),
                      "codes_in_use": int(codes_in_use(head).sum()), "val_top1": metrics["val_top1"]["head"],
                      "grounding": metrics["grounding"]["mean_max_cosine"], "train_seconds": metrics["seconds"]})
    return table


def trainer_run_path(trainer: _SweepTrainer, spec: HeadSpec) -> Path:
    return trainer.work.parent / spec.name


def _write_index(out: Path, cache: Cache, settings: TrainSettings, specs: list[HeadSpec], rows: list[dict],
                 seconds: float, in_ram: bool, key: str) -> Path:
    """SWEEP/sweep.json (marker + table) and SWEEP/index.html with the accuracy-vs-size plot."""
    by_book: dict[int, list[tuple[float, float]]] = {}
    for row in rows:
        by_book.setdefault(row["codebook"], []).append((row["local_size"], row["top1"]))
    chart = line_chart([Series(f"codebook {cb} (K = {specs[[s.codebook for s in specs].index(cb)].k})", sorted(points))
                        for cb, points in sorted(by_book.items())],
                       title="accuracy against explanation size", x_label="local size (weights > 0.1 per class)",
                       y_label=f"{rows[0]['split']} top-1", y_range=(0.0, 1.0))
    figures = [(len(rows), "heads"), (f"{seconds:.0f} s", "wall time, all heads"),
               ("RAM" if in_ram else "streamed", "cache read from"),
               (f"{max(r['top1'] for r in rows):.3f}", f"best {rows[0]['split']} top-1")]
    html = render_page("sweep_index.html", title="Sweep", subtitle=[str(cache.path), f"{len(rows)} heads"],
                       figures=figures, rows=rows, chart=Markup(chart),
                       settings=json.dumps({k: v for k, v in asdict(settings).items()}, indent=1))
    write_style(out)
    write_text(out / "index.html", html)
    write_json(out / MARKER, {"format": SWEEP_FORMAT, "version": 1, "resume_key": key, "status": "done",
                              "seconds": seconds, "heads": rows})
    return out / "index.html"
