"""Dataset readers: ImageFolder, CUB-200-2011 and WebDataset shards as one indexed list of records.

`open_dataset(DATA)` lists and parses; it never decodes an image, so opening 10k images takes well
under a second. The result gives RANDOM ACCESS by row: `dataset.splits["train"][i]` is a small,
picklable `Record` (DataLoader workers get records, not open files), and `load_image(record)` reads
and decodes it. A WebDataset sample is read by seeking to its byte range inside the tar, so shards
are indexed once and never extracted.

Order is deterministic: ImageFolder by class then path, CUB by image id, WebDataset by shard name
then position in the shard. `write_shards` turns an ImageFolder or CUB dataset into WebDataset shards
that this module reads back with the same images, labels and annotations.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from pipeline.errors import ProtoquantError
from pipeline.images import IMAGE_EXTENSIONS, crop_box, decode_rgb

Box = tuple[float, float, float, float]  # x, y, width, height in pixels of the original image
Keypoint = tuple[float, float, int]  # x, y, visible (0/1)

SPLIT_PREFIXES = ("train", "test", "val")
SHARD_INDEX = "shards.json"
CLASSES_JSON = "classes.json"
CLASSES_TXT = "classes.txt"
CLASS_ATTRIBUTES_TXT = "class_attributes.txt"  # not in CUB: make-birds writes which parts define each class


@dataclass(frozen=True)
class Record:
    """One image of a split: where its bytes are, its label, and its annotations (CUB only)."""

    id: str  # stable id: image path relative to DATA (ImageFolder, CUB), or the WebDataset __key__
    label: int  # 0-based index into Dataset.classes
    source: str  # absolute path of the image file, or of the .tar holding it
    offset: int = -1  # tar members: byte offset of the member's data in the tar; -1 for plain files
    size: int = -1  # tar members: byte length of the member's data
    box: Box | None = None  # CUB bounding box
    parts: tuple[Keypoint, ...] | None = None  # CUB part_locs, one per Dataset.part_names
    part_boxes: tuple[Box, ...] | None = None  # parts/part_boxes.txt when present; (0,0,0,0) = absent

    @property
    def display_name(self) -> str:
        """How error messages name this image: its path, or 'shard.tar (sample KEY)'."""
        return self.source if self.offset < 0 else f"{self.source} (sample {self.id})"


@dataclass
class Dataset:
    """A whole dataset: class names and, per split ("train", "test", maybe "val"), its records."""

    root: str
    kind: str  # "imagefolder" | "cub" | "wds"
    classes: list[str]
    splits: dict[str, list[Record]]
    part_names: list[str] | None = None  # CUB only: names of the parts in Record.parts order
    class_parts: list[list[str]] | None = None  # per class (Dataset.classes order), the parts that define it


def open_dataset(path: str | Path, *, kind: str = "auto") -> Dataset:
    """Index a dataset without decoding any image.

    Args:
        path: DATA directory (ImageFolder or CUB-200-2011 layout, or a directory of .tar shards), a
            single .tar, or a brace pattern such as "shards/train-{000000..000003}.tar".
        kind: "auto" (detect), "imagefolder", "cub" or "wds".
    """
    spec = str(path)
    if kind == "auto":
        kind = detect_kind(spec)
    reader = READERS.get(kind)
    if reader is None:
        raise ProtoquantError(f"unknown dataset kind {kind!r} (--kind): use one of auto, {', '.join(READERS)}.")
    return reader(spec)


def detect_kind(spec: str) -> str:
    """Tell the layout of DATA: "cub" (images.txt), "wds" (.tar shards) or "imagefolder" (train/)."""
    if "{" in spec or spec.endswith(".tar"):
        return "wds"
    root = Path(spec)
    if not root.is_dir():
        raise ProtoquantError(f"dataset {spec} does not exist or is not a directory: check the DATA path.")
    if (root / "images.txt").is_file():
        return "cub"
    split_dirs = [root / name for name in SPLIT_PREFIXES if (root / name).is_dir()]
    if any(root.glob("*.tar")) or any(any(d.glob("*.tar")) for d in split_dirs):
        return "wds"
    if (root / "train").is_dir():
        return "imagefolder"
    raise ProtoquantError(
        f"cannot tell the layout of {spec}: expected images.txt (CUB-200-2011), train/<class>/ image "
        "folders (ImageFolder), or train-*.tar / test-*.tar shards (WebDataset): check the DATA path."
    )


def read_bytes(record: Record) -> bytes:
    """The encoded image: the whole file, or the record's byte range inside its tar."""
    try:
        with open(record.source, "rb") as file:
            if record.offset < 0:
                return file.read()
            file.seek(record.offset)
            data = file.read(record.size)
    except OSError as err:
        raise ProtoquantError(
            f"cannot read {record.display_name}: {err}. Was the dataset moved or changed after it was indexed?"
        ) from err
    if len(data) != record.size:
        raise ProtoquantError(f"{record.display_name} is cut short: the tar is truncated; rewrite the shard.")
    return data


def load_image(record: Record, *, crop_to_box: bool = False) -> Image.Image:
    """Read and decode a record to RGB; `crop_to_box` crops to its CUB bounding box."""
    image = decode_rgb(read_bytes(record), record.display_name)
    if not crop_to_box:
        return image
    if record.box is None:
        raise ProtoquantError(
            f"{record.display_name} has no bounding box: cropping to boxes needs a CUB dataset with "
            "bounding_boxes.txt; drop the crop option for this dataset."
        )
    return crop_box(image, record.box)


# ---- helpers shared by the readers ----------------------------------------------------------------


def _split_of(name: str) -> str | None:
    """The split a file or directory name belongs to by its prefix (train*, test*, val*), or None."""
    return next((prefix for prefix in SPLIT_PREFIXES if name.startswith(prefix)), None)


def _val_as_test(splits: dict[str, list]) -> dict[str, list]:
    """`val` is the test split when there is no `test`; with both, `val` stays a split of its own."""
    if "val" in splits and "test" not in splits:
        splits["test"] = splits.pop("val")
    return {name: splits[name] for name in SPLIT_PREFIXES if name in splits}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


# ---- ImageFolder ----------------------------------------------------------------------------------


def read_imagefolder(spec: str) -> Dataset:
    """DATA/train/<class>/* and DATA/test/<class>/* (or val/); classes = train's class dirs, sorted."""
    root = Path(spec).absolute()
    split_dirs = _val_as_test({name: root / name for name in SPLIT_PREFIXES if (root / name).is_dir()})
    if "train" not in split_dirs:
        raise ProtoquantError(f"{root} has no train/ directory: an ImageFolder dataset needs DATA/train/<class>/.")
    classes = _class_dirs(split_dirs["train"])
    if not classes:
        raise ProtoquantError(f"{split_dirs['train']} has no class directories: put images in train/<class>/.")
    class_index = {name: label for label, name in enumerate(classes)}
    splits = {split: _imagefolder_split(root, directory, class_index) for split, directory in split_dirs.items()}
    return Dataset(root=str(root), kind="imagefolder", classes=classes, splits=splits)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))


def _imagefolder_split(root: Path, split_dir: Path, class_index: dict[str, int]) -> list[Record]:
    records = []
    names = _class_dirs(split_dir)
    if not names:
        raise ProtoquantError(f"{split_dir} has no class directories: put images in {split_dir.name}/<class>/.")
    for name in names:
        if name not in class_index:
            raise ProtoquantError(
                f"class {name!r} in {split_dir} is not a class of train/: every test class needs a train/{name}/ "
                "directory (rename or remove it)."
            )
        files = _image_files(split_dir / name, root)
        if not files:
            raise ProtoquantError(
                f"{split_dir / name} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)}): add images or "
                "remove the directory."
            )
        label = class_index[name]
        records += [Record(id=f.relative_to(root).as_posix(), label=label, source=str(f)) for f in files]
    return records


def _image_files(directory: Path, root: Path) -> list[Path]:
    """Image files under a class `directory` (recursively, sorted), skipping hidden files and directories.

    Directory links are followed once each: a link back to a folder already listed (`loop -> .`) is
    skipped, so no image is listed twice; a link that leaves the class for an ancestor or for another
    folder of DATA (`up -> ../../train`) is refused, since it would give other classes' images this
    label. Links to files, and to folders outside DATA, are followed.
    """
    class_real = os.path.realpath(directory)
    visited = {class_real}
    found, pending = [], [str(directory)]
    while pending:
        current = pending.pop()
        entries = sorted((e for e in os.scandir(current) if not _is_hidden(e.name)), key=lambda e: e.name)
        folders = []
        for entry in entries:
            if _is_folder(entry):
                real = os.path.realpath(entry.path)
                if real in visited:
                    continue
                if entry.is_symlink():
                    _check_folder_link(Path(entry.path), real, class_real, os.path.realpath(root))
                visited.add(real)
                folders.append(entry.path)
            elif os.path.isfile(entry.path) and os.path.splitext(entry.name)[1][1:].lower() in IMAGE_EXTENSIONS:
                found.append(Path(entry.path))
        pending.extend(reversed(folders))
    return sorted(found)


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; a dangling or circular link (a -> b -> a) is neither folder nor file."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _check_folder_link(link: Path, real: str, class_real: str, root_real: str) -> None:
    """Refuse a folder link that escapes its class: to an ancestor of it, or elsewhere inside DATA."""
    inside_class = _is_within(real, class_real)
    if inside_class:
        return
    if _is_within(class_real, real) or _is_within(real, root_real):
        raise ProtoquantError(
            f"{link} is a link to {real}, outside its class folder {class_real}: its images would be listed "
            "under this class (or forever); remove the link, or copy the images into the class folder."
        )


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ---- CUB-200-2011 ---------------------------------------------------------------------------------


def read_cub(spec: str) -> Dataset:
    """The CUB-200-2011 layout: the txt tables, images/, and optional boxes and parts/ annotations."""
    root = Path(spec).absolute()
    paths = dict(_read_named(root / "images.txt"))
    labels = _read_id_map(root / "image_class_labels.txt")
    is_train = _read_id_map(root / "train_test_split.txt")
    class_rows = sorted(_read_named(root / "classes.txt"))
    classes = [name for _, name in class_rows]
    class_index = {class_id: label for label, (class_id, _) in enumerate(class_rows)}
    boxes = _optional_boxes(root / "bounding_boxes.txt")
    part_names, keypoints, part_boxes = _cub_parts(root)
    # Every record of a dataset carries the same annotations: an image without part rows has all
    # parts invisible, as CUB writes them (0, 0, 0).
    no_keypoints = [[0.0, 0.0, 0]] * len(part_names) if part_names else None
    no_part_boxes = [[0.0] * 4] * len(part_names) if part_boxes else None

    splits: dict[str, list[Record]] = {"train": [], "test": []}
    missing = []
    images_dir = str(root / "images")
    for image_id in sorted(paths):
        _check_inside_images(paths[image_id], image_id, root)
        source = os.path.join(images_dir, paths[image_id])  # os.path: pathlib costs 0.3 s per 10k images
        if not os.path.isfile(source):
            missing.append(source)
        split = "train" if _lookup(is_train, image_id, "train_test_split.txt", root) == 1 else "test"
        class_id = _lookup(labels, image_id, "image_class_labels.txt", root)
        if class_id not in class_index:
            raise ProtoquantError(
                f"{root / 'image_class_labels.txt'}: image {image_id} has class {class_id}, which is not in "
                "classes.txt: fix either file."
            )
        splits[split].append(
            Record(
                id=f"images/{paths[image_id]}",
                label=class_index[class_id],
                source=source,
                box=_lookup(boxes, image_id, "bounding_boxes.txt", root) if boxes else None,
                parts=_as_keypoints(keypoints.get(image_id, no_keypoints)),
                part_boxes=_as_boxes(part_boxes.get(image_id, no_part_boxes)),
            )
        )
    if missing:
        raise ProtoquantError(
            f"{len(missing)} image(s) listed in {root / 'images.txt'} are missing, e.g. {missing[0]}: "
            "restore them or remove their lines from the CUB txt files."
        )
    splits = {name: records for name, records in splits.items() if records}
    class_parts = _class_parts(root / CLASS_ATTRIBUTES_TXT, class_index, part_names)
    return Dataset(root=str(root), kind="cub", classes=classes, splits=splits, part_names=part_names,
                   class_parts=class_parts)


def _class_parts(path: Path, class_index: dict[int, int], part_names: list[str] | None) -> list[list[str]] | None:
    """class_attributes.txt (make-birds' extension of CUB), rows '<class_id> <part> <variant>': per class,
    the parts named for it, in file order. None when the file is absent."""
    if not path.is_file():
        return None
    parts: list[list[str]] = [[] for _ in class_index]
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 3 or not fields[0].isdigit() or int(fields[0]) not in class_index:
                raise ProtoquantError(f"{path}, line {line_number}: expected '<class_id of classes.txt> <part> "
                                      f"<variant>', found {line.strip()!r}: fix the line.")
            part = " ".join(fields[1:-1])  # CUB part names may hold spaces ("left eye")
            if part_names is not None and part not in part_names:
                raise ProtoquantError(f"{path}, line {line_number}: part {part!r} is not in parts/parts.txt "
                                      f"({', '.join(part_names)}): fix the name.")
            named = parts[class_index[int(fields[0])]]
            if part not in named:
                named.append(part)
    return parts


def _check_inside_images(relative: str, image_id: int, root: Path) -> None:
    """images.txt paths are relative to DATA/images: an absolute path or a `..` that climbs out is refused,
    so dataset metadata cannot point protoquant at any file on the machine."""
    climbs = os.path.normpath(relative).split(os.sep)[0] == os.pardir
    if os.path.isabs(relative) or climbs or os.path.splitdrive(relative)[0]:
        raise ProtoquantError(
            f"{root / 'images.txt'}: image {image_id} has path {relative!r}, which is not inside {root / 'images'}: "
            "list paths relative to images/ (e.g. 001.Black_footed_Albatross/photo.jpg)."
        )


def _require(path: Path) -> None:
    if not path.is_file():
        raise ProtoquantError(f"missing {path}: a CUB-200-2011 dataset needs it (is DATA the CUB_200_2011 folder?).")


def _read_named(path: Path) -> list[tuple[int, str]]:
    """Rows "id text" (images.txt, classes.txt, parts.txt); the text may contain spaces ("left eye")."""
    _require(path)
    rows = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            fields = line.strip().split(maxsplit=1)
            if not fields:
                continue
            if len(fields) != 2 or not fields[0].isdigit():
                raise ProtoquantError(
                    f"{path}, line {line_number}: expected 'id text', found {line.strip()!r}: fix the line."
                )
            rows.append((int(fields[0]), fields[1]))
    return rows


def _read_numbers(path: Path, columns: int) -> np.ndarray:
    """A numeric table as a (rows, columns) float64 array (numpy parses CUB's 177k part rows fast)."""
    _require(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return np.empty((0, columns))
    lines = text.splitlines()
    try:
        table = np.loadtxt(lines, ndmin=2)
    except ValueError:
        table = None
    if table is None or table.shape[1] != columns:
        line_number, line = _first_bad_line(lines, columns)
        raise ProtoquantError(f"{path}, line {line_number}: expected {columns} numbers, found {line!r}: fix the line.")
    return table


def _first_bad_line(lines: list[str], columns: int) -> tuple[int, str]:
    """The first line (1-based) that is not `columns` numbers; only called once parsing has failed."""
    for line_number, line in enumerate(lines, start=1):
        fields = line.split()
        try:
            [float(field) for field in fields]
        except ValueError:
            return line_number, line
        if fields and len(fields) != columns:
            return line_number, line
    return len(lines), lines[-1]


def _read_id_map(path: Path) -> dict[int, int]:
    """Rows "image_id value" as a dict (image_class_labels.txt, train_test_split.txt)."""
    table = _read_numbers(path, 2).astype(np.int64)
    return dict(zip(table[:, 0].tolist(), table[:, 1].tolist()))


def _lookup(table: dict, image_id: int, file_name: str, root: Path):
    if image_id not in table:
        raise ProtoquantError(f"{root / file_name} has no line for image {image_id} of images.txt: add it.")
    return table[image_id]


def _optional_boxes(path: Path) -> dict[int, Box]:
    if not path.is_file():
        return {}
    table = _read_numbers(path, 5)
    return dict(zip(table[:, 0].astype(np.int64).tolist(), map(tuple, table[:, 1:].tolist())))


def _cub_parts(root: Path) -> tuple[list[str] | None, dict[int, list], dict[int, list]]:
    """Part names, per-image keypoints and (if parts/part_boxes.txt exists) per-image part boxes."""
    parts_dir = root / "parts"
    names_file, locs_file, boxes_file = parts_dir / "parts.txt", parts_dir / "part_locs.txt", parts_dir / "part_boxes.txt"
    if not names_file.is_file() and not locs_file.is_file():
        return None, {}, {}
    part_rows = sorted(_read_named(names_file))
    part_ids = np.array([part_id for part_id, _ in part_rows])
    keypoints = _per_image_parts(locs_file, 5, part_ids)
    part_boxes = _per_image_parts(boxes_file, 6, part_ids) if boxes_file.is_file() else {}
    return [name for _, name in part_rows], keypoints, part_boxes


def _per_image_parts(path: Path, columns: int, part_ids: np.ndarray) -> dict[int, list]:
    """Rows "image_id part_id values..." -> image_id: one value list per part (zeros if it has no row)."""
    table = _read_numbers(path, columns)
    image_ids, row_part_ids = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    slot = np.minimum(np.searchsorted(part_ids, row_part_ids), len(part_ids) - 1)
    unknown = part_ids[slot] != row_part_ids
    if unknown.any():
        raise ProtoquantError(f"{path}: part {row_part_ids[unknown][0]} is not in parts/parts.txt: fix either file.")
    unique_ids, image_row = np.unique(image_ids, return_inverse=True)
    values = np.zeros((len(unique_ids), len(part_ids), columns - 2))  # (images, parts, values)
    values[image_row, slot] = table[:, 2:]
    return dict(zip(unique_ids.tolist(), values.tolist()))


def _as_keypoints(rows: list | None) -> tuple[Keypoint, ...] | None:
    return None if rows is None else tuple((x, y, int(visible)) for x, y, visible in rows)


def _as_boxes(rows: list | None) -> tuple[Box, ...] | None:
    return None if rows is None else tuple(tuple(row) for row in rows)


# ---- WebDataset -----------------------------------------------------------------------------------


def read_wds(spec: str) -> Dataset:
    """WebDataset shards: a directory of train*/test* tars (or train/, test/ subdirs), a tar, or a brace pattern."""
    root, shards = _find_shards(spec)
    index = _read_json(root / SHARD_INDEX) if (root / SHARD_INDEX).is_file() else {}
    with_annotations = index.get("kind") == "cub"  # only then do the json fields carry boxes and parts
    seen: dict[str, str] = {}
    splits: dict[str, list[Record]] = {}
    expected = _indexed_shards(index)
    for split, tar_paths in shards.items():
        splits[split] = []
        for tar_path in tar_paths:
            _check_against_index(tar_path, expected.get(tar_path.name))
            for record in _index_tar(tar_path, with_annotations):
                if record.id in seen:
                    raise ProtoquantError(
                        f"duplicate WebDataset key {record.id!r} in {seen[record.id]} and {tar_path}: keys must be "
                        "unique across shards (rewrite the shards with unique __key__s)."
                    )
                seen[record.id] = str(tar_path)
                splits[split].append(record)
    if not seen:
        raise ProtoquantError(f"the shards of {spec} hold no samples: check the path or rewrite the shards.")
    classes = _wds_classes(root, max(r.label for records in splits.values() for r in records))
    return Dataset(root=str(root), kind="wds", classes=classes, splits=splits, part_names=index.get("part_names"))


def _indexed_shards(index: dict) -> dict[str, dict]:
    """shards.json (written by `protoquant shards`): tar name -> {"nsamples", "filesize"}."""
    entries = [entry for split in (index.get("splits") or {}).values() for entry in split if isinstance(entry, dict)]
    return {str(entry.get("url")): entry for entry in entries}


def _check_against_index(tar_path: Path, entry: dict | None) -> None:
    """A tar cut after a whole member reads as a clean, shorter tar: its recorded size says it is not."""
    if entry is None or "filesize" not in entry:
        return
    size = tar_path.stat().st_size
    if size != int(entry["filesize"]):
        raise ProtoquantError(f"{tar_path} is {size} bytes but {SHARD_INDEX} records {entry['filesize']}: the shard is "
                              "truncated or was changed; copy it again or rewrite the shards with `protoquant shards`.")


def _find_shards(spec: str) -> tuple[Path, dict[str, list[Path]]]:
    """The directory holding the shards (where classes.json lives) and the tar files of each split."""
    by_split: dict[str, list[Path]] = {}
    if "{" in spec or spec.endswith(".tar"):
        import braceexpand  # a webdataset dependency

        files = [Path(name).absolute() for name in braceexpand.braceexpand(spec)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ProtoquantError(
                f"{len(missing)} shard(s) of {spec} do not exist, e.g. {missing[0]}: fix the path or pattern."
            )
        root = files[0].parent
    else:
        root = Path(spec).absolute()
        files = sorted(root.glob("*.tar"))
        for name in SPLIT_PREFIXES:
            if (root / name).is_dir():
                by_split.setdefault(name, []).extend(sorted((root / name).glob("*.tar")))
    for path in files:
        split = _split_of(path.name)
        if split is None:
            raise ProtoquantError(
                f"cannot tell the split of shard {path}: name shards train-*.tar and test-*.tar (or val-*.tar), "
                "or put them in train/ and test/ subdirectories."
            )
        by_split.setdefault(split, []).append(path)
    return root, _val_as_test({split: sorted(paths) for split, paths in by_split.items() if paths})


def _index_tar(path: Path, with_annotations: bool) -> list[Record]:
    """One record per sample: members grouped by WebDataset key; reads only the small cls/json members."""
    try:
        with tarfile.open(path, "r:") as tar:
            samples = _group_members(tar.getmembers())
    except tarfile.ReadError as err:
        raise ProtoquantError(
            f"cannot index {path} as an uncompressed tar ({err}): samples are read by seeking, so shards must be "
            "plain .tar files (decompress .tar.gz shards first)."
        ) from err
    with open(path, "rb") as file:  # plain seek + read: much cheaper than tarfile.extractfile per member
        return [_sample_record(file, path, key, fields, with_annotations) for key, fields in samples]


def _group_members(members: list[tarfile.TarInfo]) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive members with the same key form a sample, as WebDataset groups them.

    key = member path up to the first dot of its basename; field = the rest, lower-cased.
    """
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    for member in members:
        if not member.isfile():
            continue
        directory, _, basename = member.name.rpartition("/")
        stem, dot, field = basename.partition(".")
        if not dot:
            continue  # no extension: not part of any sample (WebDataset skips it too)
        key = f"{directory}/{stem}" if directory else stem
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1].setdefault(field.lower(), member)
    return samples


def _member_bytes(file: BinaryIO, member: tarfile.TarInfo) -> bytes:
    file.seek(member.offset_data)
    return file.read(member.size)


def _sample_record(
    file: BinaryIO, path: Path, key: str, fields: dict[str, tarfile.TarInfo], with_annotations: bool
) -> Record:
    image_field = next((f for f in IMAGE_EXTENSIONS if f in fields), None)
    if image_field is None or "cls" not in fields:
        lacking = "an image field (" + "/".join(IMAGE_EXTENSIONS) + ")" if image_field is None else "a cls field"
        raise ProtoquantError(
            f"sample {key!r} in {path} lacks {lacking} (fields: {', '.join(sorted(fields))}): every sample needs "
            "an image and an integer class in .cls."
        )
    text = _member_bytes(file, fields["cls"]).decode("utf-8", "replace").strip()
    if not text.isdigit():
        raise ProtoquantError(f"sample {key!r} in {path}: .cls holds {text!r}, not a class index (0, 1, ...).")
    image = fields[image_field]
    record = Record(id=key, label=int(text), source=str(path), offset=image.offset_data, size=image.size)
    if with_annotations and "json" in fields:
        try:
            meta = json.loads(_member_bytes(file, fields["json"]))
        except ValueError as err:
            raise ProtoquantError(f"sample {key!r} in {path}: its .json is not valid JSON ({err}).") from err
        record = _with_annotations(record, meta)
    return record


def _with_annotations(record: Record, meta: dict) -> Record:
    """A record carrying the box / parts / part_boxes that write_shards stored in the sample's json."""
    box, parts, part_boxes = meta.get("box"), meta.get("parts"), meta.get("part_boxes")
    return replace(
        record,
        box=None if box is None else tuple(float(v) for v in box),
        parts=None if parts is None else tuple((float(x), float(y), int(seen)) for x, y, seen in parts),
        part_boxes=None if part_boxes is None else tuple(tuple(float(v) for v in b) for b in part_boxes),
    )


def _wds_classes(root: Path, max_label: int) -> list[str]:
    """Class names from classes.json / classes.txt next to the shards, else "0", "1", ... up to max_label."""
    if (root / CLASSES_JSON).is_file():
        source, classes = root / CLASSES_JSON, [str(c) for c in _read_json(root / CLASSES_JSON)]
    elif (root / CLASSES_TXT).is_file():
        source = root / CLASSES_TXT
        classes = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        return [str(label) for label in range(max_label + 1)]
    if max_label >= len(classes):
        raise ProtoquantError(
            f"a sample has class {max_label} but {source} names only {len(classes)} classes: "
            "fix the file or the .cls fields."
        )
    return classes


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ProtoquantError(f"{path} is not valid JSON ({err}): rewrite it or remove it.") from err


READERS = {"imagefolder": read_imagefolder, "cub": read_cub, "wds": read_wds}


# ---- writing WebDataset shards -------------------------------------------------------------------

SHARD_MTIME = 1_700_000_000  # fixed member mtime: the same dataset and seed give byte-identical tars


def write_shards(dataset: Dataset, out: Path, *, max_count: int = 1000, seed: int = 0) -> dict:
    """Write an ImageFolder or CUB dataset as WebDataset shards OUT/<split>-000000.tar, ...

    Each split is shuffled once with `seed` (so shards mix classes). Image bytes are copied as they
    are (no re-encode) under their original extension; each sample also has `cls` (label) and `json`
    (original path, class name, and for CUB the box, parts and part boxes). OUT/classes.json names
    the classes and OUT/shards.json lists the shards with their sample counts, which it also returns.
    """
    import webdataset

    if dataset.kind == "wds":
        raise ProtoquantError(
            f"{dataset.root} already is a WebDataset: shards are written from ImageFolder or CUB data."
        )
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")) or (out / SHARD_INDEX).exists():
        raise ProtoquantError(f"{out} already holds shards: write to an empty directory (or pass --overwrite).")
    index = {
        "format": "protoquant-shards",
        "version": 1,
        "source": dataset.root,
        "kind": dataset.kind,
        "seed": seed,
        "max_count": max_count,
        "classes": dataset.classes,
        "part_names": dataset.part_names,
        "splits": {},
    }
    for split, records in dataset.splits.items():
        shuffled = list(records)
        random.Random(seed).shuffle(shuffled)
        counts: dict[str, int] = {}
        with webdataset.ShardWriter(
            str(out / f"{split}-%06d.tar"), maxcount=max_count, verbose=0, encoder=False, mtime=SHARD_MTIME
        ) as sink:
            for position, record in enumerate(shuffled):
                sink.write(_sample(record, f"{split}-{position:08d}", dataset.classes))
                counts[sink.fname] = counts.get(sink.fname, 0) + 1
        index["splits"][split] = [
            {"url": Path(name).name, "nsamples": n, "filesize": Path(name).stat().st_size} for name, n in counts.items()
        ]
    (out / CLASSES_JSON).write_text(json.dumps(dataset.classes, indent=1) + "\n", encoding="utf-8")
    (out / SHARD_INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def _sample(record: Record, key: str, classes: list[str]) -> dict:
    """The WebDataset sample of one record: raw image bytes, cls, json metadata."""
    extension = record.source.rpartition(".")[2].lower()
    if extension not in IMAGE_EXTENSIONS:
        raise ProtoquantError(
            f"{record.source}: extension .{extension} cannot be a WebDataset image field "
            f"({', '.join(IMAGE_EXTENSIONS)}); convert the image first."
        )
    meta = {"path": record.id, "class": classes[record.label]}
    for name in ("box", "parts", "part_boxes"):
        if getattr(record, name) is not None:
            meta[name] = getattr(record, name)
    return {
        "__key__": key,
        extension: read_bytes(record),
        "cls": str(record.label).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }
