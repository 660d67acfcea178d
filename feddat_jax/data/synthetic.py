"""Procedural heterogeneous VQA benchmarks: rendered scenes, templated questions, noisy annotators.

Four benchmarks mirror the FedDAT paper's heterogeneity types (the FedDAT paper's four benchmarks; docs/results.md):

  domain   (5 clients) one visual style each: art (painted, palette-shifted; AQUA), abstract (flat clip-art;
           Abstract Scenes), vizwiz (blurred, rotated, badly exposed, cropped; VizWiz), cocoqa (textured
           photo-like; COCO-QA), gqa (cluttered scenes, compositional questions; GQA).
  function (5) one question function each, same images: attribute, knowledge (fixed fact table), logical
           (and/or/not), object (one object per scene: what shape is it), relation (CLOVE-function).
  scene    (6) one scene category each with its own objects, layout and background (CLOVE-scene).
  task     (4) vqa (answer classification), nlvr2 (two images, true/false statement), ve (entailment /
           neutral / contradiction), itm (does the caption match: yes/no).

Targets follow the real datasets: abstract and vizwiz have 10 noisy annotators and the FedDAT "climb" rule,
the task benchmark's vqa client 10 annotators and the VQA v2 rule, every other client one (sometimes wrong)
answer and "inverse_count" (1.0 for single answers). Every client's answer space is the top-K answers of its
train split. Everything is a pure function of (benchmark, seed, scale, image_size): each (client, split) draws
from its own numpy stream `SeedSequence([seed, benchmark, client, split])`, so two builds give identical bytes.

Example:
  clients = make_benchmark("domain", scale=0.05)
  clients[0].train[0]["question"], clients[0].train[0]["answers"]
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import tokenize
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from feddat_jax.data import answers as answers_lib
from feddat_jax.data import schema

BENCHMARKS = ("domain", "function", "scene", "task")


def source_hash(path: str = __file__) -> str:
  """sha256 of a Python file's tokens without comments and blank lines: editing a comment keeps the data."""
  with open(path, "rb") as f:
    tokens = tokenize.tokenize(f.readline)
    code = [(t.type, t.string) for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL)]
  return hashlib.sha256(repr(code).encode()).hexdigest()[:12]


# What generated data depend on besides the arguments: this file's code. The prepared datasets' directories
# (builders/synthetic_builder.py) and runs' fingerprints (experiment.fingerprint) carry it, so data an earlier
# version of this file wrote are never read back as this version's.
GENERATOR = source_hash()

COLORS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 210, 30),
    "purple": (140, 70, 190), "orange": (250, 130, 20), "pink": (240, 130, 190), "brown": (130, 80, 40),
    "white": (245, 245, 245), "black": (25, 25, 25),
}
# Colours an inattentive annotator confuses with each other (first = most likely).
_COLOR_NEIGHBOURS = {
    "red": ("orange", "pink", "brown"), "green": ("blue", "yellow"), "blue": ("purple", "green"),
    "yellow": ("orange", "white", "green"), "purple": ("blue", "pink"), "orange": ("red", "yellow", "brown"),
    "pink": ("red", "purple", "white"), "brown": ("orange", "black", "red"), "white": ("yellow", "pink"),
    "black": ("brown", "blue"),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
_SHAPE_NEIGHBOURS = {
    "circle": ("hexagon", "ring"), "square": ("diamond", "hexagon"), "triangle": ("diamond", "star"),
    "diamond": ("square", "triangle"), "star": ("cross", "triangle"), "cross": ("star", "square"),
    "hexagon": ("circle", "square"),
}
SIZES = ("small", "large")
_RADIUS = {"small": 0.085, "large": 0.15}  # fraction of the image side

# The knowledge client's fixed fact table.
WARM_COLORS = frozenset({"red", "orange", "yellow", "pink", "brown"})
COOL_COLORS = frozenset({"green", "blue", "purple"})
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4, "star": 10, "cross": 12, "hexagon": 6}
FRUIT_OF_COLOR = {
    "red": "apple", "green": "lime", "blue": "blueberry", "yellow": "banana", "purple": "grape",
    "orange": "orange", "pink": "peach", "brown": "coconut",
}
THING_OF_SHAPE = {
    "circle": "coin", "square": "window", "triangle": "pizza", "diamond": "kite", "star": "starfish",
    "cross": "plus", "hexagon": "honeycomb",
}
INVISIBLE = ("made of wood", "made of metal", "heavy", "expensive", "very old", "brand new")

# Scene categories (CLOVE-scene): object glyphs as (primitive, dx, dy, scale, colour or None = object colour),
# offsets in units of the object radius; vertical bands where objects stand; background and palette.
_SCENES = {
    "shop": dict(
        nouns={
            "cup": [("rect_tall", 0, 0, 0.8, None), ("ring", 0.75, 0, 0.4, None)],
            "bottle": [("rect_tall", 0, 0.25, 0.8, None), ("square", 0, -0.75, 0.3, None)],
            "plate": [("circle", 0, 0, 1.0, None), ("circle", 0, 0, 0.55, "white")],
            "cake": [("rect_wide", 0, 0.2, 1.0, None), ("star", 0, -0.55, 0.4, "yellow")],
            "bag": [("square", 0, 0.2, 0.8, None), ("ring", 0, -0.7, 0.45, None)],
        },
        bands=((0.22, 0.3), (0.62, 0.7)), bg=(222, 200, 160), texture=10, shelves=(0.4, 0.8),
        palette=("red", "green", "blue", "yellow", "purple", "white"), n_obj=(2, 5)),
    "workplace": dict(
        nouns={
            "computer": [("square", 0, -0.15, 0.85, None), ("rect_wide", 0, 0.85, 0.45, "black")],
            "chair": [("rect_tall", -0.35, -0.3, 0.7, None), ("rect_wide", 0.2, 0.45, 0.75, None)],
            "clock": [("circle", 0, 0, 1.0, None), ("cross", 0, 0, 0.5, "black")],
            "book": [("rect_wide", 0, 0, 1.0, None), ("rect_wide", 0, 0, 0.5, "white")],
            "phone": [("rect_tall", 0, 0, 0.9, None), ("circle", 0, 0.6, 0.2, "black")],
        },
        bands=((0.25, 0.45), (0.6, 0.75)), bg=(170, 180, 195), texture=6, desk=0.55,
        palette=("red", "blue", "black", "white", "green", "orange"), n_obj=(2, 5)),
    "home": dict(
        nouns={
            "bed": [("rect_wide", 0, 0.1, 1.0, None), ("square", -0.65, -0.2, 0.3, "white")],
            "window": [("square", 0, 0, 0.95, None), ("cross", 0, 0, 0.95, "white")],
            "door": [("rect_tall", 0, 0, 1.0, None), ("circle", 0.25, 0.05, 0.12, "yellow")],
            "lamp": [("triangle", 0, -0.35, 0.6, None), ("rect_tall", 0, 0.55, 0.5, "black")],
            "sofa": [("rect_wide", 0, 0.2, 1.0, None), ("rect_wide", 0, -0.35, 0.7, None)],
        },
        bands=((0.3, 0.45), (0.65, 0.8)), bg=(235, 225, 200), texture=8, stripes=True,
        palette=("red", "blue", "green", "brown", "purple", "pink"), n_obj=(2, 5)),
    "transport": dict(
        nouns={
            "car": [("rect_wide", 0, -0.05, 1.0, None), ("circle", -0.5, 0.45, 0.25, "black"),
                    ("circle", 0.5, 0.45, 0.25, "black")],
            "truck": [("rect_wide", -0.2, -0.1, 0.9, None), ("square", 0.75, 0.05, 0.35, None),
                      ("circle", -0.55, 0.5, 0.22, "black"), ("circle", 0.55, 0.5, 0.22, "black")],
            "bike": [("ring", -0.55, 0.2, 0.45, None), ("ring", 0.55, 0.2, 0.45, None),
                     ("triangle", 0, -0.1, 0.45, None)],
            "sign": [("diamond", 0, -0.35, 0.65, None), ("rect_tall", 0, 0.55, 0.45, "black")],
            "boat": [("semicircle", 0, 0.3, 1.0, None), ("triangle", 0.05, -0.45, 0.55, "white")],
        },
        bands=((0.58, 0.82),), bg=(150, 190, 230), texture=5, road=(0.55, 0.9),
        palette=("red", "blue", "yellow", "white", "green", "orange"), n_obj=(2, 4)),
    "sport": dict(
        nouns={
            "ball": [("circle", 0, 0, 0.9, None), ("cross", 0, 0, 0.6, "white")],
            "racket": [("ring", 0, -0.3, 0.65, None), ("rect_tall", 0, 0.65, 0.4, "black")],
            "cone": [("triangle", 0, -0.1, 0.9, None), ("rect_wide", 0, 0.7, 0.6, "white")],
            "flag": [("rect_wide", 0.35, -0.45, 0.6, None), ("rect_tall", -0.3, 0.1, 0.95, "black")],
            "medal": [("circle", 0, 0.3, 0.6, None), ("triangle", 0, -0.6, 0.45, "blue")],
        },
        bands=((0.15, 0.85),), bg=(60, 150, 60), texture=12, field_lines=True,
        palette=("red", "yellow", "orange", "white", "blue", "purple"), n_obj=(2, 6)),
    "outdoors": dict(
        nouns={
            "tree": [("triangle", 0, -0.25, 0.8, None), ("rect_tall", 0, 0.7, 0.35, "brown")],
            "flower": [("star", 0, 0, 0.9, None), ("circle", 0, 0, 0.3, "yellow")],
            "rock": [("hexagon", 0, 0, 0.85, None)],
            "bird": [("semicircle", 0, 0.15, 0.8, None), ("triangle", 0.8, -0.1, 0.25, "orange")],
            "house": [("square", 0, 0.3, 0.7, None), ("triangle", 0, -0.6, 0.75, None)],
        },
        bands=((0.2, 0.4), (0.62, 0.82)), bg=(140, 200, 240), texture=8, ground=0.5,
        palette=("red", "purple", "blue", "yellow", "brown", "white"), n_obj=(2, 5)),  # no green on grass
}

# Visual styles: background texture amplitude, lighting gradient, pixel noise, blur, outlines, clutter...
_STYLES = {
    "flat": dict(bg=(200, 225, 240), texture=0, light=0.0, noise=0, blur=0.0, outline=True),
    "painted": dict(bg=(210, 190, 150), texture=35, light=0.1, noise=10, blur=0.8, wobble=True, palette=True),
    "photo": dict(bg=(150, 140, 125), texture=28, light=0.35, noise=7, blur=0.5),
    "vizwiz": dict(bg=(120, 110, 100), texture=25, light=0.4, noise=9, blur=0.5, camera=True),
    "clutter": dict(bg=(140, 150, 130), texture=22, light=0.3, noise=7, blur=0.4, clutter=14),
    "vg": dict(bg=(160, 155, 140), texture=20, light=0.25, noise=5, blur=0.4),
}
# A warm, faded varnish: the painted style's colours are not the nominal ones (a palette shift).
_VARNISH = np.array([[0.62, 0.30, 0.08], [0.14, 0.66, 0.20], [0.10, 0.22, 0.58]], np.float32)


@dataclasses.dataclass(frozen=True)
class Obj:
  noun: str  # a shape (shape world) or a scene object name
  color: str
  size: str
  x: float  # centre, fraction of the image width
  y: float


def _plural(noun: str) -> str:
  return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


# ------------------------------------------------------------------------------------------------ rendering


def _points(prim: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  def ring(n, radii, phase=-math.pi / 2):
    return [(cx + radii[i % len(radii)] * math.cos(phase + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]

  if prim == "square":
    return ring(4, [r * 1.2], math.pi / 4)
  if prim == "diamond":
    return ring(4, [r])
  if prim == "triangle":
    return [(x, y + 0.2 * r) for x, y in ring(3, [r * 1.15])]
  if prim == "star":
    return ring(10, [r * 1.1, r * 0.45])
  if prim == "hexagon":
    return ring(6, [r], 0.0)
  if prim == "cross":
    a, b = 0.33 * r, r
    return [(cx + px, cy + py) for px, py in ((-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b),
                                              (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a))]
  if prim == "rect_wide":
    return [(cx - r, cy - 0.5 * r), (cx + r, cy - 0.5 * r), (cx + r, cy + 0.5 * r), (cx - r, cy + 0.5 * r)]
  if prim == "rect_tall":
    return [(cx - 0.5 * r, cy - r), (cx + 0.5 * r, cy - r), (cx + 0.5 * r, cy + r), (cx - 0.5 * r, cy + r)]
  raise ValueError(prim)


def _draw_prim(draw, prim, cx, cy, r, fill, outline, rng):
  width = max(1, int(r * 0.12)) if outline else 0
  line = (20, 20, 20) if outline else None
  box = (cx - r, cy - r, cx + r, cy + r)
  if prim == "circle":
    draw.ellipse(box, fill=fill, outline=line, width=width)
  elif prim == "ring":
    draw.ellipse(box, outline=fill, width=max(2, int(r * 0.35)))
  elif prim == "semicircle":
    draw.pieslice((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=fill, outline=line, width=width)
  else:
    pts = _points(prim, cx, cy, r)
    if rng is not None:  # painted style: hand-drawn, wobbly edges
      pts = [(x + rng.normal(0, 0.08 * r), y + rng.normal(0, 0.08 * r)) for x, y in pts]
    draw.polygon(pts, fill=fill, outline=line, width=width)


def _glyph(noun: str) -> list[tuple]:
  for sc in _SCENES.values():
    if noun in sc["nouns"]:
      return sc["nouns"][noun]
  return [(noun, 0, 0, 1.0, None)]


def _lowfreq(rng, side: int, amp: float) -> np.ndarray:
  """Smooth random texture float32[side, side, 3] in [-amp, amp] (bicubic upsampling of a coarse grid)."""
  coarse = rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32)
  chans = [np.asarray(Image.fromarray(coarse[..., c]).resize((side, side), Image.BICUBIC)) for c in range(3)]
  return np.clip(np.stack(chans, -1), -1, 1) * amp


def _background(rng, side: int, style: dict, scene: Optional[dict]) -> np.ndarray:
  """float32[side, side, 3] background: base colour, scene layout bands, lighting, texture."""
  yy = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
  base = np.array((scene or style)["bg"], np.float32) + rng.uniform(-20, 20, 3)
  img = np.broadcast_to(base, (side, side, 3)).copy()
  if scene is not None:
    if "ground" in scene:
      img[int(scene["ground"] * side):] = (90, 160, 70)
    if "road" in scene:
      y0, y1 = (int(v * side) for v in scene["road"])
      img[y0:y1] = (95, 95, 100)
    if "desk" in scene:
      img[int(scene["desk"] * side):] = (150, 105, 60)
    if "shelves" in scene:
      for s in scene["shelves"]:
        img[int(s * side):int(s * side) + max(2, side // 40)] = (110, 75, 40)
    if scene.get("stripes"):
      img[:int(0.55 * side), (np.arange(side) // max(1, side // 12)) % 2 == 0] *= 0.9
      img[int(0.55 * side):] = (170, 130, 90)
    if scene.get("field_lines"):
      img[:, side // 2 - 1:side // 2 + 1] = 235
      img[side // 10:side // 10 + 2] = 235
      img[-side // 10 - 2:-side // 10] = 235
  img *= 1 + style["light"] * (0.5 - yy) * rng.choice((-1, 1))
  amp = max(style["texture"], (scene or {}).get("texture", 0))
  if amp:
    img += _lowfreq(rng, side, amp)
  return img


def _render(rng, objs: list[Obj], image_size: int, style_name: str, scene_name: Optional[str] = None,
            camera: Optional[dict] = None) -> np.ndarray:
  """Draws `objs` at 2x and downsamples: uint8[image_size, image_size, 3]."""
  style = _STYLES[style_name]
  scene = _SCENES.get(scene_name)
  side = 2 * image_size
  canvas = Image.fromarray(np.clip(_background(rng, side, style, scene), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  for _ in range(style.get("clutter", 0)):  # GQA-like clutter: thin strokes and specks that are no objects
    x0, y0 = rng.uniform(0, side, 2)
    dx, dy = rng.normal(0, side * 0.12, 2)
    shade = tuple(int(v) for v in rng.integers(60, 200, 3))
    draw.line((x0, y0, x0 + dx, y0 + dy), fill=shade, width=int(rng.integers(1, 3)))
  wobble = rng if style.get("wobble") else None
  for o in objs:
    r = _RADIUS[o.size] * side
    for prim, dx, dy, scale, colour in _glyph(o.noun):
      fill = COLORS[colour or o.color]
      _draw_prim(draw, prim, o.x * side + dx * r, o.y * side + dy * r, scale * r, fill,
                 style.get("outline", False), wobble)
  if camera is not None:
    x0, y0, w = camera["crop"]
    canvas = canvas.crop(tuple(int(v * side) for v in (x0, y0, x0 + w, y0 + w))).resize((side, side))
    canvas = canvas.rotate(camera["angle"], resample=Image.BILINEAR, fillcolor=(90, 90, 90))
    blur = style["blur"] + camera["blur"]
  else:
    blur = style["blur"]
  if blur:
    canvas = canvas.filter(ImageFilter.GaussianBlur(blur * 2))
  img = np.asarray(canvas.resize((image_size, image_size), Image.BOX), np.float32)
  if style.get("palette"):
    img = img @ _VARNISH.T + np.array((25, 12, -10), np.float32)
  if camera is not None:
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** camera["gamma"]
  if style["noise"]:
    img += rng.normal(0, style["noise"], img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ scenes


def _sample_objs(rng, n: int, nouns, colors, sizes=SIZES, bands=((0.15, 0.85),)) -> list[Obj]:
  """n objects at non-overlapping positions (fewer if the image is full)."""
  objs = []
  for _ in range(n):
    for _ in range(20):
      size = str(rng.choice(sizes))
      r = _RADIUS[size] * 1.1
      band = bands[int(rng.integers(len(bands)))]
      x = float(rng.uniform(max(0.1, r), min(0.9, 1 - r)))
      y = float(rng.uniform(max(band[0], r), min(band[1], 1 - r)))
      if all(math.hypot(x - o.x, y - o.y) > r + _RADIUS[o.size] for o in objs):
        objs.append(Obj(str(rng.choice(nouns)), str(rng.choice(colors)), size, round(x, 4), round(y, 4)))
        break
  return objs


def _describe(o: Obj, objs: list[Obj], drop: tuple[str, ...] = (), word: str = "object") -> Optional[str]:
  """Shortest description (without the `drop` attributes) that picks out only `o` in `objs`."""
  fields = [f for f in ("size", "color", "noun") if f not in drop]
  for keep in ([], ["noun"], ["size"], ["color"], ["size", "noun"], ["color", "noun"], ["size", "color"],
               ["size", "color", "noun"]):
    if not keep or any(f not in fields for f in keep):
      continue
    if sum(all(getattr(p, f) == getattr(o, f) for f in keep) for p in objs) == 1:
      words = [getattr(o, f) for f in ("size", "color") if f in keep]
      return " ".join(words + [o.noun if "noun" in keep else word])
  return None


def _relation(a: Obj, b: Obj) -> Optional[str]:
  """Where a is relative to b, along the clearly dominant axis; None when ambiguous."""
  dx, dy = a.x - b.x, a.y - b.y
  if max(abs(dx), abs(dy)) < 0.12 or 0.6 < abs(dx) / (abs(dy) + 1e-6) < 1.6:
    return None
  if abs(dx) > abs(dy):
    return "left" if dx < 0 else "right"
  return "above" if dy < 0 else "below"


_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


# ------------------------------------------------------------------------------------------------ questions
# A question function takes (rng, objs, world) and returns (question, answer, confusions) or None when this
# scene cannot support it; `confusions` are the wrong answers a noisy annotator gives (most likely first).


def _pick(rng, seq):
  return seq[int(rng.integers(len(seq)))]


def _q_color(rng, objs, world, tmpl="what color is the {d}?"):
  o = _pick(rng, objs)
  d = _describe(o, objs, drop=("color",))
  return d and (tmpl.format(d=d), o.color, _COLOR_NEIGHBOURS[o.color])


def _q_noun(rng, objs, world, tmpl=None):
  o = _pick(rng, objs)
  d = _describe(o, objs, drop=("noun",))
  tmpl = tmpl or ("what shape is the {d}?" if world == "shapes" else "what is the {d}?")
  others = _SHAPE_NEIGHBOURS.get(o.noun) or tuple(p.noun for p in objs if p.noun != o.noun) or ("object",)
  return d and (tmpl.format(d=d), o.noun, others)


def _q_size(rng, objs, world):
  o = _pick(rng, objs)
  d = _describe(o, objs, drop=("size",))
  return d and (f"is the {d} small or large?", o.size, ("large" if o.size == "small" else "small",))


def _world_nouns(objs) -> list[str]:
  """Every noun of the visual world `objs` come from: the shapes, or the nouns of their scene."""
  for sc in _SCENES.values():
    if objs[0].noun in sc["nouns"]:
      return list(sc["nouns"])
  return list(SHAPES)


def _count_filter(rng, objs, world):
  """A random filter over objects and its plural phrase ("red objects", "stars", "blue stars"); it may name
  something that is not there (a count of 0)."""
  ref = _pick(rng, objs)
  nouns = sorted({o.noun for o in objs} | {ref.noun})
  kind = int(rng.integers(3))
  absent = rng.random() < 0.3
  if kind == 0:
    c = _pick(rng, list(COLORS)) if absent else ref.color
    return (lambda o: o.color == c), f"{c} objects"
  if kind == 1:
    n = _pick(rng, _world_nouns(objs) if absent else nouns)
    return (lambda o: o.noun == n), _plural(n)
  c = _pick(rng, list(COLORS)) if absent else ref.color
  return (lambda o: o.color == c and o.noun == ref.noun), f"{c} {_plural(ref.noun)}"


def _q_count(rng, objs, world, tmpl="how many {p} are there?"):
  pred, phrase = _count_filter(rng, objs, world)
  n = sum(map(pred, objs))
  return tmpl.format(p=phrase), str(n), (str(n + 1), str(max(0, n - 1)))


def _phrase_exists(rng, objs, present: bool) -> Optional[tuple[str, Callable]]:
  """A noun phrase ("red star", "star", "red object") for an object that is (or is not) in the scene."""
  nouns = _world_nouns(objs)
  for _ in range(10):
    ref = _pick(rng, objs)
    c = ref.color if present else _pick(rng, list(COLORS))
    n = ref.noun if present else _pick(rng, nouns)
    kind = int(rng.integers(3))
    pred = [lambda o: o.color == c and o.noun == n, lambda o: o.noun == n, lambda o: o.color == c][kind]
    phrase = [f"{c} {n}", n, f"{c} object"][kind]
    if any(map(pred, objs)) == present:
      return phrase, pred
  return None


def _yes_no(b: bool):
  return ("yes", ("no",)) if b else ("no", ("yes",))


def _q_exist(rng, objs, world):
  got = _phrase_exists(rng, objs, bool(rng.random() < 0.5))
  if got is None:
    return None
  phrase, pred = got
  return (f"is there a {phrase}?",) + _yes_no(any(map(pred, objs)))


def _q_logic(rng, objs, world):
  kind = int(rng.integers(3))
  a = _phrase_exists(rng, objs, bool(rng.random() < 0.5))
  b = _phrase_exists(rng, objs, bool(rng.random() < 0.5))
  # Overlapping phrases ("red star" and "star") would make the answer follow from the words alone.
  if a is None or b is None or set(a[0].split()) & set(b[0].split()) - {"object"}:
    return None
  ha, hb = any(map(a[1], objs)), any(map(b[1], objs))
  if kind == 0:
    return (f"is there a {a[0]} and a {b[0]}?",) + _yes_no(ha and hb)
  if kind == 1:
    return (f"is there a {a[0]} or a {b[0]}?",) + _yes_no(ha or hb)
  return (f"is there a {a[0]} but no {b[0]}?",) + _yes_no(ha and not hb)


def _pair(rng, objs, min_objs=2):
  """Two distinct objects with describable identities and a clear relation: (a, da, b, db, rel)."""
  if len(objs) < min_objs:
    return None
  i, j = rng.choice(len(objs), 2, replace=False)
  a, b = objs[i], objs[j]
  rel = _relation(a, b)
  da, db = _describe(a, objs), _describe(b, objs)
  if rel is None or da is None or db is None:
    return None
  return a, da, b, db, rel


def _q_side(rng, objs, world):
  p = _pair(rng, objs)
  if p is None:
    return None
  _, da, _, db, rel = p
  if rel in ("left", "right"):
    return f"is the {da} to the left or to the right of the {db}?", rel, (_OPPOSITE[rel],)
  return f"is the {da} above or below the {db}?", rel, (_OPPOSITE[rel],)


def _related(objs, b, rel):
  return [o for o in objs if o is not b and _relation(o, b) == rel]


def _one_related(rng, objs):
  """A described anchor object and a relation with exactly one object in it: (phrase, anchor, hit) or None."""
  b = _pick(rng, objs)
  db = _describe(b, objs)
  rel = _pick(rng, list(_REL_PHRASE))
  hits = _related(objs, b, rel)
  if db is None or len(hits) != 1:
    return None
  return _REL_PHRASE[rel], db, hits[0]


def _q_rel_noun(rng, objs, world):
  if (found := _one_related(rng, objs)) is None:
    return None
  phrase, db, h = found
  q = f"what {'shape' if world == 'shapes' else 'object'} is {phrase} the {db}?"
  return q, h.noun, tuple(o.noun for o in objs if o.noun != h.noun) or ("nothing",)


def _q_rel_color(rng, objs, world):
  if (found := _one_related(rng, objs)) is None:
    return None
  phrase, db, h = found
  return f"what color is the object {phrase} the {db}?", h.color, _COLOR_NEIGHBOURS[h.color]


def _q_rel_what(rng, objs, world):
  """GQA-style compositional answer: "what is left of the X?" -> "red star"."""
  if (found := _one_related(rng, objs)) is None:
    return None
  phrase, db, h = found
  return (f"what is {phrase} the {db}?", f"{h.color} {h.noun}",
          tuple(f"{c} {h.noun}" for c in _COLOR_NEIGHBOURS[h.color]))


def _q_rel_yesno(rng, objs, world):
  p = _pair(rng, objs)
  if p is None:
    return None
  _, da, _, db, rel = p
  asked = rel if rng.random() < 0.5 else _OPPOSITE[rel]
  return (f"is the {da} {_REL_PHRASE[asked]} the {db}?",) + _yes_no(asked == rel)


def _q_same_color(rng, objs, world):
  p = _pair(rng, objs)
  if p is None:
    return None
  a, da, b, db, _ = p
  return (f"are the {da} and the {db} the same color?",) + _yes_no(a.color == b.color)


def _q_corner(rng, objs, world):
  quad = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
  name = _pick(rng, list(quad))
  qx, qy = quad[name]
  hits = [o for o in objs if (o.x > 0.5) == qx and (o.y > 0.5) == qy and min(abs(o.x - .5), abs(o.y - .5)) > .08]
  if len(hits) != 1:
    return None
  return f"what shape is in the {name} corner?", hits[0].noun, _SHAPE_NEIGHBOURS.get(hits[0].noun, ("circle",))


def _q_know_temp(rng, objs, world):
  o = _pick(rng, [o for o in objs if o.color in WARM_COLORS | COOL_COLORS] or objs)
  d = _describe(o, objs, drop=("color",))
  if d is None or o.color not in WARM_COLORS | COOL_COLORS:
    return None
  warm = o.color in WARM_COLORS
  return f"is the color of the {d} warm or cool?", ("warm" if warm else "cool"), ("cool" if warm else "warm",)


def _q_know_corners(rng, objs, world):
  o = _pick(rng, objs)
  d = _describe(o, objs, drop=("noun",))
  n = CORNERS.get(o.noun)
  if d is None or n is None:
    return None
  confusions = tuple(str(CORNERS[s]) for s in _SHAPE_NEIGHBOURS[o.noun] if s in CORNERS)
  return f"how many corners does the {d} have?", str(n), confusions


def _q_know_lookup(rng, objs, attr, table, neighbours, template):
  """A fact-table question about one object's `attr` ("color" or "noun"), described without that attribute."""
  o = _pick(rng, objs)
  d = _describe(o, objs, drop=(attr,))
  key = getattr(o, attr)
  if d is None or key not in table:
    return None
  return template.format(d=d), table[key], tuple(table[k] for k in neighbours[key] if k in table)


def _q_know_fruit(rng, objs, world):
  return _q_know_lookup(rng, objs, "color", FRUIT_OF_COLOR, _COLOR_NEIGHBOURS,
                        "which fruit has the same color as the {d}?")


def _q_know_thing(rng, objs, world):
  return _q_know_lookup(rng, objs, "noun", THING_OF_SHAPE, _SHAPE_NEIGHBOURS,
                        "which everyday thing has the same shape as the {d}?")


def _q_art_subject(rng, objs, world):
  big = [o for o in objs if o.size == "large"]
  if len(big) != 1:
    return None
  return "what is the main subject of the painting?", big[0].noun, _SHAPE_NEIGHBOURS[big[0].noun]


def _q_art_color(rng, objs, world):
  return _q_color(rng, objs, world, "what color is the {d} in the painting?")


def _q_art_count(rng, objs, world):
  return _q_count(rng, objs, world, "how many {p} are painted?")


def _q_coco_color(rng, objs, world):
  return _q_color(rng, objs, world, "what is the color of the {d}?")


def _q_coco_count(rng, objs, world):
  return _q_count(rng, objs, world, "how many {p} are in the picture?")


def _q_coco_object(rng, objs, world):
  return _q_noun(rng, objs, world, "what is the {d} in the picture?")


# VizWiz: a photo of one main object, taken blind: the main object may be cropped away -> "unanswerable".
def _q_viz_color(rng, objs, world, visible=True):
  main = objs[0]
  return "what color is this?", (main.color if visible else "unanswerable"), (
      _COLOR_NEIGHBOURS[main.color] + ("unanswerable",) if visible else (main.color,))


def _q_viz_what(rng, objs, world, visible=True):
  main = objs[0]
  return "what is this?", (main.noun if visible else "unanswerable"), (
      _SHAPE_NEIGHBOURS[main.noun] + ("unanswerable",) if visible else (main.noun,))


def _q_viz_count(rng, objs, world, visible=True):
  n = sum(o.noun == objs[0].noun for o in objs)
  if not visible:
    return None
  return f"how many {_plural(objs[0].noun)} can you see?", str(n), (str(n + 1), "unanswerable")


# ------------------------------------------------------------------------------------------------ task clients


def _caption(objs: list[Obj], scene_name: Optional[str] = None) -> str:
  """A true caption: "a small red circle to the left of a large blue star"."""
  names = [f"a {o.size} {o.color} {o.noun}" for o in objs]
  if len(objs) == 2 and _relation(objs[0], objs[1]):
    text = f"{names[0]} {_REL_PHRASE[_relation(objs[0], objs[1])]} {names[1]}"
  elif len(names) > 1:
    text = ", ".join(names[:-1]) + " and " + names[-1]
  else:
    text = names[0]
  return text + (f" in a {scene_name}" if scene_name else "")


def _perturb(rng, objs: list[Obj], nouns=SHAPES) -> list[Obj]:
  """A hard negative for image-text matching: one attribute of one object changed (a noun to one of `nouns`)."""
  i = int(rng.integers(len(objs)))
  o = objs[i]
  kind = int(rng.integers(3))
  if kind == 0:
    o = dataclasses.replace(o, color=_pick(rng, [c for c in COLORS if c != o.color]))
  elif kind == 1:
    o = dataclasses.replace(o, noun=_pick(rng, [s for s in nouns if s != o.noun]))
  else:
    o = dataclasses.replace(o, size="large" if o.size == "small" else "small")
  return objs[:i] + [o] + objs[i + 1:]


def _nlvr2_statement(rng, left, right, kind: int):
  """A statement of kind `kind` (0-4) about a pair of images and whether it is true."""
  both = left + right
  ref = _pick(rng, both)
  n_l = sum(o.noun == ref.noun for o in left)
  n_r = sum(o.noun == ref.noun for o in right)
  if kind == 0:
    return f"the left image contains more {_plural(ref.noun)} than the right image", n_l > n_r
  if kind == 1:
    c = ref.color if rng.random() < 0.7 else _pick(rng, list(COLORS))
    return f"both images contain a {c} object", any(o.color == c for o in left) and any(o.color == c for o in right)
  if kind == 2:
    n = n_l + n_r + int(rng.integers(-1, 2))
    return f"there are exactly {max(n, 1)} {_plural(ref.noun)} in the two images", max(n, 1) == n_l + n_r
  if kind == 3:
    c = ref.color if rng.random() < 0.6 else _pick(rng, list(COLORS))
    return f"the right image contains a {c} {ref.noun}", any(o.color == c and o.noun == ref.noun for o in right)
  return f"only one image contains a {ref.noun}", (n_l > 0) != (n_r > 0)


# Each kind of hypothesis and the two labels it takes, each half of the time (so the words do not give the label).
_VE_KINDS = (("property", ("neutral", "contradiction")), ("exist", ("entailment", "contradiction")),
             ("relation", ("entailment", "contradiction")), ("count", ("entailment", "contradiction")))


def _ve_hypothesis(rng, objs, kind: str, want: str, other_scene: Callable[[], list]) -> Optional[str]:
  """A hypothesis of `kind` whose label is `want` (entailment / neutral / contradiction) for this image, or None.
  Both labels of a kind draw their wording from the same distribution, so that the words alone do not tell
  the label: the object phrases of the property hypotheses come from one generator (an object that is there or
  one that is not), and a false count is the true count of a count hypothesis about another scene of this
  client (`other_scene`), not the true count plus a small offset (a count above a scene's size is always
  false)."""
  if kind == "property":  # neutral: an invisible property of an object that is there; contradiction: of one
    got = _phrase_exists(rng, objs, want == "neutral")  # that is not (the presupposition fails)
    return got and f"the {got[0]} is {_pick(rng, INVISIBLE)}"
  truth = want == "entailment"
  if kind == "exist":
    got = _phrase_exists(rng, objs, truth)
    return got and f"there is a {got[0]} in the image"
  if kind == "relation":
    p = _pair(rng, objs)
    if p is None:
      return None
    _, da, _, db, rel = p
    return f"the {da} is {_REL_PHRASE[rel if truth else _OPPOSITE[rel]]} the {db}"
  pred, phrase = _count_filter(rng, objs, "shapes")
  n = sum(map(pred, objs))
  if truth:
    return f"there are {n} {phrase} in the image"
  other = other_scene()
  shown = sum(map(_count_filter(rng, other, "shapes")[0], other))  # a true count of a count hypothesis
  return None if shown == n else f"there are {shown} {phrase} in the image"


# ------------------------------------------------------------------------------------------------ clients


@dataclasses.dataclass(frozen=True)
class _Client:
  name: str
  sizes: tuple[int, int]  # default (train, test) at scale 1
  style: str = "vg"
  questions: tuple = ()  # question functions (VQA-style clients), sampled uniformly
  n_obj: tuple[int, int] = (2, 5)  # inclusive range
  annotators: int = 1
  noise: float = 0.06  # probability that one annotator answers wrongly
  score_rule: str = "inverse_count"
  task: str = "vqa"
  scene: Optional[str] = None


_VQA_MIX = (_q_color, _q_noun, _q_count, _q_exist, _q_size, _q_side)
_CLIENTS = {
    "domain": (
        _Client("art", (600, 200), "painted", (_q_art_subject, _q_art_color, _q_art_count), (1, 4)),
        _Client("abstract", (2000, 400), "flat", (_q_color, _q_noun, _q_count, _q_exist, _q_size), (2, 6),
                annotators=10, noise=0.2, score_rule="climb"),
        # 1200 training examples: with 400 not even full finetuning beat the text prior (docs/calibration_v2.md).
        _Client("vizwiz", (1200, 200), "vizwiz", (_q_viz_color, _q_viz_what), (1, 3),
                annotators=10, noise=0.3, score_rule="climb"),
        _Client("cocoqa", (1500, 300), "photo", (_q_coco_color, _q_coco_count, _q_coco_object, _q_rel_noun),
                (2, 5)),
        # 2-4 objects, 2000 training examples and GQA's plain attribute questions too: with 5-9 objects, 1000
        # examples and relations only, full finetuning stayed at the text prior, and with 3-6 objects it gained
        # 2 points (docs/calibration.md).
        _Client("gqa", (2000, 300), "clutter",
                (_q_color, _q_rel_color, _q_rel_what, _q_rel_yesno, _q_same_color, _q_logic), (2, 4)),
    ),
    "function": (
        _Client("attribute", (1800, 300), questions=(_q_color, _q_size, _q_same_color)),
        # 1-3 objects and 1500 training examples: with 2-5 and 500, pooled full finetuning stayed at the text prior
        # (docs/calibration.md).
        _Client("knowledge", (1500, 300), questions=(_q_know_temp, _q_know_corners, _q_know_fruit, _q_know_thing),
                n_obj=(1, 3)),
        _Client("logical", (1200, 300), questions=(_q_logic, _q_exist)),
        # One object per scene: asked about one object of several, the mini backbone does not learn the shape even
        # when finetuned end to end; alone in the picture, it does (docs/calibration_v2.md).
        _Client("object", (900, 300), questions=(_q_noun, _q_corner), n_obj=(1, 1)),
        _Client("relation", (700, 200), questions=(_q_side, _q_rel_noun, _q_rel_yesno)),
    ),
    "scene": tuple(
        _Client(name, size, scene=name, questions=(_q_color, _q_noun, _q_count, _q_exist, _q_rel_noun))
        for name, size in (("shop", (1200, 300)), ("workplace", (500, 200)), ("home", (2000, 400)),
                           ("transport", (800, 200)), ("sport", (400, 200)), ("outdoors", (1500, 300)))),
    "task": (
        _Client("vqa", (2000, 400), "photo", _VQA_MIX, annotators=10, noise=0.2, score_rule="vqa"),
        _Client("nlvr2", (800, 200), n_obj=(1, 4), task="nlvr2"),
        # 1-3 objects, and hypotheses whose wording does not tell the label (`_ve_hypothesis`): at 2-5 objects with
        # label-dependent wording full finetuning gained 1.3 points on the text prior, at 1-3 it fell 3.3 below
        # (docs/calibration.md).
        _Client("ve", (1200, 300), n_obj=(1, 3), task="ve"),
        _Client("itm", (500, 200), n_obj=(1, 3), task="itm"),
    ),
}


def _annotate(rng, answer: str, confusions, n: int, noise: float) -> list[str]:
  """n annotator answers: each is right with probability 1 - noise, else a confusion (earlier = likelier)."""
  out = []
  weights = np.array([0.5 ** i for i in range(len(confusions))])
  for _ in range(n):
    if confusions and rng.random() < noise:
      out.append(str(confusions[int(rng.choice(len(confusions), p=weights / weights.sum()))]))
    else:
      out.append(answer)
  return out


def _scene_objs(rng, client: _Client, n_obj=None) -> tuple[list[Obj], str]:
  lo, hi = n_obj or client.n_obj
  n = int(rng.integers(lo, hi + 1))
  if client.scene:
    sc = _SCENES[client.scene]
    n = int(rng.integers(sc["n_obj"][0], sc["n_obj"][1] + 1))
    return _sample_objs(rng, n, list(sc["nouns"]), sc["palette"], bands=sc["bands"]), "scene"
  return _sample_objs(rng, n, SHAPES, list(COLORS)), "shapes"


# The two answers of a two-way question: such a question is rejection-sampled to a coin flip between them.
_BINARY = {"yes": "no", "small": "large", "left": "right", "above": "below", "warm": "cool"}
_BINARY.update({b: a for a, b in list(_BINARY.items())})
_COUNTS = (_q_count, _q_art_count, _q_coco_count)  # counts: rejection-sampled to a uniform 0-2


def _wanted(question_fn, answer: str, want: float) -> bool:
  """Whether `answer` is the one this example's draw `want` (uniform in [0, 1)) asks for, so that the question
  alone does not give the answer: two-way answers are a coin flip, counts uniform over 0-2."""
  if answer in _BINARY:
    return (answer < _BINARY[answer]) == (want < 0.5)
  if question_fn in _COUNTS:
    return answer == str(int(want * 3))
  return True


def _example(rng, client: _Client, image_size: int):
  """One example dict (without question_id) for `client`."""
  if client.task == "vqa":
    # The question function is drawn once and scenes are redrawn until its answer is the one `want` asks for.
    want = float(rng.random())
    question_fn = _pick(rng, client.questions)
    for _ in range(500):
      objs, world = _scene_objs(rng, client)
      camera = None
      if client.style == "vizwiz":
        main = dataclasses.replace(objs[0], size="large")
        objs = [main] + [o for o in objs[1:] if math.hypot(o.x - main.x, o.y - main.y) > 0.3]
        w = float(rng.uniform(0.45, 0.95))
        x0, y0 = (float(rng.uniform(0, 1 - w)) for _ in range(2))
        camera = dict(crop=(x0, y0, w), angle=float(rng.uniform(-35, 35)), blur=float(rng.uniform(0, 1.6)),
                      gamma=float(np.exp(rng.uniform(-0.9, 0.9))))
        visible = x0 + 0.05 < main.x < x0 + w - 0.05 and y0 + 0.05 < main.y < y0 + w - 0.05
        got = question_fn(rng, objs, world, visible=visible)
      else:
        got = question_fn(rng, objs, world)
      if got is None:
        continue
      question, answer, confusions = got
      if not _wanted(question_fn, answer, want):
        continue
      image = _render(rng, objs, image_size, client.style, client.scene, camera)
      return dict(images=[image], question=question,
                  answers=_annotate(rng, answer, confusions, client.annotators, client.noise))
    raise RuntimeError(f"client {client.name}: could not generate a question")
  if client.task == "nlvr2":
    want, kind = rng.random() < 0.5, int(rng.integers(5))  # each kind of statement true half of the time
    for _ in range(500):
      left, _ = _scene_objs(rng, client)
      right, _ = _scene_objs(rng, client)
      statement, truth = _nlvr2_statement(rng, left, right, kind)
      if truth == want:
        break
    images = [_render(rng, objs, image_size, client.style) for objs in (left, right)]
    answer = "true" if truth else "false"
    return dict(images=images, question=statement,
                answers=_annotate(rng, answer, ("false" if truth else "true",), 1, client.noise))
  if client.task == "ve":
    labels = ("entailment", "neutral", "contradiction")
    # A third of the hypotheses are about invisible properties, the rest split over the visible kinds.
    kind, pair = _VE_KINDS[0] if rng.random() < 1 / 3 else _VE_KINDS[1 + int(rng.integers(3))]
    want = pair[int(rng.integers(2))]
    hyp = None
    while hyp is None:
      objs, _ = _scene_objs(rng, client)
      hyp = _ve_hypothesis(rng, objs, kind, want, lambda: _scene_objs(rng, client)[0])
    return dict(images=[_render(rng, objs, image_size, client.style)], question=hyp,
                answers=_annotate(rng, want, tuple(l for l in labels if l != want), 1, client.noise))
  if client.task == "itm":
    objs, _ = _scene_objs(rng, client)
    match = bool(rng.random() < 0.5)
    caption = _caption(objs if match else _perturb(rng, objs))
    answer = "yes" if match else "no"
    return dict(images=[_render(rng, objs, image_size, client.style)], question=caption,
                answers=_annotate(rng, answer, ("no" if match else "yes",), 1, client.noise))
  raise ValueError(client.task)


def _rng(seed: int, *keys: str) -> np.random.Generator:
  words = [seed] + [int.from_bytes(k.encode(), "little") % (2 ** 63) for k in keys]
  return np.random.default_rng(np.random.SeedSequence(words))


def _scaled(n: int, scale: float) -> int:
  return max(4, int(round(n * scale)))


def client_names(name: str) -> list[str]:
  """The client names of benchmark `name`, in order."""
  return [c.name for c in _CLIENTS[name]]


def make_benchmark(name: str, *, seed: int = 0, scale: float = 1.0, image_size: int = 64, num_answers: int = 100,
                   sizes: Optional[dict[str, tuple[int, int]]] = None) -> list[schema.ClientData]:
  """Builds benchmark `name` (one of BENCHMARKS): one ClientData per client, in the documented order.

  Args:
    name: "domain" | "function" | "scene" | "task".
    seed: the data seed; each (client, split) draws from its own stream derived from it.
    scale: multiplies the default (unequal) per-client (train, test) sizes; at least 4 examples per split.
    image_size: native side of the square uint8 [image_size, image_size, 3] images.
    num_answers: K, the size of each client's answer space (top-K answers of its train split).
    sizes: optional {client: (n_train, n_test)} overriding the defaults (before `scale`).
  """
  if name not in _CLIENTS:
    raise ValueError(f"unknown benchmark {name!r}; use one of {BENCHMARKS}")
  out = []
  for client in _CLIENTS[name]:
    splits = {}
    for split, n in zip(("train", "test"), (sizes or {}).get(client.name, client.sizes)):
      rng = _rng(seed, name, client.name, split)
      splits[split] = [dict(question_id=f"{client.name}-{split}-{i:05d}", **_example(rng, client, image_size))
                       for i in range(_scaled(n, scale))]
    out.append(schema.ClientData(
        name=client.name, train=splits["train"], test=splits["test"],
        answers=answers_lib.build_vocab(splits["train"], num_answers), score_rule=client.score_rule,
        num_images=2 if client.task == "nlvr2" else 1, task=client.task))
  return out


_CORPUS_STYLES = ("flat", "painted", "photo", "clutter", "vg")  # the rendering styles of the shape benchmarks


def caption_corpus(n: int, *, seed: int = 0, image_size: int = 64) -> list[dict]:
  """n (image, true caption) pairs for pretraining a tiny foundation model: [dict(images=[img], caption=str)].

  Disjoint from every benchmark by construction: the images come from their own random stream (key
  "caption-corpus", never used by make_benchmark), contain 1 to 3 objects of the same visual world (shapes in
  the benchmark styles, or a scene's objects) and carry captions, never questions or answers. Each pair also
  has a `negative`: its caption with one attribute of one object changed (a hard negative for image-text
  matching), drawn from a stream of its own so the images and captions do not depend on it.
  """
  rng = _rng(seed, "caption-corpus")
  neg_rng = _rng(seed, "caption-corpus-negatives")
  out = []
  for _ in range(n):
    k = int(rng.integers(1, 4))
    if rng.random() < 0.4:
      scene_name = _pick(rng, list(_SCENES))
      sc = _SCENES[scene_name]
      nouns = list(sc["nouns"])
      objs = _sample_objs(rng, k, nouns, sc["palette"], bands=sc["bands"])
      image = _render(rng, objs, image_size, "vg", scene_name)
    else:
      scene_name, nouns = None, SHAPES
      objs = _sample_objs(rng, k, SHAPES, list(COLORS))
      image = _render(rng, objs, image_size, _pick(rng, _CORPUS_STYLES))
    out.append(dict(images=[image], caption=_caption(objs, scene_name),
                    negative=_caption(_perturb(neg_rng, objs, nouns), scene_name)))
  return out


# What a probe asks of an image (probe_corpus): its class names.
PROBES = {
    "shape": SHAPES,  # the shape of the one object
    "color": tuple(COLORS),  # the colour of the one object
    "count": ("1", "2", "3", "4", "5"),  # how many objects
    "position": ("top left", "top right", "bottom left", "bottom right"),  # the one object's quadrant
}


def probe_corpus(n: int, probe: str, *, seed: int = 0, image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """n images uint8 [n, S, S, 3] in the shape benchmarks' styles and their labels (int [n], indices into
  PROBES[probe]): a probe of whether a model's image features carry what the twins ask about
  (benchmarks/probe_backbones.py, benchmarks/shape_probe.py).

  Each probe has its own random stream (key "<probe>-probe"), so the images are disjoint from every benchmark
  and from the caption corpus.
  """
  if probe not in PROBES:
    raise ValueError(f"unknown probe {probe!r}; use one of {tuple(PROBES)}")
  rng = _rng(seed, f"{probe}-probe")
  images, labels = [], []
  while len(labels) < n:
    objs = _sample_objs(rng, int(rng.integers(1, 6)) if probe == "count" else 1, SHAPES, list(COLORS))
    if probe == "position" and min(abs(objs[0].x - 0.5), abs(objs[0].y - 0.5)) < 0.08:
      continue  # too close to a quadrant border to say
    images.append(_render(rng, objs, image_size, _pick(rng, _CORPUS_STYLES)))
    o = objs[0]
    labels.append({"shape": lambda: SHAPES.index(o.noun), "color": lambda: list(COLORS).index(o.color),
                   "count": lambda: len(objs) - 1, "position": lambda: 2 * (o.y > 0.5) + (o.x > 0.5)}[probe]())
  return np.stack(images), np.asarray(labels, np.int32)


def shape_corpus(n: int, *, seed: int = 0, image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """`probe_corpus(n, "shape")`: n single-object images and their shapes (indices into SHAPES)."""
  return probe_corpus(n, "shape", seed=seed, image_size=image_size)


def vocabulary() -> list[str]:
  """Every word the generator can emit in a question, statement, caption or answer (sorted)."""
  texts = [
      # Templates, with their placeholders removed.
      "what color is the object in the painting? what shape is in the corner? what is the main subject of the",
      "painting? how many are there painted in the picture can you see? is there a and or but no small large",
      "to the left or right of above below what is the color of the same color warm cool how many corners",
      "does have which fruit has everyday thing shape as this the left image contains more than right both",
      "images contain a exactly two only one image is top bottom object in the image nothing unanswerable",
      "true false entailment neutral contradiction yes no objects",
      " ".join(INVISIBLE),
  ]
  words = set()
  for t in texts:
    words.update(re.findall(r"[a-z]+", t))
  nouns = set(SHAPES) | {n for sc in _SCENES.values() for n in sc["nouns"]} | {"ring", "object"}
  words |= nouns | {_plural(n) for n in nouns} | set(COLORS) | set(SIZES) | set(_SCENES)
  words |= set(FRUIT_OF_COLOR.values()) | set(THING_OF_SHAPE.values())
  words |= {str(i) for i in range(20)}
  return sorted(words)
