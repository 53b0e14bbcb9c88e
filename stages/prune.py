"""Prune and edit a run (METHOD.md "Pruning and editing"), optionally fine-tune, write a new run.

In this order:
1. drop_codes: remove named codes everywhere (editing; the code leaves the softmax over codes).
2. min_usage: remove codes chosen (argmax by cosine) by less than this fraction of the patches of the
   TRAINING split - train and validation rows, never test (METHOD.md pitfall 2).
3. top_k_per_class: keep each class's k largest weights among the remaining codes, zero the others,
   then remove the codes no class uses (they leave the softmax, as METHOD.md says). A zero weight is
   dead for good (relu), so fine-tuning trains only the kept ones.
4. finetune_epochs: stage B again on the training rows, best epoch chosen on validation.
Accuracy is reported before and after on validation (what pruning may be judged on) and, for
information only, on test.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.codebook import code_usage
from pipeline.data import evaluation_source, open_training_data, parse_memory, usable_rows
from pipeline.errors import ProtoquantError
from pipeline.model import codes_in_use, keep_top_k_per_class, save_head
from pipeline.devices import resolve_device
from pipeline.distributed import Distributed
from pipeline.io import write_json, write_log
from pipeline.progress import EpochDisplay
from pipeline.run import check_run_out, finish_run_dir, open_run_and_cache, prepare_run_dir, run_config
from pipeline.training import TrainSettings, accuracy, head_phase, run_phase


@dataclass(frozen=True)
class PruneSettings:
    """Options of `protoquant prune`."""

    min_usage: float = 0.0               # fraction of training patches; 0 = keep every code
    top_k_per_class: int | None = None   # None = keep every weight
    drop_codes: tuple[int, ...] = ()
    finetune_epochs: int = 0


@dataclass
class PruneResult:
    path: Path
    before: dict
    after: dict
    removed_named: list[int] = field(default_factory=list)
    removed_by_usage: list[int] = field(default_factory=list)
    report: Path | None = None        # OUT/report/index.html: removed codes, accuracy, changed predictions
    report_skipped: str | None = None  # why no report was written (the run itself is complete)


def parse_codes(text: str | None) -> tuple[int, ...]:
    """'3,17' -> (3, 17); empty or None -> ()."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ProtoquantError(f"--drop-codes {text!r}: write code numbers separated by commas, e.g. 3,17") from None


def _train_settings(run) -> TrainSettings:
    """The run's training settings (keys this version does not know are ignored, with the defaults for new ones)."""
    known = TrainSettings.__dataclass_fields__
    return TrainSettings(**{k: v for k, v in run.config["settings"].items() if k in known})


def prune(run_path: str | Path, out: str | Path, settings: PruneSettings, *, cache: str | Path | None = None,
          device: str = "auto", overwrite: bool = False, progress: bool = False, report: bool = True,
          data: str | Path | None = None) -> PruneResult:
    """Apply the settings to RUN's head and write the result as a new run OUT.

    With `report`, also write OUT/report/index.html (the edit shown on a page; DATA gives the pixels,
    by default the dataset recorded in the cache). A report that cannot be made does not undo the run.
    """
    out = Path(out)
    check_run_out(out, overwrite=overwrite)
    run, store = open_run_and_cache(run_path, cache)
    store.require_complete()
    train_settings = _train_settings(run)
    where = resolve_device(device)
    head = run.head.to(where)
    k = head.codes.shape[0]
    bad = [c for c in settings.drop_codes if not 0 <= c < k]
    if bad:
        raise ProtoquantError(f"--drop-codes {bad}: the run has codes 0..{k - 1}")
    if not 0 <= settings.min_usage < 1:
        raise ProtoquantError(f"--min-usage must be a fraction in [0, 1), got {settings.min_usage}")
    if settings.top_k_per_class is not None and settings.top_k_per_class < 1:
        raise ProtoquantError(f"--top-k-per-class must be at least 1, got {settings.top_k_per_class}")
    split = store.split("train")
    training = open_training_data(split, val_fraction=train_settings.val_fraction, seed=train_settings.seed,
                              batch_size=train_settings.batch_size, max_memory=parse_memory(train_settings.max_memory),
                              use_views=train_settings.use_views)
    test = evaluation_source(store.split("test"), batch_size=256) if "test" in store.splits else None

    def measure() -> dict:
        return {"val_top1": accuracy(head, training.val, device=where),
                "test_top1": accuracy(head, test, device=where) if test is not None else None,
                "codes_in_use": int(codes_in_use(head).sum())}

    before = measure()
    if settings.drop_codes:
        head.remove_codes(list(settings.drop_codes))
    by_usage = _rare_codes(head, training.scan(usable_rows(split)), settings.min_usage) if settings.min_usage > 0 else []
    if by_usage:
        head.remove_codes(by_usage)
    if settings.top_k_per_class is not None:
        keep_top_k_per_class(head, settings.top_k_per_class)
    history = []
    if settings.finetune_epochs > 0:
        phase = head_phase("finetune", head, train_settings, settings.finetune_epochs, training.val, where, Distributed(device=where))
        with EpochDisplay(progress) as display:
            display.start("finetune", settings.finetune_epochs)
            history = run_phase(phase, training.train, device=where, seed=train_settings.seed,
                                on_epoch=lambda state: display.update(state.history[-1])).history
    after = measure()

    work = prepare_run_dir(out, overwrite=overwrite, resume=False).work
    config = {**run.config, **run_config({}), "command": "prune", "parent": str(run.path.resolve()), "prune": asdict(settings)}
    save_head(work / "head.safetensors", head, classes=run.classes,
              meta={"cache_fingerprint": store.fingerprint, "settings": run.config["settings"], "prune": asdict(settings)})
    if (run.path / "probe.safetensors").is_file():
        shutil.copy2(run.path / "probe.safetensors", work / "probe.safetensors")
    write_json(work / "config.json", config)
    write_json(work / "metrics.json", {"before": before, "after": after, "removed_named": list(settings.drop_codes),
                                       "removed_by_usage": by_usage})
    write_log(work / "log.jsonl", history)
    finish_run_dir(work, out)
    result = PruneResult(out, before, after, list(settings.drop_codes), by_usage)
    if report:
        from stages.interpret import prune_report

        try:
            result.report = prune_report(run_path, out, out / "report", cache=store.path, data=data).index
        except ProtoquantError as err:
            result.report_skipped = str(err)
    return result


@torch.no_grad()
def _rare_codes(head, source, min_usage: float) -> list[int]:
    """Existing codes picked (cosine argmax among existing codes) by fewer than min_usage of the patches."""
    existing = head.code_mask.nonzero().flatten()  # (K',) indices of codes still in the head
    counts = code_usage(head.codes[existing], (f for f, _ in source.batches(0)))  # (K',)
    fraction = counts.float() / counts.sum().clamp_min(1)
    rare = existing[fraction < min_usage].tolist()
    if len(rare) == len(existing):
        raise ProtoquantError(f"--min-usage {min_usage} would remove every code: lower it")
    return rare


def print_prune(result: PruneResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pruned run {result.path}")
    for column in ("", "val top-1", "test top-1 (information)", "codes in use"):
        table.add_column(column, justify="right")
    for name, values in (("before", result.before), ("after", result.after)):
        test = "-" if values["test_top1"] is None else f"{values['test_top1']:.4f}"
        table.add_row(name, f"{values['val_top1']:.4f}", test, str(values["codes_in_use"]))
    console = Console()
    console.print(table)
    console.print(f"removed {len(result.removed_named)} named and {len(result.removed_by_usage)} rarely used codes")
