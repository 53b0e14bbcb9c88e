"""protoquant's command line: parse options, call a stage, print the result. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.errors import ProtoquantError

console = Console(stderr=True)


class _App(typer.Typer):
    """A typer app that prints ProtoquantError as one clear line (exit 2) instead of a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except ProtoquantError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            sys.exit(2)


app = _App(
    name="protoquant",
    help="Interpretable image classification with quantized prototypical parts (ProtoQuant).\n\n"
    "Run the frozen backbone ONCE ([bold]extract[/]), then build codebooks, train heads, evaluate and "
    "explain from the feature cache in seconds to minutes.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# Shared option types: one meaning everywhere.
CacheArg = Annotated[Path, typer.Argument(help="Feature cache (a Zarr v3 store made by [bold]protoquant extract[/]).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same result.")]
RunArg = Annotated[Path, typer.Argument(help="A run directory made by [bold]protoquant train[/] (or prune).")]
RunCacheOpt = Annotated[Optional[Path], typer.Option("--cache", help="The run's feature cache (default: the path recorded in RUN/config.json).")]
AutoDeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when present), cpu or cuda.")]

# ---- commands are registered below, one block per stage ----

# ---- demo: the whole pipeline, offline ----

@app.command(rich_help_panel="Start here")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for everything the demo makes (re-running skips finished steps).")] = Path("demo-out"),
    quick: Annotated[bool, typer.Option("--quick", help="A tiny version (about a minute): 4 classes, 128 px, short training.")] = False,
) -> None:
    """Run the whole pipeline offline on generated birds with real pretrained weights, and write a report.

    make-birds -> extract (tf_efficientnet_lite0, built-in ImageNet weights) -> codebook -> train ->
    evaluate (accuracy, probe accuracy, purity, local explanation size) -> per-class top-k curve ->
    gallery -> explanations -> OUT/index.html. Each step is skipped when its output is complete, so a
    second run takes seconds: the backbone runs once.

    Example: protoquant demo --out demo-out && xdg-open demo-out/index.html
    """
    from stages.demo import demo as run_demo

    result = run_demo(out, quick=quick, say=console.print, progress=True)
    evaluation = result.figures["evaluation"]
    purity = result.figures["interpretability"].get("purity", {})
    console.print(f"\n[bold green]done[/] in {result.seconds:.0f} s"
                  f"{' (skipped: ' + ', '.join(result.skipped_steps) + ')' if result.skipped_steps else ''}")
    console.print(f"ProtoQuant test top-1 {evaluation['top1']:.3f} (linear probe {evaluation['probe_top1']:.3f}), "
                  f"{evaluation['codes_used']} codes in use, local explanation size {evaluation['local_size']:.1f}"
                  + (f", purity {purity['mean']:.3f}" if purity.get("mean") is not None else ""))
    console.print(f"open [bold]{result.report.resolve()}[/]")


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
    json_out: JsonOpt = False,
) -> None:
    """Build the initial codebook: spherical k-means on a sample of the cache's TRAINING patch embeddings.

    Reads CACHE (train split only). Writes CODEBOOK: codes (K x D, each scaled to the mean norm of the patches it stands for) plus the cache fingerprint, k, sample size, seed, objective (mean cosine to the nearest code) and time. The same seed gives the same codebook.

    Before: [bold]protoquant extract[/]. Next: [bold]protoquant train CACHE --codebook CODEBOOK --out RUN[/].

    Example: protoquant codebook birds.zarr -k 512 --out codebook.safetensors
    """
    from stages.codebook import CodebookSettings, build_codebook

    result = build_codebook(cache, out, CodebookSettings(k=k, sample=sample, iters=iters, seed=seed, init=init, backend=backend))
    if json_out:
        print(json.dumps({"path": str(result.path), "k": result.k, "dim": result.dim, "sample": result.sample,
                          "objective": result.objective, "backend": result.backend, "seconds": result.seconds}))
        return
    console.print(f"{result.k} codes x {result.dim} dims from {result.sample:,} patches ({result.backend}, "
                  f"{result.seconds:.1f} s); mean cosine to the nearest code {result.objective:.3f} -> {result.path}",
                  highlight=False)
    console.print(f"Next: protoquant train {cache} --codebook {result.path} --out RUN", highlight=False)


# ---- stage 3: train ----

@app.command(rich_help_panel="Stages")
def train(
    cache: CacheArg,
    codebook: Annotated[Path, typer.Option("--codebook", "-c", help="Initial codebook made by [bold]protoquant codebook[/] from this cache.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write (written beside it, renamed when done).")],
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="Epochs of the interpretable head (stage B).")] = 40,
    probe_epochs: Annotated[int, typer.Option("--probe-epochs", min=0, help="Epochs of the linear probe (the frozen reference classifier).")] = 30,
    codebook_epochs: Annotated[int, typer.Option("--codebook-epochs", min=0, help="Epochs of codebook learning through the probe (stage A; 0 keeps the k-means codes).")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per step.")] = 128,
    probe_lr: Annotated[float, typer.Option("--probe-lr", help="AdamW learning rate of the probe.")] = 1e-3,
    codebook_lr: Annotated[float, typer.Option("--codebook-lr", help="Adam learning rate of the codes in stage A (the paper's 5e-4).")] = 5e-4,
    head_lr: Annotated[float, typer.Option("--head-lr", help="AdamW learning rate of the head's weights W (stage B).")] = 3e-2,
    codes_lr: Annotated[float, typer.Option("--codes-lr", help="Learning rate of the codes in stage B, relative to their RMS coordinate (so it suits any backbone).")] = 0.015,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay of the probe and of W.")] = 1e-4,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up before the cosine decay, in epochs (every phase).")] = 1.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of every cross-entropy.")] = 0.1,
    dict_weight: Annotated[float, typer.Option("--dict-weight", help="Weight of the dictionary MSE that pulls codes onto the patches they replace (stage A).")] = 1.0,
    tau: Annotated[float, typer.Option("--tau", help="Temperature of the softmax over codes (stage B).")] = 0.1,
    train_codes: Annotated[bool, typer.Option("--train-codes/--freeze-codes", help="Stage B trains the codes too (the paper's default, more accurate) or keeps the stage A codes (stay on real patches; see grounding in metrics.json).")] = True,
    l1: Annotated[float, typer.Option("--l1", help="L1 penalty on relu(W), per weight (0 = off).")] = 0.0,
    mixup: Annotated[float, typer.Option("--mixup", help="Feature-space mixup Beta(a, a) for probe and head (0 = off).")] = 0.0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of each class's training images held out to pick the best epoch (seeded; test is never used).")] = 0.1,
    seed: SeedOpt = 0,
    max_memory: Annotated[str, typer.Option("--max-memory", help="RAM budget for the training split, e.g. 2GB; above it the split is streamed chunk by chunk (0 = always stream; auto = half the free RAM).")] = "auto",
    views: Annotated[bool, typer.Option("--views/--no-views", help="Use the cache's augmented views (one drawn per image and epoch) when it holds some.")] = True,
    use_backbone_head: Annotated[bool, typer.Option("--use-backbone-head", help="Use the timm model's own classifier as the reference instead of a probe (only when it predicts exactly the dataset's classes; CNN backbones).")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="With --use-backbone-head: the backbone's local weights, when the cache was extracted with --weights.")] = None,
    device: AutoDeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped run of the same command from its last finished epoch.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing RUN.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a ProtoQuant head from the feature cache alone: probe, codebook (stage A), interpretable head (stage B).

    Reads CACHE (train split; a seeded validation share picks each phase's best epoch) and CODEBOOK. Writes RUN: head.safetensors (codes, W, tau, class names), probe.safetensors, config.json (every option, the cache fingerprint, versions), metrics.json and log.jsonl (one line per epoch). Interrupted? Add --resume. Under [bold]torchrun[/] each process trains on its own share of every epoch (DDP).

    Before: [bold]protoquant codebook[/]. Next: [bold]protoquant evaluate RUN[/], [bold]protoquant predict RUN IMAGE...[/], [bold]protoquant prune RUN --out RUN2[/].

    Example: protoquant train birds.zarr --codebook codebook.safetensors --out run/
    """
    from stages.train import TrainSettings, train as run_train

    settings = TrainSettings(
        epochs=epochs, probe_epochs=probe_epochs, codebook_epochs=codebook_epochs, batch_size=batch_size,
        probe_lr=probe_lr, codebook_lr=codebook_lr, head_lr=head_lr, codes_lr=codes_lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, dict_weight=dict_weight, tau=tau,
        train_codes=train_codes, l1=l1, mixup=mixup, val_fraction=val_fraction, seed=seed, max_memory=max_memory,
        use_views=views, use_backbone_head=use_backbone_head, device=device,
    )
    result = run_train(cache, codebook, out, settings, resume=resume, overwrite=overwrite, weights=weights,
                       progress=not json_out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if json_out:
        print(json.dumps({"path": str(result.path), "resumed": result.resumed, **result.metrics}))
        return
    val = result.metrics["val_top1"]
    console.print(f"validation top-1: probe {val['probe']:.3f}, quantized probe {val['quantized_probe']:.3f}, "
                  f"ProtoQuant head {val['head']:.3f}; {result.metrics['codes_in_use']} of {result.metrics['k']} codes "
                  f"in use; {result.metrics['seconds']:.0f} s -> {result.path}", highlight=False)
    console.print(f"Next: protoquant evaluate {result.path}", highlight=False)


# ---- evaluate a run ----

@app.command(rich_help_panel="Use a run")
def evaluate(
    run: RunArg,
    cache: RunCacheOpt = None,
    split: Annotated[str, typer.Option("--split", help="Which split of the cache to score.")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="For runs trained with --use-backbone-head on a cache made with --weights: that file.")] = None,
    device: AutoDeviceOpt = "auto",
    data: Annotated[Optional[Path], typer.Option("--data", help="The dataset's images: adds grounding, purity (needs part keypoints), misalignment, stability and deletion.")] = None,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="With --data: test images run through the backbone for misalignment, stability and deletion.")] = 32,
    json_out: JsonOpt = False,
) -> None:
    """Score a run on a split of its cache: top-1, top-5, per-class accuracy, and what interpretability costs.

    Reads RUN and CACHE. Prints the probe's top-1 on the same split beside the head's, codes in use, the mean local explanation size (codes contributing more than 1e-3 of the predicted logit) and the sparsity of W. --json prints one object (top1, top5, probe_top1, n, codes_used, local_size, per_class, ...; fractions, not percentages). With --data DATA it adds grounding, purity, misalignment, stability and deletion. Writes nothing (the grounding is cached in RUN).

    Before: [bold]protoquant train[/]. Next: [bold]protoquant prune RUN --out RUN2[/] or [bold]protoquant predict RUN IMAGE...[/].

    Example: protoquant evaluate run/ --split test --json
    """
    from stages.evaluate import evaluate_with_metrics, print_evaluation

    evaluation, metrics = evaluate_with_metrics(run, data=data, max_images=max_images, cache=cache, split=split,
                                                batch_size=batch_size, device=device, weights=weights)
    if json_out:
        print(json.dumps({**evaluation.to_json(), **metrics}))
        return
    print_evaluation(evaluation, run)
    for key, value in metrics.items():
        console.print(f"[bold]{key}[/]: {json.dumps(value, default=float)}", highlight=False, soft_wrap=True)


# ---- predict new images ----

@app.command(rich_help_panel="Use a run")
def predict(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads).")],
    cache: Annotated[Optional[Path], typer.Option("--cache", help="The run's feature cache, checked against the run (default: the recorded path when it exists; else the backbone recorded in RUN/config.json is used as is).")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Top contributing codes shown per image.")] = 5,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="The backbone's local weights, when the cache was extracted with --weights.")] = None,
    device: AutoDeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Classify image files end to end: the cache's backbone (same weights and preprocessing), then the head.

    Reads RUN (and the backbone named in the cache's provenance). For each image prints the class, its probability, and the codes that contributed most to it with the grid cell (and input-pixel box) where each fired. --json prints a list with one object per image. Writes nothing.

    Before: [bold]protoquant train[/]. See also: [bold]protoquant explain[/] for pages with the training patches of each code.

    Example: protoquant predict run/ bird1.jpg bird2.png --top 3
    """
    from stages.predict import predict as run_predict, print_predictions

    predictions = run_predict(run, images, cache=cache, top=top, weights=weights, device=device)
    if json_out:
        print(json.dumps([p.to_json() for p in predictions]))
    else:
        print_predictions(predictions)


# ---- prune / edit a run ----

@app.command(rich_help_panel="Use a run")
def prune(
    run: RunArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The new run directory to write.")],
    min_usage: Annotated[float, typer.Option("--min-usage", help="Remove codes chosen by fewer than this fraction of the TRAINING patches (argmax by cosine; e.g. 0.001).")] = 0.0,
    top_k_per_class: Annotated[Optional[int], typer.Option("--top-k-per-class", min=1, help="Keep each class's K largest weights, zero the rest.")] = None,
    drop_codes: Annotated[Optional[str], typer.Option("--drop-codes", help="Remove these codes everywhere (editing), e.g. 3,17.")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="Then fine-tune the head this many epochs (zeroed weights stay zero).")] = 0,
    cache: RunCacheOpt = None,
    device: AutoDeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write RUN2/report/index.html: removed codes with their patches, accuracy before and after, changed test predictions.")] = True,
    data: Annotated[Optional[Path], typer.Option("--data", help="The dataset's images for the report (default: the one recorded in the cache).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Prune or edit a run's head, optionally fine-tune it, and write the result as a new run.

    Reads RUN and its CACHE (train split: usage is counted on training and validation rows, never test). Removes named codes, then rarely used ones, then keeps the top-k weights per class, then fine-tunes. Prints validation (and, for information, test) top-1 and codes in use before and after. Writes RUN2 like a trained run.

    Before: [bold]protoquant train[/]. Next: [bold]protoquant evaluate RUN2[/].

    Example: protoquant prune run/ --out run-k5/ --top-k-per-class 5 --finetune-epochs 5
    """
    from stages.prune import PruneSettings, parse_codes, print_prune, prune as run_prune

    settings = PruneSettings(min_usage=min_usage, top_k_per_class=top_k_per_class, drop_codes=parse_codes(drop_codes),
                             finetune_epochs=finetune_epochs)
    result = run_prune(run, out, settings, cache=cache, device=device, overwrite=overwrite, progress=not json_out,
                       report=report, data=data)
    if json_out:
        print(json.dumps({"path": str(result.path), "before": result.before, "after": result.after,
                          "removed_named": result.removed_named, "removed_by_usage": result.removed_by_usage,
                          "report": str(result.report) if result.report else None}))
        return
    print_prune(result)
    if result.report:
        console.print(f"report: open [bold]{result.report}[/]")
    elif result.report_skipped:
        console.print(f"[yellow]no report:[/] {result.report_skipped}")



# ---- stage 1: extract, info ----

@app.command(rich_help_panel="Stages")
def extract(
    data: Annotated[str, typer.Argument(help="Dataset: an ImageFolder dir (train/<class>/..., test/ or val/), a CUB-200-2011 dir, or WebDataset shards (a dir of .tar files or a brace pattern).")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Any timm model name, e.g. convnext_tiny, resnet50, vit_small_patch16_224, tf_efficientnet_lite0.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The cache to write (a Zarr v3 store, a directory).")],
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Pretrained weights: built-in offline ImageNet weights for tf_efficientnet_lite0, timm's hub for other models (needs the network).")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="A local state dict (.safetensors or .pth) for the backbone.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=16, help="Input side in pixels (default: the model's own); resize and crop follow timm's data config.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding processes (0 decodes in the main process).")] = 2,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (cuda uses bf16 autocast and channels-last).")] = "cpu",
    views: Annotated[int, typer.Option("--views", min=0, help="Also cache N augmented views (random resized crop + flip, seeded) of each TRAINING image.")] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip corrupt or truncated images (listed in the store and the summary) instead of stopping.")] = False,
    crop_to_box: Annotated[bool, typer.Option("--crop-to-box", help="CUB layout: crop each image to its bird box first, as the paper does for CUB.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing cache made with other settings.")] = False,
    shard_rows: Annotated[Optional[int], typer.Option("--shard-rows", min=1, help="Images per shard, the unit of work and of resume (default: 8 chunks of <=16 MiB).")] = None,
) -> None:
    """Run a frozen backbone ONCE over every split of DATA and cache the patch-embedding grids.

    Writes CACHE with float16 features (N, H, W, D) per split, labels, ids and provenance. Interrupted?
    Run the same command again: finished shards are kept. Under [bold]torchrun[/] each rank extracts its own
    shards. Next: [bold]protoquant info CACHE[/], then [bold]protoquant codebook CACHE -k 512 --out codebook.safetensors[/].

    Example: protoquant extract birds/ --backbone tf_efficientnet_lite0 --pretrained --out birds.zarr
    """
    from stages.extract import extract as run_extract

    summary = run_extract(
        data, out, backbone=backbone, pretrained=pretrained, weights=weights, image_size=image_size,
        batch_size=batch_size, workers=workers, device=device, views=views, skip_bad=skip_bad,
        crop_to_box=crop_to_box, overwrite=overwrite, rows_per_shard=shard_rows, progress=True,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        from stages.info import print_extract_summary

        print_extract_summary(summary)


@app.command(rich_help_panel="Inspect")
def info(
    path: Annotated[Path, typer.Argument(help="A feature cache (or, later, a run directory).")],
    json_out: JsonOpt = False,
) -> None:
    """Show what a cache holds: splits, shapes, classes, backbone, provenance, and whether it is complete."""
    from stages.info import describe, print_description

    description = describe(path)
    if json_out:
        print(json.dumps(description, indent=2))
    else:
        print_description(description)


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
        print(json.dumps(index, indent=2))
        return
    table = Table(title=f"WebDataset shards in {out}")
    for column in ("split", "images", "shards", "files"):
        table.add_column(column, justify="right" if column in ("images", "shards") else "left")
    for split, shard_list in index["splits"].items():
        names = [shard["url"] for shard in shard_list]
        files = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        table.add_row(split, str(sum(s["nsamples"] for s in shard_list)), str(len(names)), files)
    Console().print(table)
    Console().print(f"{len(index['classes'])} classes; next: protoquant extract {out} --backbone NAME --out CACHE")


# ---- make-birds: the procedural CUB-layout dataset ----

@app.command("make-birds", rich_help_panel="Data")
def make_birds_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into; created, and must be empty unless --overwrite.")],
    classes: Annotated[int, typer.Option("--classes", help="Number of classes, 2 to 243 (the distinct combinations of the five attribute parts).")] = 8,
    per_class: Annotated[int, typer.Option("--per-class", help="Images per class (at least 2: one train, one test).")] = 40,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (square images), 64 to 2048.")] = 224,
    seed: SeedOpt = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of each class's images in the test split (stratified; at least one per class).")] = 0.3,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset make-birds wrote in OUT before (refused if OUT holds other files).")] = False,
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

    summary = run_make_birds(
        out, classes=classes, per_class=per_class, size=size, seed=seed, test_fraction=test_fraction,
        overwrite=overwrite,
    )
    if json_out:
        print(json.dumps(asdict(summary) | {"n_images": summary.n_images}, indent=2, default=str))
        return
    table = Table(title=f"Birds dataset in {out}", show_header=False)
    table.add_row("classes", str(summary.n_classes))
    table.add_row("images", f"{summary.n_images} ({summary.n_train} train, {summary.n_test} test), {size} x {size} px")
    table.add_row("parts", ", ".join(summary.parts))
    by_part: dict[str, int] = {}
    for _, _, part in summary.one_part_pairs:
        by_part[part] = by_part.get(part, 0) + 1
    table.add_row("one-part pairs", ", ".join(f"{part} {n}" for part, n in by_part.items()) or "none")
    Console().print(table)
    Console().print(f"Classes and what separates them: {out / 'README.txt'}")
    Console().print(f"Next: protoquant extract {out} --backbone tf_efficientnet_lite0 --pretrained --out birds.zarr")


# ---- gallery: every prototype by its nearest training patches ----

@app.command(rich_help_panel="Explain")
def gallery(
    run: RunArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the site (index.html, class pages, thumbs/).")],
    cache: RunCacheOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="The dataset the cache was extracted from, for the pixels (default: the path recorded in the cache).")] = None,
    patches: Annotated[int, typer.Option("--patches", min=1, max=10, help="Nearest training patches shown per code.")] = 6,
    per_page: Annotated[int, typer.Option("--per-page", min=1, help="Codes per index page.")] = 100,
    class_top: Annotated[int, typer.Option("--class-top", min=1, help="Prototypes shown on each class page.")] = 10,
    thumb_size: Annotated[int, typer.Option("--thumb-size", min=16, help="Thumbnail side in pixels.")] = 96,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda, for finding the nearest patches.")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Write a static site showing every code in use by its nearest training patches.

    OUT/index.html lists the codes (most used first, paginated) with their nearest training patches (the receptive cells cut from the original images), the cosine to the nearest one (grounding), their usage and the classes that weigh them; OUT/class-NNN.html shows a class's top-weighted prototypes. Open it in any browser, offline. The nearest patches are found from the cache once and stored in RUN/grounding.safetensors.

    Before: [bold]protoquant train[/]. Next: [bold]protoquant explain RUN IMAGE... --out DIR[/].

    Example: protoquant gallery run/ --data birds/ --out gallery/
    """
    from stages.gallery import GallerySettings, gallery as run_gallery

    settings = GallerySettings(patches=patches, per_page=per_page, class_top=class_top, thumb_size=thumb_size,
                               device=device)
    summary = run_gallery(run, out, cache=cache, data=data, settings=settings)
    if json_out:
        print(json.dumps({"index": str(summary.index), "codes": summary.codes, "pages": summary.pages,
                          "classes": summary.classes, "thumbnails": summary.thumbnails,
                          "grounding": summary.grounding, "seconds": summary.seconds}, indent=2))
        return
    grounding = summary.grounding
    Console().print(f"{summary.codes} codes on {summary.pages} pages, {summary.classes} class pages, "
                    f"{summary.thumbnails} thumbnails in {summary.seconds:.1f} s; mean grounding cosine "
                    f"{grounding.get('mean_cosine', float('nan')):.3f}")
    Console().print(f"Open {summary.index}")


# ---- explain: local explanations of new images ----

@app.command(rich_help_panel="Explain")
def explain(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="Image files to explain (any format Pillow reads).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pages (index.html, image-NNN.html, images/, thumbs/).")],
    cache: RunCacheOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="The dataset the cache was extracted from, for the training patches (default: the path recorded in the cache).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="The backbone's local weights, when the cache was extracted with --weights.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Top contributing codes shown for the prediction.")] = 5,
    patches: Annotated[int, typer.Option("--patches", min=1, max=10, help="Nearest training patches shown beside each code.")] = 5,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Explain new images end to end (backbone + head) as static pages: "this looks like that".

    Per image: the prediction; its top contributing codes (relu(W[c,k]) * p[k]), each with where it fired (box and heatmap over the image) and its nearest training patches; and the runner-up class with its own top codes, for contrast. OUT/explanations.json holds the numbers.

    Before: [bold]protoquant train[/] (and, for the whole codebook, [bold]protoquant gallery[/]).

    Example: protoquant explain run/ photo1.jpg photo2.png --out explained/
    """
    from dataclasses import asdict

    from stages.explain import ExplainSettings, explain as run_explain

    settings = ExplainSettings(top_codes=top, patches=patches, device=device)
    summary = run_explain(run, images, out, cache=cache, data=data, weights=weights, settings=settings)
    if json_out:
        print(json.dumps({"index": str(summary.index), "explanations": [asdict(e) for e in summary.explanations]},
                         indent=2))
        return
    for e in summary.explanations:
        runner = f" (runner-up {e.runner_up} {e.runner_up_probability:.2f})" if e.runner_up else ""
        Console().print(f"{e.image}: {e.predicted} {e.probability:.2f}{runner}", highlight=False)
    Console().print(f"Open {summary.index}")


if __name__ == "__main__":
    app()
