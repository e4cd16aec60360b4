"""Captioned shapes: a procedural text-image dataset and the judge that reads it back.

One vocabulary is shared by the three parts of this module:

- `sample_scene` draws a `Scene` (one or two coloured shapes, their sizes and positions, and
  for two objects the spatial relation between them), deterministically per
  `(seed, split, index)`;
- `render` draws a scene as an anti-aliased uint8 image `[R, R, 3]` at any resolution, and
  `caption` writes it as text, e.g. "a small red circle to the left of a big blue square";
- `judge` reads colour, shape, size and position of every object back from an image (no learned
  model: background estimate, colour segmentation, connected components, and analysis by
  synthesis for the shape), and `score` / `score_caption` compare that reading with a scene or
  with a caption, so generated images can be scored against their prompt.

Coordinates: `x` grows to the right and `y` grows downwards, both in [0, 1] of the image side;
an object's `(x, y)` is the centre of its bounding box, and every shape fills a square bounding
box of side `2 * SIZE_RADIUS[size]`.

Compositional split: the (colour, shape) pairs in `HELD_OUT_PAIRS` never occur in the "train"
and "validation" splits, and every "test" scene contains at least one of them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

# ----------------------------------------------------------------------------------------------
# Vocabulary.

COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
# RGB of each colour in `COLOURS`; the closest pair (red/orange, orange/yellow, blue/purple) is
# about 100 apart in RGB, and every colour is >= 200 away from the background.
PALETTE: np.ndarray = np.array([
    (220, 40, 40),    # red
    (255, 140, 0),    # orange
    (240, 230, 40),   # yellow
    (40, 190, 60),    # green
    (40, 210, 220),   # cyan
    (50, 80, 230),    # blue
    (160, 60, 210),   # purple
    (240, 240, 240),  # white
], dtype=np.float32)
BACKGROUND: np.ndarray = np.array((20, 20, 20), dtype=np.float32)  # near black

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "big")
# Half the side of the bounding box, as a fraction of the image side.
SIZE_RADIUS: Mapping[str, float] = {"small": 0.09, "big": 0.16}
# "A <relation> B": the subject A is first in the caption, the reference B second.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# (colour, shape) pairs never seen in train/validation; each colour and shape appears at most
# once, so every colour and every shape is still seen in training with other partners.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("blue", "circle"), ("yellow", "square"),
    ("green", "cross"), ("purple", "diamond")})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOURS, SHAPES))
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

_MARGIN = 0.03       # empty border around every object, fraction of the image side
_MIN_GAP = 0.10      # minimum empty gap between two objects along the relation axis
_MAX_SKEW = 0.35     # |offset across the relation axis| <= _MAX_SKEW * distance along it
_SUPERSAMPLE = 4     # render: sub-samples per pixel per axis


def _index(vocab: Sequence[str], word: str, what: str) -> int:
    try:
        return vocab.index(word)
    except ValueError:
        raise ValueError(f"unknown {what} {word!r}; expected one of {list(vocab)}") from None


# ----------------------------------------------------------------------------------------------
# Scenes.

@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object. `size` may be None in a scene parsed from a caption that omits it; `x`, `y`
    (bounding-box centre in [0, 1], y downwards) are NaN when unknown (parsed captions)."""
    colour: str
    shape: str
    size: str | None
    x: float = math.nan
    y: float = math.nan

    def __post_init__(self):
        _index(COLOURS, self.colour, "colour")
        _index(SHAPES, self.shape, "shape")
        if self.size is not None:
            _index(SIZES, self.size, "size")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One or two objects; for two, `relation` says where `objects[0]` is relative to
    `objects[1]` (e.g. "above": objects[0] is above objects[1])."""
    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self):
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2:
            _index(RELATIONS, self.relation, "relation")
        elif self.relation is not None:
            raise ValueError(f"a single-object scene has no relation, got {self.relation!r}")

    @property
    def num_objects(self) -> int:
        return len(self.objects)


def split_id(split: str) -> int:
    return _index(SPLITS, split, "split")


def _place_pair(rng: np.random.Generator, relation: str, ra: float, rb: float):
    """Centres (xa, ya), (xb, yb) of subject A and reference B so that `relation` holds with a
    clear gap along its axis and a bounded offset across it."""
    axis = 0 if relation in ("to the left of", "to the right of") else 1
    a_first = relation in ("to the left of", "above")  # A has the smaller coordinate
    r1, r2 = (ra, rb) if a_first else (rb, ra)
    room = 1.0 - 2 * _MARGIN - 2 * r1 - 2 * r2           # >= 0.3 for two big objects
    dist = r1 + r2 + rng.uniform(_MIN_GAP, room)
    c1 = rng.uniform(_MARGIN + r1, 1.0 - _MARGIN - r2 - dist)
    c2 = c1 + dist
    # Across the axis: A anywhere in range, B within +-_MAX_SKEW * dist of A (always non-empty).
    p1 = rng.uniform(_MARGIN + r1, 1.0 - _MARGIN - r1)
    lo = max(_MARGIN + r2, p1 - _MAX_SKEW * dist)
    hi = min(1.0 - _MARGIN - r2, p1 + _MAX_SKEW * dist)
    p2 = rng.uniform(lo, hi)
    first, second = ((c1, p1), (c2, p2)) if axis == 0 else ((p1, c1), (p2, c2))
    return (first, second) if a_first else (second, first)


def sample_scene(seed: int, index: int, split: str = "train", *, num_objects: int | None = None,
                 p_two: float = 0.5) -> Scene:
    """The scene number `index` of `split`, a pure function of `(seed, split, index)` and the
    keyword options.

    num_objects: force 1 or 2 objects (e.g. for evaluation sets); None draws two objects with
      probability `p_two`.
    Train/validation objects use only `SEEN_PAIRS`; every test scene has at least one pair from
    `HELD_OUT_PAIRS` (the other object of a two-object test scene is drawn from all pairs). The
    two objects of a scene always differ in their (colour, shape) pair.
    """
    if num_objects not in (None, 1, 2):
        raise ValueError(f"num_objects must be None, 1 or 2, got {num_objects!r}")
    if not 0.0 <= p_two <= 1.0:
        raise ValueError(f"p_two must be in [0, 1], got {p_two}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, split_id(split), index])
    n = num_objects if num_objects is not None else (2 if rng.random() < p_two else 1)

    held_out = sorted(HELD_OUT_PAIRS)
    if split == "test":
        pairs = [held_out[rng.integers(len(held_out))]]
        if n == 2:
            others = [p for p in ALL_PAIRS if p != pairs[0]]
            pairs.append(others[rng.integers(len(others))])
            if rng.random() < 0.5:
                pairs.reverse()
    else:
        chosen = rng.choice(len(SEEN_PAIRS), size=n, replace=False)
        pairs = [SEEN_PAIRS[i] for i in chosen]
    sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=n)]

    if n == 1:
        r = SIZE_RADIUS[sizes[0]]
        x, y = rng.uniform(_MARGIN + r, 1.0 - _MARGIN - r, size=2)
        return Scene((ShapeObject(*pairs[0], sizes[0], float(x), float(y)),))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    (xa, ya), (xb, yb) = _place_pair(rng, relation, SIZE_RADIUS[sizes[0]], SIZE_RADIUS[sizes[1]])
    return Scene((ShapeObject(*pairs[0], sizes[0], float(xa), float(ya)),
                  ShapeObject(*pairs[1], sizes[1], float(xb), float(yb))), relation)


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """The relation word for "A <relation> B" from centres a=(x, y), b=(x, y): the axis with the
    larger displacement decides."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


# ----------------------------------------------------------------------------------------------
# Captions and attribute arrays.

def _describe(obj: ShapeObject) -> str:
    words = ([obj.size] if obj.size is not None else []) + [obj.colour, obj.shape]
    return "a " + " ".join(words)


def caption(scene: Scene) -> str:
    """"a small red circle" or "a small red circle to the left of a big blue square"."""
    text = _describe(scene.objects[0])
    if scene.num_objects == 2:
        text += f" {scene.relation} {_describe(scene.objects[1])}"
    return text


def partial_caption(arrays: Mapping[str, np.ndarray], rng: np.random.Generator,
                    p: float) -> str:
    """The caption of a stored example (``colour``/``shape``/``size``/``relation`` arrays) in
    which, with probability ``p``, each object is described by a random non-empty subset of its
    attributes: "a red shape", "a small triangle", "a triangle". Training-time augmentation:
    captions naming one attribute alone reward an image embedding that encodes it apart from
    the others, which is what held-out (colour, shape) pairs need.
    """
    scene = arrays_to_scene(arrays)
    if rng.random() >= p:
        return caption(scene)
    words = []
    for obj in scene.objects:
        keep = [False, False, False]
        while not any(keep):
            keep = list(rng.random(3) < 0.5)
        size = obj.size if keep[0] else None
        colour = obj.colour if keep[1] else None
        shape = obj.shape if keep[2] else "shape"
        words.append("a " + " ".join(w for w in (size, colour, shape) if w))
    if scene.num_objects == 2:
        return f"{words[0]} {scene.relation} {words[1]}"
    return words[0]


_OBJECT_RE = (r"an? (?:(?P<size{i}>{sizes}) )?(?P<colour{i}>{colours}) (?P<shape{i}>{shapes})")


def _object_pattern(i: int) -> str:
    return _OBJECT_RE.format(i=i, sizes="|".join(SIZES), colours="|".join(COLOURS),
                             shapes="|".join(SHAPES))


_CAPTION_RE = re.compile(
    rf"^\s*{_object_pattern(0)}(?: (?P<relation>{'|'.join(RELATIONS)}) {_object_pattern(1)})?"
    r"\s*\.?\s*$")


def parse_caption(text: str) -> Scene:
    """Inverse of `caption`: the scene's attributes (positions are NaN; a size missing from the
    text is None). Case and surrounding whitespace are ignored; raises ValueError on text
    outside the caption grammar."""
    m = _CAPTION_RE.match(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(
            f"cannot parse caption {text!r}; expected 'a [size] <colour> <shape>' optionally "
            f"followed by '<relation> a [size] <colour> <shape>' with sizes {SIZES}, colours "
            f"{COLOURS}, shapes {SHAPES}, relations {RELATIONS}")
    objects = [ShapeObject(m["colour0"], m["shape0"], m["size0"])]
    if m["relation"] is not None:
        objects.append(ShapeObject(m["colour1"], m["shape1"], m["size1"]))
    return Scene(tuple(objects), m["relation"])


def scene_to_arrays(scene: Scene) -> dict[str, np.ndarray]:
    """Structured attributes: `colour`, `shape`, `size` int32 [2] (indices into COLOURS, SHAPES,
    SIZES; -1 for an absent object or unknown size), `position` float32 [2, 2] ((x, y) per
    object; -1 absent, NaN unknown), `num_objects` int32 [], `relation` int32 [] (index into
    RELATIONS, -1 for one object)."""
    out = {k: np.full((2,), -1, np.int32) for k in ("colour", "shape", "size")}
    out["position"] = np.full((2, 2), -1.0, np.float32)
    for i, obj in enumerate(scene.objects):
        out["colour"][i] = COLOURS.index(obj.colour)
        out["shape"][i] = SHAPES.index(obj.shape)
        out["size"][i] = -1 if obj.size is None else SIZES.index(obj.size)
        out["position"][i] = (obj.x, obj.y)
    out["num_objects"] = np.int32(scene.num_objects)
    out["relation"] = np.int32(-1 if scene.relation is None else RELATIONS.index(scene.relation))
    return out


def arrays_to_scene(arrays: Mapping[str, np.ndarray]) -> Scene:
    """Inverse of `scene_to_arrays`; `position` is optional (positions NaN without it)."""
    n = int(arrays["num_objects"])
    if n not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {n}")
    objects = []
    for i in range(n):
        size = int(arrays["size"][i])
        x, y = (arrays["position"][i] if "position" in arrays else (math.nan, math.nan))
        objects.append(ShapeObject(COLOURS[int(arrays["colour"][i])],
                                   SHAPES[int(arrays["shape"][i])],
                                   None if size < 0 else SIZES[size], float(x), float(y)))
    rel = int(arrays["relation"])
    return Scene(tuple(objects), RELATIONS[rel] if n == 2 else None)


# ----------------------------------------------------------------------------------------------
# Rendering.

def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) lie inside `shape` drawn in the box [-1, 1]^2 (v downwards)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":   # apex up at (0, -1), base along v = 1
        return (v <= 1.0) & (au <= (v + 1.0) * 0.5)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":      # arms of half-width 0.4
        return ((au <= 0.4) & (av <= 1.0)) | ((au <= 1.0) & (av <= 0.4))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _coverage(shape: str, cx: float, cy: float, r: float, x0: int, x1: int, y0: int, y1: int,
              ss: int = _SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of the window [y0:y1, x0:x1] covered by `shape` centred at
    (cx, cy) with half-side r (all in pixels; pixel i spans [i, i+1]), float32 [y1-y0, x1-x0]."""
    xs = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / ss
    ys = (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / ss
    inside = _inside(shape, ((xs - cx) / r)[None, :], ((ys - cy) / r)[:, None])
    return inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)


def _window(c: float, r: float, n: int) -> tuple[int, int]:
    return max(int(math.floor(c - r)), 0), min(int(math.ceil(c + r)) + 1, n)


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """The scene as uint8 [resolution, resolution, 3], anti-aliased by 4x4 supersampling.
    Any resolution from 16 up works; 32..256 is what the dataset and judge are tuned for."""
    if not 16 <= resolution <= 2048:
        raise ValueError(f"resolution must be in [16, 2048], got {resolution}")
    img = np.empty((resolution, resolution, 3), np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:
        if obj.size is None or math.isnan(obj.x) or math.isnan(obj.y):
            raise ValueError(f"cannot render {obj}: size and position must be known")
        r = SIZE_RADIUS[obj.size] * resolution
        cx, cy = obj.x * resolution, obj.y * resolution
        x0, x1 = _window(cx, r, resolution)
        y0, y1 = _window(cy, r, resolution)
        alpha = _coverage(obj.shape, cx, cy, r, x0, x1, y0, y1)[..., None]
        patch = img[y0:y1, x0:x1]
        patch += alpha * (PALETTE[COLOURS.index(obj.colour)] - patch)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Judge.

@dataclasses.dataclass(frozen=True)
class JudgedObject:
    """An object read from an image: attributes, bounding-box centre (x, y) and extent (the
    larger bounding-box side) in [0, 1] of the image side, area in pixels, and `shape_error`
    (normalised L1 between the object's coverage and a re-render of the chosen shape, in [0, 1];
    large values mean the blob resembles none of the shapes)."""
    colour: str
    shape: str
    size: str
    x: float
    y: float
    extent: float
    area: float
    shape_error: float


@dataclasses.dataclass(frozen=True)
class JudgedScene:
    """Every object found, largest first."""
    objects: tuple[JudgedObject, ...]

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    def as_scene(self) -> Scene | None:
        """The reading as a `Scene` (objects[0] as subject), or None unless 1 or 2 objects."""
        if self.num_objects not in (1, 2):
            return None
        objs = tuple(ShapeObject(o.colour, o.shape, o.size, o.x, o.y) for o in self.objects)
        rel = None
        if len(objs) == 2:
            rel = relation_between((objs[0].x, objs[0].y), (objs[1].x, objs[1].y))
        return Scene(objs, rel)


_FG_DISTANCE = 70.0       # RGB distance from the background above which a pixel is foreground
_MIN_AREA_FRAC = 0.002    # components smaller than this fraction of the image are noise
_MIN_AREA_PX = 4
_FIT_SCALES = (0.95, 1.0, 1.1, 1.2)
_SIZE_THRESHOLD = 2 * math.sqrt(SIZE_RADIUS["small"] * SIZE_RADIUS["big"])  # on the extent


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    return np.median(border, axis=0)


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """(low edge, length) along one axis from a per-row/column maximum coverage in [0, 1]:
    the length is the summed coverage, the low edge is placed so that partial coverage at the
    two ends is split according to their values."""
    idx = np.nonzero(profile > 0.05)[0]
    if idx.size == 0:
        return 0.0, 0.0
    first, last = idx[0], idx[-1]
    p = profile[first:last + 1]
    length = float(p.sum())
    lo_part, hi_part = 1.0 - p[0], 1.0 - p[-1]
    # Total missing coverage inside [first, last+1] is (last+1-first) - length; attribute it to
    # the two ends in proportion to how partial they are.
    missing = (last + 1 - first) - length
    share = lo_part / (lo_part + hi_part) if lo_part + hi_part > 0 else 0.5
    return float(first + missing * share), length


def judge(image: np.ndarray) -> JudgedScene:
    """Reads the objects in `image` (uint8 [H, W, 3], H == W preferred) back as attributes.

    1. background = median colour of the border pixels; foreground = pixels further than
       `_FG_DISTANCE` from it; 8-connected components smaller than 0.2% of the image dropped.
    2. colour = nearest palette entry to the median of the component's strongest pixels.
    3. coverage alpha = projection of each pixel onto the background->colour segment; the
       bounding box comes from the row/column maxima of alpha (sub-pixel).
    4. shape = the shape whose re-render in that bounding box best matches alpha (L1).
    5. size = "big" if the larger box side exceeds the geometric mean of the two sizes' sides.
    Robust to mild noise and blur: components are found after thresholding far from the
    background, colours use a median, and shapes compare whole coverage maps.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"judge expects an image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"judge expects uint8 pixels in [0, 255], got {image.dtype}")
    img = image.astype(np.float32)
    h, w, _ = img.shape
    side = float(max(h, w))
    bg = _background(img)
    diff = img - bg
    dist = np.sqrt((diff * diff).sum(-1))
    labels, n = ndimage.label(dist > _FG_DISTANCE, structure=np.ones((3, 3), bool))
    if n == 0:
        return JudgedScene(())
    areas = ndimage.sum_labels(np.ones_like(dist), labels, index=np.arange(1, n + 1))
    min_area = max(_MIN_AREA_PX, _MIN_AREA_FRAC * h * w)
    slices = ndimage.find_objects(labels)
    objects = []
    for k in np.nonzero(areas >= min_area)[0]:
        label = k + 1
        sy, sx = slices[k]
        y0, y1 = max(sy.start - 2, 0), min(sy.stop + 2, h)
        x0, x1 = max(sx.start - 2, 0), min(sx.stop + 2, w)
        lab = labels[y0:y1, x0:x1]
        comp = lab == label
        d = dist[y0:y1, x0:x1]
        pix = img[y0:y1, x0:x1]
        strong = comp & (d >= 0.8 * d[comp].max())
        colour_rgb = np.median(pix[strong], axis=0)
        ci = int(np.argmin(((PALETTE - colour_rgb) ** 2).sum(-1)))
        direction = PALETTE[ci] - bg
        alpha = np.clip(((pix - bg) @ direction) / float(direction @ direction), 0.0, 1.0)
        # Keep this component's anti-aliased rim but nothing of its neighbours.
        keep = ndimage.binary_dilation(comp, iterations=2) & ((lab == 0) | comp)
        alpha = np.where(keep, alpha, 0.0).astype(np.float32)
        left, width = _extent(alpha.max(axis=0))
        top, height = _extent(alpha.max(axis=1))
        if width <= 0 or height <= 0:
            continue
        cx, cy = x0 + left + width / 2, y0 + top + height / 2
        r = max(width, height) / 2
        best, best_err = None, math.inf
        total = float(alpha.sum())
        for shape in SHAPES:
            for scale in _FIT_SCALES:   # the box edge is uncertain by about half a pixel
                hyp = _coverage(shape, cx - x0, cy - y0, r * scale, 0, x1 - x0, 0, y1 - y0)
                err = float(np.abs(hyp - alpha).sum()) / (total + float(hyp.sum()))
                if err < best_err:
                    best, best_err = shape, err
        extent = 2 * r / side
        objects.append(JudgedObject(
            colour=COLOURS[ci], shape=best, size="big" if extent > _SIZE_THRESHOLD else "small",
            x=cx / w, y=cy / h, extent=extent, area=total, shape_error=best_err))
    objects.sort(key=lambda o: -o.area)
    return JudgedScene(tuple(objects))


# ----------------------------------------------------------------------------------------------
# Scoring.

def _matches(judged: JudgedObject, target: ShapeObject) -> tuple[bool, bool, bool]:
    return (judged.colour == target.colour, judged.shape == target.shape,
            target.size is None or judged.size == target.size)


def score(judged: JudgedScene, scene: Scene) -> dict[str, object]:
    """Compares a judge reading with the intended scene (from `sample_scene` or
    `parse_caption`). Judged objects are matched to the scene's objects order-independently
    (the assignment with the most correct attributes, colour+shape first).

    Returns:
      num_objects_correct: exactly as many objects found as intended.
      colour_correct, shape_correct, size_correct, colour_shape_correct: per intended object
        (lists of bools; False where no judged object is assigned). An unknown target size
        (None) counts as correct.
      all_objects_correct: count right and colour and shape of every object right.
      relation_correct: the matched objects stand in the intended relation (True for
        single-object scenes, which have no relation to get wrong).
      exact: count, every colour, shape and size, and the relation all right.
    """
    targets = scene.objects
    n = len(targets)
    best_key, best_assign = None, None
    candidates = judged.objects[:8]
    for perm in itertools.permutations(range(len(candidates)), min(n, len(candidates))):
        flags = [_matches(candidates[j], targets[i]) for i, j in enumerate(perm)]
        key = (sum(c and s for c, s, _ in flags), sum(c and s and z for c, s, z in flags),
               sum(map(sum, flags)))
        if best_key is None or key > best_key:
            best_key, best_assign = key, perm
    assign = list(best_assign or ()) + [None] * (n - len(best_assign or ()))
    flags = [(_matches(candidates[j], t) if j is not None else (False, False, False))
             for t, j in zip(targets, assign)]
    colour_ok = [f[0] for f in flags]
    shape_ok = [f[1] for f in flags]
    size_ok = [f[2] for f in flags]
    pair_ok = [c and s for c, s in zip(colour_ok, shape_ok)]
    count_ok = judged.num_objects == n
    relation_ok = True
    if n == 2:
        a, b = assign
        relation_ok = (a is not None and b is not None and relation_between(
            (candidates[a].x, candidates[a].y), (candidates[b].x, candidates[b].y))
            == scene.relation)
    all_ok = count_ok and all(pair_ok)
    return {
        "num_objects_correct": count_ok,
        "colour_correct": colour_ok,
        "shape_correct": shape_ok,
        "size_correct": size_ok,
        "colour_shape_correct": pair_ok,
        "all_objects_correct": all_ok,
        "relation_correct": relation_ok,
        "exact": all_ok and all(size_ok) and relation_ok,
    }


def score_caption(image: np.ndarray, text: str) -> dict[str, object]:
    """`score(judge(image), parse_caption(text))`: how well an image shows its prompt."""
    return score(judge(image), parse_caption(text))
