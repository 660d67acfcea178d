"""VQA score and accuracy for numpy or jax arrays.

Both take any leading batch shape (e.g. [N] or [C, S, B]) and an optional example mask of that shape. With
numpy inputs they return a Python float; with jax inputs a 0-d jax array, so they also work under `jax.jit`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
  return jnp if any(isinstance(a, jax.Array) for a in arrays if a is not None) else np


def _masked_mean(xp, values, mask):
  if mask is None:
    mask = xp.ones(values.shape, xp.float32)
  mask = mask.astype(xp.float32)
  out = 100.0 * (values * mask).sum() / xp.maximum(mask.sum(), 1.0)
  return float(out) if xp is np else out


def predict(logits, answer_mask=None):
  """Argmax answer index [...], ignoring answers where answer_mask ([A] or broadcastable) is 0."""
  xp = _xp(logits, answer_mask)
  if answer_mask is not None:
    logits = xp.where(answer_mask > 0, logits, -xp.inf)
  return logits.argmax(axis=-1)


def vqa_score(logits, targets, mask=None, answer_mask=None):
  """100 * mean over real examples of the target score of the argmax answer.

  Args:
    logits: [..., A] answer logits.
    targets: [..., A] soft scores (e.g. min(count / 3, 1)).
    mask: optional [...] example mask (1 real, 0 padding).
    answer_mask: optional [A] (or broadcastable to logits) 1 for answers in the client's vocabulary; without
      it the caller must have masked the logits of non-existent answers.
  """
  xp = _xp(logits, targets, mask, answer_mask)
  pred = predict(logits, answer_mask)
  score = xp.take_along_axis(targets, pred[..., None], axis=-1)[..., 0]
  return _masked_mean(xp, score, mask)


def accuracy(logits, labels, mask=None, answer_mask=None):
  """100 * fraction of real examples whose argmax equals the integer label ([...])."""
  xp = _xp(logits, labels, mask, answer_mask)
  correct = (predict(logits, answer_mask) == labels).astype(xp.float32)
  return _masked_mean(xp, correct, mask)
