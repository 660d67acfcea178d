"""The backbone registry: `config.backbone` parsed once into what it names.

  pretrained           ViLT of the size preset pretrained on synthetic captions (feddat_jax/pretrain.py): the
                       shipped weights where the package has them (mini), else pretrained here and cached
  pretrained_tiny      the same (its older name, from when only tiny was pretrained)
  random               ViLT of the size preset, randomly initialised
  hf:<dir>             ViLT from a local Hugging Face directory (config.json, weights, tokenizer files)
  albef                ALBEF of the size preset, randomly initialised
  albef:<ALBEF.pth>    ALBEF from a local copy of the official checkpoint

>>> parse("hf:~/ckpt/vilt-b32-mlm")
Backbone(name='hf', path='~/ckpt/vilt-b32-mlm')
"""
from __future__ import annotations

import dataclasses

_PLAIN = ("pretrained", "pretrained_tiny", "random", "albef")  # names without a path
_WITH_PATH = ("hf", "albef")  # names written "<name>:<path>"
HELP = ("pretrained (or its older name pretrained_tiny), random, hf:<local ViLT dir>, albef (random ALBEF) or albef:<local ALBEF.pth>")


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str  # pretrained | random | hf | albef
  path: str = ""  # hf: the directory; albef: the .pth ("" for a random ALBEF)

  @property
  def is_albef(self) -> bool:
    return self.name == "albef"

  @property
  def checkpoint(self) -> str:
    """The local checkpoint this backbone loads ("" when none: pretrained here or random)."""
    return self.path


def parse(text: str) -> Backbone:
  """'pretrained' | 'pretrained_tiny' | 'random' | 'hf:<dir>' | 'albef' | 'albef:<ALBEF.pth>' -> Backbone (both
  pretrained names give name 'pretrained'); ValueError otherwise."""
  name, colon, path = text.partition(":")
  if (not colon and name in _PLAIN) or (colon and name in _WITH_PATH and path):
    return Backbone("pretrained" if name == "pretrained_tiny" else name, path)
  raise ValueError(f"backbone={text!r}: use {HELP}")
