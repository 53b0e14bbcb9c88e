"""Training from the cache: schedules, phases, losses and checkpoints.

    TrainSettings                 every option of `protoquant train` (recorded in RUN/config.json)
    OptimSettings, lr_factor      AdamW/Adam with linear warm-up then cosine decay, set every step
    classification_loss           cross-entropy with label smoothing, optional feature mixup
    stage_b_loss                  the head's: plus L1 on relu(W) and the anchor of trainable codes
    accuracy, code_grounding      top-1 over a FeatureSource; how close codes stay to real patches
    Phase, run_phase              one training phase (probe, stage A, stage B): epochs, selection on
                                  validation, a resumable PhaseState after every epoch; a non-finite
                                  loss stops it with a named error
    stage_b_head                  the stage B head; projection_start (projection_rows): its projection's start
    head_phase                    stage B as a Phase (train, and prune's fine-tuning)
    after_stage_b                 push (ground) and the sparse step (path refit or top-k cut): train's
    push_step, sparse_step        its two halves: the sweep calls them around its shared presence pass
    refit_rows                    the rows the path refit uses: all, or a stratified sample within --refit-memory
    state_to_tensors / optimizer_to_artifact / ...   checkpoints as safetensors + JSON, no pickles

The learning rate is set before every optimizer step from the global step index (METHOD.md pitfall
3: a schedule stepped per epoch, late, lags by one). Validation selects the best epoch of each phase
(pitfall 2); the test split never enters this module.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.data import FeatureSource
from pipeline.distributed import Distributed
from pipeline.errors import ProtoquantError

LossFn = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], tuple[torch.Tensor, dict[str, float]]]
ValidateFn = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class TrainSettings:
    """Every option of `protoquant train` (recorded in RUN/config.json)."""

    epochs: int = 40                  # stage B (the interpretable head)
    probe_epochs: int = 30
    codebook_epochs: int = 10         # stage A
    batch_size: int = 64              # stage B settings measured side by side on make-birds and Fashion-MNIST
    probe_lr: float = 1e-3
    codebook_lr: float = 5e-4         # METHOD.md stage A reference setting (Adam)
    head_lr: float = 5e-3
    codes_lr: float = 0.1             # stage B codes (train_codes), relative to their RMS coordinate
    weight_decay: float = 1e-4        # AdamW, probe and head weights
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dict_weight: float = 1.0          # METHOD.md stage A: weight of the dictionary MSE
    tau: float = 0.1
    train_codes: bool = True          # the paper's default; False keeps the stage A codes (and the projection's
                                      # start) through stage B; the push still replaces them
    l1: float = 2e-3                  # L1 on relu(W), per weight
    anchor: float = 1.0               # stage B: pull of each code toward its best-matching patch in the batch
    projection_dim: int = 128         # stage B: patches and codes through a learned linear map to this many
                                      # dimensions (ProtoPNet's add-on layer; at most D); 0 = the raw cosine of the
                                      # paper, on which the push costs 8-19 points of top-1 (README, "A grounded head")
    projection_lr: float = 1e-3       # its learning rate (AdamW); it starts as the patches' top principal directions
    projection_learns: str = "fine"   # which input channels it learns on: "fine", those of the maps at the grid's
                                      # own resolution (a coarser map's keep their principal directions: its values
                                      # span blocks of cells, and weighing them up moved the evidence off the parts,
                                      # README "A grounded head"); "all"
    mixup: float = 0.0                # Beta(alpha, alpha) feature mixup for probe and head; 0 = off
    val_fraction: float = 0.1
    seed: int = 0
    max_memory: str = "auto"          # RAM budget for the train split; above it the split is streamed
    use_views: bool = True            # draw one cached augmented view per image and epoch, when present
    use_backbone_head: bool = False
    device: str = "auto"
    # After stage B (pipeline/sparsity.py, pipeline/grounding.py push_codes):
    ground: bool = True               # push: every code becomes its nearest training patch (grounding 1.0); with
                                      # the projection the head scores 0-2.4 points of top-1 below the raw one (README, "A grounded head")
    sparsity: str = "path"            # "path": elastic-net refit of W; "topk": cut, drop unused codes, fine-tune; "none"
    sparsity_rule: str = "deviance"   # path: how the point is chosen (pipeline/sparsity.py RULES)
    sparsity_tolerance: float = 0.01  # path, rule accuracy: the sparsest head within this of the best val top-1
    sparsity_k: int = 5               # topk: weights kept per class
    finetune_epochs: int = 20         # W only, after a topk cut or a push without the path refit
    path_points: int = 40
    path_l1_ratio: float = 0.99       # path: the L1 share of the penalty (pipeline/sparsity.py PathSettings.l1_ratio)
    path_relax: bool = False
    refit_memory: str = "auto"        # path: RAM for the refit's presence; above it a stratified sample of rows


SPARSITY_METHODS = ("path", "topk", "none")
PROJECTION_LEARNS = ("fine", "all")

# What a run recorded before a setting existed did instead: a replay, a resume or a prune of an older run
# keeps its method rather than silently taking today's default.
LEGACY_SETTINGS = {"anchor": 0.0, "sparsity_rule": "accuracy", "sparsity": "none", "ground": False, "refit_memory": "all",
                   "projection_dim": 0, "projection_lr": 1e-3, "projection_learns": "all"}


def with_legacy_settings(recorded: dict) -> dict:
    """A run's recorded settings, with what it did for the settings it predates (LEGACY_SETTINGS)."""
    return {**LEGACY_SETTINGS, **recorded}


def check_train_settings(s: TrainSettings) -> None:
    """One line per bad value, before any work (the CLI validates too; this guards library callers)."""
    for name in ("epochs", "probe_epochs", "codebook_epochs"):
        if getattr(s, name) < 0:
            raise ProtoquantError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(s, name)}")
    if s.batch_size < 1:
        raise ProtoquantError(f"--batch-size must be at least 1, got {s.batch_size}")
    for name in ("probe_lr", "codebook_lr", "head_lr", "codes_lr", "weight_decay", "warmup_epochs", "dict_weight",
                 "l1", "anchor", "mixup", "projection_lr"):
        value = getattr(s, name)
        if not math.isfinite(value) or value < 0:
            raise ProtoquantError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if s.projection_dim < 0:
        raise ProtoquantError(f"--projection-dim must be 0 (no projection) or more, got {s.projection_dim}")
    if s.projection_learns not in PROJECTION_LEARNS:
        raise ProtoquantError(f"--projection-learns {s.projection_learns!r}: choose {' or '.join(PROJECTION_LEARNS)}")
    if not (math.isfinite(s.tau) and s.tau > 0):
        raise ProtoquantError(f"--tau must be a finite number > 0, got {s.tau}")
    if not (0 <= s.label_smoothing < 1):
        raise ProtoquantError(f"--label-smoothing must be in [0, 1), got {s.label_smoothing}")
    if s.sparsity not in SPARSITY_METHODS:
        raise ProtoquantError(f"--sparsity {s.sparsity!r} is not a method: choose one of {', '.join(SPARSITY_METHODS)}")
    from pipeline.sparsity import RULES

    if s.sparsity_rule not in RULES:
        raise ProtoquantError(f"--sparsity-rule {s.sparsity_rule!r} is not a rule: choose {' or '.join(RULES)}")
    if not (0 <= s.sparsity_tolerance < 1):
        raise ProtoquantError(f"--sparsity-tolerance must be in [0, 1), got {s.sparsity_tolerance}")
    if s.sparsity_k < 1 or s.finetune_epochs < 0 or s.path_points < 1 or not (0 < s.path_l1_ratio <= 1):
        raise ProtoquantError(f"--sparsity-k (>= 1, got {s.sparsity_k}), --finetune-epochs (>= 0, got "
                              f"{s.finetune_epochs}), path points (>= 1, got {s.path_points}) and path l1 ratio "
                              f"(in (0, 1], got {s.path_l1_ratio}) are out of range")
    if s.refit_memory not in ("auto", "all"):
        from pipeline.data import parse_memory

        try:
            parse_memory(s.refit_memory)
        except ProtoquantError:
            raise ProtoquantError(f"--refit-memory {s.refit_memory!r} is not a size: write e.g. 8GB, 512MiB, "
                                  "auto (half the free RAM) or all (every row, or refuse)") from None
    if not (0 < s.val_fraction < 1):
        raise ProtoquantError(f"--val-fraction must be in (0, 1), got {s.val_fraction}: every phase selects its "
                              "best epoch on the validation split carved from train")


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


# --- losses ------------------------------------------------------------------------------------------

def classification_loss(model: Callable[[torch.Tensor], torch.Tensor], num_classes: int, *, label_smoothing: float, mixup_alpha: float = 0.0,
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


def stage_b_loss(head: nn.Module, settings: TrainSettings, dist: Distributed = Distributed()) -> LossFn:
    """classification_loss of a ProtoQuantHead plus its L1 penalty and, when its codes train, the anchor term
    (with --mixup the anchor sees the mixed grid the head sees, so it pulls toward mixed patches: a known limit)."""
    s = settings
    anchored = s.anchor > 0 and s.train_codes and isinstance(head.codes, nn.Parameter)
    penalty = (lambda: s.l1 * head.l1_penalty()) if s.l1 > 0 else None
    if not anchored:
        return classification_loss(head, head.weight.shape[0], label_smoothing=s.label_smoothing,
                                   mixup_alpha=s.mixup, penalty=penalty)
    similarity: list[torch.Tensor] = []

    def logits(features: torch.Tensor) -> torch.Tensor:  # keeps S for the anchor: one product per batch
        similarity[:] = [head.similarity(features)]
        return head.logits_from_presence(head.activation_from_similarity(similarity[0]).amax(dim=(2, 3)))

    def anchor() -> torch.Tensor:
        value = s.anchor * head.anchor_penalty(similarity[0], ranks=dist)
        return value + penalty() if penalty is not None else value

    return classification_loss(logits, head.weight.shape[0], label_smoothing=s.label_smoothing,
                               mixup_alpha=s.mixup, penalty=anchor)


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
def code_grounding(head: nn.Module, source: FeatureSource, *, device: torch.device,
                   dist: Distributed = Distributed()) -> torch.Tensor:
    """(K,) the highest cosine between each code and any patch of the source, as the head sees patches
    (ProtoQuantHead.embed; 1.0: the code is a real patch). Stage B may train the codes with nothing holding
    them to the data (METHOD.md stage B); this says how far they went. Max over ranks under torchrun.
    """
    codes = head.codes
    unit = torch.nn.functional.normalize(codes.detach().float().to(device), dim=1)  # (K, D or d)
    best = torch.full((codes.shape[0],), -1.0, device=device)
    for features, _ in source.batches(0):
        patches = torch.nn.functional.normalize(head.embed(features.to(device)).flatten(0, 2), dim=1)  # (B*H*W, D or d)
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
            if not torch.isfinite(loss.detach()):
                raise ProtoquantError(f"{phase.name} phase, epoch {epoch + 1}: the loss is {float(loss.detach())}; "
                                      "the features or a setting (learning rate, --tau) give non-finite numbers, "
                                      "so nothing was written: check `protoquant info CACHE --verify` and the options")
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


def phase_state_from_artifact(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> PhaseState:
    """A phase's state from a checkpoint: its best weights and history, and (for the phase that was running)
    its latest weights and optimizer, stored under `name.best`, `name.model` and `name.opt`."""
    state = PhaseState(epoch=meta["epoch"], best=tensors_to_state(f"{name}.best", tensors),
                       best_score=meta["best_score"], best_epoch=meta["best_epoch"], history=meta["history"])
    if "optimizer" in meta:
        state.model = tensors_to_state(f"{name}.model", tensors)
        state.optimizer = optimizer_from_artifact(f"{name}.opt", tensors, meta["optimizer"])
    return state




# --- stage B as a phase -----------------------------------------------------------------------------------

PROJECTION_SAMPLE_PATCHES = 200_000  # the projection's principal directions come from at most this many patches


def projection_rows(train_rows: np.ndarray, cells: int, seed: int) -> np.ndarray:
    """The training rows whose patches start the projection: all, or a seeded sample of
    PROJECTION_SAMPLE_PATCHES / cells of them, in row order."""
    n = max(1, PROJECTION_SAMPLE_PATCHES // max(cells, 1))
    if len(train_rows) <= n:
        return train_rows
    return np.sort(np.random.default_rng([seed, 0x9CA]).choice(train_rows, size=n, replace=False))


def projection_start(settings: TrainSettings, train_rows: np.ndarray, split, scan: Callable[[np.ndarray], object]
                     ) -> tuple | None:
    """With --projection-dim: the projection's start (model.pca_projection), the principal directions of the
    patches of projection_rows of the split's training rows, read by scan(rows) -> batches; None without one."""
    from pipeline.model import pca_projection

    if settings.projection_dim <= 0:
        return None
    rows = projection_rows(train_rows, split.features.shape[1] * split.features.shape[2], settings.seed)
    return pca_projection(scan(rows), settings.projection_dim)


def stage_b_head(codes: torch.Tensor, num_classes: int, settings: TrainSettings, projection: tuple | None, *,
                 device: torch.device, maps: list[tuple[int, int, int, int]] | None = None) -> nn.Module:
    """Stage B's head on the stage A codes (train and sweep); with a projection (projection_start) the codes
    start as their projections, and with --projection-learns fine the projection learns only on the channels
    of the maps at the grid's own resolution (maps: pipeline.cache.grid_maps of the cache; None: one map)."""
    from pipeline.model import ProtoQuantHead

    s = settings
    if projection is not None:
        projection = tuple(t.to(device) for t in projection)
        codes = codes.to(device).float() @ projection[0].T + projection[1]  # (K, D) -> (K, d)
    head = ProtoQuantHead(codes, num_classes, tau=s.tau, train_codes=s.train_codes, seed=s.seed,
                          projection=projection).to(device)
    if head.projection is not None and maps is not None and any((rows, cols) != (1, 1) for _, _, rows, cols in maps):
        learns = [s.projection_learns == "all" or (rows, cols) == (1, 1) for _, _, rows, cols in maps]
        head.grid_maps = [(*m, learn) for m, learn in zip(maps, learns)]
        kept = torch.cat([torch.full((stop - start,), not learn) for (start, stop, _, _), learn in zip(maps, learns)])
        _keep_columns(head.projection.weight, kept.to(device))
    return head


def _keep_columns(weight: nn.Parameter, kept: torch.Tensor) -> None:
    """Zero the gradient of weight's kept columns ((D,) bool), so they stay at their start: AdamW without weight
    decay (head_phase gives the projection none) moves a parameter only where its gradient is nonzero. A weight
    that does not learn (frozen codes freeze the projection) needs nothing."""
    if weight.requires_grad and kept.any():
        learned = (~kept).to(weight.dtype)[None, :]  # (1, D)
        weight.register_hook(lambda grad: grad * learned)


def head_phase(name: str, head: nn.Module, settings: TrainSettings, epochs: int, val: FeatureSource,
               device: torch.device, dist: Distributed) -> Phase:
    """Stage B (also prune's fine-tuning): W with AdamW, codes too with train_codes; selected on val top-1."""
    from pipeline.model import codes_in_use

    s = settings
    groups = [{"params": [head.weight], "lr": s.head_lr, "weight_decay": s.weight_decay}]
    if s.train_codes and isinstance(head.codes, nn.Parameter):  # a grounded head's codes are buffers: they stay
        # a relative rate: the same setting suits backbones whose features differ in scale
        rms = float(head.codes.detach().pow(2).mean().sqrt())
        groups.append({"params": [head.codes], "lr": s.codes_lr * rms, "weight_decay": 0.0})
        if head.projection is not None:
            groups.append({"params": list(head.projection.parameters()), "lr": s.projection_lr, "weight_decay": 0.0})
    loss = stage_b_loss(head, s, dist)

    def validate() -> dict:
        return {"val_top1": accuracy(head, val, device=device, dist=dist), "codes_in_use": int(codes_in_use(head).sum())}

    return Phase(name, head, groups, loss, validate, OptimSettings(epochs, s.head_lr, s.weight_decay, s.warmup_epochs, "adamw"))


# --- after stage B: push and sparsity (train and sweep) -----------------------------------------------------

def needs_finetune(settings: TrainSettings) -> bool:
    """A top-k cut, or a push without the path refit, is followed by a W-only fine-tuning phase."""
    return settings.sparsity == "topk" or (settings.sparsity == "none" and settings.ground)


@torch.no_grad()
def after_stage_b(head: nn.Module, settings: TrainSettings, train_rows: Callable[[], object],
                  refit_train: Callable[[], object], refit_val: Callable[[], object], *,
                  device: torch.device) -> tuple[dict, dict]:
    """In place, after stage B: push_step over train_rows, then sparse_step on the head's own presence over
    refit_train / refit_val (refit_rows' rows). Each gives a fresh pass of (grid, label) batches in row order,
    the same on every rank.
    -> (push record, sparsity record); the fine-tuning that follows a cut (needs_finetune) is the caller's phase."""
    from pipeline.sparsity import presence_matrix

    push = push_step(head, settings, train_rows, device=device)
    return push, sparse_step(head, settings, lambda: (presence_matrix(head, refit_train(), device=device),
                                                      presence_matrix(head, refit_val(), device=device)))


def refit_rows(settings: TrainSettings, train_rows: np.ndarray, val_rows: np.ndarray, labels: np.ndarray, *,
               codes: int, classes: int, dist: Distributed = Distributed(), available: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """--sparsity path: the training and validation rows the refit uses, decided before any training ->
    (train rows, val rows, record). The refit holds the presence of every row it uses (sparsity.refit_bytes);
    when that exceeds --refit-memory (auto: half the RAM available now, the lowest over ranks) it uses a
    stratified sample (sparsity.refit_sample); with "all" it uses every row and refuses when they do not fit."""
    from pipeline.data import available_memory, format_bytes, parse_memory
    from pipeline.sparsity import refit_bytes, refit_sample

    if settings.sparsity != "path":
        return train_rows, val_rows, {}
    free = available_memory() if available is None else available
    free = int(dist.min(float(free)))  # every rank samples alike
    total = len(train_rows) + len(val_rows)
    if settings.refit_memory == "all":
        need = refit_bytes(total, codes, classes)
        if need > free:
            raise ProtoquantError(f"--sparsity path refits W after stage B on the presence of {total} rows x {codes} codes, "
                                  f"about {format_bytes(need)}, but {format_bytes(free)} of RAM is available: drop "
                                  "--refit-memory all (the refit then uses a stratified sample that fits), pass "
                                  "--sparsity topk (the paper's stage 2b, no presence matrix), or more RAM")
        budget = need
    else:
        budget = free // 2 if settings.refit_memory == "auto" else parse_memory(settings.refit_memory)
    train, val, share = refit_sample(train_rows, val_rows, labels, codes=codes, classes=classes, budget=budget,
                                     seed=settings.seed)
    record = {"refit_rows": len(train) + len(val), "of_rows": total, "refit_share": round(share, 6)}
    return train, val, record if share == 1.0 else {**record, "refit_budget_bytes": int(budget)}  # auto's budget varies


def push_step(head: nn.Module, settings: TrainSettings, train_rows: Callable[[], object], *,
              device: torch.device) -> dict:
    """settings.ground: every code becomes its nearest training patch and stops training (ProtoPNet's push)."""
    from pipeline.grounding import push_codes

    if not settings.ground:
        return {"pushed": False}
    push = push_codes(head, train_rows(), device=device)
    freeze_codes(head)
    return push


def path_settings(settings: TrainSettings) -> "PathSettings":  # noqa: F821  (imported here: sparsity imports scipy)
    """The sparsity path's layout and rule from train's settings (pipeline/sparsity.py PathSettings)."""
    from pipeline.sparsity import PathSettings

    return PathSettings(points=settings.path_points, l1_ratio=settings.path_l1_ratio, rule=settings.sparsity_rule,
                        tolerance=settings.sparsity_tolerance, relax=settings.path_relax)


def sparse_step(head: nn.Module, settings: TrainSettings, presence: Callable[[], tuple] | None = None, *,
                solved: "SolvedPath | None" = None) -> dict:  # noqa: F821  (pipeline/refits.py)
    """In place, the sparse step: path (W refit on the cached presence, `presence()` -> ((N, K) train, labels),
    ((M, K) val, labels); or `solved`, the path solved already: pipeline/refits.py) or topk (the cut, then the
    unused codes leave the softmax); -> its record."""
    from pipeline.model import drop_unused_codes, keep_top_k_weights
    from pipeline.sparsity import apply_chosen_point, refit_from_presence

    s = settings
    sparsity: dict = {"method": s.sparsity}
    if s.sparsity == "path" and solved is not None:
        sparsity |= apply_chosen_point(head, solved.points, solved.n_val, path_settings(s))
        sparsity["seconds"] = round(solved.seconds, 3)
    elif s.sparsity == "path":
        started = time.perf_counter()
        sparsity |= refit_from_presence(head, *presence(), path_settings(s))
        sparsity["seconds"] = round(time.perf_counter() - started, 3)
    elif s.sparsity == "topk":
        keep_top_k_weights(head, s.sparsity_k)  # the paper's stage 2b: the cut, then the unused codes go
        drop_unused_codes(head)
    return sparsity


def freeze_codes(head: nn.Module) -> None:
    """Codes that are training patches stay so: a buffer, saved with train_codes False, which no later
    fine-tuning (train's finetune, prune's) moves."""
    codes = head.codes.detach().clone()
    del head.codes
    head.register_buffer("codes", codes)
    if head.projection is not None:
        head.projection.requires_grad_(False)
    head.train_codes = False
