"""The procedural birds dataset: CUB layout, determinism, ground truth that follows the pixels, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli
from pipeline.birds import (
    ATTRIBUTE_COLOURS,
    ATTRIBUTES,
    BEAK_COLOUR,
    N_COMBINATIONS,
    PART_IDS,
    PARTS,
    BirdsSummary,
    design_classes,
    image_rng,
    one_part_pairs,
    render_bird,
    sample_nuisance,
)
from pipeline.datasets import open_dataset
from pipeline.errors import ProtoquantError
from stages.make_birds import make_birds

REPO = Path(__file__).resolve().parents[1]


def table(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines()]


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> BirdsSummary:
    """6 classes (every part separates a pair) x 20 images at 160 px."""
    return make_birds(tmp_path_factory.mktemp("birds") / "birds", classes=6, per_class=20, size=160)


def test_layout_files_parse_and_agree(birds):
    summary = birds
    root = summary.out
    images = table(root / "images.txt")
    ids = [int(row[0]) for row in images]
    assert ids == list(range(1, summary.n_images + 1))

    classes = table(root / "classes.txt")
    assert [int(row[0]) for row in classes] == list(range(1, summary.n_classes + 1))
    names = [row[1] for row in classes]
    assert names == list(summary.classes)
    assert all(name.startswith(f"{i + 1:03d}.") for i, name in enumerate(names))

    labels = {int(i): int(c) for i, c in table(root / "image_class_labels.txt")}
    assert sorted(labels) == ids and set(labels.values()) == set(range(1, summary.n_classes + 1))
    for image_id, rel in images:
        folder, file = rel.split("/")
        assert folder == names[labels[int(image_id)] - 1]  # the folder is the labelled class
        assert file.endswith(".jpg")
    first = Image.open(root / "images" / images[0][1])
    assert first.format == "JPEG" and first.size == (160, 160)
    assert sum(1 for _ in (root / "images").rglob("*.jpg")) == summary.n_images

    assert [row[1] for row in table(root / "parts/parts.txt")] == list(PARTS) == list(summary.parts)
    for name, columns in (("part_locs", 5), ("part_boxes", 6)):
        rows = table(root / f"parts/{name}.txt")
        assert all(len(row) == columns for row in rows)
        assert [(int(r[0]), int(r[1])) for r in rows] == [(i, p) for i in ids for p in range(1, len(PARTS) + 1)]
    boxes = table(root / "bounding_boxes.txt")
    assert [int(row[0]) for row in boxes] == ids and all(len(row) == 5 for row in boxes)

    attributes = Counter()
    for class_id, part, variant in table(root / "class_attributes.txt"):
        assert summary.classes[names[int(class_id) - 1]][part] == variant
        attributes[class_id] += 1
    assert set(attributes.values()) == {len(ATTRIBUTES)}
    readme = (root / "README.txt").read_text()
    assert all(name in readme for name in names) and "protoquant extract" in readme


def test_split_is_stratified(birds):
    summary = birds
    labels = dict(table(summary.out / "image_class_labels.txt"))
    split = dict(table(summary.out / "train_test_split.txt"))
    assert set(split.values()) == {"0", "1"}
    test_per_class = Counter(labels[i] for i, is_train in split.items() if is_train == "0")
    assert test_per_class == {str(c): 6 for c in range(1, 7)}  # round(20 * 0.3) in every class
    assert (summary.n_train, summary.n_test) == (84, 36)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path):
    options = dict(classes=3, per_class=3, size=96)
    a = all_bytes(make_birds(tmp_path / "a", seed=5, **options).out)
    b = all_bytes(make_birds(tmp_path / "b", seed=5, **options).out)
    c = all_bytes(make_birds(tmp_path / "c", seed=6, **options).out)
    assert a == b
    assert a.keys() == c.keys() and a["classes.txt"] == c["classes.txt"]  # same classes...
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in jpgs)  # ...drawn differently


def test_keypoints_lie_in_their_part_box_and_the_bird_box(birds):
    summary = birds
    root = summary.out
    bird = {row[0]: [float(v) for v in row[1:]] for row in table(root / "bounding_boxes.txt")}
    boxes = {(r[0], r[1]): [float(v) for v in r[2:]] for r in table(root / "parts/part_boxes.txt")}
    visible = Counter()
    for image_id, part_id, x, y, seen in table(root / "parts/part_locs.txt"):
        x, y = float(x), float(y)
        bx, by, bw, bh = boxes[image_id, part_id]
        if seen == "0":
            assert (x, y, bx, by, bw, bh) == (0, 0, 0, 0, 0, 0)
            continue
        visible[PARTS[int(part_id) - 1]] += 1
        assert bx <= x < bx + bw and by <= y < by + bh
        gx, gy, gw, gh = bird[image_id]
        assert gx <= x < gx + gw and gy <= y < gy + gh
        assert gx <= bx and gy <= by and bx + bw <= gx + gw and by + bh <= gy + gh  # part box in bird box
        assert 0 <= gx and 0 <= gy and gx + gw <= 160 and gy + gh <= 160
    # Parts are visible most of the time; clipping and occluders hide a few.
    assert all(visible[part] > 0.85 * summary.n_images for part in PARTS), visible
    assert any(visible[part] < summary.n_images for part in PARTS)


def test_colour_under_a_keypoint_is_the_attribute_colour(birds):
    summary = birds
    root = summary.out
    paths = dict(table(root / "images.txt"))
    labels = dict(table(root / "image_class_labels.txt"))
    names = list(summary.classes)
    pixels = {}
    checked = Counter()
    for image_id, part_id, x, y, seen in table(root / "parts/part_locs.txt"):
        part = PARTS[int(part_id) - 1]
        if seen == "0" or part not in (*ATTRIBUTE_COLOURS, "beak"):
            continue
        if image_id not in pixels:
            pixels[image_id] = np.asarray(Image.open(root / "images" / paths[image_id]), dtype=np.int16)
        rgb = pixels[image_id][int(float(y)), int(float(x))]
        attributes = summary.classes[names[int(labels[image_id]) - 1]]
        expected = BEAK_COLOUR if part == "beak" else ATTRIBUTE_COLOURS[part][attributes[part]]
        assert np.abs(rgb - expected).max() <= 40, (image_id, part, rgb, expected)  # noise + JPEG
        if part in ATTRIBUTE_COLOURS:  # and it is nearer to its own variant's colour than to the others
            nearest = min(ATTRIBUTE_COLOURS[part].items(), key=lambda kv: np.abs(rgb - kv[1]).sum())[0]
            assert nearest == attributes[part]
        checked[part] += 1
    assert set(checked) == {"crown", "wing", "eye", "beak"}


def test_ground_truth_follows_the_label_map():
    attributes = design_classes(1)[0]
    for j in range(20):
        nuisance = sample_nuisance(image_rng(3, 0, j), 128)
        scene = render_bird(attributes, nuisance)
        for part in PARTS:
            if not scene.visible[part]:
                continue
            x, y = (int(v) for v in scene.keypoints[part])
            assert (scene.labels[y - 1 : y + 2, x - 1 : x + 2] == PART_IDS[part]).all()
            expected = np.clip(np.add(scene.colours[part], nuisance.noise[y, x]), 0, 255)
            assert (scene.image[y, x] == expected).all()  # the part's colour plus this pixel's noise
            rows, cols = np.nonzero(scene.labels == PART_IDS[part])
            assert scene.part_boxes[part] == (cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1)
        rows, cols = np.nonzero(scene.labels)
        assert scene.bird_box == (cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1)


def test_classes_come_in_pairs_that_differ_in_one_part():
    classes = design_classes(N_COMBINATIONS)
    keys = [tuple(c.values()) for c in classes]
    assert len(set(keys)) == N_COMBINATIONS  # every combination, each once
    for i in range(1, len(classes)):  # every class has an earlier partner one part away
        assert any(sum(a != b for a, b in zip(keys[i], keys[j])) == 1 for j in range(i))
    assert design_classes(8) == classes[:8]  # adding classes never changes the earlier ones

    named = {str(i): c for i, c in enumerate(design_classes(6))}
    pairs = one_part_pairs(named)
    assert {part for _, _, part in pairs} == set(ATTRIBUTES)  # six classes: every part separates a pair
    for a, b, part in pairs:
        assert [p for p in ATTRIBUTES if named[a][p] != named[b][p]] == [part]


def test_one_part_pairs_differ_in_that_part_pixels_only():
    named = {str(i): c for i, c in enumerate(design_classes(6))}
    for a, b, part in one_part_pairs(named):
        for j in range(3):
            nuisance = sample_nuisance(image_rng(0, 0, j), 128)
            one, two = render_bird(named[a], nuisance), render_bird(named[b], nuisance)
            changed = (one.image != two.image).any(axis=-1)
            assert changed.any(), (a, b, part)
            in_part = (one.labels == PART_IDS[part]) | (two.labels == PART_IDS[part])
            assert not (changed & ~in_part).any(), (a, b, part)


def test_summary_records_the_separating_part(birds):
    summary = birds
    assert summary.one_part_pairs
    for a, b, part in summary.one_part_pairs:
        assert [p for p in ATTRIBUTES if summary.classes[a][p] != summary.classes[b][p]] == [part]
        assert f"{a} vs {b}" in (summary.out / "README.txt").read_text()


def test_the_cub_reader_reads_it(birds):
    summary = birds
    dataset = open_dataset(summary.out)
    assert dataset.kind == "cub" and dataset.part_names == list(PARTS)
    assert dataset.classes == list(summary.classes)
    assert (len(dataset.splits["train"]), len(dataset.splits["test"])) == (summary.n_train, summary.n_test)
    record = dataset.splits["train"][0]
    assert record.box is not None and len(record.parts) == len(PARTS) and len(record.part_boxes) == len(PARTS)


def test_cli_writes_and_summarises(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "birds"
    result = runner.invoke(cli.app, ["make-birds", str(out), "--classes", "3", "--per-class", "4", "--size", "96"])
    assert result.exit_code == 0, result.output
    assert "classes" in result.output and "protoquant extract" in result.output
    assert len(table(out / "images.txt")) == 12
    result = runner.invoke(cli.app, ["make-birds", str(out)])  # again, without --overwrite
    assert result.exit_code == 2 and "not empty" in result.stderr  # one `error:` line

    args = ["make-birds", str(out), "--classes", "2", "--per-class", "5", "--seed", "1", "--test-fraction", "0.4"]
    result = runner.invoke(cli.app, [*args, "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["n_classes"], report["n_train"], report["n_test"], report["n_images"]) == (2, 6, 4, 10)
    assert report["parts"] == list(PARTS) and report["one_part_pairs"][0][2] == "beak"
    assert len(list((out / "images").iterdir())) == 2  # the old third class is gone


def test_refuses_a_non_empty_folder_and_foreign_files(tmp_path: Path):
    out = tmp_path / "birds"
    make_birds(out, classes=2, per_class=2, size=64)
    with pytest.raises(ProtoquantError, match="not empty.*--overwrite"):
        make_birds(out, classes=2, per_class=2, size=64)
    (out / "notes.md").write_text("mine")
    with pytest.raises(ProtoquantError, match="notes.md"):
        make_birds(out, classes=2, per_class=2, size=64, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "images.txt").is_file()


@pytest.mark.parametrize(
    "option",
    [
        dict(classes=N_COMBINATIONS + 1),
        dict(classes=1),
        dict(per_class=1),
        dict(size=32),
        dict(test_fraction=1.0),
        dict(seed=-1),
    ],
)
def test_refuses_bad_options(tmp_path: Path, option: dict):
    with pytest.raises(ProtoquantError, match="--" + next(iter(option)).replace("_", "-")):
        make_birds(tmp_path / "b", **option)
    assert not (tmp_path / "b").exists()


def test_cli_error_is_one_line(tmp_path: Path):
    args = ["make-birds", str(tmp_path / "new"), "--classes", "999"]
    run = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: --classes 999") and "243" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "new").exists()


def test_difficulty_knobs_change_only_what_they_name() -> None:
    """clutter 0 draws no clutter, decoys 1 paints every shape in an attribute colour, bird_scale scales the
    bird by exactly that factor; the default knobs draw the same scene as calling without them."""
    from pipeline.birds import _DISTRACTORS, Difficulty, image_rng, sample_nuisance

    plain = sample_nuisance(image_rng(3, 0, 0), 96)
    default = sample_nuisance(image_rng(3, 0, 0), 96, Difficulty())
    assert plain.scale == default.scale and np.array_equal(plain.noise, default.noise)
    assert len(plain.clutter) == len(default.clutter) >= 5
    assert sample_nuisance(image_rng(3, 0, 0), 96, Difficulty(clutter=0)).clutter == ()
    decoyed = sample_nuisance(image_rng(3, 0, 0), 96, Difficulty(decoys=1.0))
    distance = [min(np.abs(np.subtract(colour, d)).max() for d in _DISTRACTORS) for colour, _ in decoyed.clutter]
    assert max(distance) <= 10  # jittered by at most 10 per channel
    small = sample_nuisance(image_rng(3, 0, 0), 96, Difficulty(bird_scale=0.5))
    assert small.scale == pytest.approx(plain.scale * 0.5)
    with pytest.raises(ProtoquantError, match="--decoys"):
        Difficulty(decoys=1.5).check()
