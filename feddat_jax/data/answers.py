"""Answer normalisation, per-client answer vocabularies and soft VQA targets.

Every data source (synthetic generator, real-dataset tfds builders) goes through these three functions, so a
client's answer space and its targets are computed the same way whatever produced the examples.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Mapping, Sequence

import numpy as np

from feddat_jax.data import schema

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# Annotators often drop the apostrophe; map back so "dont" and "don't" count as one answer.
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "shouldnt": "shouldn't",
    "wasnt": "wasn't", "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't", "whats": "what's",
    "thats": "that's", "theres": "there's", "im": "i'm", "ive": "i've", "youre": "you're",
}
# The apostrophe stays (contractions); the period is handled separately to keep decimals like "2.5".
_PUNCTUATION = "".join(c for c in string.punctuation if c not in "'.")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")


def normalize_answer(s: str) -> str:
  """Lower-cases and normalises an answer the way the official VQA evaluation does.

  Punctuation next to a space is deleted, punctuation inside a word becomes a space ("black/white" ->
  "black white"), periods outside numbers are dropped, articles are removed, number words up to ten become
  digits and common apostrophe-less contractions get their apostrophe back. Idempotent.
  """
  s = " ".join(s.lower().split())
  s = _THOUSANDS_COMMA.sub("", s)
  for p in _PUNCTUATION:
    if p in s:
      s = s.replace(p, "" if (p + " " in s or " " + p in s) else " ")
  s = _PERIOD.sub("", s)
  words = []
  for w in s.split():
    if w in _ARTICLES:
      continue
    w = _NUMBER_WORDS.get(w, w)
    words.append(_CONTRACTIONS.get(w, w))
  return " ".join(words)


def build_vocab(examples: Iterable[Mapping], k: int) -> list[str]:
  """The k most frequent normalised answers over all annotator answers of `examples`.

  Ties are broken alphabetically so the vocabulary is independent of example order. Empty answers (e.g. an
  answer that was only an article) are skipped.
  """
  counts = collections.Counter()
  for ex in examples:
    counts.update(a for a in map(normalize_answer, ex["answers"]) if a)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return [a for a, _ in ranked[:k]]


def _climb(count: int) -> float:
  return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def soft_scores(answers: Sequence[str], vocab_index: Mapping[str, int], rule: str, num_answers: int) -> np.ndarray:
  """Soft target float32[num_answers] from one example's annotator answers.

  For each distinct normalised answer `a` with `count` = how many annotators gave it:
    "vqa":           min(count / 3, 1)                       (VQA v2)
    "climb":         0.3 / 0.6 / 0.9 / 1.0 for count 1/2/3/>=4  (FedDAT code for Abstract, VizWiz)
    "inverse_count": 1 / count                              (FedDAT code for COCO-QA, AQUA, GQA)
  "inverse_count" is literally the FedDAT formula (`score = 1 / answer_count[answer]`): single-answer data get
  1.0, and with several annotators an answer given more often scores *lower*; we keep it for fidelity.
  Answers outside `vocab_index`, or whose index is >= num_answers, are dropped (their score is not moved).
  """
  if rule not in schema.SCORE_RULES:
    raise ValueError(f"unknown score rule {rule!r}; use one of {schema.SCORE_RULES}")
  scores = np.zeros((num_answers,), np.float32)
  for a, count in collections.Counter(map(normalize_answer, answers)).items():
    idx = vocab_index.get(a)
    if idx is None or idx >= num_answers:
      continue
    if rule == "vqa":
      scores[idx] = min(count / 3.0, 1.0)
    elif rule == "climb":
      scores[idx] = _climb(count)
    else:
      scores[idx] = 1.0 / count
  return scores
