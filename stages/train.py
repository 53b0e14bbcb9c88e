"""Stage 3: train a ProtoQuant head from the feature cache alone (METHOD.md stages A and B).

Three phases, each selecting its best epoch on a validation split carved from train:
    probe      global average pool + linear on the cached grids: the frozen reference classifier
               (or, with use_backbone_head, the timm model's own classifier: no training)
    codebook   stage A: every patch replaced by its nearest code (cosine argmax, raw code), the
               quantized grid through the frozen probe; cross-entropy + dictionary MSE; only codes learn
    head       stage B: cosine similarity (through the learned projection, projection_dim: on a grid of
               several maps it learns on the finest map's channels only), softmax over codes (tau),
               spatial max, relu(W) with W ~ N(1, 0.1); codes frozen unless train_codes, then held near
               real patches by the anchor term; optional L1 on relu(W)
    ground     (no epochs, on by default) every code becomes its nearest training patch (ProtoPNet's push)
    sparsity   path: W refit on the cached presence by a non-negative elastic-net path, the sparsest
               point within one standard error of the lowest validation cross-entropy kept (sparsity_rule
               deviance; accuracy: within sparsity_tolerance of the best val top-1; pipeline/sparsity.py);
               topk: the paper's stage 2b (per-class top-k, unused codes removed, then the phase below)
    finetune   W only, after a topk cut, or after a push when sparsity is none

RUN is written into a temporary directory beside it (`.RUN.partial`, which also holds the checkpoint
that --resume continues from after every epoch) and renamed onto RUN at the end:
    head.safetensors   codes, W, code mask, tau, class names (pipeline.model.save_head)
    probe.safetensors  the linear probe (absent with use_backbone_head)
    config.json        every setting, the cache (path, fingerprint, provenance), codebook, versions
    metrics.json       validation accuracy of probe / quantized probe / head, best epochs, timings, the
                       grounding, and with sparsity path the whole accuracy-vs-size curve and its chosen point
    sparsity.svg       that curve (sparsity path only)
    log.jsonl          one record per epoch and phase
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.cache import Cache, grid_maps
from pipeline.codebook import check_fingerprint, load_codebook
from pipeline.data import FeatureSource, SourceSettings, TrainingData, open_training_data, parse_memory
from pipeline.devices import resolve_device
from pipeline.distributed import Distributed, init_distributed
from pipeline.errors import ProtoquantError
from pipeline.io import read_artifact, write_artifact, write_json, write_log, write_text_atomic
from pipeline.model import (ProbeHead, ProtoQuantHead, backbone_head, codes_in_use, local_size_per_class, save_head,
                            save_probe, stage_a_loss)
from pipeline.plots import sparsity_chart
from pipeline.progress import EpochDisplay
from pipeline.run import finish_run_dir, prepare_run_dir, train_run_config
from pipeline.training import (OptimSettings, Phase, PhaseState, TrainSettings, accuracy, after_stage_b,
                               check_train_settings, classification_loss, code_grounding, head_phase,
                               needs_finetune, optimizer_to_artifact, phase_state_from_artifact, projection_start,
                               refit_rows, run_phase, stage_b_head, state_to_tensors, with_legacy_settings)

__all__ = ["TrainSettings", "TrainResult", "train"]

PHASES = ("probe", "codebook", "head", "finetune")
SPARSITY_PLOT = "sparsity.svg"
# Settings that may differ when a stopped run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = ("device",)


@dataclass
class TrainResult:
    path: Path
    metrics: dict
    resumed: bool
    discarded_checkpoint: bool = False  # a stopped run's checkpoint was thrown away (no --resume)


class CodebookParameter(nn.Module):
    """The codebook as the only trainable tensor of stage A."""

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        self.codes = nn.Parameter(codes.detach().float().clone())  # (K, D)


def train(
    cache_path: str | Path,
    codebook_path: str | Path,
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    *,
    resume: bool = False,
    overwrite: bool = False,
    weights: str | Path | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train probe, codebook and head from CACHE starting at CODEBOOK; write the run to OUT.

    weights: the backbone's local weights file, needed only with use_backbone_head for caches made
    with --weights. on_epoch receives each epoch's log record after the checkpoint is on disk.
    """
    started = time.perf_counter()
    out = Path(out)
    device = resolve_device(settings.device)
    dist = init_distributed(device)
    check_train_settings(settings)
    cache = Cache(cache_path)
    cache.require_complete()
    codes, codebook_meta = load_codebook(codebook_path)
    check_fingerprint(codebook_meta, cache.fingerprint, "codebook", codebook_path, cache=cache.path)
    if codes.shape[1] != cache.dim:
        raise ProtoquantError(f"codebook {codebook_path} has {codes.shape[1]}-dimensional codes but cache {cache.path} "
                              f"holds {cache.dim}-dimensional features: build the codebook from this cache")
    sources = [cache.path, Path(codebook_path)]
    run_dir = prepare_run_dir(out, overwrite=overwrite, resume=resume, sources=sources) if dist.is_main else None
    dist.barrier()
    work = out.parent / f".{out.name}.partial" if run_dir is None else run_dir.work
    split = cache.split("train")
    data = open_training_data(split, val_fraction=settings.val_fraction, seed=settings.seed,
                              batch_size=settings.batch_size, max_memory=parse_memory(settings.max_memory),
                              use_views=settings.use_views, rank=dist.rank, world=dist.world)
    refit = refit_rows(settings, data.train_rows, data.val_rows, split.labels, codes=int(codes.shape[0]),
                       classes=len(cache.classes), dist=dist)
    on_gpu = data.ram is not None and data.ram.move_to_gpu_if_it_fits(device)
    config = _config(cache, codebook_path, codebook_meta, codes, settings, data, dist, on_gpu)
    states = _read_checkpoint(work / "checkpoint.safetensors", config) if resume else {}
    resumed = bool(states)

    classes = cache.classes
    trainer = _Trainer(settings, data, device, dist, work, config, states, on_epoch, refit)
    with EpochDisplay(progress and dist.is_main) as display:
        trainer.display = display
        probe = trainer.probe(cache, weights)
        codes = trainer.codebook(codes.to(device), probe)
        head = trainer.head(codes, cache)
        metrics = trainer.final_metrics(probe, codes, head)
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    if dist.is_main:
        meta = {"cache_fingerprint": cache.fingerprint, "settings": asdict(settings)}
        save_head(work / "head.safetensors", head, classes=classes, meta=meta)
        if not settings.use_backbone_head:
            save_probe(work / "probe.safetensors", probe, classes=classes, meta=meta)
        write_json(work / "config.json", config)
        write_json(work / "metrics.json", metrics)
        if trainer.path_points:
            write_text_atomic(work / SPARSITY_PLOT, sparsity_chart(metrics["sparsity"]))
        write_log(work / "log.jsonl", trainer.history())
        finish_run_dir(work, out)
    dist.close()
    return TrainResult(path=out, metrics=metrics, resumed=resumed,
                       discarded_checkpoint=bool(run_dir and run_dir.discarded_checkpoint))


class _Trainer:
    """Runs the three phases in order, each resumed from its checkpointed state when there is one."""

    def __init__(self, settings: TrainSettings, data: TrainingData, device: torch.device, dist: Distributed,
                 work: Path, config: dict, states: dict[str, PhaseState], on_epoch, refit: tuple):
        self.settings, self.data, self.device, self.dist = settings, data, device, dist
        self.refit_train, self.refit_val, refit_record = refit  # the rows the path refit uses (training.refit_rows)
        self.work, self.config, self.states, self.user_on_epoch = work, config, states, on_epoch
        self.display: EpochDisplay | None = None
        self.val_scores: dict[str, float] = {}
        self.push: dict = {"pushed": False}
        self.sparsity: dict = {"method": settings.sparsity, **refit_record}
        self.path_points: list[dict] = []

    # --- the phases ---

    def probe(self, cache: Cache, weights) -> nn.Module:
        """The frozen reference classifier: trained linear probe, or the backbone's own head."""
        s = self.settings
        if s.use_backbone_head:
            probe = backbone_head(cache.provenance, len(cache.classes), weights=weights, device=self.device)
            self.val_scores["probe"] = self._val(probe)
            return probe
        probe = ProbeHead(cache.dim, len(cache.classes)).to(self.device)
        loss = classification_loss(probe, len(cache.classes), label_smoothing=s.label_smoothing, mixup_alpha=s.mixup)
        phase = Phase("probe", probe, [{"params": list(probe.parameters())}], loss,
                      lambda: {"val_top1": self._val(probe)},
                      OptimSettings(s.probe_epochs, s.probe_lr, s.weight_decay, s.warmup_epochs, "adamw"))
        self._run(phase)
        self.val_scores["probe"] = self._val(probe)
        return probe.eval().requires_grad_(False)

    def codebook(self, initial_codes: torch.Tensor, probe: nn.Module) -> torch.Tensor:
        """Stage A: codes learn through the frozen probe; returns the best epoch's codes (K, D)."""
        s = self.settings
        book = CodebookParameter(initial_codes).to(self.device)

        def loss(f, y, rng):
            value, parts = stage_a_loss(f, book.codes, probe, y, label_smoothing=s.label_smoothing,
                                        dict_weight=s.dict_weight)
            return value, {"ce": float(parts["ce"]), "dict": float(parts["dict"])}

        phase = Phase("codebook", book, [{"params": [book.codes]}], loss, lambda: self._val_quantized(probe, book.codes),
                      OptimSettings(s.codebook_epochs, s.codebook_lr, 0.0, s.warmup_epochs, "adam"))
        self._run(phase)
        self.val_scores["quantized_probe"] = self._val_quantized(probe, book.codes)["val_top1"]
        return book.codes.detach().clone()

    def head(self, codes: torch.Tensor, cache: Cache) -> ProtoQuantHead:
        """Stage B: the interpretable head on the stage A codes."""
        s = self.settings
        projection = projection_start(s, self.data.train_rows, self.data.train.split,
                                      lambda rows: self._scan(rows).batches(0))
        head = stage_b_head(codes, len(cache.classes), s, projection, device=self.device,
                            maps=grid_maps(cache.provenance))
        self._run(head_phase("head", head, s, s.epochs, self.data.val, self.device, self.dist))
        self.val_scores["stage_b"] = self._val(head)
        self.push, sparsity = after_stage_b(head, s, lambda: self._scan(self.data.train_rows).batches(0),
                                            lambda: self._scan(self.refit_train).batches(0),
                                            lambda: self._scan(self.refit_val).batches(0), device=self.device)
        self.sparsity |= sparsity
        self.path_points = sparsity.get("curve", [])
        if needs_finetune(s):
            self._run(head_phase("finetune", head, replace(s, train_codes=False), s.finetune_epochs, self.data.val,
                                 self.device, self.dist))
        self.val_scores["head"] = self._val(head)
        return head.eval()

    def _scan(self, rows) -> FeatureSource:
        """Every one of `rows` in row order, original grids, on every rank alike (the push and the refit must
        give each rank the same head)."""
        return FeatureSource(self.data.train.split, rows, SourceSettings(256, shuffle=False), ram=self.data.ram)

    # --- shared pieces ---

    def _val(self, model: nn.Module) -> float:
        return accuracy(model, self.data.val, device=self.device, dist=self.dist)

    @torch.no_grad()
    def _val_quantized(self, probe: nn.Module, codes: torch.Tensor) -> dict:
        """Validation accuracy of probe(quantized grid) and how many codes the validation patches pick."""
        from pipeline.model import quantize

        used = torch.zeros(codes.shape[0], dtype=torch.bool, device=codes.device)

        def classify(f):
            q, idx = quantize(f, codes)  # (B, H, W, D), (B, H, W)
            used[idx.flatten()] = True
            return probe(q)

        top1 = accuracy(classify, self.data.val, device=self.device, dist=self.dist)
        return {"val_top1": top1, "codes_in_use": int(self.dist.any(used).sum())}

    def _run(self, phase: Phase) -> PhaseState:
        state = self.states.get(phase.name)
        if self.display is not None:
            self.display.start(phase.name, phase.settings.epochs, state.epoch if state else 0)

        def on_epoch(current: PhaseState) -> None:
            self.states[phase.name] = current
            if self.dist.is_main:
                self._save_checkpoint(phase.name)
                write_log(self.work / "log.jsonl", self.history())
            if self.display is not None:
                self.display.update(current.history[-1])
            if self.user_on_epoch is not None:
                self.user_on_epoch(current.history[-1])

        final = run_phase(phase, self.data.train, device=self.device, seed=self.settings.seed, dist=self.dist,
                          state=state, on_epoch=on_epoch)
        self.states[phase.name] = final
        return final

    def history(self) -> list[dict]:
        return [record for name in PHASES if name in self.states for record in self.states[name].history]

    def _save_checkpoint(self, current: str) -> None:
        """Completed phases keep their best weights; the current one also its latest weights and optimizer."""
        tensors, phases = {}, {}
        for name, state in self.states.items():
            tensors |= state_to_tensors(f"{name}.best", state.best)
            meta = {"epoch": state.epoch, "best_score": state.best_score, "best_epoch": state.best_epoch,
                    "history": state.history}
            if name == current:
                tensors |= state_to_tensors(f"{name}.model", state.model)
                opt_tensors, meta["optimizer"] = optimizer_to_artifact(f"{name}.opt", state.optimizer)
                tensors |= opt_tensors
            phases[name] = meta
        write_artifact(self.work / "checkpoint.safetensors", tensors, kind="checkpoint",
                       fields={"resume_key": _resume_key(self.config), "phases": phases})

    def final_metrics(self, probe: nn.Module, codes: torch.Tensor, head: ProtoQuantHead) -> dict:
        best = {name: self.states[name].best_epoch for name in PHASES if name in self.states}
        seconds = {name: round(sum(r["seconds"] for r in self.states[name].history), 3)
                   for name in PHASES if name in self.states}
        grounding = code_grounding(head, self.data.scan(self.data.train_rows), device=self.device, dist=self.dist)
        in_use = codes_in_use(head).cpu()
        return {
            "val_top1": {"probe": self.val_scores.get("probe"), "quantized_probe": self.val_scores.get("quantized_probe"),
                         "stage_b": self.val_scores.get("stage_b"), "head": self.val_scores.get("head")},
            "grounding": {"mean_max_cosine": float(grounding.mean()),
                          "mean_max_cosine_in_use": float(grounding[in_use].mean()) if in_use.any() else float("nan"),
                          **self.push},
            "sparsity": {**self.sparsity, "local_size": _local_size(head)},
            "best_epoch": best, "phase_seconds": seconds, "codes_in_use": int(codes_in_use(head).sum()),
            "k": int(codes.shape[0]), "n_train": int(len(self.data.train_rows)), "n_val": int(len(self.data.val_rows)),
            "data_path": "ram" if self.data.in_ram else "stream", "views": self.data.views,
        }


def _config(cache: Cache, codebook_path, codebook_meta: dict, codes: torch.Tensor, settings: TrainSettings,
            data: TrainingData, dist: Distributed, on_gpu: bool) -> dict:
    """Everything a later command needs to know about how RUN was made."""
    return train_run_config(cache, codebook_path, codebook_meta, codes, settings, data.val_rows, {
        "path": "ram" if data.in_ram else "stream", "views": data.views, "world_size": dist.world,
        "device": str(dist.device), "rows_on_gpu": on_gpu})


def _local_size(head: ProtoQuantHead) -> dict:
    """The authors' local size: weights relu(W) > 0.1 per class, mean and max over classes."""
    per_class = local_size_per_class(head).float()
    return {"mean": float(per_class.mean()), "max": int(per_class.max())}


def _resume_key(config: dict) -> dict:
    """What must not change between a stopped run and its resumption: settings, the cache, the codebook's codes,
    the validation rows and the resolved data path (RAM or streamed: they visit rows in another order)."""
    return {"settings": _compared_settings(config["settings"]), "cache": config["cache"]["fingerprint"],
            "codebook": config["codebook"]["codes_sha256"], "validation": config["validation"]["rows_sha256"],
            "data_path": config["data"]["path"]}


def _compared_settings(settings: dict) -> dict:
    """The settings a resumed run must share with its start: all but RESUMABLE_CHANGES, and the projection's
    own options only when there is a projection (without one they change nothing)."""
    compared = {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}
    if not compared.get("projection_dim"):
        compared = {k: v for k, v in compared.items() if k not in ("projection_lr", "projection_learns")}
    return compared


def _read_checkpoint(path: Path, config: dict) -> dict[str, PhaseState]:
    """Phase states of a stopped run; refuse one started with other settings or inputs."""
    if not path.is_file():
        return {}
    tensors, fields = read_artifact(path, kind="checkpoint")
    theirs, ours = dict(fields.get("resume_key", {})), _resume_key(config)
    if "settings" in theirs:  # a checkpoint older than some settings ran without them
        theirs["settings"] = _compared_settings(with_legacy_settings(theirs["settings"]))
    if theirs != ours:
        diff = sorted(k for k in set(theirs.get("settings", {})) | set(ours["settings"])
                      if theirs.get("settings", {}).get(k) != ours["settings"].get(k))
        diff += [k for k in ("cache", "codebook", "validation", "data_path") if theirs.get(k) != ours[k]]
        raise ProtoquantError(f"--resume: the stopped run in {path.parent} was started with other settings or inputs "
                              f"(differs in: {', '.join(diff)}); use the same options, or start again without --resume")
    states = {}
    for name, meta in fields.get("phases", {}).items():
        states[name] = phase_state_from_artifact(name, meta, tensors)
    return states
