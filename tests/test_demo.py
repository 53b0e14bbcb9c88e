"""The main job end to end: `protoquant demo --quick` on real pretrained weights, and its report in Chromium."""

from __future__ import annotations

import json

from stages.demo import QUICK, demo
from tests.test_pages import browser, crawl  # noqa: F401  (browser is a fixture)

STEPS = ["make-birds", "extract", "codebook", "train", "evaluate", "gallery", "explain"]


def test_quick_demo_runs_every_stage_then_skips_them_all(tmp_path, browser):  # noqa: F811
    first = demo(tmp_path / "demo", quick=True, say=lambda _: None)
    assert first.skipped_steps == []
    figures = first.figures
    evaluation = figures["evaluation"]
    assert evaluation["n"] == sum(1 for _ in (tmp_path / "demo" / "birds" / "train_test_split.txt").open()
                                  if _.split()[1] == "0")
    assert 0.0 <= evaluation["top1"] <= 1.0 and 0.0 <= evaluation["probe_top1"] <= 1.0
    assert evaluation["codes_total"] == QUICK.k
    interp = figures["interpretability"]
    assert {"purity", "misalignment", "stability", "deletion", "grounding"} <= set(interp)
    assert 0.0 <= interp["purity"]["mean"] <= 1.0

    curve = {p["k"]: p for p in figures["top_k"]}
    assert set(curve) == {1, 2, 3, 5, 10, QUICK.k}
    assert curve[1]["local_size"] <= 1.0                  # one weight per class: one code explains a prediction
    assert curve[1]["codes_used"] <= QUICK.classes        # and at most one code per class survives
    assert curve[QUICK.k]["top1"] == evaluation["top1"]   # the full head is the evaluated head

    report = (tmp_path / "demo" / "index.html").read_text()
    assert "gallery/index.html" in report and "explain/index.html" in report and "<svg" in report
    pages = crawl(browser, tmp_path / "demo")
    assert len(pages) > 3  # the report, the gallery and the explanations, all linked and loading

    second = demo(tmp_path / "demo", quick=True, say=lambda _: None)
    assert second.skipped_steps == STEPS                  # the backbone does not run again
    assert json.loads((tmp_path / "demo" / "figures.json").read_text()) == figures
