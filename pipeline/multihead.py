"""Many heads per pass over the cache (`protoquant sweep`): each block is read once, every head steps on it.

    Lane                 the members (phases of heads, probes or codebooks) that step on the same batches:
                         one seed gives one validation split and one batch order, exactly as `train --seed`
    run_round            one phase for every lane together (probes, then stage A, then stage B), epoch by
                         epoch, with run_phase's schedule, best-epoch rule and checkpoint hook
    heads_loss           stage B for a lane's heads at once: the features are normalised once and every
                         head's codes go through ONE similarity product (heads of any K and tau)
    shared_batches       batches of several sources in one pass: from RAM, or streamed with each inner
                         chunk read once for all of them
    accuracies, grounding_together    validation top-1 and code grounding for many models in one pass

Equal to `train` (tests/test_sweep.py): from RAM every head sees exactly the batches `train` with its
seed gives, so it matches within float tolerance (the one difference is the order of additions in
the shared similarity product). Streamed, the chunks are read in the order of the sweep's first
seed: its heads match `train`, heads of other seeds see the same rows per epoch with their own
validation split, initialisation and shuffle within the buffer, but the chunks in that first order
(reading each chunk once for all heads is the point of the sweep).
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.codebook import COSINE_EPS
from pipeline.data import FeatureSource, view_choices
from pipeline.errors import ProtoquantError
from pipeline.model import ProtoQuantHead, mixup
from pipeline.training import Phase, PhaseState, lr_factor, make_optimizer, set_lr

READ_AHEAD = 8    # chunks read ahead of the one being cut into batches
READ_THREADS = 4
Batch = tuple[torch.Tensor, torch.Tensor]
Classify = Callable[[torch.Tensor], torch.Tensor]
JointLoss = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], list[tuple[torch.Tensor, dict]]]


@dataclass
class Member:
    """One phase of one model in a round: what trains (phase) and how validation scores it (classify)."""

    key: str                                   # unique in the sweep, no dots (checkpoint tensor names)
    phase: Phase
    classify: Classify
    extra_scores: Callable[[], dict] = field(default=lambda: {})


@dataclass
class Lane:
    """Members that step on the same batches: one seed's training and validation sources."""

    seed: int
    train: FeatureSource
    val: FeatureSource
    members: list[Member]
    joint_loss: JointLoss | None = None        # all members' losses from one batch; None: each phase's own loss


# --- batches of many sources in one pass -----------------------------------------------------------------

def shared_batches(sources: list[FeatureSource], epoch: int = 0) -> Iterator[tuple[int, Batch]]:
    """(source index, batch) for every batch of every source's `epoch`.

    From RAM the sources simply take turns (nothing is read). Streamed, the inner chunks any source
    needs are read once each, in the first source's order, and every source buffers and shuffles its
    own rows exactly as FeatureSource does.
    """
    if all(s.ram is not None for s in sources):
        for i, source in enumerate(sources):
            for batch in source.batches(epoch):
                yield i, batch
        return
    if any(s.ram is not None for s in sources) or any(s.world > 1 for s in sources):
        raise ProtoquantError("internal: shared_batches streams single-process sources only")
    yield from _SharedStream(sources, epoch).batches()


@dataclass
class _Filling:
    """A shuffle buffer being filled: buffer[place[k]] takes the k-th row to arrive (the carried rows first)."""

    buffer: np.ndarray    # (n, H, W, D) float16
    rows: np.ndarray      # (n,) the split row at each place
    place: np.ndarray     # (n,) where each arriving row goes
    filled: int           # rows placed so far
    chunks_left: int      # chunks of this buffer still to arrive


class _Buffer:
    """One source's shuffle buffer while streaming: FeatureSource._stream_batches, fed chunk by chunk.

    The stream's chunk order is known up front, so each buffer's size is too: its permutation is drawn when
    its first chunk arrives, and every row is copied once, straight into its shuffled place (the batches
    of a concatenation shuffled afterwards, with the same draws, at a third of the copies)."""

    def __init__(self, source: FeatureSource, epoch: int, order: list[int]):
        self.source = source
        self.rng = np.random.default_rng([source.settings.seed, epoch + 1_000_003, 0xDA7A])
        self.choices = view_choices(source.split.n, source.n_views, source.settings.seed, epoch)
        self.steps_left = source.steps(epoch)
        r, rows, n = source.split.layout.rows_per_chunk, source.rows, source.split.n  # rows: sorted
        self.selected = {}  # chunk -> this source's rows in it, for the chunks that hold any
        for chunk in order:
            picked = rows[np.searchsorted(rows, chunk * r):np.searchsorted(rows, min(chunk * r + r, n))]
            if len(picked):
                self.selected[chunk] = picked
        used, per_buffer = list(self.selected), source.settings.buffer_chunks
        groups = [used[k:k + per_buffer] for k in range(0, len(used), per_buffer)]
        self.groups_of = {chunk: group for group in groups for chunk in group}
        self.carry_grids: np.ndarray | None = None
        self.carry_rows = np.empty(0, dtype=np.int64)
        self.open: _Filling | None = None

    def feed(self, start: int, stop: int, features: np.ndarray, views: np.ndarray | None) -> Iterator[Batch]:
        chunk = start // self.source.split.layout.rows_per_chunk
        selected = self.selected.get(chunk)
        if selected is None:
            return
        if self.open is None:
            self._begin(self.groups_of[chunk], features.shape[1:])
        filling = self.open
        where = filling.place[filling.filled:filling.filled + len(selected)]
        local = selected - start
        if self.source.n_views:
            stacked = np.concatenate([features[local][:, None], views[local]], axis=1)  # (n, 1 + V, H, W, D)
            filling.buffer[where] = stacked[np.arange(len(selected)), self.choices[selected]]
        elif (np.diff(local) == 1).all():
            filling.buffer[where] = features[local[0]:local[-1] + 1]  # every row of a run: no copy in between
        else:
            filling.buffer[where] = features[local]
        filling.rows[where] = selected
        filling.filled += len(selected)
        filling.chunks_left -= 1
        if filling.chunks_left == 0 and len(self.groups_of[chunk]) == self.source.settings.buffer_chunks:
            yield from self._cut()  # a full buffer is cut at once; a last, shorter one at the end (flush)

    def _begin(self, group: list[int], grid: tuple[int, ...]) -> None:
        carry = len(self.carry_rows)
        n = carry + sum(len(self.selected[c]) for c in group)
        mix = self.rng.permutation(n) if self.source.settings.shuffle else np.arange(n)  # buffer[j] = unshuffled row mix[j]
        place = np.empty(n, dtype=np.int64)
        place[mix] = np.arange(n)  # unshuffled row k (the carried rows first) goes to buffer[place[k]]
        buffer, rows = np.empty((n, *grid), dtype=np.float16), np.empty(n, dtype=np.int64)
        if carry:
            buffer[place[:carry]], rows[place[:carry]] = self.carry_grids, self.carry_rows
        self.open = _Filling(buffer, rows, place, filled=carry, chunks_left=len(group))

    def _cut(self) -> Iterator[Batch]:
        buffer, rows = self.open.buffer, self.open.rows
        b = self.source.settings.batch_size
        full = len(rows) - len(rows) % b
        self.open = None
        self.carry_grids, self.carry_rows = buffer[full:].copy(), rows[full:]  # a copy: the buffer itself can go
        for start in range(0, full, b):
            yield from self._emit(buffer[start:start + b], rows[start:start + b])

    def flush(self) -> Iterator[Batch]:
        """At the end of the epoch: the last buffer (when it held fewer chunks than a full one), then the rows
        left over, fewer than a batch."""
        if self.open is not None:
            yield from self._cut()
        if len(self.carry_rows):
            yield from self._emit(self.carry_grids, self.carry_rows)

    def _emit(self, grids: np.ndarray, rows: np.ndarray) -> Iterator[Batch]:
        if self.steps_left > 0:
            self.steps_left -= 1
            batch = torch.from_numpy(np.ascontiguousarray(grids))
            half = getattr(self.source.settings, "half", False)  # float16 batches when the source asks for them
            yield (batch if half else batch.float()), self.source.labels[torch.from_numpy(rows)]


class _SharedStream:
    """Streams the union of the sources' chunks once, in the first source's order (then the others')."""

    def __init__(self, sources: list[FeatureSource], epoch: int):
        self.sources, self.epoch = sources, epoch
        self.split = sources[0].split
        self.order = self._order()

    def _order(self) -> list[int]:
        r = self.split.layout.rows_per_chunk
        first = self.sources[0]
        chunks = np.unique(first.rows // r)
        if first.settings.shuffle:
            chunks = chunks[np.random.default_rng([first.settings.seed, self.epoch, 0xDA7A]).permutation(len(chunks))]
        seen = set(int(c) for c in chunks)
        extra = sorted(set(int(c) for s in self.sources[1:] for c in np.unique(s.rows // r)) - seen)
        return [int(c) for c in chunks] + extra

    def _reads(self, with_views: bool) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """(start, stop, features, views) of each chunk in order, read READ_AHEAD chunks ahead in threads."""
        r = self.split.layout.rows_per_chunk
        self.split.ok  # the completion marks, read once before the threads need them

        def read(chunk: int):
            start, stop = chunk * r, min(chunk * r + r, self.split.n)
            views = self.split.read_views(start, stop) if with_views else None
            return start, stop, self.split.read_features(start, stop), views  # float16, read once for all

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            pending: deque = deque()
            for chunk in self.order:
                pending.append(pool.submit(read, chunk))
                if len(pending) > READ_AHEAD:
                    yield pending.popleft().result()  # a damaged chunk raises its one named error here
            while pending:
                yield pending.popleft().result()

    def batches(self) -> Iterator[tuple[int, Batch]]:
        buffers = [_Buffer(source, self.epoch, self.order) for source in self.sources]
        with_views = any(s.n_views for s in self.sources)
        for start, stop, features, views in self._reads(with_views):
            for i, buffer in enumerate(buffers):
                for batch in buffer.feed(start, stop, features, views):
                    yield i, batch
        for i, buffer in enumerate(buffers):
            for batch in buffer.flush():
                yield i, batch


# --- many models scored in one pass --------------------------------------------------------------------------

@torch.no_grad()
def accuracies(sources: list[FeatureSource], models: list[list[tuple[str, Classify]]], *,
               device: torch.device) -> dict[str, float]:
    """Top-1 of every (key, classify) over its source (models[i] go with sources[i]); NaN for an empty source."""
    correct = {key: 0 for group in models for key, _ in group}
    total = [0] * len(sources)
    for i, (features, labels) in shared_batches(sources, 0):
        f = features.to(device)
        total[i] += len(labels)
        for key, classify in models[i]:
            correct[key] += int((classify(f).argmax(dim=1).cpu() == labels).sum())
    return {key: correct[key] / total[i] if total[i] else float("nan")
            for i, group in enumerate(models) for key, _ in group}


@torch.no_grad()
def grounding_together(sources: list[FeatureSource], heads: list[list[tuple[str, ProtoQuantHead]]], *,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """(K,) highest cosine between each head's codes and any patch of its source as that head sees patches,
    for many heads in one pass (pipeline.training.code_grounding, shared reads)."""
    units = {key: F.normalize(h.codes.detach().float().to(device), dim=1) for group in heads for key, h in group}
    best = {key: torch.full((u.shape[0],), -1.0, device=device) for key, u in units.items()}
    for i, (features, _) in shared_batches(sources, 0):
        raw = features.to(device)
        for key, head in heads[i]:
            patches = F.normalize(head.embed(raw).flatten(0, 2), dim=1)  # (B*H*W, D or d)
            best[key] = torch.maximum(best[key], (patches @ units[key].T).amax(dim=0))
    return {key: value.cpu() for key, value in best.items()}


# --- stage B for many heads at once --------------------------------------------------------------------------

def stacked_similarities(heads: list[ProtoQuantHead], f: torch.Tensor) -> list[torch.Tensor]:
    """Every head's S (B, K, H, W) for one grid batch f (B, H, W, D), through ONE similarity product (heads
    with a projection each see their own projected patches, so each takes its own product)."""
    if any(h.projection is not None for h in heads):
        return [h.similarity(f) for h in heads]
    f_unit = F.normalize(f.float(), dim=-1, eps=COSINE_EPS)  # (B, H, W, D), once for all heads
    units = torch.cat([F.normalize(h.codes, dim=-1, eps=COSINE_EPS) for h in heads])  # (sum K, D)
    similarity = f_unit @ units.T  # (B, H, W, sum K): codes-last, as ProtoQuantHead.similarity
    return [s.permute(0, 3, 1, 2) for s in similarity.split([h.codes.shape[0] for h in heads], dim=-1)]


def stacked_logits(heads: list[ProtoQuantHead], f: torch.Tensor) -> list[torch.Tensor]:
    """Every head's logits (B, C): the same math as ProtoQuantHead.forward (METHOD.md stage B), head by
    head after the shared product."""
    return [_logits(head, s) for head, s in zip(heads, stacked_similarities(heads, f))]


def _logits(head: ProtoQuantHead, similarity: torch.Tensor) -> torch.Tensor:
    return head.logits_from_presence(head.activation_from_similarity(similarity).amax(dim=(2, 3)))


def heads_loss(heads: list[ProtoQuantHead], l1: list[float], anchor: list[float], *, label_smoothing: float,
               mixup_alpha: float = 0.0) -> JointLoss:
    """pipeline.training.stage_b_loss for every head of a lane, from one batch (mixup drawn once: heads of
    one seed draw the same numbers in `train`); anchor: each head's weight (0 for frozen codes)."""
    num_classes = heads[0].weight.shape[0]

    def loss(features: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        target: torch.Tensor = labels
        if mixup_alpha > 0:
            onehot = F.one_hot(labels, num_classes).float()  # (B, C)
            features, target = mixup(features, onehot, alpha=mixup_alpha, rng=rng)
        out = []
        for head, s, l1_weight, anchor_weight in zip(heads, stacked_similarities(heads, features), l1, anchor):
            value = F.cross_entropy(_logits(head, s), target, label_smoothing=label_smoothing)
            if l1_weight > 0:
                value = value + l1_weight * head.l1_penalty()
            if anchor_weight > 0:
                value = value + anchor_weight * head.anchor_penalty(s)
            out.append((value, {}))
        return out

    return loss


# --- one round: a phase for every lane, in lockstep ------------------------------------------------------------

def run_round(lanes: list[Lane], *, device: torch.device, states: dict[str, PhaseState],
              on_epoch: Callable[[int, int], None] | None = None) -> None:
    """Train every member of every lane for the round's epochs; each keeps its best validation epoch.

    run_phase's rules member by member: the learning rate is set before each step (warm-up, cosine),
    randomness per epoch comes from (seed, phase name, epoch), ties keep the earlier epoch, and an
    empty validation keeps the last epoch. `states` (member key -> PhaseState) is continued and kept
    up to date; on_epoch(epoch, epochs) runs after every epoch, once the states hold it (checkpoint).
    """
    members = [m for lane in lanes for m in lane.members]
    settings = members[0].phase.settings
    if any((m.phase.settings.epochs, m.phase.settings.warmup_epochs) != (settings.epochs, settings.warmup_epochs)
           for m in members):
        raise ProtoquantError("internal: the members of a round must share epochs and warm-up")
    for m in members:
        states.setdefault(m.key, PhaseState())
    done = min(states[m.key].epoch for m in members)
    if done >= settings.epochs and all(states[m.key].best for m in members):
        _load_best(members, states)
        return
    optimizers = {m.key: _optimizer(m, states[m.key]) for m in members}
    plans = [_schedule(lane.train, settings.epochs, settings.warmup_epochs) for lane in lanes]
    salt = sum(ord(c) for c in members[0].phase.name)
    for epoch in range(done, settings.epochs):
        started = time.perf_counter()
        totals = _train_epoch(lanes, optimizers, plans, epoch, salt, device)
        scores = _validate(lanes, device)
        seconds = (time.perf_counter() - started) / len(members)  # the epoch's wall time, shared out
        for m in members:
            _record(m, states[m.key], optimizers[m.key], epoch, totals[m.key], scores[m.key], seconds)
        if on_epoch is not None:
            on_epoch(epoch + 1, settings.epochs)
    _load_best(members, states)


def _optimizer(member: Member, state: PhaseState) -> torch.optim.Optimizer:
    optimizer = make_optimizer(member.phase.groups, member.phase.settings)
    if state.model:
        member.phase.module.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
    return optimizer


def _schedule(source: FeatureSource, epochs: int, warmup_epochs: float) -> tuple[list[int], int, int]:
    """(steps per epoch, total steps, warm-up steps) as run_phase computes them."""
    steps = [source.steps(e) for e in range(epochs)]
    total = sum(steps)
    return steps, total, min(total, round(warmup_epochs * (steps[0] if steps else 0)))


def _train_epoch(lanes: list[Lane], optimizers: dict, plans: list, epoch: int, salt: int,
                 device: torch.device) -> dict[str, dict]:
    """One epoch of every lane; -> per member {"loss": sum, ..., "batches": n, "lr": last lr}."""
    steps = [sum(plan[0][:epoch]) for plan in plans]
    rngs = [[np.random.default_rng([lane.seed, salt, epoch]) for _ in lane.members] for lane in lanes]
    totals = {m.key: {"batches": 0, "lr": 0.0} for lane in lanes for m in lane.members}
    for lane in lanes:
        for m in lane.members:
            m.phase.module.train()
    sources = [lane.train for lane in lanes]
    for i, (features, labels) in shared_batches(sources, epoch):
        lane, (_, total_steps, warmup) = lanes[i], plans[i]
        factor = lr_factor(steps[i], total_steps, warmup)  # before the step (METHOD.md pitfall 3)
        lrs = [set_lr(optimizers[m.key], factor) for m in lane.members]
        f, y = features.to(device, non_blocking=True), labels.to(device)
        if lane.joint_loss is not None:
            results = lane.joint_loss(f, y, rngs[i][0])
        else:
            results = [m.phase.loss(f, y, rng) for m, rng in zip(lane.members, rngs[i])]
        for m, (loss, _) in zip(lane.members, results):
            _check_finite(m, loss, epoch)
        for m in lane.members:
            optimizers[m.key].zero_grad(set_to_none=True)
        torch.stack([loss for loss, _ in results]).sum().backward()  # disjoint parameters: each gets its own gradient
        for m, lr, (loss, stats) in zip(lane.members, lrs, results):
            optimizers[m.key].step()
            record = totals[m.key]
            record["batches"] += 1
            record["lr"] = lr
            for key, value in {"loss": float(loss.detach()), **stats}.items():
                record[key] = record.get(key, 0.0) + float(value)
        steps[i] += 1
    return totals


def _check_finite(member: Member, loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss.detach()):
        raise ProtoquantError(f"{member.phase.name} phase of {member.key}, epoch {epoch + 1}: the loss is "
                              f"{float(loss.detach())}; the features or a setting (learning rate, --tau) give "
                              "non-finite numbers, so nothing was written: check `protoquant info CACHE --verify` "
                              "and the options")


def _validate(lanes: list[Lane], device: torch.device) -> dict[str, dict]:
    for lane in lanes:
        for m in lane.members:
            m.phase.module.eval()
    top1 = accuracies([lane.val for lane in lanes], [[(m.key, m.classify) for m in lane.members] for lane in lanes],
                      device=device)
    return {m.key: {"val_top1": top1[m.key], **m.extra_scores()} for lane in lanes for m in lane.members}


def _record(member: Member, state: PhaseState, optimizer, epoch: int, totals: dict, scores: dict,
            seconds: float) -> None:
    """run_phase's bookkeeping after an epoch: the log record, the best epoch, the latest weights."""
    import copy

    n = totals.pop("batches")
    lr = totals.pop("lr")
    record = {"phase": member.phase.name, "epoch": epoch + 1, "lr": lr if n else 0.0,
              **{k: v / max(n, 1) for k, v in totals.items()}, **scores, "seconds": round(seconds, 3)}
    module = member.phase.module
    score = scores.get("val_top1", float("nan"))
    if math.isnan(score) or score > state.best_score:  # ties keep the earlier epoch
        state.best = {k: v.detach().clone() for k, v in module.state_dict().items()}
        state.best_score, state.best_epoch = (-1.0 if math.isnan(score) else score), epoch + 1
    state.epoch = epoch + 1
    state.model = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state.optimizer = copy.deepcopy(optimizer.state_dict())
    state.history.append(record)


def _load_best(members: list[Member], states: dict[str, PhaseState]) -> None:
    for m in members:
        if states[m.key].best:
            m.phase.module.load_state_dict(states[m.key].best)
        m.phase.module.eval()


class Codes(nn.Module):
    """A codebook as the only trainable tensor (stage A), under the state-dict name `train` uses."""

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        self.codes = nn.Parameter(codes.detach().float().clone())  # (K, D)
