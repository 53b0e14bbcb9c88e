"""A sparse head by refitting W on cached presence scores: a non-negative elastic-net path.

Once the codes are fixed, stage B's presence p (N x K, METHOD.md stage B) no longer changes, and the
head is a multinomial logistic regression on it with W >= 0 and no bias. So instead of training W
with a penalty and hoping, we solve

    min_W  mean CE(p W^T, y) + lam * (l1_ratio * sum(W) + (1 - l1_ratio) / 2 * ||W||^2)   s.t. W >= 0

for a geometric series of penalties, strongest first, each solve warm-started from the previous one
(L-BFGS-B: on W >= 0 the L1 term is linear, so each solve is smooth with bounds). The strongest penalty is the one at
which W = 0 is optimal, so the path runs from the empty head to a dense one and gives the whole
accuracy-vs-size curve in seconds. A point is chosen by one stated rule: by default
(`choose_point_by_deviance`) the sparsest head whose validation cross-entropy is within one standard
error of the path's lowest.

Size is the authors' `calculate_local_size` (METHOD.md "Pruning and editing"): per class, the
number of weights relu(W) > 0.1, averaged over classes.

    PathSettings          how the path is laid out and how a point is chosen
    presence_matrix       (N, K) presence and (N,) labels of a feature source through a head
    presence_matrices     the same for several heads from one pass (the sweep)
    penalty_max           the weakest penalty at which W = 0 is optimal
    fit_nonnegative       one elastic-net solve (warm start)
    regularization_path   every point of the path, scored on validation
    choose_point_by_deviance  the default rule: validation cross-entropy, one standard error
    choose_point          the accuracy rule (tolerance or one standard error of top-1)
    refit_from_presence   all of it on a head's presence, in place: W := the chosen point
    apply_chosen_point    its second half, on a path already solved (pipeline/refits.py solves several at once)
    refit_bytes, refit_sample  the refit's memory, and the stratified share of rows that fits a budget
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize
from threadpoolctl import ThreadpoolController

from pipeline.errors import ProtoquantError

SIZE_THRESHOLD = 0.1  # the authors' calculate_local_size counts weights above this
MIN_REFIT_ROWS_PER_CLASS = 10  # a sampled refit keeps at least this many training rows of every class
ONE_THREAD_WORK = 50_000_000   # presence entries x classes: a smaller solve runs on one thread (_threads_for)


@dataclass(frozen=True)
class PathSettings:
    """Layout of the elastic-net path and the rule that picks its point."""

    points: int = 40              # penalties on the path, geometric from penalty_max down
    min_ratio: float = 1e-3       # weakest penalty / strongest
    l1_ratio: float = 0.99        # elastic-net mixing: 1 = the lasso. On W >= 0 the L1 alone keeps every head finite, and
                                  # a ridge share spreads weight over correlated codes (elastic net's grouping effect):
                                  # measured, 0.9 gave the same top-1 at up to twice the size, purity 0.44-0.51 (0.99: 0.66-0.79)
    iterations: int = 400         # at most this many quasi-Newton steps per point (warm-started)
    gtol: float = 1e-6            # a point's solve stops when the projected gradient's largest entry is below this
                                  # (or, more often, at scipy's ftol: fit_nonnegative)
    rule: str = "deviance"        # how the point is chosen: "deviance" or "accuracy" (choose_point)
    tolerance: float = 0.01       # rule "accuracy": within max(this, one standard error) of the best val top-1
    relax: bool = False           # refit each point's support with the ridge share only (undo the L1 shrinkage)


@dataclass
class PathPoint:
    """One solve of the path: its penalty, its head weights and how they score."""

    penalty: float
    weight: torch.Tensor          # (C, K) non-negative
    val_top1: float
    train_top1: float
    val_loss: float = math.nan     # mean validation cross-entropy (the deviance per image / 2) ...
    val_loss_se: float = math.nan  # ... and its standard error over the validation images

    @property
    def local_size(self) -> float:
        """Mean over classes of the weights > 0.1 (the authors' local size)."""
        return float((self.weight > SIZE_THRESHOLD).sum(dim=1).float().mean())

    @property
    def max_class_size(self) -> int:
        return int((self.weight > SIZE_THRESHOLD).sum(dim=1).max())

    @property
    def every_class_weighted(self) -> bool:
        """Whether every class has a weight > 0: a class without one can neither be predicted nor explained."""
        return bool((self.weight > 0).any(dim=1).all())

    @property
    def nonzero(self) -> int:
        return int((self.weight > 0).sum())

    @property
    def codes_in_use(self) -> int:
        return int((self.weight > 0).any(dim=0).sum())

    def summary(self) -> dict:
        """The point as JSON-able numbers (no weights)."""
        return {"penalty": self.penalty, "val_top1": self.val_top1, "train_top1": self.train_top1,
                "val_loss": self.val_loss, "val_loss_se": self.val_loss_se,
                "local_size": self.local_size, "max_class_size": self.max_class_size,
                "nonzero_weights": self.nonzero, "codes_in_use": self.codes_in_use}


@torch.no_grad()
def presence_matrix(head, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Presence p (N, K) float32 and labels (N,) int64 of every batch, on the CPU, in batch order.

    Memory: N * K * 4 bytes (100k images x 2000 codes = 800 MB).
    """
    return presence_matrices([head], batches, device=device)[0]


@torch.no_grad()
def presence_matrices(heads: list, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                      device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """presence_matrix of several heads from one pass over the batches (the sweep's heads of one seed): each
    batch goes through every head, head by head, so each head's presence is what it alone would give.
    Memory: heads x N x K x 4 bytes at once."""
    presence: list[list[torch.Tensor]] = [[] for _ in heads]
    labels = []
    for features, y in batches:
        f = features.to(device)
        labels.append(y.cpu())
        for i, head in enumerate(heads):
            presence[i].append(head.presence(f).float().cpu())  # (B, H, W, D) -> (B, K)
    if not labels:
        raise ProtoquantError("refitting the head needs training rows, and the training share is empty")
    y = torch.cat(labels).long()
    return [(torch.cat(p), y) for p in presence]


def _gradient(weight: torch.Tensor, presence: torch.Tensor, onehot: torch.Tensor, ridge: float) -> torch.Tensor:
    """d/dW of mean CE(p W^T, y) + ridge / 2 * ||W||^2; (C, K)."""
    probabilities = (presence @ weight.T).softmax(dim=1)  # (N, K) @ (K, C) -> (N, C)
    return (probabilities - onehot).T @ presence / presence.shape[0] + ridge * weight  # (C, N) @ (N, K)


def step_size(presence: torch.Tensor, ridge: float) -> float:
    """1 / L: the softmax CE's Hessian in the logits is at most 1/2, so L <= ||p||_2^2 / (2N) + ridge."""
    spectral = float(torch.linalg.matrix_norm(presence, ord=2))
    return 1.0 / (0.5 * spectral ** 2 / presence.shape[0] + ridge + 1e-12)


def penalty_max(presence: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The smallest lam with W = 0 optimal for l1_ratio = 1: the largest descent slope -grad at W = 0.

    With l1_ratio < 1 the L1 share is lam * l1_ratio, so the path divides this by l1_ratio.
    """
    onehot = F.one_hot(labels, num_classes).float()
    gradient = _gradient(torch.zeros(num_classes, presence.shape[1]), presence, onehot, 0.0)
    return max(float((-gradient).max()), 1e-12)


def fit_nonnegative(presence: torch.Tensor, labels: torch.Tensor, num_classes: int, *, penalty: float,
                    l1_ratio: float, start: torch.Tensor | None = None, iterations: int = 400,
                    gtol: float = 1e-6) -> torch.Tensor:
    """One elastic-net solve with W >= 0, warm-started from `start`; (C, K).

    On W >= 0 the L1 term is linear (sum(W)), so the problem is smooth with bound constraints and a
    quasi-Newton solver for bounds (L-BFGS-B) applies directly. Measured on the demo's and Fashion-MNIST's
    presence: an objective equal (within 2.4e-7, float32) or lower (by up to 2e-4) than 400 projected FISTA
    steps per point, the whole path 2.8-5.3x faster, the same or the neighbouring chosen point. Weights at
    the bound are exactly 0. Stops when the projected gradient's largest entry is below gtol, when a step
    lowers the objective by less than scipy's default relative ftol (2.2e-9; 1e-12 was 1.3-1.7x slower for
    the same chosen points), or after `iterations` quasi-Newton steps. The two big products run in float32,
    as presence is stored; the (N, C) softmax and W itself in float64, as the solver needs.
    """
    with _threads_for(presence.numel() * num_classes):
        return _lbfgsb(presence.float(), labels, num_classes, penalty * (1.0 - l1_ratio), penalty * l1_ratio,
                       start, iterations, gtol)


def _lbfgsb(presence, labels, num_classes, ridge, shrink, start, iterations, gtol) -> torch.Tensor:
    n, k = presence.shape
    onehot = F.one_hot(labels, num_classes).double()

    def objective_and_gradient(x: np.ndarray) -> tuple[float, np.ndarray]:
        weight = torch.from_numpy(x).view(num_classes, k)
        logits = (presence @ weight.T.float()).double()  # (N, K) @ (K, C)
        log_norm = logits.logsumexp(dim=1)
        loss = (log_norm - (logits * onehot).sum(dim=1)).mean() + ridge / 2 * (weight * weight).sum() + shrink * weight.sum()
        residual = (logits - log_norm[:, None]).exp() - onehot  # softmax - onehot, (N, C)
        gradient = (residual.float().T @ presence).double() / n + ridge * weight + shrink  # (C, N) @ (N, K)
        return float(loss), gradient.reshape(-1).numpy()

    size = num_classes * k
    x0 = np.zeros(size) if start is None else start.double().reshape(-1).numpy().copy()
    result = optimize.minimize(objective_and_gradient, x0, jac=True, method="L-BFGS-B",
                               bounds=optimize.Bounds(np.zeros(size), np.full(size, np.inf)),
                               options={"maxiter": iterations, "gtol": gtol})
    if not math.isfinite(float(result.fun)):
        raise ProtoquantError(f"the sparse refit's solve diverged (objective {result.fun}): the presence scores hold "
                              "values the head cannot have produced; re-train the run")
    weight = torch.from_numpy(result.x).view(num_classes, k).float()
    if not weight.numel():
        return weight
    # A solve stopped by ftol can leave weights a hair above the bound (1e-6 where the optimum is 0): a weight
    # below float32's resolution of the largest one adds nothing a logit can hold, and it would count as a code in use.
    weight[weight <= torch.finfo(torch.float32).eps * weight.max()] = 0.0
    return weight


def _loss(weight: torch.Tensor, presence: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy of the head on (presence, labels) and its standard error; NaN without images."""
    if len(labels) < 2:
        return math.nan, math.nan
    per_image = F.cross_entropy(presence @ weight.T, labels, reduction="none")
    return float(per_image.mean()), float(per_image.std() / math.sqrt(len(labels)))


def _top1(weight: torch.Tensor, presence: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return float(((presence @ weight.T).argmax(dim=1) == labels).float().mean())


def regularization_path(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                        num_classes: int, settings: PathSettings = PathSettings()) -> list[PathPoint]:
    """Solve the path from the strongest penalty (W = 0) to min_ratio of it; each point scored on val."""
    presence, labels = train
    if not bool(torch.isfinite(presence).all()) or not bool(torch.isfinite(val[0]).all()):
        raise ProtoquantError("the sparse refit got presence scores that are NaN or infinite (non-finite codes or "
                              "features): re-train the run, and check the cache with `protoquant info --verify`")
    if settings.points < 1 or not 0 < settings.min_ratio <= 1 or not 0 < settings.l1_ratio <= 1:
        raise ProtoquantError(f"sparsity path settings out of range: points {settings.points} (>= 1), min_ratio "
                              f"{settings.min_ratio} (in (0, 1]), l1_ratio {settings.l1_ratio} (in (0, 1])")
    strongest = penalty_max(presence, labels, num_classes) / settings.l1_ratio
    ratios = [settings.min_ratio ** (i / max(settings.points - 1, 1)) for i in range(settings.points)]
    weight, points = None, []
    with _threads_for(presence.numel() * num_classes):
        for ratio in ratios:
            penalty = strongest * ratio
            weight = fit_nonnegative(presence, labels, num_classes, penalty=penalty, l1_ratio=settings.l1_ratio,
                                     start=weight, iterations=settings.iterations, gtol=settings.gtol)
            head = _relaxed(presence, labels, num_classes, weight, penalty, settings) if settings.relax else weight
            loss, loss_se = _loss(head, *val)
            points.append(PathPoint(penalty=penalty, weight=head, val_top1=_top1(head, *val),
                                    train_top1=_top1(head, presence, labels), val_loss=loss, val_loss_se=loss_se))
    return points


def _relaxed(presence: torch.Tensor, labels: torch.Tensor, num_classes: int, weight: torch.Tensor, penalty: float,
             settings: PathSettings) -> torch.Tensor:
    """The point's support refit with its ridge share only: the L1 picks the codes, not their size."""
    support = weight > 0  # (C, K)
    ridge = max(penalty * (1.0 - settings.l1_ratio), 1e-4)
    onehot = F.one_hot(labels, num_classes).float()
    step = step_size(presence, ridge)
    refit = weight.clone()
    for _ in range(settings.iterations):
        refit = ((refit - step * _gradient(refit, presence, onehot, ridge)).clamp_min(0.0)) * support
    return refit


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """One thread for small solves, torch's and the BLAS's under L-BFGS-B: thousands of tiny products run
    many times slower on a busy machine's thread pool than on one core. The BLAS splits a dot product of
    more than 10,000 weights (classes x codes) over its threads, which rounds differently: on one thread
    a small solve gives the same numbers in any process (pipeline/refits.py)."""
    if work >= ONE_THREAD_WORK:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas().limit(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """The process's BLAS and OpenMP pools (numpy's, scipy's), found once."""
    return ThreadpoolController()


def selection_margin(best: float, n_val: int | None, tolerance: float) -> float:
    """How far below the best validation top-1 a sparser head may score: the larger of `tolerance` and one
    standard error of that accuracy on n_val images (glmnet's one-standard-error rule). On a small
    validation split a gap of one image is noise, and only the standard error says so."""
    if not n_val:
        return tolerance
    return max(tolerance, math.sqrt(max(best * (1.0 - best), 0.0) / n_val))


RULES = ("deviance", "accuracy")


def choose_point_by_deviance(points: list[PathPoint]) -> int:
    """Index of the sparsest point whose validation cross-entropy is within one standard error of the path's
    lowest (cv.glmnet's default for multinomial models: type.measure "deviance" with lambda.1se).

    The cross-entropy is continuous where top-1 moves in steps of one image, so on a small validation split
    the choice does not jump with one image (measured: the accuracy rule picked sizes 2.0-9.0 and test top-1
    0.83-0.92 from four demo heads, this rule 9.0-9.8 and 0.92-0.93). Only points that weigh every class are
    eligible while there are any (_sparsest_within). Ties go to the lower loss, then to the stronger penalty.
    Without validation scores (NaN), the weakest penalty: nothing can justify a cut.
    """
    losses = [p.val_loss for p in points]
    return _sparsest_within(points, losses, lambda best: points[best].val_loss_se)


def choose_point(points: list[PathPoint], tolerance: float, n_val: int | None = None) -> int:
    """Rule "accuracy": index of the sparsest point (smallest local size) whose val top-1 >= best val top-1 - margin, the
    margin being selection_margin (tolerance, or one standard error on n_val images when larger).

    Only points that weigh every class are eligible while there are any (_sparsest_within). Ties go to the
    higher validation top-1, then to the stronger penalty (earlier on the path).
    Without validation scores (NaN), the weakest penalty: nothing can justify a cut.
    """
    scores = [p.val_top1 for p in points]
    return _sparsest_within(points, [-s for s in scores],
                            lambda best: selection_margin(scores[best], n_val, tolerance))


def _sparsest_within(points: list[PathPoint], badness: list[float], slack: Callable[[int], float]) -> int:
    """Both rules: the sparsest point (smallest local size) whose badness (lower is better; NaN: unscored) is
    within slack(best point) of the best, among the points that weigh every class while there are any (on a
    tiny validation split the slack admits the empty head: every logit 0, every image given to class 0, as the
    quick demo's head once did). Ties go to the lower badness, then to the stronger penalty. Nothing scored:
    the weakest penalty, since nothing can justify a cut."""
    if not points:
        raise ProtoquantError("the sparsity path is empty")
    if all(math.isnan(v) for v in badness):
        return len(points) - 1
    best = min((i for i, v in enumerate(badness) if not math.isnan(v)), key=lambda i: badness[i])
    limit = badness[best] + slack(best)
    eligible = [i for i, v in enumerate(badness) if not math.isnan(v) and v <= limit + 1e-12]
    weighted = [i for i in eligible if points[i].every_class_weighted] or [best]
    return min(weighted, key=lambda i: (points[i].local_size, badness[i], i))


@torch.no_grad()
def refit_from_presence(head, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                        settings: PathSettings = PathSettings()) -> dict:
    """In place: W := the chosen point of the path on presence already computed (presence_matrix's (N, K) and
    labels of train and val; the codes stay). Returns the record (rule, chosen point, the whole curve) that
    train writes into metrics.json."""
    return apply_chosen_point(head, regularization_path(train, val, head.weight.shape[0], settings),
                              int(val[1].numel()), settings)


@torch.no_grad()
def apply_chosen_point(head, points: list[PathPoint], n_val: int, settings: PathSettings = PathSettings()) -> dict:
    """In place: W := the point of a solved path that settings.rule chooses (n_val: the validation images it
    was scored on); -> refit_from_presence's record."""
    if settings.rule not in RULES:
        raise ProtoquantError(f"sparsity rule {settings.rule!r} is not one of {', '.join(RULES)}")
    best = max((p.val_top1 for p in points if not math.isnan(p.val_top1)), default=float("nan"))
    if settings.rule == "deviance":
        chosen = choose_point_by_deviance(points)
        lowest = min((p for p in points if not math.isnan(p.val_loss)), key=lambda p: p.val_loss, default=None)
        margin = lowest.val_loss_se if lowest is not None else float("nan")
        rule = (f"the sparsest head (mean weights > {SIZE_THRESHOLD} per class) whose validation cross-entropy is "
                "within one standard error of the path's lowest (cv.glmnet's deviance + lambda.1se)")
    else:
        chosen = choose_point(points, settings.tolerance, n_val)
        margin = selection_margin(best, n_val, settings.tolerance) if best == best else settings.tolerance
        rule = (f"the sparsest head (mean weights > {SIZE_THRESHOLD} per class) within max({settings.tolerance}, "
                "one standard error) of the best validation top-1 on the path")
    head.weight.copy_((points[chosen].weight.to(head.weight.device) * head.code_mask).to(head.weight.dtype))
    return {"rule": rule, "rule_name": settings.rule,
            "tolerance": settings.tolerance, "margin": margin, "n_val": n_val, "l1_ratio": settings.l1_ratio, "relax": settings.relax,
            "chosen_index": chosen, "chosen": points[chosen].summary(), "curve": [p.summary() for p in points]}


def refit_bytes(rows: int, codes: int, classes: int) -> int:
    """What the refit holds for `rows` rows: their (rows, K) float32 presence and the solver's (rows, C)
    temporaries (float32 products, float64 copies: about 32 bytes per row and class)."""
    return rows * (codes * 4 + classes * 32)


def refit_sample(train_rows: np.ndarray, val_rows: np.ndarray, labels: np.ndarray, *, codes: int, classes: int,
                 budget: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The rows the path refit uses -> (train rows, val rows, share of all rows): every row when their
    refit_bytes fit `budget`, else the largest equal share of each class of train and of val that fits
    (at least MIN_REFIT_ROWS_PER_CLASS training rows and 1 validation row per class; seeded; rows kept in
    order). Raises when even those floors do not fit."""
    total = len(train_rows) + len(val_rows)
    if refit_bytes(total, codes, classes) <= budget:
        return train_rows, val_rows, 1.0
    train_sizes = _class_counts(train_rows, labels)
    val_sizes = _class_counts(val_rows, labels)

    def rows_at(share: float) -> int:
        return (_kept(train_sizes, share, MIN_REFIT_ROWS_PER_CLASS).sum() + _kept(val_sizes, share, 1).sum())

    floor = refit_bytes(int(rows_at(0.0)), codes, classes)
    if floor > budget:
        from pipeline.data import format_bytes

        raise ProtoquantError(f"--sparsity path refits W after stage B on the presence of {total} rows x {codes} codes, "
                              f"and even {MIN_REFIT_ROWS_PER_CLASS} rows per class need {format_bytes(floor)} of "
                              f"--refit-memory's {format_bytes(budget)}: raise --refit-memory, or pass --sparsity topk "
                              "(the paper's stage 2b, no presence matrix)")
    low, high = 0.0, 1.0  # rows_at grows with the share: the largest share whose rows fit, by bisection
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if refit_bytes(int(rows_at(middle)), codes, classes) <= budget else (low, middle)
    rng = np.random.default_rng([seed, 0x5EF17])
    train = _stratified(train_rows, labels, _kept(train_sizes, low, MIN_REFIT_ROWS_PER_CLASS), rng)
    val = _stratified(val_rows, labels, _kept(val_sizes, low, 1), rng)
    return train, val, (len(train) + len(val)) / total


def _class_counts(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows of each class present in rows, in ascending label order (as _stratified draws them)."""
    return np.unique(labels[np.asarray(rows, dtype=np.int64)], return_counts=True)[1]


def _kept(n: np.ndarray, share: float, floor: int) -> np.ndarray:
    """Rows kept per class at `share`: ceil(share x n_c), at least min(floor, n_c)."""
    return np.minimum(n, np.maximum(floor, np.ceil(share * n).astype(np.int64)))


def _stratified(rows: np.ndarray, labels: np.ndarray, kept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """kept[i] rows of the i-th class present in rows (ascending labels), drawn by `rng`; sorted."""
    rows = np.asarray(rows, dtype=np.int64)
    of_row = labels[rows]
    chosen = [rng.choice(rows[of_row == c], size=int(n), replace=False) for c, n in zip(np.unique(of_row), kept)]
    return np.sort(np.concatenate(chosen)) if chosen else rows[:0]
