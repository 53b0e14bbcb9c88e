"""ProtoQuant's math on cached feature grids: probe, stage A, stage B head, pruning and storage.

Features arrive as (B, H, W, D) grids, channels last, usually float16 from the cache; every function
here casts them to float32 before computing.

    ProbeHead                     the frozen reference classifier (trained as the probe phase) (METHOD.md stage A, "Start")
    quantize, stage_a_loss        codebook learning through the frozen probe (METHOD.md stage A)
    ProtoQuantHead                the interpretable head (METHOD.md stage B), optionally through a projection
    pca_projection                the projection's start: the patches' principal directions
    top_contributions, peak_locations               explanations (METHOD.md "Explanations")
    local_size_per_class, local_size_per_image      the two published local explanation sizes
    keep_top_k_weights, drop_unused_codes, codes_in_use    pruning (METHOD.md "Pruning and editing")
    mixup                         optional feature-space mixup
    save_/load_head, save_/load_probe               safetensors + JSON metadata

Assignment (assign_codes, code_usage) lives in pipeline/codebook.py: it belongs to the codebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.codebook import COSINE_EPS, assign_codes
from pipeline.errors import ProtoquantError
from pipeline.io import read_artifact, write_artifact

__all__ = [
    "ProbeHead", "quantize", "stage_a_loss",
    "ProtoQuantHead", "class_contributions", "TopContributions", "top_contributions", "peak_locations", "peak_cells",
    "prune_top_k_per_class", "keep_top_k_weights", "drop_unused_codes", "codes_in_use",
    "local_size_per_class", "local_size_per_image", "local_explanation_size",
    "mixup", "save_head", "load_head", "save_probe", "load_probe",
]


# --- the probe: frozen reference classifier --------------------------------------------------------

class ProbeHead(nn.Module):
    """Global average pool over (H, W) + Linear(D, C) with bias: the classifier stage A goes through.

    Starts at zero (weight and bias) without touching the global random state; the probe phase fits it.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.utils.skip_init(nn.Linear, dim, num_classes)  # no global-RNG init
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) grid -> (B, C) logits."""
        return self.forward_pooled(f.float().mean(dim=(1, 2)))  # (B, H, W, D) -> (B, D)

    def forward_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) already pooled features -> (B, C) logits."""
        return self.linear(pooled.float())


# --- stage A: codebook learning through the frozen probe ------------------------------------------

def quantize(f: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every patch embedding by its nearest code (METHOD.md stage A).

    Args:
        f: (B, H, W, D) features.
        codes: (K, D) codebook, usually a trainable Parameter.

    Returns:
        q (B, H, W, D): the RAW code vectors (not normalised: the frozen probe needs the magnitude);
            gradients reach `codes` through the gather.
        idx (B, H, W) int64: cosine argmax, computed without gradient.
    """
    idx = assign_codes(f, codes)  # (B, H, W); METHOD.md stage A: k* = argmax cos, no gradient
    # METHOD.md stage A: raw E[k*], (B, H, W) -> (B, H, W, D). index_select, not codes[idx]: the backward of
    # advanced indexing accumulates on CPU threads in a varying order (runs differed by 1e-5 in the codes' gradient)
    q = codes.index_select(0, idx.reshape(-1)).view(*idx.shape, codes.shape[1])
    return q, idx


def stage_a_loss(
    f: torch.Tensor,
    codes: torch.Tensor,
    probe: ProbeHead,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.1,
    dict_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage A loss: CE(probe(q), y) + dict_weight * mean((q - stopgrad(f))^2) (METHOD.md stage A).

    The dictionary term is a mean over every element of the (B, H, W, D) grid. No commitment term
    and no straight-through estimator: only `codes` gets gradients, provided the probe is frozen
    (load_probe returns it so).

    Returns (loss, parts) with parts = {"ce", "dict", "accuracy"} as detached scalars.
    """
    target = f.detach().float()  # (B, H, W, D); stopgrad(z)
    q, _ = quantize(target, codes)  # (B, H, W, D)
    logits = probe(q)  # (B, C)
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    dictionary = (q - target).pow(2).mean()  # METHOD.md stage A: VQ dictionary term
    loss = ce + dict_weight * dictionary
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, {"ce": ce.detach(), "dict": dictionary.detach(), "accuracy": accuracy.detach()}


# --- stage B: the interpretable head ---------------------------------------------------------------

class ProtoQuantHead(nn.Module):
    """Code presence -> class scores through non-negative weights (METHOD.md stage B).

    Buffers and parameters (all saved by save_head):
        projection (optional): a linear map D -> d (weight (d, D), bias (d,)) applied to every patch before
            the cosine, ProtoPNet's add-on layer on frozen features; the codes then live in its d-dimensional
            space (embed). It trains with the codes and freezes with them (freeze_codes).
        codes (K, D), or (K, d) with a projection: a Parameter when train_codes, else a buffer (frozen).
        weight W (C, K): Parameter, initialised N(1.0, 0.1) from `seed`; used as relu(W).
        code_mask (K,) bool: True = the code exists. A removed code (remove_codes) is taken out of
            the softmax over codes, so it has zero activation and presence everywhere and the other
            codes' activations renormalise among themselves: the head behaves as if it had never
            had that code. Zeroing a code's weights instead (pruning) keeps it competing in the
            softmax while contributing nothing.

    Memory: activation() holds B * K * H * W float32 values (B=256, K=2000, 7x7 -> 100 MB, plus
    as much again for the backward pass); lower the batch size when it does not fit.
    """

    def __init__(
        self, codes: torch.Tensor, num_classes: int, *, tau: float = 0.1, train_codes: bool = False, seed: int = 0,
        projection: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        codes = codes.detach().float().clone()  # (K, D), or (K, d) in the projection's space
        self.projection: nn.Linear | None = None
        if projection is not None:
            weight, bias = projection  # (d, D), (d,)
            if weight.shape[0] != codes.shape[1]:
                raise ProtoquantError(f"a projection to {weight.shape[0]} dimensions needs codes of that size, got {codes.shape[1]}")
            self.projection = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0]).to(codes.device)
            with torch.no_grad():
                self.projection.weight.copy_(weight)
                self.projection.bias.copy_(bias)
            self.projection.requires_grad_(train_codes)
        if train_codes:
            self.codes = nn.Parameter(codes)
        else:
            self.register_buffer("codes", codes)
        generator = torch.Generator().manual_seed(seed)
        weight = torch.normal(1.0, 0.1, size=(num_classes, codes.shape[0]), generator=generator)  # METHOD.md stage B
        self.weight = nn.Parameter(weight.to(codes.device))
        self.register_buffer("code_mask", torch.ones(codes.shape[0], dtype=torch.bool, device=codes.device))
        self.tau = float(tau)
        self.train_codes = train_codes
        self.grid_maps: list[tuple[int, int, int, int, bool]] | None = None  # training only: see embed

    @property
    def feature_dim(self) -> int:
        """D, the dimension of the cached features the head reads."""
        return self.projection.in_features if self.projection is not None else int(self.codes.shape[1])

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        """The patches as the codes see them: f itself, or its projection; (..., D) -> (..., D or d)."""
        if self.projection is None:
            return f.float()
        if self.grid_maps is not None and self.training and torch.is_grad_enabled() and f.dim() == 4 and self._blocks_hold(f):
            return self._embed_by_maps(f)
        return self.projection(f.float())

    # grid_maps, set by stage B's training (pipeline.training.stage_b_head), are the cache's maps as
    # (first channel, end channel, block rows, block columns, learns): a coarser map's values are copies over
    # blocks of cells (pipeline.cache.grid_maps). A training step (train mode, with gradients) then projects
    # each map once per block (a stride-32 map on a stride-16 grid: a quarter of the products) and takes no
    # gradient for the columns that do not learn; the sum is the same linear map. Everything else
    # (validation, the push, a saved head) projects every cell, so what is reported is what a saved head
    # computes.

    def _blocks_hold(self, f: torch.Tensor) -> bool:
        """Whether every coarse map's values in f (B, H, W, D) are indeed constant over their blocks."""
        for start, stop, rows, cols, _ in self.grid_maps:
            if (rows, cols) != (1, 1):
                if f.shape[1] % rows or f.shape[2] % cols:
                    return False
                blocks = f[..., start:stop].unflatten(2, (-1, cols)).unflatten(1, (-1, rows))  # (B, h, r, w, c, d)
                if not bool((blocks == blocks[:, :, :1, :, :1]).all()):
                    return False
        return True

    def _embed_by_maps(self, f: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = f.shape
        weight, bias = self.projection.weight, self.projection.bias  # (d, D), (d,)
        out = bias.expand(b, h, w, -1)
        for start, stop, rows, cols, learns in self.grid_maps:
            columns = weight[:, start:stop] if learns else weight[:, start:stop].detach()
            part = f[:, ::rows, ::cols, start:stop].float() @ columns.T  # (B, H / rows, W / cols, d)
            blocks = out.unflatten(2, (-1, cols)).unflatten(1, (-1, rows))  # (B, H / rows, rows, W / cols, cols, d)
            out = (blocks + part[:, :, None, :, None]).reshape(b, h, w, -1)
        return out

    def similarity(self, f: torch.Tensor) -> torch.Tensor:
        """S[b,k,h,w] = cos(embed(f)[b,h,w], codes[k]); (B, H, W, D) -> (B, K, H, W)."""
        f_unit = F.normalize(self.embed(f), dim=-1, eps=COSINE_EPS)  # (B, H, W, D or d)
        codes_unit = F.normalize(self.codes, dim=-1, eps=COSINE_EPS)  # (K, D)
        # METHOD.md stage B: S. Computed codes-last, (B, H, W, K), and returned as a (B, K, H, W) view of it: the
        # softmax over codes then runs along contiguous memory (the (B, K, H, W) layout cost a copy per op)
        return (f_unit @ codes_unit.T).permute(0, 3, 1, 2)

    def activation(self, f: torch.Tensor) -> torch.Tensor:
        """A = softmax over the K codes of S / tau at each location; (B, H, W, D) -> (B, K, H, W)."""
        return self.activation_from_similarity(self.similarity(f))

    def activation_from_similarity(self, similarity: torch.Tensor) -> torch.Tensor:
        """A from S (B, K, H, W): for callers that need S too (the anchor term) without a second product."""
        scores = similarity.permute(0, 2, 3, 1) / self.tau  # (B, H, W, K): codes-last, see similarity()
        scores.masked_fill_(~self.code_mask, float("-inf"))  # a removed code no longer exists (in place: no copy)
        return scores.softmax(dim=-1).permute(0, 3, 1, 2)  # METHOD.md stage B: over codes, NOT over space

    def presence(self, f: torch.Tensor) -> torch.Tensor:
        """p[b,k] = max over (h, w) of A[b,k,h,w], in [0, 1]; (B, H, W, D) -> (B, K)."""
        return self.activation(f).amax(dim=(2, 3))  # METHOD.md stage B: spatial max

    def effective_weight(self) -> torch.Tensor:
        """relu(W) with removed codes' columns zeroed; (C, K)."""
        return F.relu(self.weight) * self.code_mask  # (C, K) * (K,)

    def logits_from_presence(self, p: torch.Tensor) -> torch.Tensor:
        """logits = p @ relu(W)^T, no bias; (B, K) -> (B, C)."""
        return p @ self.effective_weight().T  # METHOD.md stage B

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) grid -> (B, C) logits."""
        return self.logits_from_presence(self.presence(f))

    def contributions(self, p: torch.Tensor) -> torch.Tensor:
        """relu(W[c,k]) * p[b,k]; (B, K) -> (B, C, K). Summed over K it gives the logits."""
        return self.effective_weight()[None] * p[:, None, :]  # METHOD.md "Explanations": local

    def l1_penalty(self) -> torch.Tensor:
        """sum of relu(W) (METHOD.md stage B: optional L1, off by default)."""
        return F.relu(self.weight).sum()

    def anchor_penalty(self, similarity: torch.Tensor, *, ranks=None) -> torch.Tensor:
        """Mean over the existing codes of 1 - the highest cosine between the code and any patch of the batch.

        Stage B's pull of each code toward the real patch it most resembles (a dictionary term, like stage
        A's): trained codes otherwise drift between patches and their nearest training patch stops showing
        what they detect. similarity is S (B, K, H, W) of this batch; the gradient reaches only the codes
        (and a projection, which it pulls the patches toward the codes with).
        Under DDP (ranks: pipeline.distributed.Distributed with world > 1) each rank holds a share of the
        batch: the value is the whole batch's, and the ranks holding a code's best patch pull it world / their
        count -fold, so that averaging the gradients over ranks gives one process's gradient (which, at a tie,
        max spreads over the tied patches).
        """
        nearest = similarity.amax(dim=(0, 2, 3))[self.code_mask]  # the best-matching patch of the batch, per code
        if ranks is not None and ranks.world > 1:
            best = ranks.max(nearest.detach())
            holds = (nearest.detach() >= best).to(nearest.dtype)
            fold = ranks.world / ranks.total(holds).clamp_min(1.0)
            nearest = torch.where(holds.bool(), fold * nearest - (fold - 1) * best, best)
        return (1.0 - nearest).mean()

    @torch.no_grad()
    def remove_codes(self, indices: torch.Tensor | list[int]) -> None:
        """Remove codes everywhere (METHOD.md "Pruning and editing"): see code_mask in the class doc."""
        mask = self.code_mask.clone()
        mask[torch.as_tensor(indices, dtype=torch.long, device=mask.device)] = False
        if not mask.any():
            raise ProtoquantError("removing these codes would leave the head with none: keep at least one code")
        self.code_mask.copy_(mask)


@torch.no_grad()
def pca_projection(batches, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's start: the patches' top `dim` principal directions, centred -> (weight (d, D), bias (d,)),
    d = min(dim, D). (features (B, H, W, D), labels) batches are read once (float64 sums). Each direction's
    sign is fixed (its largest entry positive), so the same patches give the same map."""
    total = outer = None
    count = 0
    for features, _ in batches:
        x = features.double().flatten(0, 2)  # (B*H*W, D)
        total = x.sum(dim=0) if total is None else total + x.sum(dim=0)
        outer = x.T @ x if outer is None else outer + x.T @ x
        count += x.shape[0]
    if count < 2:
        raise ProtoquantError("the projection's start needs training patches, and the training share is empty")
    mean = total / count
    values, vectors = torch.linalg.eigh(outer / count - torch.outer(mean, mean))  # ascending
    top = vectors[:, values.argsort(descending=True)[:dim]]  # (D, d)
    top = top * top.gather(0, top.abs().argmax(dim=0, keepdim=True)).sign()
    return top.T.float().contiguous(), (-(mean @ top)).float()


def peak_locations(activation: torch.Tensor) -> torch.Tensor:
    """Where each code fires most: argmax over space of A; (B, K, H, W) -> (B, K, 2) as (h, w)."""
    width = activation.shape[3]
    flat = activation.flatten(2).argmax(dim=2)  # (B, K, H, W) -> (B, K, H*W) -> (B, K)
    return torch.stack([flat // width, flat % width], dim=-1)  # (B, K, 2)


def peak_cells(activation: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The peak cell of chosen codes: activation (B, K, H, W), codes (B, n) -> (B, n, 2) as (h, w)."""
    return peak_locations(activation).gather(1, codes[..., None].expand(-1, -1, 2))


def class_contributions(head: ProtoQuantHead, presence: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """relu(W[c, k]) * p[k] for one class c per image: presence (B, K), classes (B,) -> (B, K).

    Summed over k it is that class's logit (METHOD.md "Explanations": local).
    """
    return head.effective_weight()[classes] * presence


@dataclass
class TopContributions:
    """Per image, the codes that contribute most to one class, best first, and where each fired."""

    classes: torch.Tensor  # (B,) the class explained
    codes: torch.Tensor  # (B, n) int64
    values: torch.Tensor  # (B, n) relu(W[c, k]) * p[k]
    cells: torch.Tensor  # (B, n, 2) peak cell (h, w) of each code's activation map

    @property
    def shown(self) -> torch.Tensor:
        """(B, n) bool: a positive contribution (a zero one explains nothing and is not shown)."""
        return self.values > 0


def top_contributions(head: ProtoQuantHead, activation: torch.Tensor, presence: torch.Tensor,
                      classes: torch.Tensor, top: int) -> TopContributions:
    """THE ranking of evidence used by predict, explain and the metrics: the `top` largest
    contributions to `classes` (B,) and their peak cells; ties keep the lower code first."""
    contributions = class_contributions(head, presence, classes)  # (B, K)
    n = min(top, contributions.shape[1])
    order = torch.sort(contributions, dim=1, descending=True, stable=True).indices[:, :n]  # (B, n)
    return TopContributions(classes=classes, codes=order, values=contributions.gather(1, order),
                            cells=peak_cells(activation, order))


def local_explanation_size(
    contributions: torch.Tensor, logits: torch.Tensor, rel_threshold: float = 1e-3
) -> torch.Tensor:
    """Per image, how many codes contribute more than rel_threshold * the predicted class's logit.

    contributions (B, C, K), logits (B, C) -> (B,) int64. A relative threshold of our own, not one
    of the published definitions: figures to compare with papers use local_size_per_class or
    local_size_per_image.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    predicted = logits.argmax(dim=1)  # (B,)
    to_predicted = contributions[rows, predicted]  # (B, C, K) -> (B, K)
    threshold = rel_threshold * logits[rows, predicted]  # (B,)
    return (to_predicted > threshold[:, None]).sum(dim=1)


CLASS_WEIGHT_THRESHOLD = 0.1  # the authors' calculate_local_size: a weight relu(W) > 0.1 counts
PIPNET_PRESENCE_THRESHOLD = 0.1  # PIP-Net: a code counts in an image when its presence is >= 0.1 ...
PIPNET_CONTRIBUTION_THRESHOLD = 1e-3  # ... and its contribution to the predicted class exceeds 1e-3


def local_size_per_class(head: ProtoQuantHead, threshold: float = CLASS_WEIGHT_THRESHOLD) -> torch.Tensor:
    """Per class, the number of weights relu(W) above `threshold` (removed codes count 0); -> (C,) int64.

    The per-class definition of local explanation size (the authors' calculate_local_size).
    """
    return (head.effective_weight() > threshold).sum(dim=1)


def local_size_per_image(head: ProtoQuantHead, presence: torch.Tensor, predicted: torch.Tensor, *,
                         presence_threshold: float = PIPNET_PRESENCE_THRESHOLD,
                         contribution_threshold: float = PIPNET_CONTRIBUTION_THRESHOLD) -> torch.Tensor:
    """Per image, the codes with presence >= presence_threshold whose contribution relu(W[c, k]) * p[k]
    to the predicted class c exceeds contribution_threshold (PIP-Net's definition); presence (B, K),
    predicted (B,) -> (B,) int64."""
    present = presence >= presence_threshold  # (B, K)
    contributing = class_contributions(head, presence, predicted) > contribution_threshold  # (B, K)
    return (present & contributing).sum(dim=1)


# --- pruning ---------------------------------------------------------------------------------------

@torch.no_grad()
def prune_top_k_per_class(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each class's k largest positive weights, set the rest to 0; (C, K) -> new (C, K).

    0 is dead for good: relu has zero gradient at 0 (torch's relu backward passes x > 0 only), and
    weight decay keeps 0 at 0, so fine-tuning after the cut trains only the kept weights.
    (METHOD.md "Pruning and editing": per-class top-k.) Ties at the k-th value keep the lower index.
    """
    positive = weight.clamp_min(0)  # relu(W), (C, K)
    top = positive.topk(min(k, weight.shape[1]), dim=1).indices  # (C, k)
    keep = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True) & (positive > 0)  # (C, K)
    return torch.where(keep, weight, torch.zeros_like(weight))


@torch.no_grad()
def keep_top_k_weights(head: ProtoQuantHead, k: int) -> None:
    """In place, the paper's interpretability/accuracy curve (METHOD.md "Pruning and editing"): each class
    keeps its k largest weights among the codes that exist, the rest become 0. No code leaves the head:
    every code still competes in the softmax over codes, so the kept codes' presence is unchanged and
    no retraining is needed to read the curve."""
    head.weight.masked_fill_(~head.code_mask[None, :], 0.0)  # removed codes must not take top-k slots
    head.weight.copy_(prune_top_k_per_class(head.weight, k))


@torch.no_grad()
def drop_unused_codes(head: ProtoQuantHead) -> list[int]:
    """In place, stage 2b's second step: remove the codes no class uses (out of the softmax over codes).

    Every remaining presence value renormalises, so the head's accuracy moves: this step only makes
    sense before fine-tuning (METHOD.md "Pruning and editing"). Returns the removed codes.
    """
    unused = (~codes_in_use(head) & head.code_mask).nonzero().flatten()
    if len(unused):
        head.remove_codes(unused)
    return unused.tolist()


def codes_in_use(head: ProtoQuantHead) -> torch.Tensor:
    """(K,) bool: codes that exist (code_mask) and carry a positive weight to at least one class."""
    return (head.effective_weight() > 0).any(dim=0)


# --- optional augmentation ---------------------------------------------------------------------------

def mixup(
    f: torch.Tensor, y_onehot: torch.Tensor, *, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-space mixup: lam ~ Beta(alpha, alpha), mix each sample with a random partner.

    f (B, H, W, D), y_onehot (B, C) -> (mixed f float32, mixed targets (B, C)). rng supplies lam and
    the partner permutation, so a seeded numpy Generator makes it reproducible.
    """
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(f.shape[0])).to(f.device)  # (B,)
    f = f.float()
    y = y_onehot.float()
    return lam * f + (1 - lam) * f[partner], lam * y + (1 - lam) * y[partner]


# --- storage -----------------------------------------------------------------------------------------

def save_head(path: str | Path, head: ProtoQuantHead, *, classes: list[str], meta: dict) -> None:
    """Save codes, weight, code_mask (and the projection) as safetensors; classes, tau, train_codes and meta as JSON."""
    if len(classes) != head.weight.shape[0]:
        raise ProtoquantError(f"saving head {path}: {len(classes)} class names for {head.weight.shape[0]} "
                              f"classes: pass the cache's class names")
    tensors = {"codes": head.codes, "weight": head.weight, "code_mask": head.code_mask}
    if head.projection is not None:
        tensors |= {"projection.weight": head.projection.weight, "projection.bias": head.projection.bias}
    fields = {"classes": list(classes), "tau": head.tau, "train_codes": head.train_codes, "meta": meta}
    write_artifact(path, tensors, kind="head", fields=fields)


def load_head(path: str | Path) -> tuple[ProtoQuantHead, list[str], dict]:
    """Load a head written by save_head -> (head on the CPU, class names, meta); bit-exact."""
    tensors, fields = read_artifact(path, kind="head")
    _require(tensors, ("codes", "weight", "code_mask"), "head", path)
    projection = None
    if "projection.weight" in tensors:
        _require(tensors, ("projection.bias",), "head", path)
        projection = (tensors["projection.weight"], tensors["projection.bias"])
    head = ProtoQuantHead(tensors["codes"], len(fields["classes"]), tau=fields["tau"],
                          train_codes=fields["train_codes"], projection=projection)
    head.load_state_dict({name: tensors[name] for name in head.state_dict()})
    return head, fields["classes"], fields.get("meta", {})


def save_probe(path: str | Path, probe: ProbeHead, *, classes: list[str], meta: dict) -> None:
    """Save the probe's weight (C, D) and bias (C,) as safetensors; classes and meta as JSON."""
    tensors = {"weight": probe.linear.weight, "bias": probe.linear.bias}
    write_artifact(path, tensors, kind="probe", fields={"classes": list(classes), "meta": meta})


def load_probe(path: str | Path) -> tuple[ProbeHead, list[str], dict]:
    """Load a probe written by save_probe -> (frozen probe in eval mode on the CPU, class names, meta)."""
    tensors, fields = read_artifact(path, kind="probe")
    _require(tensors, ("weight", "bias"), "probe", path)
    num_classes, dim = tensors["weight"].shape
    probe = ProbeHead(dim, num_classes)
    probe.linear.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
    return probe.eval().requires_grad_(False), fields["classes"], fields.get("meta", {})


def _require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], kind: str, path: str | Path) -> None:
    """Raise ProtoquantError when a saved artefact lacks one of the tensors it must hold."""
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ProtoquantError(f"{kind} {path} lacks tensor(s) {', '.join(missing)}: it is damaged or was not "
                              f"written by protoquant; rebuild it with `protoquant train CACHE ...`")


# --- the timm model's own classifier as the reference head (use_backbone_head) -----------------------

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
    """Rebuild the cache's backbone and wrap its classifier; refuse one that predicts other classes, and a grid
    that is not the model's final map (--layers other than final: its head reads forward_features)."""
    from pipeline.backbones import FINAL, load_backbone_for_cache

    backbone = load_backbone_for_cache(provenance, weights=weights, device=str(device))
    outputs = int(getattr(backbone.model, "num_classes", 0) or 0)
    if outputs != num_classes:
        raise ProtoquantError(f"--use-backbone-head: {provenance['backbone']} predicts {outputs} classes but the "
                              f"dataset has {num_classes}; train the linear probe instead (leave out --use-backbone-head)")
    if backbone.layers != (FINAL,):  # extract's default (--layers auto) is a stride 16+32 grid
        raise ProtoquantError(f"--use-backbone-head: the cache's grid is --layers {','.join(map(str, backbone.layers))}, "
                              "not the forward_features map the model's own head reads; extract with --layers final "
                              "for it, or train the linear probe (leave out --use-backbone-head)")
    return BackboneHead(backbone.model, backbone.layout).to(device)
