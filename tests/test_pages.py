"""The static pages (gallery, explain, edit report) in a real headless Chromium, on a real small run.

A birds dataset (make-birds) goes through the real stages - extract with a random-init timm ViT,
codebook, train - and the pages are written from that run. Every page reachable from each site's
index is opened from file://: every <img> must decode (naturalWidth > 0), every relative link must
point at a file that loads (and at an element, for #anchors), no page may reference the network,
and a screenshot must not be blank. Chromium is Debian's (installed by .ci/run); without it the
browser tests are skipped locally and fail in CI (CI set).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections import deque
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli
from pipeline.grounding import GROUNDING_FILE
from pipeline.model import codes_in_use, load_head, save_head
from stages.codebook import CodebookSettings, build_codebook
from stages.evaluate import MetricSettings, interpretability_metrics
from stages.explain import ExplainSettings, explain
from stages.extract import extract
from stages.gallery import GallerySettings, gallery
from stages.make_birds import make_birds
from stages.prune import prune_report
from stages.train import TrainSettings, train

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--window-size=1280,900")
# Decode every image of the page afresh (lazy images below the fold have not loaded yet): -> naturalWidths.
DECODE_ALL = """
const done = arguments[arguments.length - 1];
Promise.all([...document.images].map(i => { const copy = new Image(); copy.src = i.src;
    return copy.decode().then(() => copy.naturalWidth, () => 0); })).then(done);
"""


@pytest.fixture(scope="module")
def birds_run(tmp_path_factory) -> dict[str, Path]:
    """make-birds (4 classes x 10 images, 128 px) -> extract (test_vit) -> codebook (12) -> train -> RUN."""
    root = tmp_path_factory.mktemp("pages")
    make_birds(root / "birds", classes=4, per_class=10, size=128, seed=0)
    extract(root / "birds", root / "cache.zarr", backbone="test_vit", image_size=128, workers=0, batch_size=20)
    build_codebook(root / "cache.zarr", root / "codebook.safetensors", CodebookSettings(k=12))
    train(root / "cache.zarr", root / "codebook.safetensors", root / "run",
          TrainSettings(epochs=3, probe_epochs=3, codebook_epochs=1, batch_size=16, sparsity="none"))  # many codes
    return {"root": root, "data": root / "birds", "cache": root / "cache.zarr", "run": root / "run"}


@pytest.fixture(scope="module")
def sites(birds_run) -> dict[str, Path]:
    """The three sites written from the run: gallery, explain (2 test images) and an edit report."""
    root = birds_run["root"]
    gallery(birds_run["run"], root / "gallery", data=birds_run["data"], settings=GallerySettings(per_page=5, patches=4))
    test_images = sorted((birds_run["data"] / "images").rglob("*_0001.jpg"))[:2]
    explain(birds_run["run"], test_images, root / "explain", settings=ExplainSettings(top_codes=3, patches=3))
    edited = root / "run-edited"
    shutil.copytree(birds_run["run"], edited)
    head, classes, meta = load_head(edited / "head.safetensors")
    head.remove_codes(np.flatnonzero(codes_in_use(head).numpy())[:3])
    save_head(edited / "head.safetensors", head, classes=classes, meta=meta)
    prune_report(birds_run["run"], edited, root / "report")
    return {"gallery": root / "gallery", "explain": root / "explain", "report": root / "report"}


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("CI must provide Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="protoquant-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def crawl(driver, site: Path) -> dict[str, dict]:
    """Open index.html and every page reachable by relative links; check each as it is loaded.

    Returns per page: image widths, its links, and its screenshot's number of distinct colours.
    """
    pages, queue = {}, deque([site / "index.html"])
    while queue:
        page = queue.popleft().resolve()
        if str(page) in pages:
            continue
        source = page.read_text(encoding="utf-8")
        assert "http://" not in source and "https://" not in source, f"{page} references the network"
        driver.get(page.as_uri())
        assert driver.title, f"{page} did not load"
        widths = driver.execute_async_script(DECODE_ALL)
        assert all(w > 0 for w in widths), f"an image of {page} does not decode: {widths}"
        lazy = driver.execute_script("return [...document.images].every(i => i.loading === 'lazy')")
        assert lazy, f"{page}: every image should load lazily"
        links = driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
        for link in links:
            target = urlparse(link)
            assert target.scheme == "file", f"{page} links off the site: {link}"
            path = Path(unquote(target.path))
            assert path.is_file(), f"{page} links to a missing file {path}"
            if target.fragment:
                assert f'id="{target.fragment}"' in path.read_text(encoding="utf-8"), f"{link}: no such anchor"
            if path.suffix == ".html":
                queue.append(path)
        screenshot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        rgb = np.asarray(screenshot).reshape(-1, 3).astype(np.int32)
        colours = len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))
        assert colours > 20, f"{page}: the screenshot is blank ({colours} colours)"
        pages[str(page)] = {"images": len(widths), "links": len(links), "colours": colours}
    return pages


def test_gallery_site_loads_with_every_image_and_link(sites, browser, birds_run):
    pages = crawl(browser, sites["gallery"])
    names = {Path(p).name for p in pages}
    used = int(codes_in_use(load_head(birds_run["run"] / "head.safetensors")[0]).sum())
    index_pages = -(-used // 5)
    assert {"index.html", "classes.html", *(f"class-{c:03d}.html" for c in range(4))} <= names
    assert {f"index-{n}.html" for n in range(2, index_pages + 1)} <= names  # pagination reached every page
    index = pages[str((sites["gallery"] / "index.html").resolve())]
    assert index["images"] == min(5, used) * 4 and index["colours"] > 1000  # 5 codes x 4 patches, pictures on screen
    thumbs = list((sites["gallery"] / "thumbs").glob("*.jpg"))
    assert len(thumbs) == used * 4  # one file per shown patch, written once
    assert (birds_run["run"] / GROUNDING_FILE).is_file()  # stored in the run for the next page or metric


def test_explain_pages_load_and_show_prediction_and_runner_up(sites, browser):
    pages = crawl(browser, sites["explain"])
    assert {Path(p).name for p in pages} == {"index.html", "image-001.html", "image-002.html"}
    explanations = json.loads((sites["explain"] / "explanations.json").read_text())
    assert len(explanations) == 2
    for e in explanations:
        assert e["runner_up"] and e["runner_up"] != e["predicted"] and 0 < e["probability"] <= 1
        assert 0 < len(e["reasons"]) <= 3
        contributions = [r["contribution"] for r in e["reasons"]]
        assert contributions == sorted(contributions, reverse=True)
        for r in e["reasons"]:
            assert r["contribution"] == pytest.approx(r["weight"] * r["presence"], rel=1e-5)
        page = (sites["explain"] / e["page"]).read_text()
        assert e["predicted"] in page and e["runner_up"] in page
    assert pages[str((sites["explain"] / "image-001.html").resolve())]["images"] >= 1 + 3 * (1 + 3)


def test_edit_report_lists_removed_codes_and_changed_predictions(sites, browser):
    pages = crawl(browser, sites["report"])
    assert [Path(p).name for p in pages] == ["index.html"]
    report = json.loads((sites["report"] / "report.json").read_text())
    assert len(report["removed_codes"]) == 3
    assert report["codes_in_use_after"] == report["codes_in_use_before"] - 3
    assert report["fixed"] + report["broken"] <= report["changed_predictions"] <= report["images"]
    html = (sites["report"] / "index.html").read_text()
    assert all(f'id="code-{k}"' in html for k in report["removed_codes"])


def test_cli_gallery_and_explain(birds_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli.app, ["gallery", str(birds_run["run"]), "--out", str(tmp_path / "g"), "--per-page", "50",
                                     "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["pages"] == 1 and (tmp_path / "g" / "index.html").is_file()
    image = next((birds_run["data"] / "images").rglob("*.jpg"))
    result = runner.invoke(cli.app, ["explain", str(birds_run["run"]), str(image), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e" / "image-001.html").is_file()
    result = runner.invoke(cli.app, ["explain", str(birds_run["run"]), str(tmp_path / "missing.jpg"), "--out",
                                     str(tmp_path / "e2")])
    assert result.exit_code == 2 and "does not exist" in result.stderr  # cli prints it as one line


def test_evaluate_hook_reports_every_metric(birds_run):
    metrics = interpretability_metrics(birds_run["run"], birds_run["data"],
                                       settings=MetricSettings(max_images=4, steps=2, batch_size=4))
    assert set(metrics) == {"grounding", "purity", "purity_strict", "evidence_on_defining_parts", "misalignment",
                            "stability", "deletion"}
    assert 0 <= metrics["purity"]["mean"] <= 1 and metrics["purity"]["codes"] > 0
    evidence = metrics["evidence_on_defining_parts"]  # make-birds writes class_attributes.txt
    assert 0 <= evidence["share"] <= evidence["on_any_part"] <= 1 and set(evidence["by_part"]) <= {
        "beak", "crown", "wing", "tail", "eye"}
    assert 0 <= metrics["stability"]["stability"] <= 1 and metrics["misalignment"]["images"] == 4
    assert metrics["deletion"]["images"] + metrics["deletion"]["skipped"] == 4
    assert 0 < metrics["grounding"]["mean_cosine"] <= 1 + 1e-6
    json.dumps(metrics, allow_nan=False)  # plain JSON, ready for metrics.json


def test_cli_evaluate_with_data_and_prune_with_report(birds_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli.app, ["evaluate", str(birds_run["run"]), "--data", str(birds_run["data"]),
                                     "--max-images", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert {"top1", "probe_top1", "purity", "misalignment", "stability", "deletion", "grounding"} <= set(payload)
    assert 0.0 <= payload["purity"]["mean"] <= 1.0

    used = np.flatnonzero(codes_in_use(load_head(birds_run["run"] / "head.safetensors")[0]).numpy())
    result = runner.invoke(cli.app, ["prune", str(birds_run["run"]), "--out", str(tmp_path / "edited"),
                                     "--drop-codes", f"{used[0]},{used[1]}", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["report"]
    assert report and Path(report).is_file()
    assert set(used[:2].tolist()) <= set(json.loads((Path(report).parent / "report.json").read_text())["removed_codes"])


# ---- hostile names: every page escapes them, and pages never overwrite the user's files ---------------------------

PAYLOADS = ("<script>alert(1)</script>", "\"quotes\" & 'apos' <b>bold</b>", "AT&T &amp; <img src=x onerror=alert(2)>")
RUN_PAYLOAD = 'xss-run-<img src=x onerror=alert(5)>&"q"'
FILE_PAYLOADS = ("<svg onload=alert(3)>.jpg", '"><img src=x onerror=alert(8)>.jpg')


class _Tags(HTMLParser):
    """Every start tag (name, attributes) and all text of a page, entities decoded."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.text.extend(value for _, value in attrs if value)

    def handle_data(self, data):
        self.text.append(data)


def assert_escaped(page: Path, shown: tuple[str, ...]) -> None:
    """No payload became markup on `page`, and each of `shown` reaches the reader as text."""
    source = page.read_text(encoding="utf-8")
    parsed = _Tags()
    parsed.feed(source)
    assert not [t for t, _ in parsed.tags if t == "script"], f"{page}: a <script> tag"
    assert not [a for _, attrs in parsed.tags for a in attrs if a.startswith("on")], f"{page}: an on* handler"
    assert not [t for t, attrs in parsed.tags if attrs.get("src") == "x"], f"{page}: an injected <img src=x>"
    for payload in (*PAYLOADS, RUN_PAYLOAD, *FILE_PAYLOADS):
        assert payload not in source, f"{page} holds {payload!r} unescaped"
    text = "\n".join(parsed.text)
    for payload in shown:
        assert payload in text, f"{page} does not show {payload!r}"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> dict[str, Path]:
    """A CUB-layout dataset whose classes.txt names the classes with HTML payloads, and a run on it in a
    folder whose name is one too."""
    from tests.conftest import make_cub

    root = tmp_path_factory.mktemp("hostile")
    truth = make_cub(root / "cub", n_classes=3, per_class=4)
    (root / "cub" / "classes.txt").write_text("".join(f"{c + 1} {name}\n" for c, name in enumerate(PAYLOADS)))
    extract(root / "cub", root / "cache.zarr", backbone="test_vit", image_size=64, workers=0, batch_size=16)
    build_codebook(root / "cache.zarr", root / "codebook.safetensors", CodebookSettings(k=6))
    run = root / RUN_PAYLOAD
    train(root / "cache.zarr", root / "codebook.safetensors", run,
          TrainSettings(epochs=2, probe_epochs=2, codebook_epochs=1, batch_size=8, sparsity="none"))
    image = root / "cub" / truth.files["test"][0][0]
    images = [root / name for name in FILE_PAYLOADS]
    for path in images:
        shutil.copyfile(image, path)
    return {"root": root, "data": root / "cub", "run": run, "images": images}


def test_every_page_escapes_class_file_and_run_names(hostile_run):
    from stages.demo import QUICK, write_report

    root, run = hostile_run["root"], hostile_run["run"]
    gallery(run, root / "site" / "gallery", data=hostile_run["data"], settings=GallerySettings(patches=2))
    pages = sorted((root / "site" / "gallery").glob("*.html"))
    assert {"index.html", "classes.html", "class-000.html"} <= {p.name for p in pages}
    for page in pages:
        assert_escaped(page, ())
    assert_escaped(root / "site" / "gallery" / "classes.html", PAYLOADS)  # every class listed by name
    assert_escaped(root / "site" / "gallery" / "index.html", (f"run {RUN_PAYLOAD}",))

    summary = explain(run, hostile_run["images"], root / "explain", settings=ExplainSettings(top_codes=2, patches=2))
    assert [e.image for e in summary.explanations] == list(FILE_PAYLOADS)
    assert_escaped(root / "explain" / "index.html", FILE_PAYLOADS)
    for e in summary.explanations:
        assert_escaped(root / "explain" / e.page, (e.image, e.predicted))
        assert e.predicted in PAYLOADS

    edited = root / "edited"
    shutil.copytree(run, edited)
    head, classes, meta = load_head(edited / "head.safetensors")
    head.remove_codes(np.flatnonzero(codes_in_use(head).numpy())[:2])
    save_head(edited / "head.safetensors", head, classes=classes, meta=meta)
    prune_report(run, edited, root / "report", data=hostile_run["data"])
    weighing = {PAYLOADS[c] for c in np.flatnonzero((load_head(run / "head.safetensors")[0].effective_weight()
                                                     [:, np.flatnonzero(~head.code_mask.numpy())] > 0).any(dim=1))}
    assert weighing  # the removed codes were in use, so their cards name the classes that weighed them
    assert_escaped(root / "report" / "index.html", (RUN_PAYLOAD, *weighing))

    evaluation = {"top1": 0.5, "probe_top1": 0.5, "top5": 1.0, "codes_used": 4, "codes_total": 6, "local_size": 2.0,
                  "n": 6}
    interp = {"purity": {"mean": 0.5, "above_0_5": PAYLOADS[0]}, "note": PAYLOADS[2]}
    curve = [{"k": 1, "top1": 0.4, "codes_used": 3, "local_size": 1.0, "full": False},
             {"k": 6, "top1": 0.5, "codes_used": 4, "local_size": 2.0, "full": True}]
    raw = {"evaluation": evaluation, "interpretability": {"purity": {"mean": 0.4, "above_0_5": PAYLOADS[1]}},
                "top_k": curve}  # the second column carries hostile text too
    report = write_report(root / "site", run, {"evaluation": evaluation, "interpretability": interp, "top_k": curve,
                                               "raw": raw}, QUICK)
    assert_escaped(report, (PAYLOADS[0], PAYLOADS[1]))
    assert (root / "site" / "style.css").read_text() == (root / "site" / "gallery" / "style.css").read_text()


def test_pages_never_overwrite_the_users_files(hostile_run):
    from pipeline.errors import ProtoquantError

    root, run, images = hostile_run["root"], hostile_run["run"], hostile_run["images"]
    mine = root / "my-site"
    mine.mkdir()
    for name in ("index.html", "style.css"):
        (mine / name).write_text(f"the user's {name}")
    with pytest.raises(ProtoquantError, match="did not make"):
        gallery(run, mine, data=hostile_run["data"])
    with pytest.raises(ProtoquantError, match="did not make"):
        explain(run, images[:1], mine)
    assert sorted(p.name for p in mine.iterdir()) == ["index.html", "style.css"]
    assert (mine / "index.html").read_text() == "the user's index.html"

    site = root / "ours"
    explain(run, images, site, settings=ExplainSettings(top_codes=2, patches=2))
    first = json.loads((site / ".protoquant-pages.json").read_text())
    assert "image-002.html" in first["files"] and first["kind"] == "explain"
    (site / "notes.txt").write_text("added by the user")
    explain(run, images[:1], site, settings=ExplainSettings(top_codes=2, patches=2))  # ours: replaced
    assert (site / "notes.txt").read_text() == "added by the user"
    assert not (site / "image-002.html").exists()  # the earlier run's page is gone with its listing
    assert sorted(json.loads((site / ".protoquant-pages.json").read_text())["files"]) == sorted(
        p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file() and p.name not in
        (".protoquant-pages.json", "notes.txt"))


def test_a_bad_image_leaves_nothing_written(hostile_run):
    from pipeline.errors import ProtoquantError

    root, run, images = hostile_run["root"], hostile_run["run"], hostile_run["images"]
    truncated = root / "truncated.jpg"
    truncated.write_bytes(images[0].read_bytes()[:200])
    with pytest.raises(ProtoquantError, match="truncated.jpg"):
        explain(run, [images[0], truncated], root / "fresh")
    assert not (root / "fresh").exists()

    kept = root / "kept"
    explain(run, images[:1], kept, settings=ExplainSettings(top_codes=2, patches=2))
    before = {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    with pytest.raises(ProtoquantError, match="truncated.jpg"):
        explain(run, [images[1], truncated], kept)
    assert {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before
