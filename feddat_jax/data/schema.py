"""The common example schema every data source produces, and a client's data.

An *example* is a plain dict, whatever its source (the synthetic generator, a tfds builder reading a real
dataset's official files, or `tfds.data_source` reading them back):

    {
      "question_id": str,                  # unique within the client
      "images": [uint8 [H, W, 3], ...],    # 1 image (VQA) or 2 (NLVR2-like two-image statements)
      "question": str,                     # the question, statement, hypothesis or caption
      "answers": [str, ...],               # annotator answers: 10 (VQA v2 / VizWiz / Abstract style) or 1
    }

A client's answer space is the top-K answers of its train split (`ClientData.answers`); soft targets are
computed from `answers` by `feddat_jax.data.answers.soft_scores` under the client's `score_rule`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

Example = dict[str, Any]

SCORE_RULES = ("vqa", "climb", "inverse_count")
"""How annotator answers become soft scores (the FedDAT code's rules per dataset; docs/real_data.md):
- "vqa": min(count / 3, 1), the official VQA v2 rule;
- "climb": 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 matching annotators (the FedDAT code for Abstract, VizWiz);
- "inverse_count": 1 / count (the FedDAT code for COCO-QA, AQUA, GQA; 1.0 for single-answer data)."""


@dataclasses.dataclass
class ClientData:
  """One client's data: random-access sequences of examples and its answer space."""

  name: str
  train: Sequence[Example]
  test: Sequence[Example]
  answers: list[str]  # answer vocabulary (index = label id), at most the benchmark's K
  score_rule: str = "vqa"
  num_images: int = 1  # images per example (2 for two-image tasks)
  task: str = "vqa"  # vqa | nlvr2 | ve | itm: the kind of question, for reports

  def __post_init__(self):
    if self.score_rule not in SCORE_RULES:
      raise ValueError(f"client {self.name!r}: unknown score_rule {self.score_rule!r}; use one of {SCORE_RULES}")
