"""Tokenizers with one call interface: `tok(texts, max_length) -> {input_ids, attention_mask}`.

`SyntheticTokenizer` is word-level over the synthetic generator's vocabulary (no download, every generated word
is known); `HFTokenizer` wraps a transformers BERT tokenizer object for real ViLT checkpoints. Both produce
`[CLS] tokens... [SEP]` padded with [PAD] (or truncated, keeping [SEP] last) to exactly max_length.

Example:
  tok = SyntheticTokenizer()
  tok(["what color is the star?"], max_length=8)["input_ids"]  # int32 [1, 8]
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from feddat_jax.data import synthetic

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_TOKEN = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")


def _pack(ids: list[list[int]], max_length: int, cls: int, sep: int, pad: int) -> dict[str, np.ndarray]:
  """[CLS] ids [SEP], truncated and padded: input_ids, attention_mask int32[N, max_length]."""
  if max_length < 2:
    raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
  input_ids = np.full((len(ids), max_length), pad, np.int32)
  mask = np.zeros((len(ids), max_length), np.int32)
  for i, row in enumerate(ids):
    row = [cls] + list(row[:max_length - 2]) + [sep]
    input_ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return {"input_ids": input_ids, "attention_mask": mask}


class SyntheticTokenizer:
  """Deterministic word-level tokenizer: lower-cased words, digits and punctuation marks are tokens.

  Vocabulary: the specials ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4), the punctuation the generator uses,
  then `synthetic.vocabulary()` (sorted) plus any `extra_words`.
  """

  def __init__(self, extra_words: Sequence[str] = ()):
    words = sorted(set(synthetic.vocabulary()) | set(extra_words))
    self.vocab = list(SPECIALS) + ["?", ",", "."] + words
    self._index = {w: i for i, w in enumerate(self.vocab)}
    self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = range(5)
    self.vocab_size = len(self.vocab)

  def tokenize(self, text: str) -> list[str]:
    return _TOKEN.findall(text.lower())

  def encode(self, text: str) -> list[int]:
    """Token ids without specials; unknown words map to [UNK]."""
    return [self._index.get(t, self.unk_token_id) for t in self.tokenize(text)]

  def decode(self, ids: Sequence[int]) -> str:
    """Space-joined tokens, skipping [PAD], [CLS] and [SEP]."""
    skip = {self.pad_token_id, self.cls_token_id, self.sep_token_id}
    return " ".join(self.vocab[i] for i in ids if i not in skip)

  def __call__(self, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    return _pack([self.encode(t) for t in texts], max_length, self.cls_token_id, self.sep_token_id,
                 self.pad_token_id)


class HFTokenizer:
  """Wraps a transformers (BERT-style) tokenizer object with the SyntheticTokenizer call interface."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.vocab_size = len(tokenizer)
    self.pad_token_id = tokenizer.pad_token_id
    self.cls_token_id = tokenizer.cls_token_id
    self.sep_token_id = tokenizer.sep_token_id
    self.mask_token_id = tokenizer.mask_token_id
    self.unk_token_id: Optional[int] = tokenizer.unk_token_id

  def __call__(self, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    out = self.tokenizer(list(texts), max_length=max_length, padding="max_length", truncation=True,
                         return_attention_mask=True)
    return {"input_ids": np.asarray(out["input_ids"], np.int32),
            "attention_mask": np.asarray(out["attention_mask"], np.int32)}


def tokenize_answers(tokenizer, answers: Sequence[str], num_answers: int, answer_len: int) -> np.ndarray:
  """A client's candidate answers as int32 [num_answers, answer_len]: `[CLS] tokens [SEP] [PAD]...`.

  For answer-generating models (ALBEF's decoder starts from [CLS]). Unused slots (fewer answers than
  num_answers) hold "[CLS] [SEP]": valid decoder inputs, to be masked by the client's answer_mask.
  """
  if len(answers) > num_answers:
    raise ValueError(f"{len(answers)} answers do not fit num_answers={num_answers}")
  texts = list(answers) + [""] * (num_answers - len(answers))
  return np.asarray(tokenizer(texts, max_length=answer_len)["input_ids"], np.int32)
