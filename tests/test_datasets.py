"""Dataset readers, image decoding and the shards converter, on tiny datasets written to tmp_path."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image
from typer.testing import CliRunner

import cli
from pipeline.datasets import Record, load_image, open_dataset, read_bytes, write_shards
from pipeline.errors import ProtoquantError
from pipeline.images import decode_rgb
from tests.conftest import PART_NAMES, DataTruth, make_imagefolder, write_noise_image


def _ids_and_labels(records: list[Record]) -> list[tuple[str, int]]:
    return [(r.id, r.label) for r in records]


# ---- ImageFolder ----------------------------------------------------------------------------------


def test_imagefolder_lists_every_image_in_sorted_order(imagefolder_data: DataTruth):
    dataset = open_dataset(imagefolder_data.root)
    assert dataset.kind == "imagefolder"
    assert dataset.classes == ["cat", "dog", "owl"]
    assert dataset.part_names is None
    assert list(dataset.splits) == ["train", "test"]
    for split, expected in imagefolder_data.files.items():
        assert _ids_and_labels(dataset.splits[split]) == expected
    record = dataset.splits["test"][0]
    assert record.source == str(imagefolder_data.root.absolute() / record.id)
    assert (record.offset, record.size, record.box) == (-1, -1, None)
    assert pickle.loads(pickle.dumps(record)) == record  # records travel to DataLoader workers
    assert open_dataset(imagefolder_data.root) == dataset  # deterministic


def test_imagefolder_accepts_val_as_test_and_ignores_hidden_and_other_files(tmp_path: Path):
    truth = make_imagefolder(tmp_path, classes=("a", "b"), per_class={"train": 2, "val": 1})
    rng = np.random.default_rng(1)
    write_noise_image(tmp_path / "train/a/UPPER.JPEG", rng)
    write_noise_image(tmp_path / "train/a/.hidden.png", rng)
    write_noise_image(tmp_path / "train/.hidden_class/x.png", rng)
    (tmp_path / "train/b/notes.txt").write_text("not an image")
    dataset = open_dataset(tmp_path, kind="imagefolder")
    assert dataset.classes == ["a", "b"]
    assert _ids_and_labels(dataset.splits["test"]) == truth.files["test"]
    assert [r.id for r in dataset.splits["train"]] == [
        "train/a/UPPER.JPEG", "train/a/img_000.png", "train/a/img_001.jpg", "train/b/img_000.png", "train/b/img_001.jpg"
    ]
    write_noise_image(tmp_path / "test/b/x.png", rng)  # with both test/ and val/, val stays its own split
    assert list(open_dataset(tmp_path).splits) == ["train", "test", "val"]


def test_imagefolder_errors_name_the_problem(tmp_path: Path):
    make_imagefolder(tmp_path, classes=("a", "b"))
    write_noise_image(tmp_path / "test/zebra/x.png", np.random.default_rng(0))
    with pytest.raises(ProtoquantError, match="zebra"):
        open_dataset(tmp_path)
    (tmp_path / "test/zebra/x.png").unlink()
    (tmp_path / "test/zebra").rmdir()
    (tmp_path / "train/empty").mkdir()
    with pytest.raises(ProtoquantError, match=r"train/empty holds no images"):
        open_dataset(tmp_path)
    with pytest.raises(ProtoquantError, match="cannot tell the layout"):
        open_dataset(tmp_path / "train/a")
    with pytest.raises(ProtoquantError, match="unknown dataset kind 'folders'"):
        open_dataset(tmp_path, kind="folders")


def test_opening_lists_files_without_decoding_them(tmp_path: Path):
    for i in range(3):
        path = tmp_path / f"train/c{i}/broken.jpg"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not a jpeg at all")
    dataset = open_dataset(tmp_path)
    assert len(dataset.splits["train"]) == 3
    with pytest.raises(ProtoquantError, match="broken.jpg"):
        load_image(dataset.splits["train"][0])


# ---- CUB-200-2011 ---------------------------------------------------------------------------------


def test_cub_reads_labels_splits_boxes_and_parts(cub_data: DataTruth):
    dataset = open_dataset(cub_data.root)
    assert dataset.kind == "cub"
    assert dataset.classes == ["001.Bird_A", "002.Bird_B", "003.Bird_C"]
    assert dataset.part_names == list(PART_NAMES)  # "left eye": names keep their spaces
    for split, expected in cub_data.files.items():
        assert _ids_and_labels(dataset.splits[split]) == expected
    for record in dataset.splits["train"] + dataset.splits["test"]:
        assert record.box == cub_data.boxes[record.id]
        assert record.parts == cub_data.parts[record.id]
        assert record.part_boxes is None
        assert Path(record.source) == cub_data.root.absolute() / record.id


def test_cub_part_boxes_are_attached_when_present(cub_data: DataTruth):
    (cub_data.root / "parts/part_boxes.txt").write_text("1 2 1.0 2.0 3.0 4.0\n")
    record = open_dataset(cub_data.root).splits["train"][0]  # image 1
    assert record.part_boxes == ((0.0,) * 4, (1.0, 2.0, 3.0, 4.0), (0.0,) * 4, (0.0,) * 4)


def test_cub_crop_to_box_gives_the_box_size(cub_data: DataTruth):
    record = open_dataset(cub_data.root).splits["test"][1]
    full, crop = load_image(record), load_image(record, crop_to_box=True)
    x, y, w, h = record.box
    assert crop.size == (int(w), int(h))
    assert np.array_equal(np.asarray(crop), np.asarray(full)[int(y) : int(y + h), int(x) : int(x + w)])


def test_crop_to_box_without_box_is_an_error(imagefolder_data: DataTruth):
    record = open_dataset(imagefolder_data.root).splits["train"][0]
    with pytest.raises(ProtoquantError, match="no bounding box"):
        load_image(record, crop_to_box=True)


@pytest.mark.parametrize("missing", ["train_test_split.txt", "classes.txt"])
def test_cub_missing_required_file_is_named(cub_data: DataTruth, missing: str):
    (cub_data.root / missing).unlink()
    with pytest.raises(ProtoquantError, match=missing):
        open_dataset(cub_data.root)


def test_cub_bad_line_and_missing_image_are_named(cub_data: DataTruth):
    with open(cub_data.root / "bounding_boxes.txt", "a") as file:
        file.write("13 1.0 oops 3.0 4.0\n")
    with pytest.raises(ProtoquantError, match=r"bounding_boxes.txt, line 13"):
        open_dataset(cub_data.root)
    (cub_data.root / "bounding_boxes.txt").unlink()  # optional: records then have no box
    assert open_dataset(cub_data.root).splits["train"][0].box is None
    Path(open_dataset(cub_data.root).splits["test"][0].source).unlink()
    with pytest.raises(ProtoquantError, match="1 image\\(s\\) listed in .*images.txt are missing"):
        open_dataset(cub_data.root)


# ---- symlinks and paths that leave their place (fault probe 1g, 1g', 1g'', 9h) ------------------------


def test_a_link_loop_inside_a_class_lists_each_image_once(imagefolder_data: DataTruth):
    root = imagefolder_data.root
    (root / "train/cat/loop").symlink_to(".")  # 1g: os.walk(followlinks=True) listed every image 41 times
    (root / "train/cat/deeper").mkdir()
    write_noise_image(root / "train/cat/deeper/extra.png", np.random.default_rng(5))
    (root / "train/cat/deeper/back").symlink_to("..")
    dataset = open_dataset(root)
    ids = [r.id for r in dataset.splits["train"]]
    assert len(ids) == len(set(ids)) == len(imagefolder_data.files["train"]) + 1
    assert "train/cat/deeper/extra.png" in ids and not any("loop" in i or "back" in i for i in ids)


def test_a_link_up_to_the_split_is_refused_naming_it(imagefolder_data: DataTruth):
    (imagefolder_data.root / "train/dog/up").symlink_to("../../train")  # 1g': relabelled every image as dog
    with pytest.raises(ProtoquantError, match=r"train/dog/up is a link to .*outside its class folder"):
        open_dataset(imagefolder_data.root)


def test_a_link_to_another_class_is_refused(imagefolder_data: DataTruth):
    (imagefolder_data.root / "train/owl/cats").symlink_to("../cat")
    with pytest.raises(ProtoquantError, match=r"train/owl/cats is a link to .*train/cat, outside its class"):
        open_dataset(imagefolder_data.root)


def test_links_to_files_and_to_folders_outside_data_are_followed(imagefolder_data: DataTruth, tmp_path: Path):
    rng = np.random.default_rng(6)
    write_noise_image(tmp_path / "store/more/a.png", rng)
    write_noise_image(tmp_path / "store/single.png", rng)
    (imagefolder_data.root / "train/owl/more").symlink_to(tmp_path / "store/more")
    (imagefolder_data.root / "train/owl/single.png").symlink_to(tmp_path / "store/single.png")
    (imagefolder_data.root / "train/owl/dangling_a").symlink_to("dangling_b")  # 1g'': a dangling loop is ignored
    (imagefolder_data.root / "train/owl/dangling_b").symlink_to("dangling_a")
    owl = [r.id for r in open_dataset(imagefolder_data.root).splits["train"] if r.label == 2]
    assert owl == ["train/owl/img_000.png", "train/owl/img_001.jpg", "train/owl/img_002.png",
                   "train/owl/more/a.png", "train/owl/single.png"]


@pytest.mark.parametrize("path", ["ABSOLUTE", "../../outside.jpg", "001.Bird_A/../../../outside.jpg"])
def test_cub_images_txt_may_not_point_outside_data(cub_data: DataTruth, tmp_path: Path, path: str):
    outside = tmp_path / "outside.jpg"
    write_noise_image(outside, np.random.default_rng(7))
    path = str(outside) if path == "ABSOLUTE" else path
    lines = (cub_data.root / "images.txt").read_text().splitlines()
    lines[0] = f"1 {path}"  # 9h: read silently, its pixels then shown in the pages
    (cub_data.root / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ProtoquantError, match=r"images.txt: image 1 has path .* not inside .*images"):
        open_dataset(cub_data.root)


# ---- WebDataset -----------------------------------------------------------------------------------


def test_imagefolder_to_shards_round_trip(imagefolder_data: DataTruth, tmp_path: Path):
    source = open_dataset(imagefolder_data.root)
    index = write_shards(source, tmp_path / "shards", max_count=4, seed=3)
    assert [s["nsamples"] for s in index["splits"]["train"]] == [4, 4, 1]
    assert [s["url"] for s in index["splits"]["test"]] == ["test-000000.tar", "test-000001.tar"]
    assert json.loads((tmp_path / "shards/classes.json").read_text()) == source.classes

    shards = open_dataset(tmp_path / "shards")
    assert (shards.kind, shards.classes) == ("wds", source.classes)
    by_path = {r.id: r for records in source.splits.values() for r in records}
    for split, records in source.splits.items():
        back = shards.splits[split]
        assert len(back) == len(records)
        original_paths = _json_paths(tmp_path / "shards", split)
        assert sorted(original_paths.values()) == sorted(r.id for r in records)  # every image once
        assert [r.id for r in back] == sorted(r.id for r in back)  # keys in shard order
        for record in back:
            original = by_path[original_paths[record.id]]
            assert record.label == original.label
            assert read_bytes(record) == read_bytes(original)  # raw bytes, no re-encode
    assert np.array_equal(np.asarray(load_image(back[0])), np.asarray(load_image(by_path[original_paths[back[0].id]])))


def _json_paths(shard_dir: Path, split: str) -> dict[str, str]:
    """key -> original path, read with the webdataset library itself (proves the tars are standard)."""
    urls = [str(p) for p in sorted(shard_dir.glob(f"{split}-*.tar"))]
    samples = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)
    return {s["__key__"]: json.loads(s["json"])["path"] for s in samples}


def test_shards_are_reproducible_and_seeded(imagefolder_data: DataTruth, tmp_path: Path):
    source = open_dataset(imagefolder_data.root)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_shards(source, tmp_path / name, max_count=100, seed=seed)
    tar_a, tar_b, tar_c = (tmp_path / name / "train-000000.tar" for name in "abc")
    assert tar_a.read_bytes() == tar_b.read_bytes()
    assert list(_json_paths(tmp_path / "a", "train").values()) != list(_json_paths(tmp_path / "c", "train").values())
    with pytest.raises(ProtoquantError, match="already holds shards"):
        write_shards(source, tmp_path / "a")


def test_cub_to_shards_keeps_boxes_and_parts(cub_data: DataTruth, tmp_path: Path):
    write_shards(open_dataset(cub_data.root), tmp_path / "shards", max_count=5)
    shards = open_dataset(str(tmp_path / "shards" / "{train,test}-{000000..000001}.tar"))
    assert shards.part_names == list(PART_NAMES)
    assert shards.classes == cub_data.classes
    paths = {**_json_paths(tmp_path / "shards", "train"), **_json_paths(tmp_path / "shards", "test")}
    for split in ("train", "test"):
        assert len(shards.splits[split]) == len(cub_data.files[split])
        for record in shards.splits[split]:
            assert record.box == cub_data.boxes[paths[record.id]]
            assert record.parts == cub_data.parts[paths[record.id]]
            assert load_image(record, crop_to_box=True).size == tuple(int(v) for v in record.box[2:])


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 3), value).save(buffer, "PNG")
    return buffer.getvalue()


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_wds_directory_with_split_subdirs_follows_key_rules(tmp_path: Path):
    _write_tar(tmp_path / "train/a.tar", {
        "dir/img.v0.final.jpeg": _png_bytes(10),  # key "dir/img", field "v0.final.jpeg": not an image field
        "dir/img.PNG": _png_bytes(20),  # field lower-cased: "png"
        "dir/img.cls": b"1",
        "other.png": _png_bytes(30),
        "other.cls": b" 0\n",
    })
    _write_tar(tmp_path / "test/b.tar", {"t1.jpeg": _png_bytes(40), "t1.cls": b"2"})
    dataset = open_dataset(tmp_path)
    assert dataset.kind == "wds"
    assert dataset.classes == ["0", "1", "2"]  # no classes file: names from the cls values
    assert _ids_and_labels(dataset.splits["train"]) == [("dir/img", 1), ("other", 0)]
    assert _ids_and_labels(dataset.splits["test"]) == [("t1", 2)]
    pixels = [np.asarray(load_image(r))[0, 0, 0] for r in dataset.splits["train"] + dataset.splits["test"]]
    assert pixels == [20, 30, 40]
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")
    assert open_dataset(tmp_path).classes == ["zero", "one", "two"]


def test_wds_errors_name_tar_and_key(tmp_path: Path):
    _write_tar(tmp_path / "d1/train-0.tar", {"k1.png": _png_bytes(1), "k1.cls": b"0"})
    _write_tar(tmp_path / "d1/train-1.tar", {"k1.png": _png_bytes(1), "k1.cls": b"0"})
    with pytest.raises(ProtoquantError, match="duplicate WebDataset key 'k1'.*train-0.tar.*train-1.tar"):
        open_dataset(tmp_path / "d1")
    _write_tar(tmp_path / "d2/train-0.tar", {"k1.png": _png_bytes(1), "k2.png": _png_bytes(1), "k2.cls": b"0"})
    with pytest.raises(ProtoquantError, match="sample 'k1' in .*train-0.tar lacks a cls field"):
        open_dataset(tmp_path / "d2")
    _write_tar(tmp_path / "d3/extra.tar", {"k.png": _png_bytes(1), "k.cls": b"0"})
    with pytest.raises(ProtoquantError, match="cannot tell the split of shard .*extra.tar"):
        open_dataset(tmp_path / "d3", kind="wds")


# ---- decoding -------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_decode_rgb_converts_every_mode_to_8bit_rgb():
    grey = decode_rgb(_encode(Image.new("L", (2, 2), 77), "PNG"), "grey.png")
    assert (grey.mode, grey.getpixel((0, 0))) == ("RGB", (77, 77, 77))

    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    decoded = decode_rgb(_encode(rgba, "PNG"), "rgba.png")
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]  # on white

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    decoded = decode_rgb(_encode(palette, "PNG", transparency=0), "palette.png")
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 255, 0)]

    cmyk = decode_rgb(_encode(Image.new("CMYK", (2, 2), (0, 255, 0, 0)), "TIFF"), "cmyk.tif")
    assert cmyk.getpixel((0, 0)) == (255, 0, 255)

    one_bit = Image.new("1", (2, 1), 0)
    one_bit.putpixel((1, 0), 1)
    decoded = decode_rgb(_encode(one_bit, "PNG"), "bits.png")
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


@pytest.mark.parametrize("fmt", ["PNG", "PPM"])  # PNG opens as mode I;16, 16-bit PGM as mode I
def test_decode_rgb_scales_16bit_to_8bit(fmt: str):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    decoded = decode_rgb(_encode(Image.fromarray(values), fmt), "deep.img")
    assert decoded.mode == "RGB"
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_decode_errors_name_the_file_and_suggest_skip_bad(tmp_path: Path):
    jpeg = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(ProtoquantError, match=r"cut\.jpg.*--skip-bad"):
        decode_rgb(jpeg[: len(jpeg) // 2], "cut.jpg")
    with pytest.raises(ProtoquantError, match=r"garbage\.png.*--skip-bad"):
        decode_rgb(b"\x89PNG but not really", "garbage.png")
    assert decode_rgb(jpeg, "whole.jpg").size == (64, 64)


# ---- the shards command ---------------------------------------------------------------------------


def test_cli_shards_writes_summarises_and_refuses_a_full_dir(imagefolder_data: DataTruth, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "shards"
    args = ["shards", str(imagefolder_data.root), "--out", str(out), "--max-count", "5"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "test" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json", "shards.json", "test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar"
    ]

    result = runner.invoke(cli.app, args)
    assert result.exit_code != 0
    assert result.exit_code == 2 and "already holds shards" in result.stderr  # one `error:` line

    result = runner.invoke(cli.app, [*args[:-1], "100", "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["splits"]["train"] == [
        {"url": "train-000000.tar", "nsamples": 9, "filesize": (out / "train-000000.tar").stat().st_size}
    ]
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
