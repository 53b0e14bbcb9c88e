"""Stage 1: run a frozen backbone ONCE over every split of a dataset and cache the patch grids.

Reader (DataLoader workers decode and preprocess), compute (the backbone, in this process) and writer
(a thread that writes whole shards, then their completion marks) are separate pieces, so decoding and
writing overlap the forward passes. Shards are the unit of work and resume: a killed run started
again redoes only the shards without a mark (or whose files no longer match it), after checking that
the dataset still lists the same ids and labels. Under torchrun each rank takes its own shards
(`plan_shards`); outside it an owner lock beside the store keeps a second writer out.

`--out` follows pipeline/paths.py: only a cache protoquant made is resumed or (with --overwrite)
replaced; anything else is refused with what it is.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset as TorchDataset

from pipeline.backbones import AUTO, AUTOCAST_DTYPE, FINAL, Backbone, extract_grid, load_backbone
from pipeline.cache import (NOT_WRITTEN, Cache, SplitPlan, create_cache, describe_foreign_cache, is_protoquant_cache,
                            plan_shards, settings_hash, write_shard)
from pipeline.datasets import Dataset, Record, load_image, open_dataset
from pipeline.devices import resolve_device
from pipeline.distributed import Distributed, init_distributed
from pipeline.errors import ProtoquantError
from pipeline.images import crop_box
from pipeline.paths import OwnerLock, check_output, refuse_url, remove_ours
from pipeline.progress import progress_bar
from pipeline.views import view_transform


# extract's defaults: the recipe measured best on part-defined data and on Fashion-MNIST (README, "Which
# feature map"): the backbone family's layers (AUTO: a CNN's deepest stride-16 + stride-32 stages on the
# stride-16 grid, a ViT's final tokens) and the whole image (or box) squashed to S x S with nothing cut.
# None keeps plain timm: layers None = the final map, crop None = the model's own data config.
DEFAULT_LAYERS_SPEC = AUTO
DEFAULT_CROP_MODE, DEFAULT_CROP_PCT = "squash", 1.0


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


@dataclass(frozen=True)
class _Failure:
    """A worker's error as data: the main process raises it once, the same line as with --workers 0."""

    message: str


class _Rows(TorchDataset):
    """Row index -> (row, image tensor (1 + V, 3, S, S), ok, (width, height)), or a _Failure; runs in
    worker processes, which must not raise: DataLoader would wrap the error in a worker traceback."""

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
            image, original_size = self._decode(record)
        except ProtoquantError as err:
            if not self.skip_bad:
                return _Failure(str(err))
            return row, torch.zeros(1 + self.views, 3, self.size, self.size), False, (0, 0)
        tensors = [self.transform(image)]
        for view in range(self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.view_seed * 1_000_003 + row * 101 + view)  # same view wherever it runs
                tensors.append(self.augment(image))
        return row, torch.stack(tensors), True, original_size

    def _decode(self, record: Record):
        image = load_image(record)
        original_size = image.size  # (width, height) before any crop: annotations live in these pixels
        if self.crop_to_box:
            try:
                image = crop_box(image, record.box)
            except ProtoquantError as err:
                raise ProtoquantError(f"{record.display_name}: {err}") from None
        return image, original_size


def _shard_batches(shards: list[range], batch_size: int) -> list[list[int]]:
    """Batches never straddle shards, so a resumed shard sees exactly the batches of a full run."""
    return [list(rows[i:i + batch_size]) for rows in shards for i in range(0, len(rows), batch_size)]


class _ShardWriter:
    """A thread that writes complete shards (features, views, ok, sizes), then their checksums and marks."""

    def __init__(self, max_pending: int = 2):
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="protoquant-writer")
        self.thread.start()

    def put(self, group: zarr.Group, directory: Path, shard: int, rows: range, buffers: dict[str, np.ndarray]) -> None:
        if self.error:
            raise self.error
        self.jobs.put((group, directory, shard, rows, buffers))

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error:
                continue
            try:
                write_shard(*job)
            except BaseException as err:  # surfaced in the compute loop and at close
                self.error = err

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def _settings(dataset: Dataset, backbone: Backbone, *, views: int, view_seed: int, crop_to_box: bool,
              row_order_seed: int, rows_per_shard: int | None) -> dict:
    return {
        "backbone": backbone.name, "weights": backbone.weights, "model_kwargs": backbone.model_kwargs,
        "data_config": backbone.provenance()["data_config"], "grid": list(backbone.grid), "dim": backbone.dim,
        "dataset_kind": dataset.kind, "split_sizes": {k: len(v) for k, v in dataset.splits.items()},
        "views": views, "view_seed": view_seed, "crop_to_box": crop_to_box, "row_order_seed": row_order_seed,
        "rows_per_shard": rows_per_shard,
        **({"layers": list(backbone.layers)} if backbone.layers != (FINAL,) else {}),  # older caches resume as before
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


def _check_out(out: Path, data: str | Path, overwrite: bool) -> bool:
    """True when `out` holds a protoquant cache (resume or replace it); False when it is free."""
    sources = [Path(data)] if Path(data).exists() else []
    return check_output(out, is_ours=is_protoquant_cache, what="a protoquant feature cache", overwrite=overwrite,
                        sources=sources, describe=describe_foreign_cache)


def _prepare_store(out: Path, ours: bool, overwrite: bool, settings: dict, plans: dict[str, SplitPlan], create) -> Cache:
    """Resume the cache at `out` when it was made from the same settings and dataset listing; replace
    it with --overwrite; refuse it otherwise. A store killed while being created starts again."""
    if not ours:
        return create()
    if overwrite:
        remove_ours(out, is_protoquant_cache)
        return create()
    cache = Cache(out, writable=True)
    if "settings_hash" not in cache.attrs or not cache.attrs.get("created"):
        remove_ours(out, is_protoquant_cache)  # killed while being created: it holds no features yet
        return create()
    if cache.attrs["settings_hash"] != settings_hash(settings):
        theirs = cache.attrs.get("settings", {})
        diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        made = ""
        if "data_config" in theirs and _grid_options(theirs) != _grid_options(settings):  # e.g. made before the defaults changed
            made = (f"; it was made with {_grid_options(theirs)} (extract's defaults: --layers {DEFAULT_LAYERS_SPEC} "
                    f"--crop-mode {DEFAULT_CROP_MODE} --crop-pct {DEFAULT_CROP_PCT}): pass those to resume it")
        raise ProtoquantError(f"--out {out} holds a cache made with other settings (differs in: {', '.join(diff)}){made}; "
                              "pass --overwrite to replace it, or choose another --out")
    if any(cache.split(name).recorded() is None for name in cache.splits):
        raise ProtoquantError(f"--out {out} was started by an older protoquant that recorded no shard checksums: "
                              "pass --overwrite to extract it again")
    for name, plan in plans.items():
        _check_listing(out, cache.split(name), plan)
    _reset_shards_to_redo(cache)
    return cache


def _grid_options(settings: dict) -> str:
    """The --layers / --crop-mode / --crop-pct a cache's settings record (resolved: stage indices, timm's crop)."""
    config = settings["data_config"]
    layers = ",".join(map(str, settings.get("layers") or [FINAL]))  # no "layers": made with the final map
    return f"--layers {layers} --crop-mode {config.get('crop_mode', 'center')} --crop-pct {config.get('crop_pct')}"


def _check_listing(out: Path, split, plan: SplitPlan) -> None:
    """Refuse to resume onto another dataset: every row's id and label must be the ones listed now.
    Rows whose id or label chunk was lost (fill values) are rewritten from the listing."""
    ids, labels = split.group["ids"][:], split.group["labels"][:]
    now_ids, now_labels = np.asarray(plan.ids, dtype=object), np.asarray(plan.labels, dtype=np.int32)
    lost = (ids == "") | (labels < 0)
    differ = np.flatnonzero(((ids != now_ids) | (labels != now_labels)) & ~lost)
    if len(differ):
        shown = "; ".join(f"row {r}: {ids[r]} (label {labels[r]}) is now {now_ids[r]} (label {now_labels[r]})"
                          for r in differ[:3])
        raise ProtoquantError(f"--out {out} was extracted from another listing of the dataset: {len(differ)} rows of "
                              f"the {split.name} split differ ({shown}{'; ...' if len(differ) > 3 else ''}); "
                              "pass --overwrite to extract it again, or choose another --out")
    if lost.any():
        split.group["ids"][:] = now_ids
        split.group["labels"][:] = now_labels


def _reset_shards_to_redo(cache: Cache) -> None:
    """Done shards whose files are missing or truncated, or whose ok marks were lost, are redone; the
    files of every shard to redo are removed first (a write killed halfway leaves a torn shard, and
    zarr reads a shard's old index before rewriting it)."""
    for name in cache.splits:
        split = cache.split(name)
        redo = {p.shard for p in split.shard_problems()}
        lost_ok = (split.group["ok"][:] == NOT_WRITTEN) & split.done_rows()
        redo |= {split.layout.shard_of(int(r)) for r in np.flatnonzero(lost_ok)}
        for shard in sorted(redo):
            split.group["done"][shard] = 0
        for shard in np.flatnonzero(~split.done()):
            for array in ("features", "views"):
                if array in split.group:
                    split.shard_file(array, int(shard)).unlink(missing_ok=True)


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
    kind: str = "auto",
    progress: bool = False,
    layers: str | tuple | None = DEFAULT_LAYERS_SPEC,
    crop_pct: float | None = DEFAULT_CROP_PCT,
    crop_mode: str | None = DEFAULT_CROP_MODE,
) -> ExtractSummary:
    """Extract every split of `data` into the Zarr store `out` (resuming an interrupted run).

    `layers` picks the maps of the grid (pipeline/backbones.py): by default AUTO, the family's measured
    default (resolved and recorded as stage indices); "final" or None = forward_features. `crop_pct` and
    `crop_mode` override timm's data config: by default squash 1.0, the whole image (with `crop_to_box`
    the whole box: the paper's CUB transform; METHOD.md pitfall 6) resized to S x S with nothing cut;
    None = the model's own value (e.g. crop_mode None and crop_pct None: timm's centre crop).
    """
    started = time.perf_counter()
    refuse_url(out, "--out")
    out = Path(out)
    dist = init_distributed(resolve_device(device))
    device = str(dist.device)
    lock = OwnerLock(out, f"the cache {out}")
    if dist.is_main:
        _check_out(out, data, overwrite)  # before anything is read or written, the lock included
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        ours = _check_out(out, data, overwrite) if dist.is_main else True  # again: another writer may have been at it
        dataset = open_dataset(data, kind=kind)
        if crop_to_box and any(r.box is None for records in dataset.splits.values() for r in records[:1]):
            raise ProtoquantError(f"--crop-to-box needs bounding boxes, but {data} has none (CUB layout with "
                                  "bounding_boxes.txt, or shards written from one); drop --crop-to-box")
        net = load_backbone(backbone, pretrained=pretrained, weights=weights, image_size=image_size,
                            device=device, model_kwargs=model_kwargs, layers=layers, crop_pct=crop_pct,
                            crop_mode=crop_mode)
        splits = {name: _ordered(records, row_order_seed) for name, records in dataset.splits.items()}
        settings = _settings(dataset, net, views=views, view_seed=view_seed, crop_to_box=crop_to_box,
                             row_order_seed=row_order_seed, rows_per_shard=rows_per_shard)
        n_parts = len(dataset.part_names or [])
        plans = {name: _split_plan(recs, n_parts, views if name == "train" else 0) for name, recs in splits.items()}

        def create() -> Cache:
            cache = create_cache(
                out, settings=settings, grid=net.grid, dim=net.dim, rows_per_shard=rows_per_shard, splits=plans,
                attrs={"provenance": net.provenance(), "classes": dataset.classes, "part_names": dataset.part_names,
                       "class_parts": dataset.class_parts, "source": {"path": str(Path(data).resolve()) if Path(data).exists() else str(data),
                                  "kind": dataset.kind},
                       "crop_to_box": crop_to_box, "views": views},
            )
            cache.update_attrs({"created": True})  # written last: a store without it is restarted from scratch
            return cache

        if dist.is_main:
            _prepare_store(out, ours, overwrite, settings, plans, create)
        dist.barrier()
        return _run(out, splits, net, dist, started, batch_size=batch_size, workers=workers, view_seed=view_seed,
                    crop_to_box=crop_to_box, skip_bad=skip_bad, progress=progress)
    finally:
        lock.release()


def _run(out: Path, splits: dict[str, list[Record]], net: Backbone, dist: Distributed, started: float, *,
         batch_size: int, workers: int, view_seed: int, crop_to_box: bool, skip_bad: bool, progress: bool) -> ExtractSummary:
    """Extract this rank's unmarked shards, then finish the store (rank 0) once every rank is done."""
    cache = Cache(out, writable=True)
    layouts = {name: cache.split(name).layout for name in cache.splits}
    done = {name: cache.split(name).done() for name in cache.splits}
    resumed_shards = sum(int(marks.sum()) for marks in done.values())
    mine = plan_shards(done, dist.rank, dist.world)

    def rows_in(shards_by_split: dict) -> int:
        return sum(len(layouts[s].shard_rows(int(p))) for s, shards in shards_by_split.items() for p in shards)

    total, total_all_ranks = rows_in(mine), rows_in(plan_shards(done))
    writer = _ShardWriter()
    try:
        with progress_bar(total, "extract", enabled=progress and dist.is_main) as advance:
            for name, shards in mine.items():
                if shards:
                    _extract_split(cache, name, splits[name], shards, net, batch_size=batch_size, workers=workers,
                                   device=str(dist.device), view_seed=view_seed, crop_to_box=crop_to_box,
                                   skip_bad=skip_bad, writer=writer, advance=advance)
    finally:
        writer.close()
    dist.barrier()
    summary = _finish(out, started, total_all_ranks, resumed_shards, finalize=dist.is_main)
    dist.close()
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
    for batch in loader:
        if isinstance(batch, _Failure):
            raise ProtoquantError(batch.message)
        rows, images, ok, sizes = batch
        if shard is None or filled == len(rows_of[shard]):
            shard, filled = next(shard_iter), 0
            n = len(rows_of[shard])
            buffers = {"features": np.empty((n, h, w, net.dim), np.float16), "ok": np.empty(n, np.uint8),
                       "image_size": np.empty((n, 2), np.int32)}
            if views:
                buffers["views"] = np.empty((n, views, h, w, net.dim), np.float16)
        flat = images.flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=AUTOCAST_DTYPE, enabled=use_amp):
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
            writer.put(split.group, split.directory, shard, rows_of[shard], buffers)


def _collate(batch):
    failures = [item for item in batch if isinstance(item, _Failure)]
    if failures:
        return failures[0]
    rows, images, ok, sizes = zip(*batch)
    return list(rows), torch.stack(images), np.array(ok, dtype=bool), np.array(sizes, dtype=np.int32)


def _finish(out: Path, started: float, images: int, resumed_shards: int, *, finalize: bool) -> ExtractSummary:
    """Check the marks and files, then (rank 0) record completeness, the skipped ids and the fingerprint
    that covers every shard's checksum."""
    cache = Cache(out, writable=finalize)
    cache.require_complete()
    splits = {name: cache.split(name) for name in cache.splits}
    skipped = [str(i) for split in splits.values() for i in split.ids[~split.ok]]  # ids are paths relative to DATA
    if finalize:
        cache.update_attrs({"complete": True, "skipped": skipped, "fingerprint": cache.content_fingerprint()})
    shapes = {name: tuple(split.features.shape) for name, split in splits.items()}
    nbytes = sum(split.nbytes + (split.views.nbytes if split.views is not None else 0) for split in splits.values())
    return ExtractSummary(path=out, splits=shapes, gigabytes=nbytes / 1e9, seconds=time.perf_counter() - started,
                          images=images, skipped=skipped, resumed_shards=resumed_shards)
