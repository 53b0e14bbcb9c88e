"""protoquant's command line: parse options, call a stage, print the result. Nothing else lives here.

One output policy for every command: results go to stdout (`--json`: one JSON document and nothing
else), progress, hints and notes go to stderr, and any error is ONE `error: ...` line on stderr with
exit code 2 - bad options included, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.24 vendors its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_errors

from pipeline.errors import ProtoquantError

out_console = Console()             # results
console = Console(stderr=True)      # progress, hints, notes and errors

# The order of `protoquant --help`: the order of the pipeline.
PIPELINE_ORDER = ("demo", "make-birds", "shards", "extract", "info", "codebook", "train", "sweep", "evaluate",
                  "predict", "explain", "gallery", "prune")


def print_error(message: str) -> None:
    """The one way an error reaches the user: a single `error: ...` line on stderr (no markup, no wrapping)."""
    console.print(Text.assemble(("error:", "bold red"), " ", " ".join(str(message).split())), soft_wrap=True)


def _usage_error_line(err: click_errors.UsageError) -> str:
    where = f" (see: {err.ctx.command_path} --help)" if err.ctx is not None else ""
    return f"{err.format_message()}{where}"


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a preprocessing mismatch, a dropped classifier) as one `warning: ...` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


class _PipelineGroup(TyperGroup):
    """Commands in pipeline order; ProtoquantError and usage errors become one line and exit code 2."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = list(self.commands)
        return sorted(names, key=lambda name: PIPELINE_ORDER.index(name) if name in PIPELINE_ORDER else len(names))

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        warnings.showwarning = _warning_line
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ProtoquantError as err:
            print_error(str(err))
            sys.exit(2)
        except click_errors.NoArgsIsHelpError as err:
            from typer import rich_utils

            rich_utils.rich_format_error(err)
            sys.exit(err.exit_code)
        except click_errors.UsageError as err:
            print_error(_usage_error_line(err))
            sys.exit(2)
        except click_errors.ClickException as err:
            print_error(err.format_message())
            sys.exit(err.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_PipelineGroup,
    name="protoquant",
    help="Interpretable image classification with quantized prototypical parts (ProtoQuant).\n\n"
    "Run the frozen backbone ONCE ([bold]extract[/]), then build codebooks, train heads, evaluate and "
    "explain from the feature cache in seconds to minutes.\n\n"
    "Results go to stdout (--json: pure JSON), progress and notes to stderr; an error is one line and exit code 2.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


# ---- option checks: each rule lives here once ----

def number_rule(*, low: float | None = 0.0, low_open: bool = False, high: float | None = None,
                high_open: bool = True, hint: str = "") -> Callable:
    """A typer callback refusing NaN, infinities and values outside [low, high) (open or closed ends as asked)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    if high is None:
        rule = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        rule = f"in {left}{low:g}, {high:g}{right}"

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise typer.BadParameter(f"got {value:g}; pass a finite number {rule}{hint}")
        return value

    return check


def float_option(*names: str, help: str, **rule) -> typer.models.OptionInfo:
    """A float option checked by number_rule (finite, and >= 0 unless told otherwise)."""
    return typer.Option(*names, help=help, callback=number_rule(**rule))


def learning_rate(name: str, help: str) -> typer.models.OptionInfo:
    return float_option(name, help=help, hint=" (a negative rate climbs the loss)")


def check_device(text: str) -> str:
    """--device goes through the one device rule at parse time; the text itself (auto stays auto) is kept."""
    from pipeline.devices import resolve_device

    resolve_device(text)
    return text


def concrete_device(text: str) -> str:
    """The device string for stages that need a real one ('auto' resolved: cuda when present, else cpu)."""
    from pipeline.devices import resolve_device

    return str(resolve_device(text))


# ---- shared option types: one meaning, one help, one check everywhere ----
CacheArg = Annotated[Path, typer.Argument(help="Feature cache (a Zarr v3 store made by [bold]protoquant extract[/]).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same result.")]
RunArg = Annotated[Path, typer.Argument(help="A run directory made by [bold]protoquant train[/] (or prune).")]
RunCacheOpt = Annotated[Optional[Path], typer.Option("--cache", help="The run's feature cache (default: the path recorded in RUN/config.json; pass --cache when the cache has moved).")]
DeviceOpt = Annotated[str, typer.Option("--device", callback=check_device, help="auto (cuda when present, else cpu), cpu, cuda or cuda:N.")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="The backbone's local weights (.safetensors or .pth), when the cache was extracted with --weights.")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="The dataset the cache was extracted from, for the pixels (default: the path recorded in the cache).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output that protoquant wrote (anything else there is refused, never deleted).")]

# Options train and sweep share (one declaration, one help text; the defaults stay in each signature)
EpochsOpt = Annotated[int, typer.Option("--epochs", min=0, help="Epochs of the interpretable head (stage B).")]
ProbeEpochsOpt = Annotated[int, typer.Option("--probe-epochs", min=0, help="Epochs of the linear probe (the frozen reference classifier).")]
CodebookEpochsOpt = Annotated[int, typer.Option("--codebook-epochs", min=0, help="Epochs of codebook learning through the probe (stage A; 0 keeps the k-means codes).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per step.")]
ProbeLrOpt = Annotated[float, learning_rate("--probe-lr", "AdamW learning rate of the probe.")]
CodebookLrOpt = Annotated[float, learning_rate("--codebook-lr", "Adam learning rate of the codes in stage A (the paper's 5e-4).")]
HeadLrOpt = Annotated[float, learning_rate("--head-lr", "AdamW learning rate of the head's weights W (stage B).")]
CodesLrOpt = Annotated[float, learning_rate("--codes-lr", "Learning rate of the codes in stage B, relative to their RMS coordinate (so it suits any backbone).")]
AnchorOpt = Annotated[float, float_option("--anchor", hint=" (0 turns it off)", help="Stage B pull of every trainable code toward its best-matching patch in the batch, so codes stay near real patches (measured on the raw cosine, before the push: grounding 0.80-0.88 instead of 0.70, top-1 within noise; larger values cost accuracy; >= 0).")]
def _refit_memory(value: str) -> str:
    from pipeline.data import parse_memory

    if value not in ("auto", "all"):
        try:
            size = parse_memory(value)
        except Exception:
            size = 0
        if size <= 0:
            raise typer.BadParameter(f"got {value!r}; write a size above 0 (e.g. 8GB, 512MiB), auto or all") from None
    return value


def refit_note(sparsity: dict, settings_text: str) -> str | None:
    """The line train and sweep print when the sparse refit used a sample (training.refit_rows' record)."""
    if sparsity.get("refit_share", 1.0) >= 1.0:
        return None
    from pipeline.data import format_bytes

    return (f"note: the sparse refit used a stratified {sparsity['refit_share']:.1%} of the rows "
            f"({sparsity['refit_rows']} of {sparsity['of_rows']}) to stay within --refit-memory {settings_text} "
            f"({format_bytes(sparsity['refit_budget_bytes'])})")


ProjectionDimOpt = Annotated[int, typer.Option("--projection-dim", min=0, help="Stage B compares patches and codes through a learned linear map to this many dimensions (at most D; ProtoPNet's add-on layer on the frozen features; it starts as the training patches' top principal directions and trains with the codes, on the channels --projection-learns names). Default 128: then the pushed head (--ground) scores 0 to 2.4 points of top-1 below the raw-cosine one (three sets) instead of 8 to 19, and every prototype is a training patch. 0 = the raw cosine of the paper (pass --no-ground with it) (README, \"A grounded head\").")]
SweepProjectionDimOpt = Annotated[int, typer.Option("--projection-dim", min=0, help="As train's --projection-dim (default 128): stage B compares patches and codes through a learned linear map to this many dimensions (at most D; started from the patches' principal directions, trained at train's --projection-lr 1e-3 on train's --projection-learns fine channels); 0 = the raw cosine (pass --no-ground with it).")]
RefitMemoryOpt = Annotated[str, typer.Option("--refit-memory", callback=_refit_memory, help="RAM the sparse refit (--sparsity path) may hold: the presence of every training and validation row, rows x (4 K + 32 C) bytes. Above it the refit uses a stratified sample of the rows that fits (the same share of every class, at least 10 training rows each; metrics.json records the share). auto = half the RAM free when training starts; all = every row, or refuse before training.")]
L1RatioOpt = Annotated[float, float_option("--l1-ratio", low_open=True, high=1.0, high_open=False, help="The L1 share of the penalty along the sparse refit's path (--sparsity path), in (0, 1]. Near 1 the path acts as the non-negative lasso: of codes that carry the same evidence it keeps one, where a larger ridge share spreads weight over all of them (measured: 0.9 gave the same top-1 with up to twice the codes per class and purity 0.44-0.51 instead of 0.66-0.79); the 1% ridge makes each solve's optimum unique (the lasso's is not when codes are collinear).")]
WeightDecayOpt = Annotated[float, float_option("--weight-decay", help="AdamW weight decay of the probe and of W (>= 0).")]
LabelSmoothingOpt = Annotated[float, float_option("--label-smoothing", high=1.0, hint=" (0 turns it off)", help="Label smoothing of every cross-entropy, in [0, 1).")]
TrainCodesOpt = Annotated[bool, typer.Option("--train-codes/--freeze-codes", help="Stage B trains the codes (and the projection) too, the paper's default and more accurate, or keeps the stage A codes and the projection's start; the push (--ground, on by default) then still replaces the codes by training patches (see grounding in metrics.json).")]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Any timm model name, e.g. convnext_tiny, resnet50, vit_small_patch16_224, tf_efficientnet_lite0.")]


def print_json(value, *, indent: int | None = None) -> None:
    """`--json`: one JSON document on stdout (NaN written as null, never as the invalid `NaN`)."""
    print(json.dumps(_json_clean(value), indent=indent, default=str))


def _json_clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    return value


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0

# ---- commands are registered below, one block per stage ----

# ---- demo: the whole pipeline, offline ----

@app.command(rich_help_panel="Start here")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for everything the demo makes (re-running skips finished steps).")] = Path("demo-out"),
    quick: Annotated[bool, typer.Option("--quick", help="A small version (under a minute): 4 classes of 40 images, K = 64, train's defaults.")] = False,
) -> None:
    """Run the whole pipeline offline on generated birds with real pretrained weights, and write a report.

    make-birds -> extract (tf_efficientnet_lite0, built-in ImageNet weights) -> codebook -> train (the
    default head, grounded, and the raw-cosine variant: --projection-dim 0 --no-ground) -> evaluate both (accuracy,
    probe accuracy, purity, local explanation size, evidence on defining parts, grounding) -> per-class
    top-k curve -> gallery -> explanations -> OUT/index.html. Each step is skipped when its output is complete, so a
    second run takes seconds: the backbone runs once.

    Example: protoquant demo --out demo-out && xdg-open demo-out/index.html
    """
    from stages.demo import demo as run_demo

    result = run_demo(out, quick=quick, say=console.print, progress=True)
    evaluation = result.figures["evaluation"]
    purity = result.figures["interpretability"].get("purity", {})
    skipped = f" (skipped: {', '.join(result.skipped_steps)})" if result.skipped_steps else ""
    console.print(f"\n[bold green]done[/] in {result.seconds:.0f} s{skipped}", highlight=False)
    out_console.print(f"ProtoQuant test top-1 {evaluation['top1']:.3f} (linear probe {evaluation['probe_top1']:.3f}), "
                      f"{evaluation['codes_used']} codes in use, local explanation size {evaluation['local_size']:.1f}"
                      + (f", purity {purity['mean']:.3f}" if purity.get("mean") is not None else ""), highlight=False)
    raw = result.figures["raw"]
    cosines = [figures["interpretability"].get("grounding", {}).get("mean_cosine") for figures in (result.figures, raw)]
    out_console.print(f"raw-cosine variant (--projection-dim 0 --no-ground): test top-1 {raw['evaluation']['top1']:.3f}"
                      + (f"; grounding {cosines[0]:.3f} (default) against {cosines[1]:.3f}" if None not in cosines else "")
                      + " (the report compares them)", highlight=False)
    out_console.print(f"report: {result.report.resolve()}", highlight=False, soft_wrap=True)


# ---- stage 2: codebook ----

@app.command(rich_help_panel="Stages")
def codebook(
    cache: CacheArg,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of codes (prototypical parts). Small data: 128-512; CUB-200: about 2000.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The codebook file to write (safetensors + JSON metadata).")],
    sample: Annotated[int, typer.Option("--sample", min=1, help="At most this many patch vectors go into k-means, spread evenly over classes and images.")] = 100_000,
    iters: Annotated[int, typer.Option("--iters", min=1, help="k-means iterations.")] = 20,
    seed: SeedOpt = 0,
    init: Annotated[str, typer.Option("--init", help="kmeans (spherical FAISS k-means: codes start on the data) or random (the paper's orthogonal init, for comparison).")] = "kmeans",
    backend: Annotated[str, typer.Option("--backend", help="auto (FAISS when installed, GPU when faiss-gpu sees one; else torch), faiss or torch.")] = "auto",
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Build the initial codebook: spherical k-means on a sample of the cache's TRAINING patch embeddings.

    Reads CACHE (train split only). Writes CODEBOOK: codes (K x D, each scaled to the mean norm of the patches it stands for) plus the cache fingerprint, k, sample size, seed, objective (mean cosine to the nearest code) and time. The same seed gives the same codebook.

    Before: [bold]protoquant extract[/]. Next: [bold]protoquant train CACHE --codebook CODEBOOK --out RUN[/].

    Example: protoquant codebook birds.zarr -k 512 --out codebook.safetensors
    """
    from stages.codebook import CodebookSettings, build_codebook

    settings = CodebookSettings(k=k, sample=sample, iters=iters, seed=seed, init=init, backend=backend,
                                device=concrete_device(device))
    result = build_codebook(cache, out, settings)
    if json_out:
        print_json({"path": str(result.path), "k": result.k, "dim": result.dim, "sample": result.sample,
                    "objective": result.objective, "backend": result.backend, "seconds": result.seconds})
        return
    out_console.print(f"{result.k} codes x {result.dim} dims from {result.sample:,} patches ({result.backend}, "
                      f"{result.seconds:.1f} s); mean cosine to the nearest code {result.objective:.3f} -> {result.path}",
                      highlight=False, soft_wrap=True)
    console.print(f"Next: protoquant train {cache} --codebook {result.path} --out RUN", highlight=False, soft_wrap=True)


# ---- stage 3: train ----

# TrainSettings fields whose option has another name on the command line.
_SETTING_TO_OPTION = {"use_views": "views"}


def replay_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """`train --config RUN/config.json`: the recorded run becomes the defaults; explicit options still win."""
    if value is None or ctx.resilient_parsing:
        return value
    known = {param.name for param in ctx.command.params}
    recorded = {name: value for name, value in recorded_train_options(value).items() if name in known}
    ctx.default_map = {**(ctx.default_map or {}), **recorded}
    return value


def recorded_train_options(path: Path) -> dict:
    """The options of the `protoquant train` run recorded in PATH (a run's config.json, or the run directory)."""
    from pipeline.io import read_json

    path = path / "config.json" if path.is_dir() else path
    config = read_json(path, "--config")
    settings = config.get("settings")
    if config.get("command") != "train" or not isinstance(settings, dict):
        raise ProtoquantError(f"--config {path}: not the config.json of a `protoquant train` run (it records no "
                              "train settings); pass RUN/config.json of a trained run")
    from pipeline.training import with_legacy_settings

    options = {_SETTING_TO_OPTION.get(name, name): value for name, value in with_legacy_settings(settings).items()}
    options["cache"] = (config.get("cache") or {}).get("path")
    options["codebook"] = (config.get("codebook") or {}).get("path")
    return {name: value for name, value in options.items() if value is not None}


def _one_of(module: str, name: str) -> Callable[[str], str]:
    """An option callback: the value must be one of `module.name` (a tuple of names, imported only when the
    option is parsed, so start-up stays light)."""
    def check(value: str) -> str:
        choices = getattr(importlib.import_module(module), name)
        if value not in choices:
            listed = " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
            raise typer.BadParameter(f"got {value!r}; choose {listed}")
        return value
    return check


@app.command(rich_help_panel="Stages")
def train(
    cache: CacheArg,
    codebook: Annotated[Path, typer.Option("--codebook", "-c", help="Initial codebook made by [bold]protoquant codebook[/] from this cache.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write (written beside it, renamed when done).")],
    config: Annotated[Optional[Path], typer.Option("--config", is_eager=True, callback=replay_config, help="Replay a run: RUN/config.json (or RUN) supplies CACHE, --codebook and every training option as defaults; options given here override them. --out is always yours to give.")] = None,
    epochs: EpochsOpt = 40,
    probe_epochs: ProbeEpochsOpt = 30,
    codebook_epochs: CodebookEpochsOpt = 10,
    batch_size: BatchSizeOpt = 64,
    probe_lr: ProbeLrOpt = 1e-3,
    codebook_lr: CodebookLrOpt = 5e-4,
    head_lr: HeadLrOpt = 5e-3,
    codes_lr: CodesLrOpt = 0.1,
    weight_decay: WeightDecayOpt = 1e-4,
    warmup_epochs: Annotated[float, float_option("--warmup-epochs", help="Linear warm-up before the cosine decay, in epochs (every phase; >= 0).")] = 1.0,
    label_smoothing: LabelSmoothingOpt = 0.1,
    dict_weight: Annotated[float, float_option("--dict-weight", help="Weight of the dictionary MSE that pulls codes onto the patches they replace (stage A; >= 0).")] = 1.0,
    tau: Annotated[float, float_option("--tau", low_open=True, hint=" (e.g. 0.1; smaller is closer to hard assignment)", help="Temperature of the softmax over codes (stage B; > 0).")] = 0.1,
    train_codes: TrainCodesOpt = True,
    l1: Annotated[float, float_option("--l1", hint=" (0 turns it off)", help="L1 penalty on relu(W), per weight (0 = off).")] = 2e-3,
    anchor: AnchorOpt = 1.0,
    projection_dim: ProjectionDimOpt = 128,
    projection_lr: Annotated[float, learning_rate("--projection-lr", help="Learning rate of the projection (AdamW; >= 0; 0 keeps the principal directions).")] = 1e-3,
    projection_learns: Annotated[str, typer.Option("--projection-learns", callback=_one_of("pipeline.training", "PROJECTION_LEARNS"), help="Which cached channels the projection learns on: fine = those of the maps at the grid's own resolution, while a coarser map's channels (upsampled, each value spanning a block of cells) keep their principal directions; all = every channel. Measured on make-birds, fine keeps the top evidence on the defining parts (part box 0.81 against 0.73) at the same top-1 (README, \"A grounded head\"). A cache of one map learns on all either way.")] = "fine",
    ground: Annotated[bool, typer.Option("--ground/--no-ground", help="After stage B, replace every code by its nearest training patch (ProtoPNet's push), so each prototype IS a training patch (grounding 1.0); W is then refit. On by default: with the projection (--projection-dim 128) the grounded head scored 0 to 2.4 points of top-1 below the raw-cosine one (three sets); on the raw cosine (--projection-dim 0) 8 to 19 points on make-birds (README, \"A grounded head\").")] = True,
    sparsity: Annotated[str, typer.Option("--sparsity", callback=_one_of("pipeline.training", "SPARSITY_METHODS"), help="How the head becomes sparse: path = refit W on the cached presence along a non-negative elastic-net path and keep the head --sparsity-rule picks (default: the sparsest within one standard error of the lowest validation cross-entropy); topk = the paper's stage 2b (each class keeps --sparsity-k weights, unused codes removed, W fine-tuned); none = the dense stage B head.")] = "path",
    sparsity_rule: Annotated[str, typer.Option("--sparsity-rule", callback=_one_of("pipeline.sparsity", "RULES"), help="--sparsity path: how the head is picked from the path. deviance = the sparsest head whose validation cross-entropy is within one standard error of the lowest (cv.glmnet's default; stable on small validation splits); accuracy = the sparsest within max(--sparsity-tolerance, one standard error) of the best validation top-1.")] = "deviance",
    path_l1_ratio: L1RatioOpt = 0.99,
    refit_memory: RefitMemoryOpt = "auto",
    sparsity_tolerance: Annotated[float, float_option("--sparsity-tolerance", high=1.0, help="--sparsity path --sparsity-rule accuracy: validation top-1 the chosen head may give up against the path's best, in [0, 1).")] = 0.01,
    sparsity_k: Annotated[int, typer.Option("--sparsity-k", min=1, help="--sparsity topk: weights kept per class.")] = 5,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="Epochs of W-only fine-tuning after a topk cut, or after the push with --sparsity none.")] = 20,
    sweep_sparsity: Annotated[bool, typer.Option("--sweep-sparsity", help="Also print the whole accuracy-vs-size curve of the path (always recorded in RUN/metrics.json and plotted in RUN/sparsity.svg).")] = False,
    mixup: Annotated[float, float_option("--mixup", hint=" (0 turns it off)", help="Feature-space mixup Beta(a, a) for probe and head (0 = off).")] = 0.0,
    val_fraction: Annotated[float, float_option("--val-fraction", low_open=True, high=1.0, hint=": the held-out share picks each phase's best epoch, so it cannot be empty (e.g. 0.1)", help="Share of each class's training images held out to pick the best epoch, in (0, 1) (seeded; test is never used).")] = 0.1,
    seed: SeedOpt = 0,
    max_memory: Annotated[str, typer.Option("--max-memory", help="RAM budget for the training split, e.g. 2GB; above it the split is streamed chunk by chunk (0 = always stream; auto = half the free RAM).")] = "auto",
    views: Annotated[bool, typer.Option("--views/--no-views", help="Use the cache's augmented views (one drawn per image and epoch) when it holds some.")] = True,
    use_backbone_head: Annotated[bool, typer.Option("--use-backbone-head", help="Use the timm model's own classifier as the reference instead of a probe (only when it predicts exactly the dataset's classes; CNN backbones).")] = False,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped run of the same command from its last finished epoch (without it, a stopped run's checkpoint is discarded).")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a ProtoQuant head from the feature cache alone: probe, codebook (stage A), interpretable head (stage B), then the sparse refit of W.

    Stage B trains the codes with an anchor that keeps them near real patches (--anchor); W is then refit along a non-negative elastic-net path and the sparsest head within one standard error of the lowest validation cross-entropy is kept (--sparsity, --sparsity-rule; the curve is RUN/sparsity.svg, --sweep-sparsity prints it). Before that, the push (--ground, the default) makes every code exactly a training patch as the head sees it: codes and patches meet through a learned 128-dimensional projection (--projection-dim), so the grounded head scores 0 to 2.4 points of top-1 below the raw-cosine one (three sets); on the raw cosine (--projection-dim 0 --ground) it costs 8 to 19 (README, "A grounded head").

    Reads CACHE (train split; a seeded validation share picks each phase's best epoch) and CODEBOOK. Writes RUN: head.safetensors (codes, W, tau, class names), probe.safetensors, config.json (every option, the cache fingerprint, versions), metrics.json and log.jsonl (one line per epoch). Interrupted? Add --resume. Under [bold]torchrun[/] each process trains on its own share of every epoch (DDP).

    Before: [bold]protoquant codebook[/]. Next: [bold]protoquant evaluate RUN[/], [bold]protoquant predict RUN IMAGE...[/], [bold]protoquant prune RUN --out RUN2[/].

    Example: protoquant train birds.zarr --codebook codebook.safetensors --out run/
    """
    from stages.train import TrainSettings, train as run_train

    settings = TrainSettings(
        epochs=epochs, probe_epochs=probe_epochs, codebook_epochs=codebook_epochs, batch_size=batch_size,
        probe_lr=probe_lr, codebook_lr=codebook_lr, head_lr=head_lr, codes_lr=codes_lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, dict_weight=dict_weight, tau=tau,
        train_codes=train_codes, l1=l1, anchor=anchor, projection_dim=projection_dim, projection_lr=projection_lr, projection_learns=projection_learns, mixup=mixup, val_fraction=val_fraction, seed=seed, max_memory=max_memory,
        use_views=views, use_backbone_head=use_backbone_head, device=device, ground=ground, sparsity=sparsity,
        sparsity_rule=sparsity_rule, sparsity_tolerance=sparsity_tolerance, sparsity_k=sparsity_k, finetune_epochs=finetune_epochs,
        path_l1_ratio=path_l1_ratio, refit_memory=refit_memory,
    )
    if ground and not projection_dim and is_rank_zero():
        console.print("note: the push (--ground) on the raw cosine cost 8 to 19 points of top-1 on make-birds; "
                      "the default projection (--projection-dim 128) brings that to 0 to 2.4; --no-ground keeps the trained "
                      "codes (README, \"A grounded head\")", highlight=False,
                      soft_wrap=True)
    result = run_train(cache, codebook, out, settings, resume=resume, overwrite=overwrite, weights=weights,
                       progress=not json_out)
    if not is_rank_zero():
        return
    if getattr(result, "discarded_checkpoint", False):
        console.print(f"note: the stopped run's checkpoint for {out} was discarded and training started over "
                      "(add --resume to continue a stopped run instead)", highlight=False, soft_wrap=True)
    if json_out:
        print_json({"path": str(result.path), "resumed": result.resumed, **result.metrics})
        return
    if sweep_sparsity:
        _print_sparsity_curve(result.metrics["sparsity"], result.path)
    val = result.metrics["val_top1"]
    size, grounding = result.metrics["sparsity"]["local_size"], result.metrics["grounding"]
    out_console.print(f"validation top-1: probe {val['probe']:.3f}, quantized probe {val['quantized_probe']:.3f}, "
                      f"ProtoQuant head {val['head']:.3f}; {result.metrics['codes_in_use']} of {result.metrics['k']} "
                      f"codes in use; {size['mean']:.1f} weights > 0.1 per class (max {size['max']}); grounding "
                      f"{grounding['mean_max_cosine_in_use']:.3f}; {result.metrics['seconds']:.0f} s -> {result.path}",
                      highlight=False, soft_wrap=True)
    note = refit_note(result.metrics["sparsity"], refit_memory)
    if note:
        console.print(note, highlight=False, soft_wrap=True)
    console.print(f"Next: protoquant evaluate {result.path}", highlight=False, soft_wrap=True)


# ---- sweep: many heads per pass ----

def _number_list(kind: type, rule: Callable | None = None) -> Callable:
    """A typer callback: '0,1,2' -> (0, 1, 2); each value must parse as `kind` and pass `rule`."""

    def parse(text: str) -> tuple:
        values = []
        for part in text.split(","):
            try:
                values.append(kind(part.strip()))
            except ValueError:
                raise typer.BadParameter(f"{part.strip()!r} in {text!r} is not {'an integer' if kind is int else 'a number'}: write a "
                                         f"comma-separated list such as {'0,1,2' if kind is int else '0,0.001'}") from None
            if rule is not None:
                rule(values[-1])
        return tuple(values)

    return parse


@app.command(rich_help_panel="Stages")
def sweep(
    cache: CacheArg,
    codebook: Annotated[list[Path], typer.Option("--codebook", "-c", help="A codebook made from this cache; pass it several times to compare codebooks (each fixes a K).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The sweep folder to write: one run directory per head, index.html, sweep.json.")],
    seeds: Annotated[str, typer.Option("--seeds", callback=_number_list(int), help="Comma-separated seeds, e.g. 0,1,2 (each seed: its own validation split, probe and initialisation).")] = "0",
    l1: Annotated[str, typer.Option("--l1", callback=_number_list(float, number_rule()), help="Comma-separated L1 penalties on relu(W), e.g. 0,0.002 (train's default: 0.002).")] = "0.002",
    tau: Annotated[str, typer.Option("--tau", callback=_number_list(float, number_rule(low_open=True)), help="Comma-separated temperatures of the softmax over codes, e.g. 0.05,0.1.")] = "0.1",
    epochs: EpochsOpt = 40,
    probe_epochs: ProbeEpochsOpt = 30,
    codebook_epochs: CodebookEpochsOpt = 10,
    batch_size: BatchSizeOpt = 64,
    probe_lr: ProbeLrOpt = 1e-3,
    codebook_lr: CodebookLrOpt = 5e-4,
    head_lr: HeadLrOpt = 5e-3,
    codes_lr: CodesLrOpt = 0.1,
    anchor: AnchorOpt = 1.0,
    projection_dim: SweepProjectionDimOpt = 128,
    ground: Annotated[bool, typer.Option("--ground/--no-ground", help="As train's --ground (on by default): every head's codes are pushed onto their nearest training patches before the path refit, one pass over the training split per head.")] = True,
    weight_decay: WeightDecayOpt = 1e-4,
    label_smoothing: LabelSmoothingOpt = 0.1,
    train_codes: TrainCodesOpt = True,
    path_l1_ratio: L1RatioOpt = 0.99,
    refit_memory: RefitMemoryOpt = "auto",
    val_fraction: Annotated[float, float_option("--val-fraction", low_open=True, high=1.0, hint=" (e.g. 0.1)", help="Share of each class's training images held out to pick the best epoch, in (0, 1).")] = 0.1,
    max_memory: Annotated[str, typer.Option("--max-memory", help="RAM budget for the training split, e.g. 2GB; above it the split is streamed, each chunk read once for all heads (0 = always stream).")] = "auto",
    views: Annotated[bool, typer.Option("--views/--no-views", help="Use the cache's augmented views when it holds some.")] = True,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped sweep of the same command from its last finished epoch.")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train many heads in ONE pass over the cache per epoch: every codebook x seed x --l1 x --tau.

    Each block of the cache is read once and every head steps on it; heads of one seed share the probe, heads of one seed and codebook share stage A. Writes SWEEP/<name>/ (ordinary run directories: evaluate, gallery, explain and prune take them), SWEEP/index.html (table and accuracy-vs-size plot) and SWEEP/sweep.json. Every option not listed here is train's default. A seed's path refits run side by side, one process per core (PROTOQUANT_REFIT_WORKERS=1: all in this process; the heads are the same). Interrupted? Add --resume.

    Before: [bold]protoquant codebook[/] (one per K). Next: [bold]protoquant evaluate SWEEP/<name>[/].

    Example: protoquant sweep birds.zarr -c k128.safetensors -c k256.safetensors --seeds 0,1 --l1 0,0.002 --out sweep/
    """
    from stages.sweep import SweepGrid, sweep as run_sweep
    from pipeline.training import TrainSettings

    settings = TrainSettings(
        epochs=epochs, probe_epochs=probe_epochs, codebook_epochs=codebook_epochs, batch_size=batch_size,
        probe_lr=probe_lr, codebook_lr=codebook_lr, head_lr=head_lr, codes_lr=codes_lr, weight_decay=weight_decay,
        anchor=anchor, projection_dim=projection_dim, ground=ground, label_smoothing=label_smoothing, train_codes=train_codes, val_fraction=val_fraction,
        max_memory=max_memory, use_views=views, device=device, path_l1_ratio=path_l1_ratio,
        refit_memory=refit_memory)
    say = None if json_out else (lambda line: console.print(line, highlight=False))
    result = run_sweep(cache, codebook, out, settings, SweepGrid(seeds=seeds, l1=l1, tau=tau), resume=resume,
                       overwrite=overwrite, progress=say)
    if json_out:
        print_json({"path": str(result.path), "resumed": result.resumed, "seconds": result.seconds, "heads": result.rows})
        return
    _print_sweep(result)
    from pipeline.io import read_json

    for row in result.rows:  # a seed's heads share one sample (sized for all of them): one line per head that used one
        note = refit_note(read_json(result.path / row["name"] / "metrics.json", "").get("sparsity", {}), refit_memory)
        if note:
            console.print(f"{row['name']}: {note}", highlight=False, soft_wrap=True)
    console.print(f"Next: open {result.index}, or protoquant evaluate {result.path / result.rows[0]['name']}",
                  highlight=False, soft_wrap=True)


def _print_sweep(result) -> None:
    from rich.table import Table

    table = Table(title=Text(f"{len(result.rows)} heads in {result.seconds:.0f} s -> {result.path}"))
    for name in ("run", "top-1", "probe", "local size", "codes", "train s"):
        table.add_column(name, justify="left" if name == "run" else "right")
    for row in result.rows:
        table.add_row(Text(row["name"]), f"{row['top1']:.3f}", f"{row['probe_top1']:.3f}", f"{row['local_size']:.1f}",
                      str(row["codes_in_use"]), f"{row['train_seconds']:.1f}")
    out_console.print(table)


def _print_sparsity_curve(sparsity: dict, run: Path) -> None:
    """The elastic-net path as a table on stdout, the chosen point marked."""
    curve = sparsity.get("curve")
    if not curve:
        console.print(f"note: --sweep-sparsity: this run used --sparsity {sparsity.get('method')}, which has no path "
                      "to print (use --sparsity path)", highlight=False, soft_wrap=True)
        return
    out_console.print("penalty     val top-1  val loss (se)    weights>0.1/class  max/class  codes", highlight=False,
                      soft_wrap=True)
    for i, p in enumerate(curve):
        mark = "  <- chosen" if i == sparsity.get("chosen_index") else ""
        loss = f"{p.get('val_loss', float('nan')):.3f} ({p.get('val_loss_se', float('nan')):.3f})"
        out_console.print(f"{p['penalty']:<11.4g} {p['val_top1']:<10.3f} {loss:<16} {p['local_size']:<18.1f} "
                          f"{p['max_class_size']:<10d} {p['codes_in_use']}{mark}", highlight=False, soft_wrap=True)
    out_console.print(f"rule: {sparsity['rule']}; plot: {run / 'sparsity.svg'}", highlight=False, soft_wrap=True)


# ---- evaluate a run ----

@app.command(rich_help_panel="Use a run")
def evaluate(
    run: RunArg,
    cache: RunCacheOpt = None,
    split: Annotated[str, typer.Option("--split", help="Which split of the cache to score.")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    data: Annotated[Optional[Path], typer.Option("--data", help="The dataset's images: adds grounding, purity and purity_strict (need part keypoints), evidence_on_defining_parts (needs class_attributes.txt), misalignment, stability and deletion.")] = None,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="With --data: test images run through the backbone for misalignment, stability and deletion.")] = 32,
    json_out: JsonOpt = False,
) -> None:
    """Score a run on a split of its cache: top-1, top-5, per-class accuracy, and what interpretability costs.

    Reads RUN and CACHE. Prints the probe's top-1 on the same split beside the head's, codes in use, the local explanation size under both published definitions (local_size_weights_above_0_1: per class, weights relu(W) > 0.1, the ProtoQuant authors'; local_size_pipnet: per image, codes with presence >= 0.1 contributing > 1e-3 to the predicted class) and the sparsity of W. --json prints one object (top1, top5, probe_top1, n, codes_used, local_size_weights_above_0_1, local_size_pipnet, per_class, ...; fractions, not percentages). With --data DATA it adds grounding, purity (the PIP-Net protocol) and purity_strict, evidence_on_defining_parts (when the dataset says which parts define each class), misalignment, stability and deletion. Writes nothing (the grounding is cached in RUN).

    Before: [bold]protoquant train[/]. Next: [bold]protoquant prune RUN --out RUN2[/] or [bold]protoquant predict RUN IMAGE...[/].

    Example: protoquant evaluate run/ --split test --json
    """
    from stages.evaluate import evaluate_with_metrics

    evaluation, metrics = evaluate_with_metrics(run, data=data, max_images=max_images, cache=cache, split=split,
                                                batch_size=batch_size, device=device, weights=weights)
    if json_out:
        print_json({**evaluation.to_json(), **metrics})
        return
    _print_evaluation(evaluation, run)
    for key, value in metrics.items():
        out_console.print(Text.assemble((key, "bold"), f": {json.dumps(_json_clean(value), default=float)}"),
                          soft_wrap=True)


def _print_evaluation(result, run_path: Path) -> None:
    """Rich tables: the summary, then per-class accuracy."""
    from rich.table import Table

    summary = Table(title=Text(f"{run_path} on the {result.split} split ({result.n} images)"))
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    rows = [
        ("ProtoQuant top-1", f"{result.top1:.4f}"), ("ProtoQuant top-5", f"{result.top5:.4f}"),
        ("probe top-1 (reference)", f"{result.probe_top1:.4f}"),
        ("probe minus ProtoQuant", f"{result.probe_top1 - result.top1:+.4f}"),
        ("codes in use", f"{result.codes_used} / {result.codes_total}"),
        ("local size: weights > 0.1 per class", f"{result.local_size_weights_above_0_1:.2f} codes"),
        ("local size: PIP-Net, per image", f"{result.local_size_pipnet:.2f} codes"),
        ("sparsity of W", f"{result.w_sparsity:.3f}"),
    ]
    if result.skipped:
        rows.append(("skipped images (not scored)", str(result.skipped)))
    for name, value in rows:
        summary.add_row(name, value)
    out_console.print(summary)
    per_class = Table(title="per-class top-1")
    per_class.add_column("class")
    per_class.add_column("top-1", justify="right")
    for name, value in result.per_class.items():
        per_class.add_row(Text(name), f"{value:.3f}")
    out_console.print(per_class)


# ---- predict new images ----

@app.command(rich_help_panel="Use a run")
def predict(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads).")],
    cache: Annotated[Optional[Path], typer.Option("--cache", help="The run's feature cache, checked against the run (default: the recorded path when it exists; else the backbone recorded in RUN/config.json is used as is).")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Top contributing codes shown per image.")] = 5,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Classify image files end to end: the cache's backbone (same weights and preprocessing), then the head.

    Reads RUN (and the backbone named in the cache's provenance). For each image prints the class, its probability, and the codes that contributed most to it with the grid cell where each fired and that cell's receptive box in the image's own pixels (x, y, width, height). --json prints a list with one object per image. Writes nothing.

    Before: [bold]protoquant train[/]. See also: [bold]protoquant explain[/] for pages with the training patches of each code.

    Example: protoquant predict run/ bird1.jpg bird2.png --top 3
    """
    from stages.predict import predict as run_predict

    predictions = run_predict(run, images, cache=cache, top=top, weights=weights, device=device)
    if json_out:
        print_json([p.to_json() for p in predictions])
    else:
        _print_predictions(predictions)


def _print_predictions(predictions: list) -> None:
    """One small table per image: the codes behind the predicted class."""
    from rich.table import Table

    for p in predictions:
        title = Text.assemble(f"{p.image}: ", (p.label, "bold"), f" ({p.probability:.3f})")
        table = Table(title=title, title_justify="left")
        for column in ("code", "contribution", "presence", "cell (row, col)", "box in image (x, y, w, h)"):
            table.add_column(column, justify="right")
        for e in p.evidence:
            table.add_row(str(e.code), f"{e.contribution:.3f}", f"{e.presence:.3f}", f"{e.cell[0]}, {e.cell[1]}",
                          ", ".join(f"{v:.0f}" for v in e.box))
        out_console.print(table)


# ---- prune / edit a run ----

@app.command(rich_help_panel="Use a run")
def prune(
    run: RunArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The new run directory to write.")],
    min_usage: Annotated[float, float_option("--min-usage", high=1.0, high_open=False, hint=" (a fraction of the patches; e.g. 0.001)", help="Remove codes chosen by fewer than this fraction of the TRAINING patches (argmax by cosine; e.g. 0.001).")] = 0.0,
    top_k_per_class: Annotated[Optional[int], typer.Option("--top-k-per-class", min=1, help="Keep each class's K largest weights and zero the rest; every code stays in the softmax over codes (the paper's interpretability/accuracy curve: no retraining needed).")] = None,
    drop_unused: Annotated[bool, typer.Option("--drop-unused", help="Then remove the codes no class uses from the head (out of the softmax over codes, so every other presence renormalises). With --top-k-per-class and --finetune-epochs: the paper's stage 2b.")] = False,
    drop_codes: Annotated[Optional[str], typer.Option("--drop-codes", help="Remove these codes everywhere (editing), e.g. 3,17.")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="Then fine-tune the head this many epochs (zeroed weights stay zero).")] = 0,
    cache: RunCacheOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write RUN2/report/index.html: removed codes with their patches, accuracy before and after, changed test predictions.")] = True,
    data: Annotated[Optional[Path], typer.Option("--data", help="The dataset's images for the report (default: the one recorded in the cache).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Prune or edit a run's head, optionally fine-tune it, and write the result as a new run.

    Reads RUN and its CACHE (train split: usage is counted on training and validation rows, never test). Removes named codes, then rarely used ones, then keeps the top-k weights per class, then (--drop-unused) removes the codes no class uses, then fine-tunes. Prints validation (and, for information, test) top-1 and codes in use before and after. Writes RUN2 like a trained run.

    Before: [bold]protoquant train[/]. Next: [bold]protoquant evaluate RUN2[/].

    Example: protoquant prune run/ --out run-k5/ --top-k-per-class 5   (the curve's point k = 5)
    Example: protoquant prune run/ --out run-2b/ --top-k-per-class 5 --drop-unused --finetune-epochs 5   (stage 2b)
    """
    from stages.prune import PruneSettings, parse_codes, prune as run_prune

    settings = PruneSettings(min_usage=min_usage, top_k_per_class=top_k_per_class, drop_codes=parse_codes(drop_codes),
                             finetune_epochs=finetune_epochs, drop_unused=drop_unused)
    if drop_unused and finetune_epochs == 0:
        console.print(Text.assemble(("note: ", "yellow"), "--drop-unused without --finetune-epochs: removing codes "
                                    "renormalises every other presence, so the head is scored on values it was not "
                                    "trained on (the paper removes them only before fine-tuning)"), soft_wrap=True)
    result = run_prune(run, out, settings, cache=cache, device=device, overwrite=overwrite, progress=not json_out,
                       report=report, data=data)
    if json_out:
        print_json({"path": str(result.path), "before": result.before, "after": result.after,
                    "removed_named": result.removed_named, "removed_by_usage": result.removed_by_usage,
                    "removed_unused": result.removed_unused,
                    "report": str(result.report) if result.report else None})
        return
    _print_prune(result)
    if result.report:
        out_console.print(f"report: {result.report}", highlight=False, soft_wrap=True)
    elif result.report_skipped:
        console.print(Text.assemble(("no report: ", "yellow"), result.report_skipped), soft_wrap=True)


def _print_prune(result) -> None:
    from rich.table import Table

    table = Table(title=Text(f"pruned run {result.path}"))
    for column in ("", "val top-1", "test top-1 (information)", "codes in use"):
        table.add_column(column, justify="right")
    for name, values in (("before", result.before), ("after", result.after)):
        test = "-" if values["test_top1"] is None else f"{values['test_top1']:.4f}"
        table.add_row(name, f"{values['val_top1']:.4f}", test, str(values["codes_in_use"]))
    out_console.print(table)
    out_console.print(f"removed {len(result.removed_named)} named, {len(result.removed_by_usage)} rarely used and "
                      f"{len(result.removed_unused)} unused codes")


# ---- stage 1: extract, info ----

@app.command(rich_help_panel="Stages")
def extract(
    data: Annotated[str, typer.Argument(help="Dataset: an ImageFolder dir (train/<class>/..., test/ or val/), a CUB-200-2011 dir, or WebDataset shards (a dir of .tar files or a brace pattern).")],
    backbone: BackboneOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="The cache to write (a Zarr v3 store, a directory).")],
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Pretrained weights: built-in offline ImageNet weights for tf_efficientnet_lite0, timm's hub for other models (needs the network).")] = False,
    weights: WeightsOpt = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=16, help="Input side S in pixels (default: the model's own); the image becomes S x S by --crop-mode / --crop-pct, with the model's timm interpolation and mean/std.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding processes (0 decodes in the main process).")] = 2,
    device: DeviceOpt = "auto",
    views: Annotated[int, typer.Option("--views", min=0, help="Also cache N augmented views (random resized crop + flip, seeded) of each TRAINING image.")] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip corrupt or truncated images (listed in the store and the summary) instead of stopping.")] = False,
    crop_to_box: Annotated[bool, typer.Option("--crop-to-box", help="CUB layout: crop each image to its bird box first; the box then goes through --crop-mode / --crop-pct like a whole image (by default squashed to the input size with nothing cut, as the paper does for CUB).")] = False,
    overwrite: OverwriteOpt = False,
    shard_rows: Annotated[Optional[int], typer.Option("--shard-rows", min=1, help="Images per shard, the unit of work and of resume (default: 8 chunks of <=16 MiB).")] = None,
    kind: Annotated[str, typer.Option("--kind", help="Dataset layout: auto (detect), imagefolder, cub or wds.")] = "auto",
    layers: Annotated[str, typer.Option("--layers", help="Which feature map(s) form the grid. Default 'auto', the backbone family's measured default: for a CNN its deepest stride-16 and stride-32 stages, concatenated on the stride-16 grid (tf_efficientnet_lite0 at 224 px: 14x14x432), which beat the final map on part-defined data and on Fashion-MNIST; for a ViT its final tokens (every block is stride 16). 'final' is timm's forward_features (a CNN's stride-32 map: 7x7 at 224 px). Also: feature stages of timm's forward_intermediates by index (negative from the end) or stride (s16 = the deepest stride-16 stage), several comma-separated (concatenated on the finest grid, coarser maps upsampled). A 14x14 grid has 4x the cells of 7x7, and head training grows with the cells: `protoquant info CACHE` shows what a choice costs (cells, bytes per image, the cache's size). The resolved stages are recorded.")] = "auto",
    crop_pct: Annotated[float, float_option("--crop-pct", help="timm's crop_pct: resize to S / crop_pct, then cut the centre S x S. Default 1.0: nothing cut beyond what --crop-mode cuts. timm's usual centre crop is --crop-mode center --crop-pct 0.875 (a model's own crop_pct is in its timm data config).", low=0.0, low_open=True, high=1.0, high_open=False)] = 1.0,
    crop_mode: Annotated[str, typer.Option("--crop-mode", help="timm's crop_mode: squash (the default: both sides resized to S, aspect not kept, nothing cut; measured best on part-defined data, where a centre crop cuts off parts at the edges), center (shorter side resized, aspect kept, the longer side's overflow cut) or border (longer side resized, padded). Recorded in the cache and replayed by every later stage.")] = "squash",
) -> None:
    """Run a frozen backbone ONCE over every split of DATA and cache the patch-embedding grids.

    Defaults: --layers auto --crop-mode squash --crop-pct 1.0, the recipe measured best on part-defined data
    (a stride 16+32 grid, the whole image with nothing cut). For timm's plain forward_features on its centre
    crop pass --layers final --crop-mode center --crop-pct 0.875.

    Writes CACHE with float16 features (N, H, W, D) per split, labels, ids and provenance. Interrupted?
    Run the same command again: finished shards are kept. Under [bold]torchrun[/] each rank extracts its own
    shards. Next: [bold]protoquant info CACHE[/], then [bold]protoquant codebook CACHE -k 512 --out codebook.safetensors[/].

    Example: protoquant extract birds/ --backbone tf_efficientnet_lite0 --pretrained --out birds.zarr
    """
    from stages.extract import extract as run_extract

    summary = run_extract(
        data, out, backbone=backbone, pretrained=pretrained, weights=weights, image_size=image_size,
        batch_size=batch_size, workers=workers, device=concrete_device(device), views=views, skip_bad=skip_bad,
        crop_to_box=crop_to_box, overwrite=overwrite, rows_per_shard=shard_rows, kind=kind, progress=True,
        layers=layers, crop_pct=crop_pct, crop_mode=crop_mode,
    )
    if is_rank_zero():
        _print_extract_summary(summary)


@app.command(rich_help_panel="Stages")
def info(
    path: Annotated[Path, typer.Argument(help="A feature cache, or a run directory (then its summary).")],
    json_out: JsonOpt = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read every shard and compare it with the checksum written with it (reads the whole cache); exit code 2 when damaged.")] = False,
) -> None:
    """Show what a cache holds: splits, shapes, classes, backbone, provenance, and whether it is complete and intact (a run directory: what it was made from)."""
    from stages.info import describe, require_intact

    if _is_run(path):
        _show_run(path, json_out)
        return
    description = describe(path, verify=verify)
    if json_out:
        print_json(description, indent=2)
    else:
        _print_description(description)
    require_intact(description)


def _print_extract_summary(summary) -> None:
    from rich.table import Table

    table = Table("split", "features (N, H, W, D)", title=Text(f"cached to {summary.path}"))
    for name, shape in summary.splits.items():
        table.add_row(name, str(shape))
    out_console.print(table)
    resumed = f", {summary.resumed_shards} shards kept from an earlier run" if summary.resumed_shards else ""
    out_console.print(f"{summary.images} images in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s), "
                      f"{summary.gigabytes:.3f} GB{resumed}", highlight=False)
    if summary.skipped:
        more = " ..." if len(summary.skipped) > 10 else ""
        out_console.print(Text.assemble((f"skipped {len(summary.skipped)} bad files: ", "yellow"),
                                        ", ".join(summary.skipped[:10]) + more), soft_wrap=True)
    console.print(f"next: protoquant info {summary.path}", highlight=False, soft_wrap=True)


def _print_description(d: dict) -> None:
    from rich.table import Table

    prov = d["provenance"]
    state = (("complete", "green") if d["complete"]
             else (f"damaged: {len(d['damaged'])} problems", "red") if d["damaged"]
             else ("incomplete - run the same extract command again to resume", "yellow"))
    if d["complete"] and d["verified"]:
        state = ("complete, every shard verified", "green")
    out_console.print(Text.assemble((str(d["path"]), "bold"), "  ", state, f"  fingerprint {d['fingerprint']}"),
                      soft_wrap=True)
    out_console.print(Text.assemble("backbone ", (prov["backbone"], "bold"),
                                    f"  weights {prov['weights']}  grid {prov['grid'][0]}x{prov['grid'][1]}  "
                                    f"dim {prov['dim']}  input {prov['data_config']['input_size'][-1]} px  "
                                    f"timm {prov['timm_version']}"), soft_wrap=True)
    out_console.print(Text(_grid_cost_line(d["grid_cost"], prov)), soft_wrap=True)
    out_console.print(Text(f"source {d['source']['kind']}: {d['source']['path']}"), soft_wrap=True)
    names = d["classes"]
    out_console.print(Text(f"{len(names)} classes: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"),
                      soft_wrap=True)
    table = Table("split", "features", "views", "shards", "skipped", "GB", "annotations")
    for name, split in d["splits"].items():
        table.add_row(name, "x".join(map(str, split["shape"])), str(split["views"]),
                      f"{split['shards_done']}/{split['shards']}", str(split["skipped"]), f"{split['gigabytes']:.3f}",
                      ", ".join(split["annotations"]) or "-")
    out_console.print(table)


def _grid_cost_line(cost: dict, prov: dict) -> str:
    """`layers 3,final (14x14x112 + 7x7x1280)  crop center 0.875: 196 cells x 1392 dims = 546 kB per image ...`"""
    config = prov["data_config"]
    maps = " + ".join("x".join(map(str, shape)) for shape in cost["layer_shapes"])
    return (f"layers {','.join(map(str, cost['layers']))} ({maps})  crop {config.get('crop_mode') or 'center'} "
            f"{config.get('crop_pct')}: {cost['cells']} cells x {cost['dim']} dims = "
            f"{cost['bytes_per_image'] / 1e3:.1f} kB per image (float16), {cost['gigabytes']:.3f} GB for "
            f"{cost['images']} images and views; head training time grows with the cells")


def _is_run(path: Path) -> bool:
    from pipeline.run import is_run_dir

    return is_run_dir(path) or (path.is_dir() and (path / "config.json").is_file() and not (path / "zarr.json").exists())


def _show_run(path: Path, json_out: bool) -> None:
    """`info RUN`: say that it is a run and what it was made from; scores come from `evaluate`."""
    from pipeline.io import read_json

    config = read_json(path / "config.json", f"run {path}")
    metrics = read_json(path / "metrics.json", f"run {path}") if (path / "metrics.json").is_file() else {}
    summary = {
        "path": str(path), "kind": "run", "command": config.get("command"),
        "cache": (config.get("cache") or {}).get("path"), "codebook": (config.get("codebook") or {}).get("path"),
        "classes": len((config.get("cache") or {}).get("classes") or []), "k": metrics.get("k"),
        "codes_in_use": metrics.get("codes_in_use"), "val_top1": metrics.get("val_top1"),
        "created_utc": config.get("created_utc"),
        "projection_dim": _projection_dim(config),
        "pushed": (metrics.get("grounding") or {}).get("pushed"),
        "grounding": (metrics.get("grounding") or {}).get("mean_max_cosine_in_use"),
    }
    if json_out:
        print_json(summary)
        return
    out_console.print(Text.assemble((str(path), "bold"), f" is a run ({summary['command'] or 'train'}) made "
                                    f"{summary['created_utc'] or '(date not recorded)'} from the cache "
                                    f"{summary['cache']} with the codebook {summary['codebook']}"), soft_wrap=True)
    if summary["k"] is not None:
        out_console.print(f"{summary['classes']} classes, {summary['codes_in_use']} of {summary['k']} codes in use; "
                          f"validation top-1 {json.dumps(_json_clean(summary['val_top1']))}", highlight=False,
                          soft_wrap=True)
    if summary["grounding"] is not None:
        space = f"through a {summary['projection_dim']}-dimensional projection" if summary["projection_dim"] \
            else "on the raw cosine"
        how = "pushed: every code is a training patch" if summary["pushed"] else "trained codes, not pushed"
        out_console.print(f"codes compared with patches {space}; {how}; grounding {summary['grounding']:.3f}",
                          highlight=False, soft_wrap=True)
    console.print(f"Scores on a split: protoquant evaluate {path}; the cache itself: protoquant info {summary['cache']}",
                  highlight=False, soft_wrap=True)


def _projection_dim(config: dict) -> int:
    """The dimension a run's projection maps to: its --projection-dim, at most the cache's D (0 = none)."""
    asked = (config.get("settings") or {}).get("projection_dim", 0)
    dim = (config.get("cache") or {}).get("dim")
    return min(asked, dim) if asked and dim else asked


# ---- shards: ImageFolder / CUB -> WebDataset ----

@app.command(rich_help_panel="Data")
def shards(
    data: Annotated[str, typer.Argument(help="Dataset to convert: an ImageFolder dir (train/<class>/..., test/ or val/) or a CUB-200-2011 dir.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the shards; must be empty unless --overwrite.")],
    max_count: Annotated[int, typer.Option("--max-count", min=1, help="Images per shard; the last shard of a split holds the rest.")] = 1000,
    seed: SeedOpt = 0,
    kind: Annotated[str, typer.Option("--kind", help="Layout of DATA: auto, imagefolder or cub.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the shards already in --out (deletes its *.tar and index files, nothing else).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Pack an ImageFolder or CUB-200-2011 dataset into WebDataset tar shards.

    Writes OUT/train-000000.tar, OUT/test-000000.tar, ... with each split shuffled once (--seed).

    Each sample keeps the original image bytes (no re-encoding), its class (.cls) and a .json with the original path (for CUB also the bird box and part keypoints). OUT/classes.json names the classes.

    A few big sequential files beat many small ones on network file systems and object stores.

    Next: [bold]protoquant extract OUT --backbone NAME --out CACHE[/] reads the shards like the folders.

    Example: protoquant shards birds/ --out birds-shards/ --max-count 500
    """
    from rich.table import Table

    from stages.shards import make_shards

    index = make_shards(data, out, max_count=max_count, seed=seed, kind=kind, overwrite=overwrite)
    if json_out:
        print_json(index, indent=2)
        return
    table = Table(title=Text(f"WebDataset shards in {out}"))
    for column in ("split", "images", "shards", "files"):
        table.add_column(column, justify="right" if column in ("images", "shards") else "left")
    for split, shard_list in index["splits"].items():
        names = [shard["url"] for shard in shard_list]
        files = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        table.add_row(split, str(sum(s["nsamples"] for s in shard_list)), str(len(names)), files)
    out_console.print(table)
    out_console.print(f"{len(index['classes'])} classes", highlight=False)
    console.print(f"Next: protoquant extract {out} --backbone NAME --out CACHE", highlight=False, soft_wrap=True)


# ---- make-birds: the procedural CUB-layout dataset ----

@app.command("make-birds", rich_help_panel="Data")
def make_birds_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into; created, and must be empty unless --overwrite.")],
    classes: Annotated[int, typer.Option("--classes", help="Number of classes, 2 to 243 (the distinct combinations of the five attribute parts).")] = 8,
    per_class: Annotated[int, typer.Option("--per-class", help="Images per class (at least 2: one train, one test).")] = 40,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (square images), 64 to 2048.")] = 224,
    seed: SeedOpt = 0,
    test_fraction: Annotated[float, float_option("--test-fraction", low_open=True, high=1.0, help="Share of each class's images in the test split (stratified; at least one per class).")] = 0.3,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset make-birds wrote in OUT before (refused if OUT holds other files).")] = False,
    clutter: Annotated[int, typer.Option("--clutter", help="Difficulty: the most background clutter shapes per image (0: a clean background).")] = 12,
    decoys: Annotated[float, float_option("--decoys", low=0.0, high=1.0, high_open=False, help="Difficulty: the share of clutter shapes painted in the attribute colours, decoys a model may learn instead of the parts.")] = 0.4,
    bird_scale: Annotated[float, float_option("--bird-scale", low=0.3, high=1.5, high_open=False, help="Difficulty: a factor on the bird's size (1.0: it spans about 55-80% of the image; smaller birds have smaller parts).")] = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """Draw a procedural "birds with parts" dataset in the CUB-200-2011 layout, with part keypoints and boxes.

    Every bird has a body, head, crown, beak, eye, wing, tail and legs. Five parts define the class (beak and tail shape; crown, wing and eye colour); pose, scale, position, body colour, clutter, occluders and noise are random. Classes are chosen so that pairs of them differ in ONE part only, and OUT/README.txt says which part separates which classes. The classes depend on --classes only; the images also on --seed (the same seed writes the same bytes).

    Writes OUT/images/NNN.Class/*.jpg, images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, bounding_boxes.txt, parts/parts.txt and parts/part_locs.txt as CUB does, plus parts/part_boxes.txt (tight part boxes), class_attributes.txt and README.txt. 8 classes x 40 images at 224 px take a few seconds.

    Next: [bold]protoquant extract OUT --backbone tf_efficientnet_lite0 --pretrained --out birds.zarr[/]

    Example: protoquant make-birds birds/ --classes 8 --per-class 40 --size 224
    """
    from dataclasses import asdict

    from rich.table import Table

    from stages.make_birds import make_birds as run_make_birds

    from pipeline.birds import Difficulty

    summary = run_make_birds(
        out, classes=classes, per_class=per_class, size=size, seed=seed, test_fraction=test_fraction,
        overwrite=overwrite, difficulty=Difficulty(clutter=clutter, decoys=decoys, bird_scale=bird_scale),
    )
    if json_out:
        print_json(asdict(summary) | {"n_images": summary.n_images}, indent=2)
        return
    table = Table(title=Text(f"Birds dataset in {out}"), show_header=False)
    table.add_row("classes", str(summary.n_classes))
    table.add_row("images", f"{summary.n_images} ({summary.n_train} train, {summary.n_test} test), {size} x {size} px")
    table.add_row("parts", ", ".join(summary.parts))
    by_part: dict[str, int] = {}
    for _, _, part in summary.one_part_pairs:
        by_part[part] = by_part.get(part, 0) + 1
    table.add_row("one-part pairs", ", ".join(f"{part} {n}" for part, n in by_part.items()) or "none")
    out_console.print(table)
    out_console.print(f"Classes and what separates them: {out / 'README.txt'}", highlight=False, soft_wrap=True)
    console.print(f"Next: protoquant extract {out} --backbone tf_efficientnet_lite0 --pretrained --out birds.zarr",
                  highlight=False, soft_wrap=True)


# ---- gallery: every prototype by its nearest training patches ----

@app.command(rich_help_panel="Use a run")
def gallery(
    run: RunArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the site (index.html, class pages, thumbs/).")],
    cache: RunCacheOpt = None,
    data: DataOpt = None,
    patches: Annotated[int, typer.Option("--patches", min=1, max=10, help="Nearest training patches shown per code.")] = 6,
    per_page: Annotated[int, typer.Option("--per-page", min=1, help="Codes per index page.")] = 100,
    class_top: Annotated[int, typer.Option("--class-top", min=1, help="Prototypes shown on each class page.")] = 10,
    thumb_size: Annotated[int, typer.Option("--thumb-size", min=16, help="Thumbnail side in pixels.")] = 96,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Write a static site showing every code in use by its nearest training patches.

    OUT/index.html lists the codes (most used first, paginated) with their nearest training patches (the receptive cells cut from the original images), the cosine to the nearest one (grounding), their usage and the classes that weigh them; OUT/class-NNN.html shows a class's top-weighted prototypes. Open it in any browser, offline. The nearest patches are found from the cache once and stored in RUN/grounding.safetensors.

    Before: [bold]protoquant train[/]. Next: [bold]protoquant explain RUN IMAGE... --out DIR[/].

    Example: protoquant gallery run/ --data birds/ --out gallery/
    """
    from stages.gallery import GallerySettings, gallery as run_gallery

    settings = GallerySettings(patches=patches, per_page=per_page, class_top=class_top, thumb_size=thumb_size,
                               device=concrete_device(device))
    summary = run_gallery(run, out, cache=cache, data=data, settings=settings)
    if json_out:
        print_json({"index": str(summary.index), "codes": summary.codes, "pages": summary.pages,
                    "classes": summary.classes, "thumbnails": summary.thumbnails,
                    "grounding": summary.grounding, "seconds": summary.seconds}, indent=2)
        return
    grounding = summary.grounding
    out_console.print(f"{summary.codes} codes on {summary.pages} pages, {summary.classes} class pages, "
                      f"{summary.thumbnails} thumbnails in {summary.seconds:.1f} s; mean grounding cosine "
                      f"{grounding.get('mean_cosine', float('nan')):.3f}", highlight=False)
    out_console.print(f"Open {summary.index}", highlight=False, soft_wrap=True)


# ---- explain: local explanations of new images ----

@app.command(rich_help_panel="Use a run")
def explain(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="Image files to explain (any format Pillow reads).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pages (index.html, image-NNN.html, images/, thumbs/).")],
    cache: RunCacheOpt = None,
    data: DataOpt = None,
    weights: WeightsOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Top contributing codes shown for the prediction.")] = 5,
    patches: Annotated[int, typer.Option("--patches", min=1, max=10, help="Nearest training patches shown beside each code.")] = 5,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Explain new images end to end (backbone + head) as static pages: "this looks like that".

    Per image: the prediction; its top contributing codes (relu(W[c,k]) * p[k]), each with where it fired (box and heatmap over the image) and its nearest training patches; and the runner-up class with its own top codes, for contrast. OUT/explanations.json holds the numbers.

    Before: [bold]protoquant train[/] (and, for the whole codebook, [bold]protoquant gallery[/]).

    Example: protoquant explain run/ photo1.jpg photo2.png --out explained/
    """
    from dataclasses import asdict

    from stages.explain import ExplainSettings, explain as run_explain

    settings = ExplainSettings(top_codes=top, patches=patches, device=concrete_device(device))
    summary = run_explain(run, images, out, cache=cache, data=data, weights=weights, settings=settings)
    if json_out:
        print_json({"index": str(summary.index), "explanations": [asdict(e) for e in summary.explanations]}, indent=2)
        return
    for e in summary.explanations:
        runner = f" (runner-up {e.runner_up} {e.runner_up_probability:.2f})" if e.runner_up else ""
        out_console.print(Text(f"{e.image}: {e.predicted} {e.probability:.2f}{runner}"), soft_wrap=True)
    out_console.print(f"Open {summary.index}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
