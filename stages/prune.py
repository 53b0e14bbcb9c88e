"""Prune and edit a run (METHOD.md "Pruning and editing"), optionally fine-tune, write a new run.

In this order:
1. drop_codes: remove named codes everywhere (editing; the code leaves the softmax over codes).
2. min_usage: remove codes chosen (argmax by cosine) by less than this fraction of the patches of the
   TRAINING split - train and validation rows, never test (METHOD.md pitfall 2).
3. top_k_per_class: keep each class's k largest weights among the remaining codes and zero the others;
   every code stays in the softmax over codes. Alone, this is the paper's interpretability/accuracy
   curve (no retraining). A zero weight is dead for good (relu), so fine-tuning trains only the kept ones.
4. drop_unused: remove the codes no class uses (out of the softmax: the others' presence renormalises).
   With top_k_per_class and finetune_epochs this is the paper's stage 2b (cut, remove, fine-tune);
   without fine-tuning it changes every presence value of a head trained with those codes present.
5. finetune_epochs: stage B again on the training rows, best epoch chosen on validation.
Accuracy is reported before and after on validation (what pruning may be judged on) and, for
information only, on test.

The edit report (OUT/report/index.html, or prune_report(RUN_BEFORE, RUN_AFTER, DIR)) shows which codes
went, their nearest training patches, accuracy before and after, and the test predictions that
changed; edit_report(run, edited_head, cache, DIR) does the same for a head not saved yet.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline import render
from pipeline.cache import Cache
from pipeline.cards import GROUNDING_TOP, code_views, write_code_thumbnails
from pipeline.codebook import code_usage
from pipeline.data import evaluation_source, open_training_data, parse_memory, usable_rows
from pipeline.errors import ProtoquantError
from pipeline.grounding import SplitImages, grounding_for_run
from pipeline.model import ProtoQuantHead, codes_in_use, drop_unused_codes, keep_top_k_weights, save_head
from pipeline.devices import resolve_device
from pipeline.distributed import Distributed
from pipeline.io import write_json, write_log
from pipeline.progress import EpochDisplay
from pipeline.run import (Run, check_run_matches_cache, check_run_out, finish_run_dir, open_run, open_run_and_cache,
                          prepare_run_dir, run_config)
from pipeline.training import TrainSettings, accuracy, head_phase, run_phase, with_legacy_settings


@dataclass(frozen=True)
class PruneSettings:
    """Options of `protoquant prune`."""

    min_usage: float = 0.0               # fraction of training patches; 0 = keep every code
    top_k_per_class: int | None = None   # None = keep every weight; all codes stay in the softmax
    drop_codes: tuple[int, ...] = ()
    drop_unused: bool = False            # remove the codes no class uses (stage 2b, before fine-tuning)
    finetune_epochs: int = 0


@dataclass
class PruneResult:
    path: Path
    before: dict
    after: dict
    removed_named: list[int] = field(default_factory=list)
    removed_by_usage: list[int] = field(default_factory=list)
    removed_unused: list[int] = field(default_factory=list)  # by drop_unused: no class weighed them
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
    """The run's training settings (keys this version does not know are ignored; settings the run predates take
    what it did without them, pipeline.training.LEGACY_SETTINGS)."""
    known = TrainSettings.__dataclass_fields__
    return TrainSettings(**{k: v for k, v in with_legacy_settings(run.config["settings"]).items() if k in known})


def prune(run_path: str | Path, out: str | Path, settings: PruneSettings, *, cache: str | Path | None = None,
          device: str = "auto", overwrite: bool = False, progress: bool = False, report: bool = True,
          data: str | Path | None = None) -> PruneResult:
    """Apply the settings to RUN's head and write the result as a new run OUT.

    With `report`, also write OUT/report/index.html (the edit shown on a page; DATA gives the pixels,
    by default the dataset recorded in the cache). A report that cannot be made does not undo the run.
    """
    out = Path(out)
    check_run_out(out, overwrite=overwrite, sources=[Path(run_path)] + ([Path(cache)] if cache else []))
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
        keep_top_k_weights(head, settings.top_k_per_class)
    unused = drop_unused_codes(head) if settings.drop_unused else []
    history = []
    if settings.finetune_epochs > 0:
        # W only, as train's fine-tuning after a cut: the codes the explanations show stay where they are
        phase = head_phase("finetune", head, replace(train_settings, train_codes=False), settings.finetune_epochs,
                           training.val, where, Distributed(device=where))
        with EpochDisplay(progress) as display:
            display.start("finetune", settings.finetune_epochs)
            history = run_phase(phase, training.train, device=where, seed=train_settings.seed,
                                on_epoch=lambda state: display.update(state.history[-1])).history
    after = measure()

    work = prepare_run_dir(out, overwrite=overwrite, resume=False, sources=[run.path, store.path]).work
    config = {**run.config, **run_config({}), "command": "prune", "parent": str(run.path.resolve()), "prune": asdict(settings)}
    save_head(work / "head.safetensors", head, classes=run.classes,
              meta={"cache_fingerprint": store.fingerprint, "settings": run.config["settings"], "prune": asdict(settings)})
    if (run.path / "probe.safetensors").is_file():
        shutil.copy2(run.path / "probe.safetensors", work / "probe.safetensors")
    write_json(work / "config.json", config)
    write_json(work / "metrics.json", {"before": before, "after": after, "removed_named": list(settings.drop_codes),
                                       "removed_by_usage": by_usage, "removed_unused": unused})
    write_log(work / "log.jsonl", history)
    finish_run_dir(work, out)
    result = PruneResult(out, before, after, list(settings.drop_codes), by_usage, unused)
    if report:
        try:
            result.report = prune_report(run_path, out, out / "report", cache=store.path, data=data).index
        except ProtoquantError as err:
            result.report_skipped = str(err)
    return result


# ---- the edit report --------------------------------------------------------------------------------------

@dataclass
class PruneReport:
    """What an edit report found, and where it is."""

    out: Path
    index: Path
    accuracy_before: float
    accuracy_after: float
    removed: list[int]  # codes in use before, not after
    changed: int  # test predictions that changed
    seconds: float


@torch.no_grad()
def predictions(head: ProtoQuantHead, cache: Cache, split: str, *, batch_size: int = 256,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, predicted classes) over the usable rows of a split, in row order."""
    data = cache.split(split)
    rows = usable_rows(data)
    labels, predicted = [], []
    head = head.eval().to(device)
    for features, y in evaluation_source(data, batch_size=batch_size, rows=rows).batches(0):
        predicted.append(head(features.to(device)).argmax(dim=1).cpu())
        labels.append(y)
    return rows, torch.cat(labels).numpy(), torch.cat(predicted).numpy()


def prune_report(before_run: str | Path, after_run: str | Path, out: str | Path, *, cache: str | Path | None = None,
                 data: str | Path | None = None, split: str = "test", patches: int = 5, max_changed: int = 200,
                 device: str = "cpu") -> PruneReport:
    """Write DIR/index.html comparing two runs on the same cache: before and after an edit."""
    before, store = open_run_and_cache(before_run, cache)
    after = open_run(after_run)
    check_run_matches_cache(after, store)
    title = f"{Path(before_run).name} → {Path(after_run).name}"
    return edit_report(before, after.head, store, out, data=data, split=split, patches=patches,
                       max_changed=max_changed, device=device, title=title)


def edit_report(before: Run, after: ProtoQuantHead, cache: Cache, out: str | Path, *, data: str | Path | None = None,
                split: str = "test", patches: int = 5, max_changed: int = 200, device: str = "cpu",
                title: str = "") -> PruneReport:
    """Write DIR/index.html for an edited head (e.g. before the pruned run is saved): the codes in use
    before and not after with their nearest training patches, accuracy on `split` before and after,
    and the predictions that changed (at most max_changed shown; DIR/report.json has the counts)."""
    started = time.perf_counter()
    out = Path(out)
    used_before, used_after = codes_in_use(before.head).cpu().numpy(), codes_in_use(after).cpu().numpy()
    removed = np.flatnonzero(used_before & ~used_after)
    with render.pages_folder(out, "edit-report") as site:
        grounding = grounding_for_run(before.path, before.head, cache, top=max(GROUNDING_TOP, patches), device=device)
        write_code_thumbnails(grounding, removed, cache, SplitImages(cache, grounding.split, data), site,
                              patches=patches, size=96)
        rows, labels, predicted_before = predictions(before.head, cache, split, device=device)
        _, _, predicted_after = predictions(after, cache, split, device=device)
        changed = np.flatnonzero(predicted_before != predicted_after)
        test_images = SplitImages(cache, split, data)
        shown = changed[:max_changed]
        for i in shown.tolist():
            picture, _ = render.fit(test_images.load(int(rows[i])), 96)
            render.save_image(picture, site / _test_image(int(rows[i])))
        figures = _edit_figures(split, labels, predicted_before, predicted_after, used_before, used_after)
        _write_report(site, before, after, cache, grounding, figures, title=title or before.path.name, split=split,
                      patches=patches, rows=rows, labels=labels, predicted=(predicted_before, predicted_after),
                      shown=shown)
    return PruneReport(out=out, index=out / "index.html", accuracy_before=figures["accuracy_before"],
                       accuracy_after=figures["accuracy_after"], removed=removed.tolist(), changed=int(len(changed)),
                       seconds=round(time.perf_counter() - started, 3))


def _edit_figures(split: str, labels: np.ndarray, before: np.ndarray, after: np.ndarray, used_before: np.ndarray,
                  used_after: np.ndarray) -> dict:
    """The numbers of an edit (report.json): accuracy before and after, codes in use, predictions changed."""
    return {"accuracy_before": float((before == labels).mean()), "accuracy_after": float((after == labels).mean()),
            "split": split, "images": int(len(labels)), "codes_in_use_before": int(used_before.sum()),
            "codes_in_use_after": int(used_after.sum()), "removed_codes": np.flatnonzero(used_before & ~used_after).tolist(),
            "changed_predictions": int((before != after).sum()),
            "fixed": int(((after == labels) & (before != labels)).sum()),
            "broken": int(((before == labels) & (after != labels)).sum())}


def _write_report(site: Path, before: Run, after: ProtoQuantHead, cache: Cache, grounding, figures: dict, *, title: str,
                  split: str, patches: int, rows: np.ndarray, labels: np.ndarray,
                  predicted: tuple[np.ndarray, np.ndarray], shown: np.ndarray) -> None:
    removed = np.asarray(figures["removed_codes"], dtype=np.int64)
    removed_mask = ~after.code_mask.cpu().numpy()
    views = code_views(before.head, grounding, removed, patches=patches)
    cards = [{"view": views[k], "note": "removed from the head" if removed_mask[k] else "no class weighs it any more"}
             for k in sorted(views)]
    ids = cache.split(split).ids
    changed_rows = [_changed_row(ids, before.classes, int(rows[i]), int(labels[i]), int(predicted[0][i]),
                                 int(predicted[1][i])) for i in shown.tolist()]
    page = render.render_page("edit_report.html", title="Edit report", subtitle=[title, f"{split} split"],
                              figures=_report_figures(figures), cards=cards, classes=before.classes,
                              changed=changed_rows, n_changed=figures["changed_predictions"])
    render.write_style(site)
    render.write_text(site / "index.html", page)
    write_json(site / "report.json", figures)


def _test_image(row: int) -> str:
    return f"images/test-{row:06d}.jpg"


def _report_figures(figures: dict) -> list[tuple[str, str]]:
    return [(f"{figures['accuracy_before']:.3f}", "accuracy before"),
            (f"{figures['accuracy_after']:.3f}", "accuracy after"),
            (f"{figures['codes_in_use_before']} \u2192 {figures['codes_in_use_after']}", "codes in use"),
            (str(figures["changed_predictions"]), "predictions changed"), (str(figures["fixed"]), "fixed"),
            (str(figures["broken"]), "broken")]


def _changed_row(ids, classes: list[str], row: int, label: int, before: int, after: int) -> dict:
    verdict = "fixed" if after == label else ("broken" if before == label else "still wrong")
    image_id = str(ids[row])
    return {"picture": _test_image(row), "id": image_id, "name": image_id.rsplit("/", 1)[-1], "truth": classes[label],
            "before": classes[before], "after": classes[after], "verdict": verdict}


@torch.no_grad()
def _rare_codes(head, source, min_usage: float) -> list[int]:
    """Existing codes picked (cosine argmax among existing codes) by fewer than min_usage of the patches."""
    existing = head.code_mask.nonzero().flatten()  # (K',) indices of codes still in the head
    counts = code_usage(head.codes[existing], (head.embed(f.to(head.codes.device)) for f, _ in source.batches(0)))  # (K',)
    fraction = counts.float() / counts.sum().clamp_min(1)
    rare = existing[fraction < min_usage].tolist()
    if len(rare) == len(existing):
        raise ProtoquantError(f"--min-usage {min_usage} would remove every code: lower it")
    return rare
