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

# ---- commands are registered below, one block per stage ----


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


if __name__ == "__main__":
    app()
