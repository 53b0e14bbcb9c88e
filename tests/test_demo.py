"""The main job end to end: `protoquant demo --quick` on real pretrained weights, then its report in Chromium.

The demo runs once per module. Everything but the page crawl runs without a browser; the crawl is
skipped where chromium / chromedriver are absent (and fails in CI, which must have them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.demo import QUICK, demo
from tests.test_pages import browser, crawl  # noqa: F401  (browser is a fixture)

STEPS = ["make-birds", "extract", "codebook", "train", "train-raw", "evaluate", "evaluate-raw", "gallery", "explain"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> dict:
    """The quick demo run twice into one folder: the second run must find every step done."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    first = demo(out, quick=True, say=lambda _: None)
    second = demo(out, quick=True, say=lambda _: None)
    return {"out": out, "first": first, "second": second}


def _test_images(out: Path) -> int:
    return sum(1 for line in (out / "birds" / "train_test_split.txt").open() if line.split()[1] == "0")


def test_quick_demo_runs_every_stage_then_skips_them_all(quick_demo) -> None:
    out, first, second = quick_demo["out"], quick_demo["first"], quick_demo["second"]
    assert first.skipped_steps == []
    assert second.skipped_steps == STEPS                  # the backbone does not run again
    figures = first.figures
    assert figures == second.figures
    assert {**json.loads((out / "figures.json").read_text()), "raw": json.loads((out / "figures-raw.json").read_text())} == figures

    evaluation = figures["evaluation"]
    assert evaluation["n"] == _test_images(out) == QUICK.classes * 12  # make-birds keeps 12 of 40 per class for test
    assert evaluation["codes_total"] == QUICK.k and evaluation["top5"] == 1.0  # 4 classes: top-5 is every class
    assert evaluation["top1"] == pytest.approx(sum(evaluation["per_class"].values()) / QUICK.classes)  # 12 per class
    assert len(evaluation["per_class"]) == QUICK.classes

    curve = {p["k"]: p for p in figures["top_k"]}
    assert set(curve) == {1, 2, 3, 5, 10, QUICK.k}
    assert curve[1]["local_size"] <= 1.0                  # one weight per class: one code explains a prediction
    assert curve[1]["codes_used"] <= QUICK.classes        # and at most one code per class survives
    assert all(curve[k]["codes_used"] <= min(k * QUICK.classes, QUICK.k) for k in curve)
    assert curve[QUICK.k]["top1"] == evaluation["top1"]   # the full head is the evaluated head

    interp = figures["interpretability"]
    assert {"purity", "misalignment", "stability", "deletion", "grounding"} <= set(interp)
    assert interp["grounding"]["codes"] == evaluation["codes_used"]  # grounding is reported over the codes in use
    grounding = interp["grounding"]  # pushed (train's default): every prototype a training patch
    assert grounding["min_cosine"] > 0.9999

    variant = figures["raw"]  # the second column: trained codes on the raw cosine, near real patches, not on them
    assert 0.5 < variant["interpretability"]["grounding"]["min_cosine"] < 0.999
    assert variant["evaluation"]["n"] == evaluation["n"] and variant["evaluation"]["codes_total"] == QUICK.k
    report = (out / "index.html").read_text()
    assert "gallery/index.html" in report and "explain/index.html" in report and "<svg" in report
    assert "<code>--projection-dim 0 --no-ground</code>" in report and "raw cosine, not pushed" in report
    assert f"<td>{100 * variant['evaluation']['top1']:.1f}%</td>" in report
    assert (out / "gallery" / "index.html").is_file() and (out / "explain" / "index.html").is_file()


def test_quick_demo_pages_load_in_a_browser(quick_demo, browser) -> None:  # noqa: F811
    pages = crawl(browser, quick_demo["out"])
    assert len(pages) > 3  # the report, the gallery and the explanations, all linked and loading


def test_quick_demo_head_beats_chance(quick_demo) -> None:
    """It used to stay at chance (16 images per class at 128 px, 10 epochs): a demo must show a head that learned."""
    evaluation = quick_demo["first"].figures["evaluation"]
    assert evaluation["top1"] > 1.5 / QUICK.classes
    assert sum(1 for accuracy in evaluation["per_class"].values() if accuracy > 0) >= 2


def test_a_step_runs_again_when_one_it_comes_after_did(quick_demo) -> None:
    """The raw-cosine head deleted: it is trained again and so are its figures (not kept stale); the rest is skipped."""
    import shutil

    out = quick_demo["out"]
    shutil.rmtree(out / "run-raw")
    third = demo(out, quick=True, say=lambda _: None)
    assert third.skipped_steps == [s for s in STEPS if s not in ("train-raw", "evaluate-raw")]
    assert third.figures == quick_demo["first"].figures  # the same settings give the same head and figures
    state = json.loads((out / "demo-state.json").read_text())  # as a demo folder made with train's older defaults
    state["train"]["train"]["projection_dim"] = 0
    (out / "demo-state.json").write_text(json.dumps(state))
    fourth = demo(out, quick=True, say=lambda _: None)
    assert fourth.skipped_steps == [s for s in STEPS if s not in ("train", "evaluate", "gallery", "explain")]
    assert fourth.figures == quick_demo["first"].figures
    state = json.loads((out / "demo-state.json").read_text())  # as if train had been redone by a call stopped
    state["evaluate"]["after"]["train"] = {"another": "head"}  # before evaluate: its figures are of the old head
    (out / "demo-state.json").write_text(json.dumps(state))
    fifth = demo(out, quick=True, say=lambda _: None)
    assert fifth.skipped_steps == [s for s in STEPS if s != "evaluate"]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path) -> None:
    """--out holding the user's files (an index.html of theirs) is refused before anything is written."""
    from pipeline.errors import ProtoquantError
    from stages.demo import demo

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("mine")
    with pytest.raises(ProtoquantError, match="not a demo folder"):
        demo(site, quick=True, say=lambda _: None)
    assert sorted(p.name for p in site.iterdir()) == ["index.html"]
    assert (site / "index.html").read_text() == "mine"
