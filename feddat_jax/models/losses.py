"""The losses of FedDAT and the baselines (as the FedDAT paper defines them), with answer and example masks.

Shapes: logits, targets [B, A]; answer_mask [A] (1 for answers in the client's vocabulary);
example_mask [B] (1 for real examples, 0 for padding in a partial batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_NEG = -1e9  # logit for answers outside a client's vocabulary: zero probability, finite arithmetic


def mask_logits(logits, answer_mask):
  return jnp.where(answer_mask > 0, logits, _NEG)


def _example_mean(per_example, example_mask):
  return (per_example * example_mask).sum() / jnp.maximum(example_mask.sum(), 1.0)


def task_loss(logits, targets, answer_mask, example_mask):
  """BCE with soft targets, summed over the client's answers, mean over real examples.

  The reference's `BCEWithLogitsLoss(reduction='mean') * num_answers` is exactly this for a full vocabulary.
  """
  bce = optax.sigmoid_binary_cross_entropy(logits, targets) * answer_mask
  return _example_mean(bce.sum(-1), example_mask)


def kd_loss(student, teacher, answer_mask, example_mask, temperature=3.0):
  """T^2 * mean over examples of KL(softmax(teacher / T) || softmax(student / T)); the teacher is detached."""
  t = jax.lax.stop_gradient(mask_logits(teacher, answer_mask)) / temperature
  s = mask_logits(student, answer_mask) / temperature
  log_t, log_s = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
  kl = (jnp.exp(log_t) * (log_t - log_s)).sum(-1)
  return temperature**2 * _example_mean(kl, example_mask)


def vqa_scores(logits, targets, answer_mask):
  """Per-example VQA score: the soft target of the argmax answer (in [0, 1]), [B]."""
  pred = jnp.argmax(mask_logits(logits, answer_mask), axis=-1)
  return jnp.take_along_axis(targets, pred[:, None], axis=-1)[:, 0]
