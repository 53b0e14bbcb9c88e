"""A procedural "birds with parts" dataset, written exactly in the CUB-200-2011 layout.

Each bird is drawn from parts (body, head, crown, beak, eye, wing, tail, legs). Five parts carry a
class-defining attribute with three variants each (beak and tail: shape; crown, wing and eye:
colour); a class is one combination of the five. Body, head, tail and leg colours, body and head
shape, pose, scale, position, background clutter, occluders and noise are random nuisances shared
by every class, so only the attribute parts tell classes apart. Classes are chosen so that each one
differs from an earlier one in exactly one part (fine-grained pairs), and every part separates some
pair once there are six classes or more.

Ground truth comes from the drawing itself: every polygon is drawn twice, into the RGB image and
with its part id into a label map, so keypoints, visibility and tight boxes follow the pixels.

Layout written under OUT (CUB-200-2011; pixel (x, y) is column x, row y, 0-based):
    images/<NNN.ClassName>/<ClassName>_<NNNN>.jpg
    images.txt               <image_id> <path relative to images/>
    image_class_labels.txt   <image_id> <class_id>            (1-based)
    train_test_split.txt     <image_id> <1 train | 0 test>    (stratified per class)
    classes.txt              <class_id> <NNN.ClassName>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (tight box of the visible bird)
    parts/parts.txt          <part_id> <part name>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>   (0 0 0 when not visible)
  and, not in CUB (our extension):
    parts/part_boxes.txt     <image_id> <part_id> <x> <y> <w> <h>     (0 0 0 0 when not visible)
    class_attributes.txt     <class_id> <part> <variant>
    README.txt               the classes, which part separates which classes, the conventions
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import ProtoquantError

RGB = tuple[int, int, int]

PARTS: tuple[str, ...] = ("body", "head", "crown", "beak", "eye", "wing", "tail", "legs")
PART_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(PARTS)}

# The class-defining parts and their variants, in class-name order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "beak": ("short", "long", "hooked"),
    "crown": ("red", "blue", "yellow"),
    "wing": ("black", "white", "green"),
    "tail": ("fan", "forked", "pointed"),
    "eye": ("dark", "red", "yellow"),
}
# Parts whose attribute is a colour, drawn exactly in that colour (before noise and JPEG).
ATTRIBUTE_COLOURS: dict[str, dict[str, RGB]] = {
    "crown": {"red": (210, 35, 35), "blue": (35, 85, 215), "yellow": (240, 200, 30)},
    "wing": {"black": (30, 30, 35), "white": (235, 235, 225), "green": (40, 150, 80)},
    "eye": {"dark": (25, 20, 20), "red": (220, 30, 30), "yellow": (245, 215, 40)},
}
BEAK_COLOUR: RGB = (225, 140, 40)  # the same for every class: the beak's SHAPE is the attribute
# Shared nuisances: the body colour is drawn from this palette and jittered in every image.
BODY_PALETTE: tuple[RGB, ...] = ((140, 105, 70), (125, 125, 120), (120, 120, 70), (185, 160, 120), (95, 80, 65))
LEGS_COLOUR: RGB = (105, 95, 90)

# Clutter sometimes takes these colours, so that a colour alone, anywhere in the image, proves nothing.
_DISTRACTORS: tuple[RGB, ...] = (*(c for colours in ATTRIBUTE_COLOURS.values() for c in colours.values()), BEAK_COLOUR)

N_COMBINATIONS = math.prod(len(v) for v in ATTRIBUTES.values())
JPEG_QUALITY = 92
MIN_SIZE, MAX_SIZE = 64, 2048

# Canonical frame: the bird faces +x, y points down, the body centre is the origin, units are about
# half a body length. This box holds every part of every variant (used to place the bird).
_EXTENT = ((-1.2, -0.62), (0.98, 0.72))
_FEET_Y = 0.66


# ---------------------------------------------------------------- classes


def design_classes(n: int) -> list[dict[str, str]]:
    """The attribute dicts of the first n classes; they depend on n only, never on the seed.

    Greedy: each new class copies an existing class (newest first) and changes ONE part, the part
    used least often so far, to its least used variant. So every class after the first differs from
    an earlier one in exactly one part, the parts take turns being the difference, and the first n
    classes stay the same whatever the total.
    """
    if not 1 <= n <= N_COMBINATIONS:
        raise ProtoquantError(f"design_classes: n={n} must be between 1 and {N_COMBINATIONS}")
    chosen: list[tuple[int, ...]] = [(0,) * len(ATTRIBUTES)]  # variant indices, in ATTRIBUTES order
    uses = [0] * len(ATTRIBUTES)  # how often each part was the one difference
    while len(chosen) < n:
        i, child = _one_part_step(chosen, uses)
        uses[i] += 1
        chosen.append(child)
    return [{p: ATTRIBUTES[p][c[i]] for i, p in enumerate(ATTRIBUTES)} for c in chosen]


def _one_part_step(chosen: list[tuple[int, ...]], uses: list[int]) -> tuple[int, tuple[int, ...]]:
    """The next class: (index of the part that changes, its variant indices)."""
    seen = set(chosen)
    for i in sorted(range(len(uses)), key=lambda i: (uses[i], i)):
        counts = Counter(c[i] for c in chosen)
        values = sorted(range(len(ATTRIBUTES[list(ATTRIBUTES)[i]])), key=lambda v: (counts[v], v))
        for parent in reversed(chosen):
            for v in values:
                candidate = parent[:i] + (v,) + parent[i + 1 :]
                if candidate not in seen:
                    return i, candidate
    raise AssertionError("unreachable: one-part moves connect every combination")


def class_name(attributes: dict[str, str]) -> str:
    """'Hooked_Beak_Red_Crown_Black_Wing_Fan_Tail_Dark_Eye': each attribute part with its variant."""
    return "_".join(f"{attributes[p].capitalize()}_{p.capitalize()}" for p in ATTRIBUTES)


def one_part_pairs(classes: dict[str, dict[str, str]]) -> list[tuple[str, str, str]]:
    """Every (class_a, class_b, part) whose attributes differ in that one part only."""
    names = list(classes)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = [p for p in ATTRIBUTES if classes[a][p] != classes[b][p]]
            if len(diff) == 1:
                pairs.append((a, b, diff[0]))
    return pairs


# ---------------------------------------------------------------- one image


@dataclass(frozen=True, eq=False)
class Nuisance:
    """Everything random about one image; sampled before, and independently of, the class.

    So two classes rendered with the same Nuisance differ only in their attribute parts' pixels.
    """

    size: int
    flip: bool  # True: the bird faces left
    angle: float  # radians, clockwise on screen
    scale: float  # pixels per canonical unit
    offset: tuple[float, float]  # image position of the canonical origin
    body_colour: RGB
    head_colour: RGB
    tail_colour: RGB
    legs_colour: RGB
    body_shape: tuple[float, float, float]  # body length, body height, head radius factors
    background: Image.Image  # RGB, size x size: gradient + soft texture
    clutter: tuple[tuple[RGB, np.ndarray], ...]  # background polygons, image coordinates
    perch: tuple[RGB, float, float] | None  # colour, tilt, thickness (canonical)
    occluder: tuple[RGB, np.ndarray] | None  # foreground polygon, canonical coordinates
    noise: np.ndarray  # (size, size, 3) int16, added to the drawn pixels


@dataclass(frozen=True, eq=False)
class Scene:
    """One rendered bird with the ground truth read off its own label map."""

    image: np.ndarray  # (H, W, 3) uint8, before JPEG
    labels: np.ndarray  # (H, W) uint8: part id of the topmost shape, 0 = not the bird
    keypoints: dict[str, tuple[float, float]]  # part -> (x, y) pixel; (0, 0) when not visible
    visible: dict[str, bool]
    part_boxes: dict[str, tuple[float, float, float, float]]  # x, y, w, h; zeros when not visible
    bird_box: tuple[float, float, float, float]
    colours: dict[str, RGB]  # the fill colour of every part in this image


def _jitter(rng: np.random.Generator, colour: RGB, amount: int) -> RGB:
    c = np.asarray(colour) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 32) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return _rotate(np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1), angle) + (cx, cy)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])  # row vectors: (x, y) -> (cx - sy, sx + cy)


def _segment(p: tuple[float, float], q: tuple[float, float], half_width: float) -> np.ndarray:
    """A thick line from p to q as a quad."""
    d = np.subtract(q, p)
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-12) * half_width
    return np.array([p + n, q + n, q - n, p - n])


@dataclass(frozen=True)
class Difficulty:
    """The knobs of make-birds; the defaults draw exactly the images earlier versions drew.

    clutter: the most background shapes per image (at least min(5, clutter) are drawn; 0: none).
    decoys: the share of clutter shapes painted in the attribute colours (the shortcut a model may learn).
    bird_scale: a factor on the bird's size (1.0: it spans about 55-80% of the image).
    """

    clutter: int = 12
    decoys: float = 0.4
    bird_scale: float = 1.0

    def check(self) -> None:
        if not 0 <= self.clutter <= 100:
            raise ProtoquantError(f"--clutter {self.clutter}: choose 0 to 100 background shapes per image")
        if not 0.0 <= self.decoys <= 1.0:
            raise ProtoquantError(f"--decoys {self.decoys}: choose a share between 0 and 1")
        if not 0.3 <= self.bird_scale <= 1.5:
            raise ProtoquantError(f"--bird-scale {self.bird_scale}: choose 0.3 to 1.5 (1.0: the bird spans "
                                  "about 55-80% of the image)")


def sample_nuisance(rng: np.random.Generator, size: int, difficulty: Difficulty = Difficulty()) -> Nuisance:
    """Draw pose, scale, position, shared colours, background, clutter, occluder and noise."""
    flip = bool(rng.random() < 0.5)
    angle = float(rng.uniform(-0.26, 0.26))  # +-15 degrees
    scale = float(size * rng.uniform(0.24, 0.36)) * difficulty.bird_scale  # default: spans ~55-80% of the image

    # Place the bird: usually whole, sometimes (15%) pushed partly out of frame.
    corners = np.array([[x, y] for x in (_EXTENT[0][0], _EXTENT[1][0]) for y in (_EXTENT[0][1], _EXTENT[1][1])])
    corners = _rotate(corners * ((-1.0 if flip else 1.0), 1.0), angle) * scale
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    out_of_frame = rng.random() < 0.15
    offset = []
    for axis in range(2):
        span = hi[axis] - lo[axis]
        slack = 0.3 * span if out_of_frame else -2.0
        a, b = -lo[axis] - slack, size - hi[axis] + slack
        offset.append(float(rng.uniform(a, b)) if a < b else (size - lo[axis] - hi[axis]) / 2.0)

    body_colour = _jitter(rng, BODY_PALETTE[rng.integers(len(BODY_PALETTE))], 18)
    head_colour = _jitter(rng, body_colour, 10)
    shade = rng.uniform(0.7, 0.85)
    tail_colour = tuple(int(v * shade) for v in body_colour)
    legs_colour = _jitter(rng, LEGS_COLOUR, 12)
    body_shape = tuple(float(v) for v in rng.uniform(0.9, 1.1, size=3))

    # Background: a vertical gradient between two random colours plus a soft texture, both drawn on
    # a coarse grid and bilinearly upsampled (the gradient stays exactly linear).
    top, bottom = rng.uniform(40, 230, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, 6)[:, None, None]
    coarse = top + (bottom - top) * ramp + rng.uniform(-30, 30, size=(6, 6, 3))
    background = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    background = background.resize((size, size), Image.Resampling.BILINEAR)

    # Clutter: random polygons, ellipses and lines; some take the attribute colours as distractors.
    clutter = []
    for _ in range(int(rng.integers(min(5, difficulty.clutter), difficulty.clutter + 1))):
        kind = int(rng.integers(3))
        colour = (
            _jitter(rng, _DISTRACTORS[rng.integers(len(_DISTRACTORS))], 10)
            if rng.random() < difficulty.decoys
            else tuple(int(v) for v in rng.integers(0, 256, size=3))
        )
        centre = rng.uniform(0, size, size=2)
        r = size * rng.uniform(0.03, 0.15)
        if kind == 0:
            pts = _ellipse(*centre, r, r * rng.uniform(0.3, 1.0), rng.uniform(0, np.pi), n=20)
        elif kind == 1:
            pts = centre + rng.uniform(-r, r, size=(int(rng.integers(3, 6)), 2))
        else:
            pts = _segment(centre, centre + rng.uniform(-2 * r, 2 * r, size=2), size * rng.uniform(0.003, 0.012))
        clutter.append((colour, pts))

    perch = None
    if rng.random() < 0.8:
        perch = (_jitter(rng, (110, 80, 50), 25), float(rng.uniform(-0.12, 0.12)), float(rng.uniform(0.05, 0.09)))

    occluder = None
    if rng.random() < 0.2:  # a leaf or a twig in front of the bird
        centre = rng.uniform((-0.8, -0.5), (0.8, 0.5))
        r = rng.uniform(0.15, 0.3)
        if rng.random() < 0.5:
            occluder = (_jitter(rng, (60, 140, 50), 25), _ellipse(*centre, r, r * 0.45, rng.uniform(0, np.pi), n=24))
        else:
            d = _rotate(np.array([[r * 1.6, 0.0]]), rng.uniform(0, np.pi))[0]
            occluder = (_jitter(rng, (90, 65, 40), 20), _segment(centre - d, centre + d, 0.05))

    # Pixel noise: the sum of two uniform draws (triangular; std 3 to 9 grey levels, at most +-20).
    amp = int(rng.integers(3, 11))
    noise = rng.integers(-amp, amp + 1, size=(2, size, size, 3), dtype=np.int16).sum(axis=0, dtype=np.int16)
    return Nuisance(
        size=size, flip=flip, angle=angle, scale=scale, offset=(offset[0], offset[1]),
        body_colour=body_colour, head_colour=head_colour, tail_colour=tail_colour, legs_colour=legs_colour,
        body_shape=body_shape, background=background, clutter=tuple(clutter), perch=perch,
        occluder=occluder, noise=noise,
    )  # fmt: skip


def _bird(attributes: dict[str, str], nz: Nuisance) -> tuple[list[tuple[str, np.ndarray]], dict[str, tuple]]:
    """The bird's polygons in drawing order (part, canonical polygon) and each part's anchor point.

    Anchors sit inside their own part, clear of the parts drawn over it (the wing over the body,
    the crown and eye over the head), so a part is visible unless clipped or occluded.
    """
    bl, bh, hr = nz.body_shape
    px = 1.0 / nz.scale  # one pixel in canonical units: thin parts keep a minimum width
    shapes: list[tuple[str, np.ndarray]] = []
    anchors: dict[str, tuple] = {}

    # Tail: from under the back of the body, pointing back and a little down. (u along, v across)
    root, phi = np.array([-0.42 * bl, 0.06]), 0.25
    along, across = np.array([-math.cos(phi), math.sin(phi)]), np.array([math.sin(phi), math.cos(phi)])
    tail_uv = {
        "fan": (
            [(0.0, -0.09)] + [(0.62 * math.cos(a), 0.62 * math.sin(a)) for a in np.linspace(-0.45, 0.45, 9)]
            + [(0.0, 0.09)],
            (0.40, 0.0),
        ),
        "forked": ([(0.0, -0.09), (0.66, -0.24), (0.44, 0.0), (0.66, 0.24), (0.0, 0.09)], (0.28, 0.0)),
        "pointed": ([(0.0, -0.12), (0.80, 0.0), (0.0, 0.12)], (0.30, 0.0)),
    }[attributes["tail"]]  # fmt: skip
    def to_xy(uv) -> np.ndarray:  # (..., 2) tail coordinates -> canonical
        uv = np.asarray(uv, dtype=np.float64)
        return root + uv[..., :1] * along + uv[..., 1:] * across

    shapes.append(("tail", to_xy(tail_uv[0])))
    anchors["tail"] = tuple(to_xy(tail_uv[1]))

    # Legs: two legs with toes, under the body; the anchor is the middle of the front leg.
    hw = max(0.045, 2.2 * px)
    for hip_x, foot_x in ((-0.08, -0.06), (0.12, 0.16)):
        hip, foot = (hip_x * bl, 0.22), (foot_x * bl, _FEET_Y)
        for piece in (
            _segment(hip, foot, hw),
            _segment(foot, (foot[0] + 0.14, _FEET_Y + 0.02), hw * 0.8),
            _segment(foot, (foot[0] - 0.10, _FEET_Y + 0.03), hw * 0.8),
        ):
            shapes.append(("legs", piece))
    anchors["legs"] = (0.14 * bl, 0.47)

    # Body: a tilted ellipse (head end up); its anchor is the breast, below the wing.
    shapes.append(("body", _ellipse(0.0, 0.0, 0.56 * bl, 0.32 * bh, -0.2)))
    anchors["body"] = (0.22 * bl, 0.17 * bh)

    # Wing: a teardrop on the flank, pointed towards the tail.
    t = np.linspace(0.0, 2.0 * np.pi, 32, endpoint=False)
    back = np.maximum(0.0, -np.cos(t))
    wing = np.stack([0.36 * bl * np.cos(t) * (1 + 0.45 * back), 0.16 * bh * np.sin(t) * (1 - 0.45 * back)], axis=1)
    shapes.append(("wing", _rotate(wing, -0.12) + (-0.06 * bl, -0.05)))
    anchors["wing"] = (-0.06 * bl, -0.05)

    # Head, with the crown (the cap above a chord), the eye and the beak.
    r = 0.25 * hr
    cx, cy = 0.5 * bl, -0.30 - 0.5 * (r - 0.25)
    shapes.append(("head", _ellipse(cx, cy, r, r)))
    anchors["head"] = (cx - 0.45 * r, cy + 0.35 * r)
    chord = -0.4 * r  # the crown covers the head above y = cy + chord
    a0 = math.asin(-chord / r)  # angle (from +x, measured upwards) where the chord meets the circle
    arc = np.linspace(math.pi - a0, a0, 17)
    crown = np.stack([cx + 1.04 * r * np.cos(arc), cy - 1.04 * r * np.sin(arc)], axis=1)
    shapes.append(("crown", crown))
    anchors["crown"] = (cx - 0.05 * r, cy - 0.7 * r)
    er = max(0.075, 2.6 * px)
    ex, ey = cx + 0.4 * r, cy + 0.05 * r
    shapes.append(("eye", _ellipse(ex, ey, er, er, n=16)))
    anchors["eye"] = (ex, ey)

    bx, by = cx + r * math.cos(0.1), cy + r * math.sin(0.1)
    beak_pts, beak_anchor = {
        "short": ([(-0.04, -0.09), (0.17, 0.01), (-0.04, 0.09)], (0.04, 0.0)),
        "long": ([(-0.04, -0.075), (0.38, 0.015), (-0.04, 0.08)], (0.07, 0.0)),
        "hooked": (
            [(-0.04, -0.09), (0.09, -0.09), (0.18, -0.05), (0.22, 0.03), (0.19, 0.11), (0.15, 0.05), (0.08, 0.06),
             (-0.04, 0.08)],
            (0.05, -0.01),
        ),
    }[attributes["beak"]]  # fmt: skip
    thick = max(1.0, 4.5 * px / 0.1)  # the beak is ~0.1 thick at its anchor: keep that >= 4.5 px
    shapes.append(("beak", np.array(beak_pts) * (1.0, thick) + (bx, by)))
    anchors["beak"] = (bx + beak_anchor[0], by + beak_anchor[1] * thick)
    return shapes, anchors


def _part_colours(attributes: dict[str, str], nz: Nuisance) -> dict[str, RGB]:
    colours = {part: ATTRIBUTE_COLOURS[part][attributes[part]] for part in ATTRIBUTE_COLOURS}
    colours.update(body=nz.body_colour, head=nz.head_colour, tail=nz.tail_colour, legs=nz.legs_colour)
    colours["beak"] = BEAK_COLOUR
    return colours


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def render_bird(attributes: dict[str, str], nuisance: Nuisance) -> Scene:
    """Draw one bird of the given attributes under the given nuisance, with its ground truth.

    A part is visible when the 3x3 pixels around its keypoint all show that part (not clipped by
    the frame, not covered by the occluder or another part); its box is then the tight box of all
    its pixels. The bird box is the tight box of every bird pixel.
    """
    nz, size = nuisance, nuisance.size
    image = nz.background.copy()
    labels = Image.new("L", (size, size), 0)
    draw_rgb, draw_lab = ImageDraw.Draw(image), ImageDraw.Draw(labels)

    def to_image(points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64) * ((-1.0 if nz.flip else 1.0), 1.0)
        return _rotate(pts, nz.angle) * nz.scale + nz.offset

    def draw(points: np.ndarray, colour: RGB, label: int) -> None:
        xy = [tuple(p) for p in points.tolist()]
        draw_rgb.polygon(xy, fill=colour)
        draw_lab.polygon(xy, fill=label)

    for colour, pts in nz.clutter:
        draw(pts, colour, 0)
    if nz.perch is not None:
        colour, tilt, thick = nz.perch
        y = _FEET_Y + 0.03 + thick
        ends = _rotate(np.array([[-4.0, 0.0], [4.0, 0.0]]), tilt) + (0.0, y)
        draw(to_image(_segment(ends[0], ends[1], thick)), colour, 0)
    colours = _part_colours(attributes, nz)
    shapes, anchors = _bird(attributes, nz)
    for part, pts in shapes:
        draw(to_image(pts), colours[part], PART_IDS[part])
    if nz.occluder is not None:
        draw(to_image(nz.occluder[1]), nz.occluder[0], 0)

    pixels = np.clip(np.asarray(image, dtype=np.int16) + nz.noise, 0, 255).astype(np.uint8)
    lab = np.asarray(labels)
    keypoints, visible, part_boxes = {}, {}, {}
    for part in PARTS:
        x, y = (int(round(v)) for v in to_image(np.array([anchors[part]]))[0])
        pid = PART_IDS[part]
        seen = 1 <= x < size - 1 and 1 <= y < size - 1 and bool((lab[y - 1 : y + 2, x - 1 : x + 2] == pid).all())
        visible[part] = seen
        keypoints[part] = (float(x), float(y)) if seen else (0.0, 0.0)
        part_boxes[part] = _box(lab == pid) if seen else (0.0, 0.0, 0.0, 0.0)
    return Scene(
        image=pixels, labels=lab, keypoints=keypoints, visible=visible, part_boxes=part_boxes,
        bird_box=_box(lab > 0), colours=colours,
    )  # fmt: skip


def image_rng(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    """The generator of one image: independent of the order images are made in."""
    return np.random.default_rng((seed, 1, class_index, image_index))


# ---------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class BirdsSummary:
    """What make_birds wrote."""

    out: Path
    n_classes: int
    n_train: int
    n_test: int
    size: int
    seed: int
    parts: tuple[str, ...]
    classes: dict[str, dict[str, str]]  # "NNN.ClassName" -> {attribute part: variant}
    one_part_pairs: tuple[tuple[str, str, str], ...]  # (class a, class b, the only part that differs)
    difficulty: Difficulty = Difficulty()

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_test


# Everything make_birds writes at the top of OUT: --overwrite removes these and nothing else.
OUTPUTS = (
    "images", "parts", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
    "bounding_boxes.txt", "class_attributes.txt", "README.txt",
)  # fmt: skip


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ProtoquantError(f"{out} is a file; make-birds needs a folder to write the dataset into")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not entries:
        return
    if not overwrite:
        raise ProtoquantError(
            f"{out} is not empty ({len(entries)} entries); pick a new folder, or pass --overwrite to replace "
            "a dataset that make-birds wrote there"
        )
    foreign = [name for name in entries if name not in OUTPUTS]
    if foreign:
        raise ProtoquantError(
            f"--overwrite refused: {out} holds files make-birds did not write ({', '.join(foreign[:5])}); "
            "pick an empty folder"
        )
    for name in entries:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _check_options(classes: int, per_class: int, size: int, seed: int, test_fraction: float) -> None:
    if not 2 <= classes <= N_COMBINATIONS:
        raise ProtoquantError(
            f"--classes {classes}: choose 2 to {N_COMBINATIONS}; there are {N_COMBINATIONS} distinct birds "
            f"({' x '.join(str(len(v)) for v in ATTRIBUTES.values())} variants of {', '.join(ATTRIBUTES)})"
        )
    if per_class < 2:
        raise ProtoquantError(f"--per-class {per_class}: need at least 2 images per class (one train, one test)")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ProtoquantError(f"--size {size}: choose {MIN_SIZE} to {MAX_SIZE} pixels")
    if seed < 0:
        raise ProtoquantError(f"--seed {seed}: use a seed >= 0")
    if not 0.0 < test_fraction < 1.0:
        raise ProtoquantError(f"--test-fraction {test_fraction}: choose a fraction between 0 and 1 (exclusive)")


def make_birds(
    out: Path,
    *,
    classes: int = 8,
    per_class: int = 40,
    size: int = 224,
    seed: int = 0,
    test_fraction: float = 0.3,
    overwrite: bool = False,
    difficulty: Difficulty = Difficulty(),
) -> BirdsSummary:
    """Draw classes x per_class birds of size x size pixels into OUT, in the CUB-200-2011 layout.

    The class definitions depend on `classes` only; the images on `seed` (same seed, same bytes).
    Each class puts round(per_class * test_fraction) images in test (at least 1, at most per_class - 1).
    A non-empty OUT is refused unless `overwrite`, which replaces only what make_birds writes.
    """
    out = Path(out)
    _check_options(classes, per_class, size, seed, test_fraction)
    difficulty.check()
    _prepare_out(out, overwrite)

    attributes = design_classes(classes)
    names = [f"{i + 1:03d}.{class_name(a)}" for i, a in enumerate(attributes)]
    class_attrs = dict(zip(names, attributes))
    n_test = min(max(int(math.floor(per_class * test_fraction + 0.5)), 1), per_class - 1)
    split_rng = np.random.default_rng((seed, 0))

    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes", "part_locs", "part_boxes")}
    (out / "parts").mkdir(parents=True, exist_ok=True)
    image_id = 0
    for c, (name, attrs) in enumerate(class_attrs.items()):
        folder = out / "images" / name
        folder.mkdir(parents=True)
        test = set(split_rng.permutation(per_class)[:n_test].tolist())
        for j in range(per_class):
            image_id += 1
            scene = render_bird(attrs, sample_nuisance(image_rng(seed, c, j), size, difficulty))
            file = f"{name.split('.', 1)[1]}_{j + 1:04d}.jpg"
            Image.fromarray(scene.image).save(folder / file, quality=JPEG_QUALITY, subsampling=0)
            lines["images"].append(f"{image_id} {name}/{file}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {0 if j in test else 1}")
            lines["boxes"].append(f"{image_id} " + " ".join(f"{v:.1f}" for v in scene.bird_box))
            for part in PARTS:
                pid, (x, y) = PART_IDS[part], scene.keypoints[part]
                lines["part_locs"].append(f"{image_id} {pid} {x:.1f} {y:.1f} {int(scene.visible[part])}")
                lines["part_boxes"].append(f"{image_id} {pid} " + " ".join(f"{v:.1f}" for v in scene.part_boxes[part]))

    pairs = one_part_pairs(class_attrs)
    files = {
        "images.txt": lines["images"],
        "image_class_labels.txt": lines["labels"],
        "train_test_split.txt": lines["split"],
        "classes.txt": [f"{i + 1} {n}" for i, n in enumerate(names)],
        "bounding_boxes.txt": lines["boxes"],
        "parts/parts.txt": [f"{PART_IDS[p]} {p}" for p in PARTS],
        "parts/part_locs.txt": lines["part_locs"],
        "parts/part_boxes.txt": lines["part_boxes"],
        "class_attributes.txt": [f"{i + 1} {p} {a[p]}" for i, a in enumerate(attributes) for p in ATTRIBUTES],
    }
    for rel, rows in files.items():
        (out / rel).write_text("\n".join(rows) + "\n", encoding="utf-8")
    summary = BirdsSummary(
        out=out, n_classes=classes, n_train=classes * (per_class - n_test), n_test=classes * n_test,
        size=size, seed=seed, parts=PARTS, classes=class_attrs, one_part_pairs=tuple(pairs), difficulty=difficulty,
    )  # fmt: skip
    (out / "README.txt").write_text(readme(summary), encoding="utf-8")
    return summary


def readme(summary: BirdsSummary) -> str:
    """The dataset's README.txt: the classes, which part separates which classes, the conventions."""
    s = summary
    colour = lambda rgb: "RGB(%d, %d, %d)" % rgb  # noqa: E731
    out = [
        "Procedural birds with parts (written by `protoquant make-birds`)",
        "=" * 64,
        "",
        f"{s.n_classes} classes, {s.n_images} images ({s.n_train} train, {s.n_test} test, stratified per class),",
        f"{s.size} x {s.size} px JPEG (quality {JPEG_QUALITY}, no chroma subsampling), seed {s.seed}.",
        "The layout is CUB-200-2011's, so any CUB reader reads it; `protoquant extract` does:",
        "    protoquant extract <this folder> --backbone <name> --out <cache>",
        "",
        "Parts (parts/parts.txt)",
        "-----------------------",
        "Every bird is drawn from the same parts: " + ", ".join(f"{PART_IDS[p]} {p}" for p in PARTS) + ".",
        "Five parts carry the class; each has three variants:",
    ]
    for part, variants in ATTRIBUTES.items():
        if part in ATTRIBUTE_COLOURS:
            desc = ", ".join(f"{v} {colour(ATTRIBUTE_COLOURS[part][v])}" for v in variants)
            out.append(f"  {part:6s} colour: {desc}")
        else:
            out.append(f"  {part:6s} shape:  {', '.join(variants)}")
    out += [
        f"The beak is always {colour(BEAK_COLOUR)}; only its shape varies.",
        "Shared by every class (random in every image, so they tell nothing about the class): body,",
        "head, tail and leg colours (the body from a palette of browns, greys, olive and tan, jittered),",
        "body and head proportions, left/right facing, rotation (+-15 degrees), scale, position (15% of",
        "birds partly out of frame), background gradient, texture and clutter, a perch, a leaf or twig",
        "in front of the bird (20%), and pixel noise.",
        f"Difficulty: up to {s.difficulty.clutter} clutter shapes per image, {s.difficulty.decoys:.0%} of them in an",
        f"attribute colour as a distractor (--clutter, --decoys); bird size x{s.difficulty.bird_scale:g} (--bird-scale).",
        "",
        "Classes (classes.txt, class_attributes.txt)",
        "-------------------------------------------",
    ]
    for name, attrs in s.classes.items():
        out.append(f"  {name}: " + ", ".join(f"{p}={v}" for p, v in attrs.items()))
    out += ["", "Which part separates which classes", "----------------------------------"]
    if s.one_part_pairs:
        out.append("These pairs differ in ONE part only: that part alone tells them apart (fine-grained).")
        for part in ATTRIBUTES:
            pairs = [(a, b) for a, b, p in s.one_part_pairs if p == part]
            if pairs:
                out.append(f"  {part}:")
                out += [f"    {a} vs {b} ({s.classes[a][part]} / {s.classes[b][part]})" for a, b in pairs]
    varying = [p for p in ATTRIBUTES if len({a[p] for a in s.classes.values()}) > 1]
    out.append("Parts that vary between classes: " + (", ".join(varying) or "none") + ".")
    out += [
        "",
        "Files and conventions",
        "---------------------",
        "Pixel (x, y) is column x, row y, 0-based; a box x y w h covers columns x .. x+w-1, rows y .. y+h-1.",
        "  images/<NNN.ClassName>/<ClassName>_<NNNN>.jpg",
        "  images.txt               <image_id> <path relative to images/>",
        "  image_class_labels.txt   <image_id> <class_id>   (1-based)",
        "  train_test_split.txt     <image_id> <1 = train, 0 = test>",
        "  classes.txt              <class_id> <NNN.ClassName>",
        "  bounding_boxes.txt       <image_id> <x> <y> <w> <h>   tight box of the visible bird pixels",
        "  parts/parts.txt          <part_id> <part name>",
        "  parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>",
        "      a fixed point inside the part: its centre (the body's is the breast, below the wing; the",
        "      legs' is the middle of the front leg); visible = 1 when the 3x3 pixels around it show",
        "      that part (not out of frame, not covered), else the row reads 0 0 0",
        "  parts/part_boxes.txt     <image_id> <part_id> <x> <y> <w> <h>   (not in CUB)",
        "      tight box of the part's visible pixels; 0 0 0 0 when the part is not visible",
        "  class_attributes.txt     <class_id> <part> <variant>   (not in CUB)",
        "Keypoints, visibility and boxes come from the drawing itself (a label map drawn with the image).",
        "",
    ]
    return "\n".join(out)
