"""Stage 1: run a frozen backbone ONCE over every split of a dataset and cache the patch grids.

Reader (DataLoader workers decode and preprocess), compute (the backbone, in this process) and writer
(a thread that writes whole shards, then their completion marks) are separate pieces, so decoding and
writing overlap the forward passes. Shards are the unit of work and resume: a killed run started
again redoes only the shards without a mark. Under torchrun each rank takes its own shards.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset as TorchDataset

from pipeline.backbones import Backbone, extract_grid, load_backbone
from pipeline.cache import Cache, SplitPlan, create_cache, settings_hash
from pipeline.datasets import Dataset, Record, load_image, open_dataset
from pipeline.errors import ProtoquantError
from pipeline.images import crop_box
from pipeline.progress import progress_bar
from pipeline.views import view_transform


@dataclass
class ExtractSummary:
    """What an extraction produced (also what `make demo`'s first step prints)."""

    path: Path
    splits: dict[str, tuple[int, ...]]
    gigabytes: float
    seconds: float
    images: int
    skipped: list[str] = field(default_factory=list)
    resumed_shards: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class _Rows(TorchDataset):
    """Row index -> (row, image tensor (1 + V, 3, S, S), ok, (width, height)); runs in worker processes."""

    def __init__(self, records: list[Record], backbone: Backbone, views: int, view_seed: int,
                 crop_to_box: bool, skip_bad: bool):
        self.records = records
        self.transform = backbone.transform
        self.augment = view_transform(backbone.data_config) if views else None
        self.views = views
        self.view_seed = view_seed
        self.crop_to_box = crop_to_box
        self.skip_bad = skip_bad
        self.size = backbone.image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, row: int):
        record = self.records[row]
        try:
            image = load_image(record)
            original_size = image.size  # (width, height) before any crop: annotations live in these pixels
            if self.crop_to_box:
                image = crop_box(image, record.box)
        except ProtoquantError:
            if not self.skip_bad:
                raise
            return row, torch.zeros(1 + self.views, 3, self.size, self.size), False, (0, 0)
        tensors = [self.transform(image)]
        for view in range(self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.view_seed * 1_000_003 + row * 101 + view)  # same view wherever it runs
                tensors.append(self.augment(image))
        return row, torch.stack(tensors), True, original_size


def _shard_batches(shards: list[range], batch_size: int) -> list[list[int]]:
    """Batches never straddle shards, so a resumed shard sees exactly the batches of a full run."""
    return [list(rows[i:i + batch_size]) for rows in shards for i in range(0, len(rows), batch_size)]


class _ShardWriter:
    """A thread that writes complete shards (features, views, ok, sizes) and then their marks."""

    def __init__(self, max_pending: int = 2):
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="protoquant-writer")
        self.thread.start()

    def put(self, group: zarr.Group, shard: int, rows: range, buffers: dict[str, np.ndarray]) -> None:
        if self.error:
            raise self.error
        self.jobs.put((group, shard, rows, buffers))

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error:
                continue
            group, shard, rows, buffers = job
            try:
                for name, values in buffers.items():
                    group[name][rows.start:rows.stop] = values
                group["done"][shard] = 1  # last: the shard is complete only when everything else is on disk
            except BaseException as err:  # surfaced in the compute loop and at close
                self.error = err

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _settings(dataset: Dataset, backbone: Backbone, *, views: int, view_seed: int, crop_to_box: bool,
              row_order_seed: int, rows_per_shard: int | None) -> dict:
    return {
        "backbone": backbone.name, "weights": backbone.weights, "model_kwargs": backbone.model_kwargs,
        "data_config": backbone.provenance()["data_config"], "grid": list(backbone.grid), "dim": backbone.dim,
        "dataset_kind": dataset.kind, "split_sizes": {k: len(v) for k, v in dataset.splits.items()},
        "views": views, "view_seed": view_seed, "crop_to_box": crop_to_box, "row_order_seed": row_order_seed,
        "rows_per_shard": rows_per_shard,
    }


def _ordered(records: list[Record], seed: int) -> list[Record]:
    """Permute once with a fixed seed so any contiguous block of rows is a random sample (streaming)."""
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order]


def _split_plan(records: list[Record], n_parts: int | None, views: int) -> SplitPlan:
    plan = SplitPlan(ids=[r.id for r in records], labels=np.array([r.label for r in records], dtype=np.int32), views=views)
    if records and records[0].box is not None:
        plan.boxes = np.array([r.box for r in records], dtype=np.float32)
    if n_parts and records and records[0].parts is not None:
        plan.part_locs = np.array([r.parts for r in records], dtype=np.float32)
        if getattr(records[0], "part_boxes", None) is not None:
            plan.part_boxes = np.array([r.part_boxes for r in records], dtype=np.float32)
    return plan


def _open_or_create(out: Path, settings: dict, create) -> tuple[Cache, bool]:
    """Resume a store made with the same settings; refuse one made with others; create otherwise."""
    if out.exists() and any(out.iterdir()):
        try:
            cache = Cache(out)
        except ProtoquantError:
            cache = None
        if cache is None or "settings_hash" not in cache.attrs or not cache.attrs.get("created"):
            if cache is None and not (out / "zarr.json").exists():
                raise ProtoquantError(f"--out {out} exists and is not a feature cache: choose another path")
            shutil.rmtree(out)  # a store killed while being created holds no features: start it again
            return create(), False
        if cache.attrs["settings_hash"] != settings_hash(settings):
            theirs = cache.attrs.get("settings", {})
            diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
            raise ProtoquantError(f"--out {out} holds a cache made with other settings (differs in: {', '.join(diff)}); "
                                  "pass --overwrite to replace it, or choose another --out")
        return cache, True
    return create(), False


def extract(
    data: str | Path,
    out: str | Path,
    *,
    backbone: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
    views: int = 0,
    view_seed: int = 0,
    skip_bad: bool = False,
    crop_to_box: bool = False,
    overwrite: bool = False,
    rows_per_shard: int | None = None,
    row_order_seed: int = 0,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> ExtractSummary:
    """Extract every split of `data` into the Zarr store `out` (resuming an interrupted run)."""
    started = time.perf_counter()
    out = Path(out)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProtoquantError("--device cuda: no CUDA device is visible; use --device cpu")
    rank, world = _distributed(device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)  # NCCL barriers use the current device
    dataset = open_dataset(data)
    if crop_to_box and any(r.box is None for records in dataset.splits.values() for r in records[:1]):
        raise ProtoquantError(f"--crop-to-box needs bounding boxes, but {data} has none (CUB layout with bounding_boxes.txt, "
                              "or shards written from one); drop --crop-to-box")
    net = load_backbone(backbone, pretrained=pretrained, weights=weights, image_size=image_size,
                        device=device, model_kwargs=model_kwargs)
    splits = {name: _ordered(records, row_order_seed) for name, records in dataset.splits.items()}
    settings = _settings(dataset, net, views=views, view_seed=view_seed, crop_to_box=crop_to_box,
                         row_order_seed=row_order_seed, rows_per_shard=rows_per_shard)

    def create() -> Cache:
        n_parts = len(dataset.part_names or [])
        cache = create_cache(
            out, settings=settings, grid=net.grid, dim=net.dim, rows_per_shard=rows_per_shard,
            attrs={"provenance": net.provenance(), "classes": dataset.classes, "part_names": dataset.part_names,
                   "source": {"path": str(Path(data).resolve()) if Path(data).exists() else str(data), "kind": dataset.kind},
                   "crop_to_box": crop_to_box, "views": views},
            splits={name: _split_plan(recs, n_parts, views if name == "train" else 0) for name, recs in splits.items()},
        )
        cache.update_attrs({"created": True})  # written last: a store without it is restarted from scratch
        return cache

    if rank == 0:
        if overwrite and out.exists():
            shutil.rmtree(out)
        _, resumed = _open_or_create(out, settings, create)
    _barrier(world)
    cache = Cache(out)
    layouts = {name: cache.split(name).layout for name in cache.splits}
    todo = {name: np.flatnonzero(~cache.split(name).done()) for name in cache.splits}
    resumed_shards = sum(layouts[s].n_shards - len(t) for s, t in todo.items())
    mine = {name: shards[rank::world] for name, shards in todo.items()}

    def rows_in(shards_by_split: dict) -> int:
        return sum(len(layouts[s].shard_rows(int(p))) for s, shards in shards_by_split.items() for p in shards)

    total, total_all_ranks = rows_in(mine), rows_in(todo)

    writer = _ShardWriter()
    try:
        with progress_bar(total, "extract", enabled=progress and rank == 0) as advance:
            for name, shards in mine.items():
                if len(shards):
                    _extract_split(cache, name, splits[name], [int(s) for s in shards], net,
                                                  batch_size=batch_size, workers=workers, device=device,
                                                  view_seed=view_seed, crop_to_box=crop_to_box,
                                                  skip_bad=skip_bad, writer=writer, advance=advance)
    finally:
        writer.close()
    _barrier(world)
    summary = _finish(out, started, total_all_ranks, resumed_shards, finalize=rank == 0)
    _barrier(world)
    return summary


def _extract_split(cache: Cache, name: str, records: list[Record], shards: list[int], net: Backbone, *,
                   batch_size: int, workers: int, device: str, view_seed: int, crop_to_box: bool,
                   skip_bad: bool, writer: _ShardWriter, advance) -> None:
    split = cache.split(name)
    views = split.views.shape[1] if split.views is not None else 0
    rows_of = {s: split.layout.shard_rows(s) for s in shards}
    loader = DataLoader(
        _Rows(records, net, views, view_seed, crop_to_box, skip_bad),
        batch_sampler=_shard_batches(list(rows_of.values()), batch_size),
        num_workers=workers, pin_memory=device.startswith("cuda"), collate_fn=_collate,
    )
    h, w = net.grid
    buffers, shard_iter = None, iter(shards)
    shard, filled = None, 0
    use_amp = device.startswith("cuda")
    for rows, images, ok, sizes in loader:
        if shard is None or filled == len(rows_of[shard]):
            shard, filled = next(shard_iter), 0
            n = len(rows_of[shard])
            buffers = {"features": np.empty((n, h, w, net.dim), np.float16), "ok": np.empty(n, np.uint8),
                       "image_size": np.empty((n, 2), np.int32)}
            if views:
                buffers["views"] = np.empty((n, views, h, w, net.dim), np.float16)
        flat = images.flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            grid = extract_grid(net, flat).float().half()
        if not torch.isfinite(grid).all():
            raise ProtoquantError(f"the backbone produced non-finite features for rows {rows[0]}..{rows[-1]} of {name}; "
                                  "float16 overflow or a broken model: check --weights")
        grid = grid.unflatten(0, (len(rows), 1 + views)).cpu().numpy()     # (B*(1+V), H, W, D) -> (B, 1+V, H, W, D)
        grid[~ok] = np.nan                                                   # a skipped file stays NaN, never zeros
        at = slice(filled, filled + len(rows))
        buffers["features"][at] = grid[:, 0]
        if views:
            buffers["views"][at] = grid[:, 1:]
        buffers["ok"][at] = ok
        buffers["image_size"][at] = sizes
        filled += len(rows)
        advance(len(rows))
        if filled == len(rows_of[shard]):
            writer.put(split.group, shard, rows_of[shard], buffers)


def _collate(batch):
    rows, images, ok, sizes = zip(*batch)
    return list(rows), torch.stack(images), np.array(ok, dtype=bool), np.array(sizes, dtype=np.int32)


def _finish(out: Path, started: float, images: int, resumed_shards: int, *, finalize: bool) -> ExtractSummary:
    cache = Cache(out)
    cache.require_complete()
    splits = {name: cache.split(name) for name in cache.splits}
    skipped = [f"{name}/{i}" for name, split in splits.items() for i in split.ids[~split.ok]]
    if finalize:
        cache.update_attrs({"complete": True, "skipped": skipped})
    shapes = {name: tuple(split.features.shape) for name, split in splits.items()}
    nbytes = sum(split.nbytes + (split.views.nbytes if split.views is not None else 0) for split in splits.values())
    return ExtractSummary(path=out, splits=shapes, gigabytes=nbytes / 1e9, seconds=time.perf_counter() - started,
                          images=images, skipped=skipped, resumed_shards=resumed_shards)
