"""Training loops from the cache: schedules, one epoch loop for every phase, DDP, checkpoints, runs.

    OptimSettings, lr_factor      AdamW/Adam with linear warm-up then cosine decay, set every step
    Distributed, init_distributed torchrun: disjoint data per rank, gradients averaged by all_reduce
    classification_loss           cross-entropy with label smoothing, optional feature mixup
    accuracy, code_grounding      top-1 over a FeatureSource; how close codes stay to real patches
    Phase, run_phase              one training phase (probe, stage A, stage B): epochs, selection on
                                  validation, a resumable PhaseState after every epoch
    state_to_tensors / optimizer_to_artifact / ...   checkpoints as safetensors + JSON, no pickles
    EpochDisplay                  a rich bar per phase: loss, validation accuracy, codes in use
    prepare_run_dir, finish_run_dir                 run directories, written atomically (temp dir + rename)
    Run, open_run, open_run_and_cache, BackboneHead  reading a finished run and its reference classifier

The learning rate is set before every optimizer step from the global step index (METHOD.md pitfall
3: a schedule stepped per epoch, late, lags by one). Validation selects the best epoch of each phase
(pitfall 2); the test split never enters this module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from pipeline.data import FeatureSource
from pipeline.errors import ProtoquantError

LossFn = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], tuple[torch.Tensor, dict[str, float]]]
ValidateFn = Callable[[], dict[str, float]]


# --- schedule and optimizer ------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimSettings:
    """One phase's optimisation: epochs, optimizer, base learning rate(s), warm-up in epochs."""

    epochs: int
    lr: float
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    optimizer: str = "adamw"  # "adam" (stage A reference setting) or "adamw"


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(groups: list[dict], settings: OptimSettings) -> torch.optim.Optimizer:
    """Adam or AdamW over param groups; each group may carry its own "lr" and "weight_decay"."""
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if settings.optimizer not in optimizers:
        raise ProtoquantError(f"unknown optimizer {settings.optimizer!r}: choose one of {', '.join(optimizers)}")
    groups = [{"lr": settings.lr, "weight_decay": settings.weight_decay, **g} for g in groups]
    for group in groups:
        group["base_lr"] = group["lr"]  # the schedule scales base_lr; kept in the state for resume
    return optimizers[settings.optimizer](groups)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's base LR by factor; returns the first group's LR (for the log)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# --- torchrun --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly); collectives run on `device`."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """All-reduce and average gradients: the head's parameters are tiny, so no DDP wrapper is needed."""
        if self.world == 1:
            return
        for p in parameters:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (float64)."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over ranks."""
        if self.world == 1:
            return mask
        values = mask.to(self.device, torch.int32)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return values.bool().to(mask.device)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Join the torchrun job named by WORLD_SIZE/RANK: NCCL on GPUs (one per rank), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(torch.distributed.get_rank(), world, device)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU (this rank's one under torchrun), else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ProtoquantError("--device cuda: no CUDA device is visible; use --device cpu or auto")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    elif device != "cpu":
        raise ProtoquantError(f"--device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)


# --- losses ------------------------------------------------------------------------------------------

def classification_loss(model: nn.Module, num_classes: int, *, label_smoothing: float, mixup_alpha: float = 0.0,
                        penalty: Callable[[], torch.Tensor] | None = None) -> LossFn:
    """Cross-entropy with label smoothing of model(grid), optional feature mixup and an extra penalty.

    With mixup_alpha > 0 each batch is mixed with a shuffled copy of itself (pipeline.model.mixup,
    drawing from the epoch's rng) and the targets become class probabilities.
    """
    from pipeline.model import mixup

    def loss(features: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        target: torch.Tensor = labels
        if mixup_alpha > 0:
            onehot = torch.nn.functional.one_hot(labels, num_classes).float()  # (B, C)
            features, target = mixup(features, onehot, alpha=mixup_alpha, rng=rng)
        value = torch.nn.functional.cross_entropy(model(features), target, label_smoothing=label_smoothing)
        if penalty is not None:
            value = value + penalty()
        return value, {}

    return loss


# --- accuracy ----------------------------------------------------------------------------------------

@torch.no_grad()
def accuracy(classify: Callable[[torch.Tensor], torch.Tensor], source: FeatureSource, *,
             device: torch.device, dist: Distributed = Distributed()) -> float:
    """Top-1 of classify (grid (B, H, W, D) -> logits (B, C)) over the source, summed over ranks.

    NaN when the source is empty (no validation split).
    """
    correct = total = 0
    for features, labels in source.batches(0):
        logits = classify(features.to(device))  # (B, C)
        correct += int((logits.argmax(dim=1).cpu() == labels).sum())
        total += len(labels)
    correct, total = dist.sum([correct, total])
    return correct / total if total else float("nan")


@torch.no_grad()
def code_grounding(codes: torch.Tensor, source: FeatureSource, *, device: torch.device,
                   dist: Distributed = Distributed()) -> torch.Tensor:
    """(K,) the highest cosine between each code and any patch of the source (1.0: it is a real patch).

    Stage B may train the codes with nothing holding them to the data (METHOD.md stage B); this says
    how far they went. Max over ranks under torchrun.
    """
    unit = torch.nn.functional.normalize(codes.detach().float().to(device), dim=1)  # (K, D)
    best = torch.full((codes.shape[0],), -1.0, device=device)
    for features, _ in source.batches(0):
        patches = torch.nn.functional.normalize(features.to(device).flatten(0, 2), dim=1)  # (B*H*W, D)
        best = torch.maximum(best, (patches @ unit.T).amax(dim=0))  # (B*H*W, K) -> (K,)
    if dist.world > 1:
        best = best.to(dist.device)
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX)
    return best.cpu()


# --- one phase -----------------------------------------------------------------------------------------

@dataclass
class PhaseState:
    """Everything needed to continue a phase after `epoch` completed epochs."""

    epoch: int = 0
    model: dict[str, torch.Tensor] = field(default_factory=dict)      # module.state_dict()
    optimizer: dict = field(default_factory=dict)                      # optimizer.state_dict()
    best: dict[str, torch.Tensor] = field(default_factory=dict)       # state at the best epoch so far
    best_score: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)                 # one log record per epoch


@dataclass
class Phase:
    """A training phase: which module, which parameters, which loss, how to validate."""

    name: str
    module: nn.Module
    groups: list[dict]           # optimizer param groups ({"params": [...], optional "lr", "weight_decay"})
    loss: LossFn                 # (features (B, H, W, D), labels (B,), rng) -> (loss, stats)
    validate: ValidateFn         # -> {"val_top1": ..., other numbers to log}
    settings: OptimSettings


def run_phase(phase: Phase, source: FeatureSource, *, device: torch.device, seed: int,
              dist: Distributed = Distributed(), state: PhaseState | None = None,
              on_epoch: Callable[[PhaseState], None] | None = None) -> PhaseState:
    """Train `phase` for its epochs (continuing from `state`), keep the best validation epoch.

    The module ends holding the best epoch's weights (the last epoch's when validation is empty,
    i.e. val_top1 is NaN). on_epoch receives the state after every epoch (checkpoint, display, log).
    Randomness per epoch (mixup) comes from (seed, phase name, epoch), so a resumed run repeats an
    uninterrupted one exactly.
    """
    settings = phase.settings
    state = state or PhaseState()
    if state.epoch >= settings.epochs and state.best:  # finished before a resume: only its result is kept
        phase.module.load_state_dict(state.best)
        phase.module.eval()
        return state
    optimizer = make_optimizer(phase.groups, settings)
    if state.model:
        phase.module.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
    parameters = [p for g in optimizer.param_groups for p in g["params"]]
    steps_per_epoch = [source.steps(e) for e in range(settings.epochs)]
    total_steps = sum(steps_per_epoch)
    warmup = min(total_steps, round(settings.warmup_epochs * (steps_per_epoch[0] if steps_per_epoch else 0)))
    salt = sum(ord(c) for c in phase.name)
    for epoch in range(state.epoch, settings.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([seed, salt, epoch])
        step = sum(steps_per_epoch[:epoch])
        phase.module.train()
        totals: dict[str, float] = {}
        n_batches = 0
        for features, labels in source.batches(epoch):
            lr = set_lr(optimizer, lr_factor(step, total_steps, warmup))  # before the step (pitfall 3)
            loss, stats = phase.loss(features.to(device, non_blocking=True), labels.to(device), rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(parameters)
            optimizer.step()
            step += 1
            n_batches += 1
            for key, value in {"loss": float(loss.detach()), **stats}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        phase.module.eval()
        scores = phase.validate()
        record = {"phase": phase.name, "epoch": epoch + 1, "lr": lr if n_batches else 0.0,
                  **{k: v / max(n_batches, 1) for k, v in totals.items()}, **scores,
                  "seconds": round(time.perf_counter() - started, 3)}
        score = scores.get("val_top1", float("nan"))
        if math.isnan(score) or score > state.best_score:  # ties keep the earlier epoch
            state.best = {k: v.detach().clone() for k, v in phase.module.state_dict().items()}
            state.best_score, state.best_epoch = (-1.0 if math.isnan(score) else score), epoch + 1
        state.epoch = epoch + 1
        state.model = {k: v.detach().clone() for k, v in phase.module.state_dict().items()}
        state.optimizer = copy.deepcopy(optimizer.state_dict())
        state.history.append(record)
        if on_epoch is not None:
            on_epoch(state)
    if state.best:
        phase.module.load_state_dict(state.best)
    phase.module.eval()
    return state


# --- checkpoints: safetensors tensors + JSON, never pickles -------------------------------------------

def state_to_tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: tensor} -> {prefix.name: tensor} on the CPU, contiguous (safetensors wants that)."""
    return {f"{prefix}.{name}": t.detach().cpu().contiguous() for name, t in state.items()}


def tensors_to_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of state_to_tensors."""
    start = f"{prefix}."
    return {name[len(start):]: t for name, t in tensors.items() if name.startswith(start)}


def optimizer_to_artifact(prefix: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (tensors, JSON-able rest): moments as tensors, hyper-parameters as JSON."""
    tensors, scalars = {}, {}
    for pid, values in state.get("state", {}).items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state.get("param_groups", []), "scalars": scalars}


def optimizer_from_artifact(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of optimizer_to_artifact (a state_dict for Optimizer.load_state_dict)."""
    per_param: dict[int, dict] = {}
    start = f"{prefix}."
    for name, t in tensors.items():
        if name.startswith(start):
            pid, key = name[len(start):].split(".", 1)
            per_param.setdefault(int(pid), {})[key] = t
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        per_param.setdefault(int(pid), {})[key] = value
    return {"state": per_param, "param_groups": meta.get("param_groups", [])}


# --- display -------------------------------------------------------------------------------------------

class EpochDisplay:
    """A rich bar per phase advancing one epoch at a time, with loss, val top-1 and codes in use."""

    def __init__(self, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "EpochDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, phase: str, epochs: int, done: int = 0) -> None:
        self.tasks[phase] = self.progress.add_task(phase, total=epochs, completed=done, status="")

    def update(self, record: dict) -> None:
        parts = [f"loss {record['loss']:.3f}" if "loss" in record else ""]
        if not math.isnan(record.get("val_top1", float("nan"))):
            parts.append(f"val top-1 {record['val_top1']:.3f}")
        if "codes_in_use" in record:
            parts.append(f"codes in use {record['codes_in_use']}")
        self.progress.update(self.tasks[record["phase"]], completed=record["epoch"], status="  ".join(p for p in parts if p))


# --- run directories -------------------------------------------------------------------------------------

def work_dir_for(out: Path) -> Path:
    """The temporary directory beside RUN where a run is written (and resumed from) before the rename."""
    return out.parent / f".{out.name}.partial"


def prepare_run_dir(out: Path, *, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Check RUN may be written; return (work dir, whether a partial run is there to resume)."""
    if out.exists() and not overwrite:
        raise ProtoquantError(f"--out {out} already exists: choose another path, or pass --overwrite to replace it")
    work = work_dir_for(out)
    if resume and (work / "checkpoint.safetensors").is_file():
        return work, True
    if resume:
        raise ProtoquantError(f"--resume: no stopped run to continue for {out} (no {work}/checkpoint.safetensors); "
                              "start it without --resume")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work, False


def finish_run_dir(work: Path, out: Path) -> None:
    """Move the finished work dir onto RUN in one rename (an old RUN, with --overwrite, is removed first)."""
    (work / "checkpoint.safetensors").unlink(missing_ok=True)
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        shutil.rmtree(trash)
    os.replace(work, out)


def write_json(path: Path, value) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def write_log(path: Path, records: list[dict]) -> None:
    """The per-epoch log: one JSON object per line."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ProtoquantError(f"{path} is missing: {what}")
    return json.loads(path.read_text())


def iter_log(path: Path) -> Iterator[dict]:
    """Records of a run's log.jsonl."""
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


# --- reading a run ---------------------------------------------------------------------------------------

class BackboneHead(nn.Module):
    """The timm model's own classifier applied to a cached grid: forward_head on the pre-pool map.

    Only for grids that are the model's forward_features output as is (CNN layouts NCHW / NHWC);
    ViT token grids lost their prefix tokens, which timm's heads may pool, so they are refused.
    """

    def __init__(self, model: nn.Module, layout: str):
        super().__init__()
        if layout not in ("NCHW", "NHWC"):
            raise ProtoquantError(f"--use-backbone-head: the cache holds a {layout} token grid without its prefix "
                                  "tokens, so the model's own head cannot be applied to it; train the linear probe "
                                  "(leave out --use-backbone-head)")
        self.model = model.eval().requires_grad_(False)
        self.layout = layout

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) grid -> (B, C) logits."""
        x = f.float().permute(0, 3, 1, 2) if self.layout == "NCHW" else f.float()  # (B, D, H, W) for CNNs
        return self.model.forward_head(x)


def backbone_head(provenance: dict, num_classes: int, *, weights: str | Path | None = None,
                  device: torch.device | str = "cpu") -> BackboneHead:
    """Rebuild the cache's backbone and wrap its classifier; refuse one that predicts other classes."""
    from pipeline.backbones import load_backbone_for_cache

    backbone = load_backbone_for_cache(provenance, weights=weights, device=str(device))
    outputs = int(getattr(backbone.model, "num_classes", 0) or 0)
    if outputs != num_classes:
        raise ProtoquantError(f"--use-backbone-head: {provenance['backbone']} predicts {outputs} classes but the "
                              f"dataset has {num_classes}; train the linear probe instead (leave out --use-backbone-head)")
    return BackboneHead(backbone.model, backbone.layout).to(device)


@dataclass
class Run:
    """A finished run directory: its config, the ProtoQuant head and how to rebuild the probe."""

    path: Path
    config: dict
    head: nn.Module
    classes: list[str]

    @property
    def cache_fingerprint(self) -> str:
        return self.config["cache"]["fingerprint"]

    def reference_head(self, *, weights: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
        """The frozen reference classifier the run was trained through (linear probe or backbone head)."""
        from pipeline.model import load_probe

        if self.config["settings"].get("use_backbone_head"):
            return backbone_head(self.config["cache"]["provenance"], len(self.classes), weights=weights, device=device)
        probe, _, _ = load_probe(self.path / "probe.safetensors")
        return probe.to(device)


def open_run(path: str | Path) -> Run:
    """Read RUN/config.json and RUN/head.safetensors; a clear error when RUN is not a finished run."""
    from pipeline.model import load_head

    path = Path(path)
    if not path.is_dir():
        partial = work_dir_for(path)
        hint = (f"; a stopped run is in {partial}: continue it with `protoquant train ... --out {path} --resume`"
                if partial.exists() else "; make one with `protoquant train CACHE --codebook CODEBOOK --out RUN`")
        raise ProtoquantError(f"run {path} does not exist{hint}")
    config = read_json(path / "config.json", f"{path} is not a protoquant run (make one with `protoquant train`)")
    head, classes, _ = load_head(path / "head.safetensors")
    return Run(path=path, config=config, head=head.eval(), classes=classes)


def check_run_matches_cache(run: Run, cache) -> None:
    """Refuse a cache other than the run's (fingerprint) or one of another feature dimension."""
    if cache.dim != run.head.codes.shape[1]:
        raise ProtoquantError(f"run {run.path} works on {run.head.codes.shape[1]}-dimensional features but cache "
                              f"{cache.path} holds {cache.dim}-dimensional ones: use the cache the run was trained on")
    if run.cache_fingerprint != cache.fingerprint:
        raise ProtoquantError(f"run {run.path} was trained on the cache with fingerprint {run.cache_fingerprint[:12]}..., "
                              f"but {cache.path} has {cache.fingerprint[:12]}...: pass --cache with the cache it was "
                              "trained on (recorded in its config.json)")


def open_run_and_cache(run_path: str | Path, cache_path: str | Path | None):
    """(Run, Cache): the cache is the one recorded in the run unless given; refused when they do not match."""
    from pipeline.cache import Cache

    run = open_run(run_path)
    cache = Cache(cache_path or run.config["cache"]["path"])
    check_run_matches_cache(run, cache)
    return run, cache
