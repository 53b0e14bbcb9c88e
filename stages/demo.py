"""`protoquant demo`: the whole pipeline on generated birds with real pretrained weights, offline.

make-birds -> extract (tf_efficientnet_lite0, built-in ImageNet weights) -> FAISS codebook -> train
-> evaluate (accuracy, probe, purity, local size) -> per-class top-k curve -> gallery -> explanations
-> one DIR/index.html that links everything. Each step is skipped when its output is already complete
(DIR/demo-state.json records what finished with which settings), so a second run costs seconds:
the cache's promise, that the backbone runs once, shown on the user's own machine.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from markupsafe import Markup

from pipeline import render
from pipeline.cache import Cache
from pipeline.data import evaluation_source
from pipeline.errors import ProtoquantError
from pipeline.paths import check_output
from pipeline.model import keep_top_k_weights
from pipeline.plots import Series, line_chart
from pipeline.io import iter_log, read_json, write_json
from pipeline.run import open_run


STATE_FILE = "demo-state.json"  # marks a folder as a demo protoquant made: a re-run continues in it

@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; `quick` is the one the tests run. Epochs of None keep train's defaults."""

    classes: int = 6
    per_class: int = 150      # frozen ImageNet features need ~100 training images per class here
    size: int = 224
    k: int = 128
    epochs: int | None = None
    probe_epochs: int | None = None
    codebook_epochs: int | None = None
    views: int = 0
    explain_images: int = 4
    metric_images: int = 16
    workers: int = 2
    seed: int = 0
    # The recipe measured best on part-defined data (README, "Stage 1"): stride 16+32 grid, whole image
    # squashed to the input (nothing cut): extract's defaults too; train's defaults then anchor the codes and
    # sparsify the head.
    layers: str = "auto"
    crop_mode: str = "squash"
    crop_pct: float = 1.0

    @property
    def recipe(self) -> str:
        return (f"grid from --layers {self.layers} (stride 16+32 for this CNN), --crop-mode {self.crop_mode} "
                f"--crop-pct {self.crop_pct:g}, K = {self.k}; train's defaults: codes and patches compared through "
                "a learned 128-dimensional projection (learned on the stride-16 channels), codes anchored near the "
                "training patches they match, then pushed onto their nearest training patch (every prototype IS "
                "a training patch), W refit along a non-negative path, 99% L1")

    def train_settings(self):
        from pipeline.training import TrainSettings

        given = {"epochs": self.epochs, "probe_epochs": self.probe_epochs, "codebook_epochs": self.codebook_epochs}
        return TrainSettings(seed=self.seed, **{k: v for k, v in given.items() if v is not None})

    def raw_settings(self):
        """The variant beside the default head: the paper's raw cosine, codes not pushed (README, "A grounded head")."""
        return replace(self.train_settings(), **RAW)


FULL = DemoSettings()
# 40 images per class at 224 px with train's defaults: 16 at 128 px with 10 epochs stayed at chance (top-1 0.20-0.25,
# the head empty or one class), 40 at 128 px too; this one gave 0.625 and 0.500 on seeds 0 and 1 in about 25 s.
QUICK = DemoSettings(classes=4, per_class=40, size=224, k=64, explain_images=2, metric_images=4, workers=0)
TOP_K = (1, 2, 3, 5, 10)
RAW = {"projection_dim": 0, "ground": False}  # train's options for the report's second column
RAW_OPTIONS = "--projection-dim 0 --no-ground"  # the same, as typed
# The paper's per-class top-k without retraining on CUB-200 (METHOD.md), beside ours on the report's chart.
PAPER_FULL_HEAD = 0.866
PAPER_TOP_K = ((1, 0.678), (3, 0.774), (5, 0.799), (10, 0.832), (50, 0.847))


@dataclass
class DemoResult:
    out: Path
    report: Path
    figures: dict
    seconds: float
    skipped_steps: list[str]


class _Steps:
    """Runs named steps once: a step whose settings and outputs are recorded as done is skipped, unless a step
    it comes after ran in this call (its inputs changed)."""

    def __init__(self, out: Path, settings: DemoSettings, say: Callable[[str], None]):
        self.state_path = out / STATE_FILE
        self.state = read_json(self.state_path, "delete it to run the demo again") if self.state_path.exists() else {}
        write_json(self.state_path, self.state)  # written first: it marks the folder as the demo's
        self.settings = asdict(settings)
        self.say = say
        self.skipped: list[str] = []
        self.ran: set[str] = set()

    def run(self, name: str, outputs: list[Path], action: Callable[[], object], *, after: tuple[str, ...] = (),
            extra: dict | None = None) -> None:
        """extra: settings of this step beyond the demo's (recorded with them), and what the steps it comes after
        recorded: a step whose input step was redone in an earlier, interrupted call runs again too."""
        expected = {**self.settings, **(extra or {}), "after": {step: self.state.get(step) for step in after}}
        if (self.state.get(name) == expected and all(p.exists() for p in outputs)
                and not self.ran.intersection(after)):
            self.say(f"[dim]{name}: already done, skipped[/]")
            self.skipped.append(name)
            return
        begin = time.perf_counter()
        self.say(f"[bold]{name}[/] ...")
        action()
        self.ran.add(name)
        self.state[name] = expected
        write_json(self.state_path, self.state)
        self.say(f"{name}: done in {time.perf_counter() - begin:.1f} s")


def demo(out: str | Path = "demo-out", *, quick: bool = False, say: Callable[[str], None] = print,
         progress: bool = False) -> DemoResult:
    """Run the whole pipeline into OUT (resuming: finished steps are skipped)."""
    from pipeline.birds import make_birds
    from stages.codebook import CodebookSettings, build_codebook
    from stages.evaluate import MetricSettings, evaluate, interpretability_metrics
    from stages.explain import explain
    from stages.extract import extract
    from stages.gallery import gallery
    from stages.train import train

    started = time.perf_counter()
    settings = QUICK if quick else FULL
    out = Path(out)
    check_output(out, is_ours=lambda path: (path / STATE_FILE).is_file(), what="a demo folder", overwrite=False,
                 option="--out")
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(out, settings, say)
    birds, cache, codebook, run = out / "birds", out / "birds.zarr", out / "codebook.safetensors", out / "run"
    raw = out / "run-raw"
    figures_path, raw_path = out / "figures.json", out / "figures-raw.json"

    steps.run("make-birds", [birds / "images.txt"], lambda: make_birds(
        birds, classes=settings.classes, per_class=settings.per_class, size=settings.size, seed=settings.seed,
        overwrite=True))
    steps.run("extract", [cache / "zarr.json"], lambda: extract(
        birds, cache, backbone="tf_efficientnet_lite0", pretrained=True, image_size=settings.size,
        views=settings.views, workers=settings.workers, batch_size=32, overwrite=True, progress=progress,
        layers=settings.layers, crop_mode=settings.crop_mode, crop_pct=settings.crop_pct), after=("make-birds",))
    steps.run("codebook", [codebook], lambda: build_codebook(cache, codebook, CodebookSettings(k=settings.k, seed=settings.seed)),
              after=("extract",))
    steps.run("train", [run / "head.safetensors"], lambda: train(
        cache, codebook, run, settings.train_settings(), overwrite=True, progress=progress), after=("codebook",),
        extra={"train": asdict(settings.train_settings())})  # a demo folder of older defaults trains again
    steps.run("train-raw", [raw / "head.safetensors"], lambda: train(
        cache, codebook, raw, settings.raw_settings(), overwrite=True, progress=progress),
        after=("codebook",), extra={"train": asdict(settings.raw_settings())})

    def measure(run_path: Path, path: Path) -> None:
        evaluation = evaluate(run_path, cache=cache, split="test").to_json()
        metrics = interpretability_metrics(run_path, birds, cache=cache,
                                           settings=MetricSettings(max_images=settings.metric_images))
        write_json(path, {"evaluation": evaluation, "interpretability": metrics,
                          "top_k": top_k_curve(run_path, cache, TOP_K)})

    steps.run("evaluate", [figures_path], lambda: measure(run, figures_path), after=("train",))
    steps.run("evaluate-raw", [raw_path], lambda: measure(raw, raw_path), after=("train-raw",))
    steps.run("gallery", [out / "gallery" / "index.html"], lambda: gallery(run, out / "gallery", cache=cache, data=birds),
              after=("train",))
    test_images = _test_images(cache, birds, settings.explain_images)
    steps.run("explain", [out / "explain" / "index.html"], lambda: explain(run, test_images, out / "explain", cache=cache, data=birds),
              after=("train",))

    figures = {**json.loads(figures_path.read_text()), "raw": json.loads(raw_path.read_text())}
    report = write_report(out, run, figures, settings)
    return DemoResult(out=out, report=report, figures=figures, seconds=time.perf_counter() - started,
                      skipped_steps=steps.skipped)


@torch.no_grad()
def top_k_curve(run_path: Path, cache_path: Path, ks: tuple[int, ...]) -> list[dict]:
    """Test accuracy when each class keeps only its k largest weights (no retraining; METHOD.md pruning)."""
    from stages.evaluate import score_head

    run = open_run(run_path)
    test = Cache(cache_path).split("test")
    points = []
    n_codes = int(run.head.codes.shape[0])
    for k in (*ks, n_codes):
        head = copy.deepcopy(run.head)
        if k < n_codes:
            keep_top_k_weights(head, k)
        scored = score_head(head, None, evaluation_source(test, batch_size=256), run.classes, split="test",
                            device=torch.device("cpu"))
        points.append({"k": k, "top1": scored.top1, "codes_used": scored.codes_used, "local_size": scored.local_size,
                       "full": k == n_codes})
    return points


def _test_images(cache_path: Path, birds: Path, count: int) -> list[Path]:
    """A few test images, one per class first, as files on disk (explain takes image paths)."""
    test = Cache(cache_path).split("test")
    chosen, seen = [], set()
    for image_id, label in zip(test.ids, test.labels):
        if label not in seen:
            seen.add(int(label))
            chosen.append(birds / str(image_id))
        if len(chosen) == count:
            break
    if not chosen:
        raise ProtoquantError(f"{cache_path} has no test images to explain")
    return chosen


def _percent(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}%"


def write_report(out: Path, run_path: Path, figures: dict, settings: DemoSettings) -> Path:
    """DIR/index.html (and DIR/style.css): the figures, two plots, and links to the gallery and the explanations."""
    evaluation, interp, curve = figures["evaluation"], figures["interpretability"], figures["top_k"]
    raw = figures["raw"]
    variant = _result_rows(raw["evaluation"], raw["interpretability"], raw["top_k"])
    results = [(name, ours, theirs) for (name, ours), (_, theirs) in
               zip(_result_rows(evaluation, interp, curve), variant)]
    per_epoch, top_k = _charts(run_path, curve)
    strip = [p.relative_to(out).as_posix() for p in sorted((out / "gallery" / "thumbs").glob("*.jpg"))[:6]]
    metrics = json.dumps({k: v for k, v in interp.items() if k != "grounding"}, indent=1, default=float)[:4000]
    page = render.render_page("demo_report.html", title="protoquant demo", settings=settings,
                              results=results, variant_options=RAW_OPTIONS, strip=strip,
                              per_epoch=per_epoch, top_k=top_k, metrics=metrics)
    render.write_style(out)
    report = out / "index.html"
    render.write_text(report, page)
    return report


def _charts(run_path: Path, curve: list[dict]) -> tuple[Markup, Markup]:
    """Validation accuracy per epoch, and accuracy against the per-class top-k (SVG; plots escapes its text)."""
    epochs = [r for r in iter_log(run_path / "log.jsonl") if r.get("val_top1") is not None]
    order = ["probe", "codebook", "head", "finetune"]
    phases = sorted({r["phase"] for r in epochs}, key=lambda name: order.index(name) if name in order else len(order))
    per_epoch = line_chart(
        [Series(phase, [(r["epoch"], r["val_top1"]) for r in epochs if r["phase"] == phase]) for phase in phases],
        title="validation accuracy per epoch", x_label="epoch", y_label="top-1", y_range=(0.0, 1.0))
    full = next(p for p in curve if p["full"])
    top_k = line_chart(
        [Series("per-class top-k (no retraining)", [(p["k"], p["top1"]) for p in curve if not p["full"]]),
         Series(f"full head ({full['codes_used']} codes)", [(p["k"], full["top1"]) for p in curve if not p["full"]]),
         Series(f"paper, CUB-200 (full head {PAPER_FULL_HEAD:.3f})", list(PAPER_TOP_K))],
        title="interpretability vs accuracy", x_label="weights kept per class (k)", y_label="test top-1",
        y_range=(0.0, 1.0), log_x=True)
    return Markup(per_epoch), Markup(top_k)


def _number(value, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def _result_rows(evaluation: dict, interp: dict, curve: list[dict]) -> list[tuple[str, str]]:
    purity, evidence = interp.get("purity") or {}, interp.get("evidence_on_defining_parts") or {}
    grounding = interp.get("grounding") or {}
    full = next(p for p in curve if p["full"])
    top5 = next((p for p in curve if p["k"] == 5 and not p["full"]), None)
    return [
        ("ProtoQuant head, test top-1", _percent(evaluation["top1"])),
        ("linear probe (reference), test top-1", _percent(evaluation["probe_top1"])),
        ("test top-5", _percent(evaluation["top5"])),
        ("per-class top-5 without retraining / full head",
         f"{_percent(top5['top1'])} / {_percent(full['top1'])}" if top5 else "-"),
        ("codes in use", f"{evaluation['codes_used']} of {evaluation['codes_total']}"),
        ("local size: weights > 0.1 per class (authors)", _number(evaluation.get("local_size_weights_above_0_1"), ".1f")),
        ("local size: codes per image (PIP-Net)", _number(evaluation.get("local_size_pipnet"), ".1f")),
        ("purity (PIP-Net protocol, mean)", _number(purity.get("mean"))),
        ("codes with purity > 0.5", str(purity.get("above_0_5", "-"))),
        ("evidence on defining parts (the peak cell's receptive box; a random cell)",
         f"{_number(evidence.get('share'))} ({_number(evidence.get('chance'))})"),
        ("evidence on defining parts (purity's 32-px patch; a random cell)",
         f"{_number(evidence.get('share_pipnet_patch'))} ({_number(evidence.get('chance_pipnet_patch'))})"),
        ("evidence on defining parts (the peak cell's centre on a defining part's box; a random cell)",
         f"{_number(evidence.get('share_part_box'))} ({_number(evidence.get('chance_part_box'))})"),
        ("grounding: mean cosine of the codes in use to their nearest training patch",
         _number(grounding.get("mean_cosine"))),
        ("test images", str(evaluation["n"])),
    ]
