r"""Renders a benchmark's clients as a contact sheet: a row per client of images with question and answers.

  python -m feddat_jax.data.contact_sheet --benchmark=domain --out=docs/contact_domain.png
"""
from __future__ import annotations

import argparse
import collections
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from feddat_jax import cli
from feddat_jax.data import synthetic

_CELL = 160  # pixels per image cell side
_TEXT_H = 64  # pixels under each cell for question and answers
_LABEL_W = 110  # left column with the client name


def _answer_text(answers: list[str]) -> str:
  counts = collections.Counter(answers)
  if len(answers) == 1:
    return f"A: {answers[0]}"
  return "A: " + ", ".join(f"{a} x{n}" for a, n in counts.most_common(3))


def render_sheet(clients, per_client: int = 6) -> Image.Image:
  """Contact sheet image: per client (row) `per_client` train examples, upscaled, with their text."""
  font = ImageFont.load_default()
  rows = len(clients)
  sheet = Image.new("RGB", (_LABEL_W + per_client * (_CELL + 8), rows * (_CELL + _TEXT_H + 8)), "white")
  draw = ImageDraw.Draw(sheet)
  for r, client in enumerate(clients):
    y = r * (_CELL + _TEXT_H + 8)
    draw.text((6, y + _CELL // 2 - 20), f"{client.name}\n{client.task}\n{client.score_rule}\n"
              f"n={len(client.train)}", fill="black", font=font)
    for i, ex in enumerate(client.train[:per_client]):
      x = _LABEL_W + i * (_CELL + 8)
      imgs = ex["images"]
      w = _CELL // len(imgs)
      for j, img in enumerate(imgs):
        tile = Image.fromarray(np.asarray(img)).resize((w - 2 * j, w - 2 * j) if len(imgs) > 1 else (_CELL, _CELL),
                                                       Image.NEAREST)
        sheet.paste(tile, (x + j * (w + 2), y + (_CELL - tile.height) // 2))
      lines = textwrap.wrap(ex["question"], 27)[:3] + [_answer_text(ex["answers"])[:27]]
      draw.multiline_text((x, y + _CELL + 2), "\n".join(lines), fill="black", font=font, spacing=2)
  return sheet


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--benchmark", default="domain", choices=synthetic.BENCHMARKS, help="which benchmark")
  parser.add_argument("--out", required=True, help="output PNG path")
  parser.add_argument("--per_client", type=int, default=6, help="examples shown per client")
  parser.add_argument("--seed", type=int, default=0, help="data seed")
  parser.add_argument("--image_size", type=int, default=64, help="native image side")
  args = parser.parse_args(argv)
  cli.check_output("--out", args.out)  # before the benchmark is built
  for flag in ("per_client", "image_size"):
    if getattr(args, flag) <= 0:
      cli.fail(f"--{flag}={getattr(args, flag)} must be > 0")
  # Each split is one random stream, so the first examples are the same as in the full-size benchmark.
  clients = synthetic.make_benchmark(args.benchmark, seed=args.seed, image_size=args.image_size,
                                     sizes={c: (args.per_client, 4) for c in synthetic.client_names(args.benchmark)})
  render_sheet(clients, args.per_client).save(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
