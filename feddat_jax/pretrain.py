"""A tiny foundation model: ViLT pretrained from scratch on the synthetic caption corpus, cached on disk.

ViLT's own objectives on (image, caption) pairs from `synthetic.caption_corpus` (disjoint from every client
benchmark):
- masked language modelling: 15% of the caption tokens (ViLT's rate; `mask_prob` changes it), BERT's 80/10/10
  rule ([MASK] / random / unchanged), predicted by HF's ViltMLMHead (dense -> gelu -> LayerNorm -> decoder tied
  to the word embeddings);
- image-text matching: pooler -> Linear(d, 2); half of the batch is paired with another image of the batch.
One forward pass serves both: MLM is scored on the matched pairs only, since a caption's masked colour or shape
word is only recoverable from its own image (on a mismatched pair MLM would train the text prior instead).

The result is the frozen backbone of the default federated job: `pretrained_backbone` returns
`(ViltConfig, params)` with params the tree `ViLT(cfg).init` makes (peft=None), ready for
`VisionLanguageModel(cfg, ...).init(rng, pretrained=params)`. The config's `image_size` is the size the
backbone was pretrained at (DEFAULTS); a downstream model should use that config as it is.

Example:
  tok = SyntheticTokenizer()
  cfg, params = pretrained_backbone("small", tok, cache_dir="~/.cache/feddat_jax/foundation")
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from feddat_jax import checkpoint
from feddat_jax import reporting
from feddat_jax import workdir_lock
from feddat_jax.config_checks import ConfigError
from feddat_jax.data import pipeline
from feddat_jax.data import synthetic
from feddat_jax.models import vilt as vilt_lib

# Bump when anything that changes the trained parameters changes, so stale caches are not reused.
FORMAT_VERSION = 1

# Defaults per size, measured on the shared 2-core CPU: small must leave most of the default job's 10-minute
# budget to federated training. Images are pretrained at the preset's size (the downstream model's, so the
# position-embedding grid and the object-to-patch scale are the ones it sees); None: the preset's.
DEFAULTS = {
    "tiny": dict(steps=1500, batch_size=64, lr=2e-3, image_size=None),
    # Pretrained once, longer than a job could, and shipped (feddat_jax/foundation/): a larger corpus, the visual
    # words masked more often and hard ITM negatives, so that its frozen features tell shapes, colours, counts
    # and positions apart (docs/foundation_model.md).
    "mini": dict(steps=6000, batch_size=64, lr=1.5e-3, image_size=None, corpus_size=32768, visual_mask_prob=0.5,
                 hard_negatives=0.5),
    "small": dict(steps=120, batch_size=32, lr=2e-3, image_size=None),
    "base": dict(steps=300, batch_size=32, lr=3e-4, image_size=None),
}
DEFAULT_STEPS = {size: d["steps"] for size, d in DEFAULTS.items()}
RENDER_SIZE = 64  # the corpus is drawn at this size and resized to the model's, as the benchmarks are
# ViLT's (and BERT's) masking rate, the default for every size. 60% masks more of the visual words per step;
# it scored higher on a second draw of the Function benchmark but not on the usual one
# (docs/foundation_model.md#attempts-to-make-the-backbone-more-useful), so the standard rate stays.
MASK_PROB = 0.15
_COMPLETE = "COMPLETE"  # written last inside a cache entry; an entry without it is never loaded
# Backbones pretrained once and shipped in the package: <cache key>.safetensors and <cache key>.json (config,
# held-out metrics, sha256 of the weights, the command and commit that made them). A request whose cache key
# matches one loads it instead of pretraining.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "foundation")


# ---------------------------------------------------------------------------------------------------- model


class MLMHead(nn.Module):
  """HF ViltMLMHead: dense -> gelu -> LayerNorm, then a decoder tied to the word embeddings (+ own bias)."""

  cfg: vilt_lib.ViltConfig

  @nn.compact
  def __call__(self, x, word_embeddings):
    """x [B, L, d], word_embeddings [V, d] -> logits [B, L, V]."""
    cfg = self.cfg
    x = jax.nn.gelu(nn.Dense(cfg.hidden_size, name="dense")(x), approximate=False)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(x)
    bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
    return x @ word_embeddings.T.astype(x.dtype) + bias


class PretrainModel(nn.Module):
  """ViLT (params under "vilt", exactly the tree `ViLT(cfg).init` makes) + MLM and ITM heads."""

  cfg: vilt_lib.ViltConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, pixel_values, pixel_mask):
    """-> (mlm_logits [B, L, V], itm_logits [B, 2])."""
    vilt = vilt_lib.ViLT(self.cfg, name="vilt")
    out = vilt(input_ids, attention_mask, pixel_values, pixel_mask)
    words = vilt.variables["params"]["embeddings"]["text_embeddings"]["word_embeddings"]["embedding"]
    text = out["last_hidden_state"][:, :input_ids.shape[1]]
    mlm = MLMHead(self.cfg, name="mlm")(text, words)
    itm = nn.Dense(2, name="itm")(out["pooler_output"])
    return mlm, itm


def _normalize(pixels):
  """uint8 -> [-1, 1], ViLT's mean = std = 0.5 (as `VisionLanguageModel.features`)."""
  return pixels.astype(jnp.float32) / 127.5 - 1.0


def bert_mask(rng, input_ids, candidates, mask_token_id: int, vocab_size: int, prob: float = MASK_PROB):
  """BERT masking: picks `prob` of the candidate tokens; 80% -> [MASK], 10% -> random token, 10% unchanged.

  input_ids int [B, L], candidates bool [B, L] -> (masked ids [B, L], picked bool [B, L]).
  """
  k_pick, k_kind, k_rand = jax.random.split(rng, 3)
  picked = candidates & (jax.random.uniform(k_pick, input_ids.shape) < prob)
  u = jax.random.uniform(k_kind, input_ids.shape)
  random_ids = jax.random.randint(k_rand, input_ids.shape, 0, vocab_size, input_ids.dtype)
  ids = jnp.where(picked & (u < 0.8), mask_token_id, input_ids)
  ids = jnp.where(picked & (u >= 0.8) & (u < 0.9), random_ids, ids)
  return ids, picked


def make_itm_pairs(rng, input_ids):
  """Pairs half of the captions with another image of the batch: (image index [B], match label int [B]).

  A negative takes the image `shift` rows away (one random shift in [1, B)), so it is never its own. A caption
  identical to the one of the image it gets (e.g. two "a small red circle") still describes it: label 1.
  """
  b = input_ids.shape[0]
  k_neg, k_shift = jax.random.split(rng)
  neg = jax.random.uniform(k_neg, (b,)) < 0.5
  shift = jax.random.randint(k_shift, (), 1, b)
  rows = jnp.arange(b)
  image_idx = jnp.where(neg, (rows + shift) % b, rows)
  same = jnp.all(input_ids[image_idx] == input_ids, axis=1)
  return image_idx, (~neg | same).astype(jnp.int32)


def _losses(model, params, input_ids, attention_mask, pixels, pixel_mask, targets, picked, itm_labels):
  """Mean MLM loss (picked tokens of matched pairs) + ITM loss, and accuracies."""
  mlm_logits, itm_logits = model.apply({"params": params}, input_ids, attention_mask, _normalize(pixels),
                                       pixel_mask)
  w = (picked & (itm_labels[:, None] == 1)).astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(mlm_logits.astype(jnp.float32), targets)
  mlm_loss = (ce * w).sum() / n
  mlm_acc = ((mlm_logits.argmax(-1) == targets) * w).sum() / n
  itm_loss = optax.softmax_cross_entropy_with_integer_labels(itm_logits.astype(jnp.float32), itm_labels).mean()
  itm_acc = (itm_logits.argmax(-1) == itm_labels).mean()
  return mlm_loss + itm_loss, dict(mlm_loss=mlm_loss, mlm_acc=mlm_acc, itm_loss=itm_loss, itm_acc=itm_acc)


def make_optimizer(lr: float, steps: int, weight_decay: float = 0.01):
  """AdamW (b2 0.98, clip 1.0), linear warm-up over 10% of the steps then cosine decay to 0.

  Weight decay on matrices only (not biases, LayerNorm scales, the cls token).
  """
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(2, steps), 0.0)
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay, mask=decay_mask))


def make_train_step(cfg: vilt_lib.ViltConfig, tokenizer, optimizer, mask_prob: float = MASK_PROB,
                    visual_mask_prob: float = 0.0, hard_negatives: float = 0.0):
  """-> jitted step(state, batch, rng) -> (state, metrics); state = dict(params, opt_state) is donated.

  batch: input_ids, attention_mask int32 [B, L]; pixel_values uint8 [B, H, W, 3]; pixel_mask bool [B, H, W];
  with hard_negatives > 0 also negative_ids, negative_mask int32 [B, L] (`encode_corpus`). Negatives and masks
  are drawn inside the step from `rng`. visual_mask_prob > 0: the words only the image can tell
  (`visual_word_ids`) are masked at this rate instead of mask_prob. hard_negatives: the share of the ITM
  negatives that keep their own image and take its hard-negative caption (one attribute of one object
  changed) instead of another image of the batch.
  """
  model = PretrainModel(cfg)
  special = jnp.array(sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id}))
  visual = jnp.asarray(np.concatenate(list(visual_word_ids(tokenizer).values())))

  def step(state, batch, rng):
    k_itm, k_mlm, k_hard = jax.random.split(rng, 3)
    ids, am = batch["input_ids"], batch["attention_mask"]
    image_idx, itm_labels = make_itm_pairs(k_itm, ids)
    if hard_negatives:
      hard = (itm_labels == 0) & (jax.random.uniform(k_hard, itm_labels.shape) < hard_negatives)
      image_idx = jnp.where(hard, jnp.arange(ids.shape[0]), image_idx)
      ids = jnp.where(hard[:, None], batch["negative_ids"], ids)
      am = jnp.where(hard[:, None], batch["negative_mask"], am)
    candidates = (am > 0) & ~jnp.isin(ids, special)
    prob = jnp.where(jnp.isin(ids, visual), visual_mask_prob, mask_prob) if visual_mask_prob else mask_prob
    masked, picked = bert_mask(k_mlm, ids, candidates, tokenizer.mask_token_id, cfg.vocab_size, prob)
    loss_fn = lambda p: _losses(model, p, masked, am, batch["pixel_values"][image_idx],
                                batch["pixel_mask"][image_idx], ids, picked, itm_labels)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, opt_state=opt_state), dict(metrics, loss=loss)

  return jax.jit(step, donate_argnums=0)


def init_params(cfg: vilt_lib.ViltConfig, rng, text_len: int = 8):
  """Fresh PretrainModel params: {"vilt", "mlm", "itm"}."""
  s = cfg.image_size
  return PretrainModel(cfg).init(rng, jnp.zeros((1, text_len), jnp.int32), jnp.ones((1, text_len), jnp.int32),
                                 jnp.zeros((1, s, s, 3)), jnp.ones((1, s, s), bool))["params"]


# ----------------------------------------------------------------------------------------------------- data


def encode_corpus(examples, tokenizer, *, image_size: int, text_len: int,
                  with_negatives: bool = False) -> dict[str, np.ndarray]:
  """Caption corpus -> arrays: input_ids, attention_mask int32 [N, L'], pixel_values uint8 [N, S, S, 3],
  pixel_mask bool [N, S, S]; with_negatives: also negative_ids, negative_mask int32 [N, L'] (the hard-negative
  captions).

  L' <= text_len is the longest caption (+ [CLS], [SEP]) rounded up to 8: the padding columns after it are
  masked keys whose outputs nothing reads, and position embeddings are absolute, so dropping them changes
  no loss or gradient, only the cost.
  """
  out = tokenizer([ex["caption"] for ex in examples], max_length=text_len)
  if with_negatives:
    neg = tokenizer([ex["negative"] for ex in examples], max_length=text_len)
    out.update(negative_ids=neg["input_ids"], negative_mask=neg["attention_mask"])
  used = int(max(out[k].sum(1).max() for k in ("attention_mask", "negative_mask") if k in out))
  keep = min(text_len, -(-used // 8) * 8)
  out = {k: v[:, :keep] for k, v in out.items()}
  n = len(examples)
  out["pixel_values"] = np.zeros((n, image_size, image_size, 3), np.uint8)
  out["pixel_mask"] = np.zeros((n, image_size, image_size), bool)
  for i, ex in enumerate(examples):
    out["pixel_values"][i], out["pixel_mask"][i] = pipeline.preprocess_image(
        np.asarray(ex["images"][0]), (image_size, image_size))
  return out


def _single_token_ids(tokenizer, words) -> np.ndarray:
  """The ids of the words that the tokenizer keeps as one token."""
  enc = tokenizer(list(words), max_length=4)
  return np.array([row[1] for row, m in zip(enc["input_ids"], enc["attention_mask"]) if m.sum() == 3], np.int32)


def visual_word_ids(tokenizer) -> dict[str, np.ndarray]:
  """Token ids of the caption words only the image can tell: colours, object nouns (shapes, scene objects),
  sizes and relations."""
  nouns = set(synthetic.SHAPES) | {n for sc in synthetic._SCENES.values() for n in sc["nouns"]}  # pylint: disable=protected-access
  return {"color": _single_token_ids(tokenizer, sorted(synthetic.COLORS)),
          "shape": _single_token_ids(tokenizer, sorted(nouns)),
          "size": _single_token_ids(tokenizer, sorted(synthetic.SIZES)),
          "relation": _single_token_ids(tokenizer, ("left", "right", "above", "below"))}


# ------------------------------------------------------------------------------------------------- evaluate


def evaluate(cfg: vilt_lib.ViltConfig, params, data: dict[str, np.ndarray], tokenizer, *, seed: int = 0,
             batch_size: int = 64) -> dict[str, float]:
  """Held-out metrics of PretrainModel `params` on encoded pairs `data` (see `encode_corpus`).

  - itm_acc: matching accuracy with half of the captions paired with another image; mlm_acc: BERT-masked
    tokens of the matched pairs (the training metrics, on unseen pairs).
  - mlm_acc_{color,shape}: one colour (shape) word per caption replaced by [MASK], nothing else masked; and
    the same with a blank grey image (`_blank`): the text-only baseline. Grounded features score well above
    it; a caption's other words (e.g. the scene, "a red star and a red circle") are the blank's only cues.
  """
  model = PretrainModel(cfg)
  special = jnp.array(sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id}))

  @jax.jit
  def itm_batch(ids, am, pixels, pmask, rng):
    k_itm, k_mlm = jax.random.split(rng)
    image_idx, labels = make_itm_pairs(k_itm, ids)
    masked, picked = bert_mask(k_mlm, ids, (am > 0) & ~jnp.isin(ids, special), tokenizer.mask_token_id,
                               cfg.vocab_size)
    mlm_logits, itm_logits = model.apply({"params": params}, masked, am, _normalize(pixels[image_idx]),
                                         pmask[image_idx])
    w = picked & (labels[:, None] == 1)
    return ((mlm_logits.argmax(-1) == ids) & w).sum(), w.sum(), (itm_logits.argmax(-1) == labels).sum()

  @jax.jit
  def word_batch(masked, am, pixels, pmask, pos, target):
    mlm_logits, _ = model.apply({"params": params}, masked, am, _normalize(pixels), pmask)
    pred = jnp.take_along_axis(mlm_logits.argmax(-1), pos[:, None], 1)[:, 0]
    return pred == target

  n = len(data["input_ids"]) // batch_size * batch_size  # whole batches: one compiled shape
  if n == 0:
    raise ValueError(f"evaluate needs at least batch_size={batch_size} pairs, got {len(data['input_ids'])}")
  rng = np.random.default_rng([seed, 7])
  vis = visual_word_ids(tokenizer)
  totals = dict(mlm_hit=0, mlm_n=0, itm_hit=0)
  word_hits = {f"{k}{b}": [] for k in vis for b in ("", "_blank")}
  for s in range(0, n, batch_size):
    sl = slice(s, s + batch_size)
    ids, am, px, pm = (data[k][sl] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask"))
    hit, cnt, itm_hit = itm_batch(ids, am, px, pm, jax.random.PRNGKey(seed * 100003 + s))
    totals["mlm_hit"] += int(hit)
    totals["mlm_n"] += int(cnt)
    totals["itm_hit"] += int(itm_hit)
    for kind, word_ids in vis.items():
      has = np.isin(ids, word_ids)
      rows = np.flatnonzero(has.any(1))
      if rows.size == 0:
        continue
      # One random occurrence per caption (deterministic), padded to the batch with row 0's choice.
      pos = np.array([rng.choice(np.flatnonzero(has[r])) for r in rows])
      take = np.concatenate([rows, np.full(batch_size - rows.size, rows[0])])
      pos = np.concatenate([pos, np.full(batch_size - rows.size, pos[0])])
      masked = ids[take].copy()
      masked[np.arange(batch_size), pos] = tokenizer.mask_token_id
      target = ids[take, pos]
      blank = np.full_like(px[take], 128)
      for suffix, pixels in (("", px[take]), ("_blank", blank)):
        ok = np.asarray(word_batch(masked, am[take], pixels, pm[take], pos, target))
        word_hits[f"{kind}{suffix}"].append(ok[:rows.size])
  out = dict(mlm_acc=totals["mlm_hit"] / max(totals["mlm_n"], 1), itm_acc=totals["itm_hit"] / n)
  for k, v in word_hits.items():
    out[f"mlm_acc_{k}"] = float(np.concatenate(v).mean()) if v else float("nan")
  return out


# ------------------------------------------------------------------------------------------------- pretrain


def _resolve(size: str, steps, batch_size, lr, image_size, mask_prob) -> tuple[int, int, float, int, float]:
  if size not in DEFAULTS:
    raise ValueError(f"unknown ViLT size {size!r}; use one of {tuple(DEFAULTS)}")
  d = DEFAULTS[size]
  image_size = image_size or d["image_size"] or vilt_lib.PRESETS[size]["image_size"]
  mask_prob = mask_prob or MASK_PROB
  if not 0.0 < mask_prob < 1.0:
    raise ValueError(f"pretraining mask_prob={mask_prob} must be in (0, 1)")
  return (steps or d["steps"], batch_size or d["batch_size"], lr or d["lr"], image_size, mask_prob)


def pretrain(size: str, tokenizer, *, steps: Optional[int] = None, batch_size: Optional[int] = None,
             seed: int = 0, image_size: Optional[int] = None, patch_size: Optional[int] = None, text_len: int = 40,
             lr: Optional[float] = None, corpus_size: Optional[int] = None, eval_size: int = 128,
             mask_prob: Optional[float] = None, visual_mask_prob: float = 0.0, hard_negatives: float = 0.0,
             log_every: Optional[int] = None, log: Callable[[str], None] = print,
             checkpoint_dir: Optional[str] = None, fingerprint: str = ""):
  """Pretrains ViLT `size` with MLM + ITM on the caption corpus -> (ViltConfig, backbone params, metrics).

  steps, batch_size, lr, image_size, patch_size: None (or 0) -> DEFAULTS[size] / the preset's; mask_prob: None
  (or 0) -> MASK_PROB. The config's image_size is `image_size` (the position-embedding grid is the pretraining
  one) and its vocab_size the tokenizer's. corpus_size: distinct pairs to train on (default min(steps *
  batch_size, 4096); they are revisited with fresh masks and negatives); eval_size further pairs are held out
  for `evaluate`. visual_mask_prob, hard_negatives: see `make_train_step` (0: off, as in the default job's
  pretraining). metrics: the last logging interval's training means (mlm_loss, mlm_acc, itm_loss, itm_acc),
  the held-out ones (eval_*) and timings (seconds).

  checkpoint_dir: save the training state there at every logging interval and resume from the newest one
  (refused if it was written under another `fingerprint`); a killed run resumes bitwise, since the data order
  is replayed from the seed and each step's masks and negatives derive from (seed, step).
  """
  steps, batch_size, lr, image_size, mask_prob = _resolve(size, steps, batch_size, lr, image_size, mask_prob)
  if batch_size < 2:
    raise ValueError("image-text matching draws negatives from the batch: batch_size must be >= 2")
  if not (0.0 <= visual_mask_prob < 1.0 and 0.0 <= hard_negatives <= 1.0):
    raise ValueError(f"pretraining visual_mask_prob={visual_mask_prob} must be in [0, 1) and "
                     f"hard_negatives={hard_negatives} in [0, 1]")
  if text_len > vilt_lib.ViltConfig.max_position_embeddings:
    raise ValueError(f"text_len={text_len} exceeds ViLT's {vilt_lib.ViltConfig.max_position_embeddings} "
                     "text positions")
  cfg = vilt_lib.ViltConfig.preset(size, vocab_size=tokenizer.vocab_size, image_size=image_size,
                                   **({"patch_size": patch_size} if patch_size else {}))
  corpus_size = corpus_size or min(steps * batch_size, 4096)
  log_every = log_every or max(1, steps // 10)
  t0 = time.perf_counter()

  examples = synthetic.caption_corpus(corpus_size + eval_size, seed=seed, image_size=min(RENDER_SIZE, image_size))
  data = encode_corpus(examples[:corpus_size], tokenizer, image_size=image_size, text_len=text_len,
                       with_negatives=hard_negatives > 0)
  held_out = (encode_corpus(examples[corpus_size:], tokenizer, image_size=image_size, text_len=text_len)
              if eval_size else None)
  del examples
  t_data = time.perf_counter() - t0
  log(f"pretrain[{size}]: {corpus_size} caption pairs at {image_size}px, {data['input_ids'].shape[1]} text "
      f"tokens ({t_data:.1f}s); {steps} steps x {batch_size}, lr {lr:g}, {mask_prob:.0%} of tokens masked"
      + (f" ({visual_mask_prob:.0%} of the visual words)" if visual_mask_prob else "")
      + (f", {hard_negatives:.0%} of ITM negatives hard" if hard_negatives else ""))

  rng = jax.random.PRNGKey(seed)
  k_init, k_train = jax.random.split(rng)
  optimizer = make_optimizer(lr, steps)
  params = init_params(cfg, k_init)
  state = dict(params=params, opt_state=optimizer.init(params))
  train_step = make_train_step(cfg, tokenizer, optimizer, mask_prob, visual_mask_prob, hard_negatives)
  ckpt, start = None, 0
  if checkpoint_dir:
    ckpt = checkpoint.Checkpointer(checkpoint_dir, fingerprint)
    ckpt.check_config()
    start, restored = ckpt.restore_latest(lambda meta: state)
    if restored is not None:
      state = restored
      log(f"pretrain[{size}]: resuming at step {start}/{steps} from {checkpoint_dir}")

  order_rng = np.random.default_rng([seed, 1])
  order = np.empty(0, np.int64)
  pending, last = [], {}
  t_start = t_mark = time.perf_counter()
  t_compile = 0.0
  bar = tqdm(total=steps, initial=start, desc=f"pretrain[{size}]", unit="step", dynamic_ncols=True,
             disable=None)  # terminal only
  try:
    for i in range(steps):
      if len(order) < batch_size:  # a fresh permutation per epoch; a partial tail joins the next epoch
        order = np.concatenate([order, order_rng.permutation(corpus_size)])
      idx, order = np.sort(order[:batch_size]), order[batch_size:]
      if i < start:  # resumed: replay the data order up to the checkpoint
        continue
      batch = {k: v[idx] for k, v in data.items()}
      state, m = train_step(state, batch, jax.random.fold_in(k_train, i))
      pending.append(m)
      bar.update(1)
      if i == start:
        jax.block_until_ready(m)
        t_compile = time.perf_counter() - t_mark
        t_mark = time.perf_counter()
      if (i + 1) % log_every == 0 or i + 1 == steps:
        ms = jax.device_get(pending)
        last = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
        n_timed = len(pending) - (1 if i + 1 - start == len(pending) else 0)  # the first step compiles
        rate = n_timed / max(time.perf_counter() - t_mark, 1e-9) if n_timed else float("nan")
        bar.set_postfix(mlm=f"{last['mlm_loss']:.3f}", itm=f"{last['itm_loss']:.3f}", refresh=False)
        with tqdm.external_write_mode():  # the log line above the bar, not through it
          log(f"pretrain[{size}] step {i + 1}/{steps}: mlm {last['mlm_loss']:.3f} (acc {last['mlm_acc']:.3f}) "
              f"itm {last['itm_loss']:.3f} (acc {last['itm_acc']:.3f}) {rate:.2f} steps/s")
        if ckpt is not None and i + 1 < steps:
          ckpt.save(i + 1, state)
        pending, t_mark = [], time.perf_counter()
  finally:  # a failed step leaves the checkpoints written so far usable
    bar.close()
    if ckpt is not None:
      ckpt.close()
  t_train = time.perf_counter() - t_start

  params = jax.device_get(state["params"])
  metrics = dict(last)
  if eval_size:
    t_eval = time.perf_counter()
    ev = evaluate(cfg, params, held_out, tokenizer, seed=seed, batch_size=min(64, eval_size))
    metrics.update({f"eval_{k}": v for k, v in ev.items()})
    metrics["time_eval_s"] = time.perf_counter() - t_eval
    log(f"pretrain[{size}] held-out: itm acc {ev['itm_acc']:.3f}, mlm acc {ev['mlm_acc']:.3f}; masked colour "
        f"{ev['mlm_acc_color']:.3f} (blank image {ev['mlm_acc_color_blank']:.3f}), shape "
        f"{ev['mlm_acc_shape']:.3f} (blank {ev['mlm_acc_shape_blank']:.3f})")
  metrics.update(time_data_s=t_data, time_compile_s=t_compile, time_train_s=t_train,
                 time_total_s=time.perf_counter() - t0,
                 steps_per_s=(steps - start - 1) / max(t_train - t_compile, 1e-9))
  if start:
    metrics["resumed_at_step"] = start  # the timings are this process's
  log(f"pretrain[{size}] done in {metrics['time_total_s']:.1f}s (data {t_data:.1f}s, compile {t_compile:.1f}s, "
      f"train {t_train:.1f}s)")
  return cfg, jax.tree_util.tree_map(jnp.asarray, params["vilt"]), metrics


# ---------------------------------------------------------------------------------------------------- cache


def _tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
  """What of a tokenizer shapes pretraining: its vocabulary (when exposed), specials and corpus encoding."""
  vocab = getattr(tokenizer, "vocab", None)
  inner = getattr(tokenizer, "tokenizer", None)
  if vocab is None and hasattr(inner, "get_vocab"):
    vocab = sorted(inner.get_vocab().items(), key=lambda kv: kv[1])
  probe = tokenizer(synthetic.vocabulary(), max_length=8)["input_ids"]
  return dict(vocab=list(vocab) if vocab is not None else None, vocab_size=int(tokenizer.vocab_size),
              specials=[int(getattr(tokenizer, f"{n}_token_id")) for n in ("pad", "cls", "sep", "mask")],
              probe=hashlib.sha256(np.asarray(probe, np.int64).tobytes()).hexdigest())


def cache_key(size: str, tokenizer, **hparams) -> str:
  """'vilt-<size>-<16 hex>' from the size, every pretraining hyperparameter and the tokenizer."""
  blob = json.dumps(dict(version=FORMAT_VERSION, size=size, hparams=hparams,
                         tokenizer=_tokenizer_fingerprint(tokenizer)), sort_keys=True, default=str)
  return f"vilt-{size}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OSError):
    return True
  return True


def _clean_stale(cache_dir: str, key: str) -> None:
  """Removes temp dirs of `key` left by dead writers, and an entry that lacks its completion marker."""
  for name in os.listdir(cache_dir):
    if name.startswith(f".tmp-{key}-"):
      try:
        pid = int(name[len(f".tmp-{key}-"):].split("-")[0])
      except ValueError:
        pid = -1
      if pid <= 0 or not _pid_alive(pid):
        shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
  final = os.path.join(cache_dir, key)
  if os.path.isdir(final) and not os.path.exists(os.path.join(final, _COMPLETE)):
    shutil.rmtree(final, ignore_errors=True)


def _abstract_params(cfg: vilt_lib.ViltConfig):
  s = cfg.image_size
  init = lambda: vilt_lib.ViLT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                                          jnp.ones((1, 8), jnp.int32), jnp.zeros((1, s, s, 3)),
                                          jnp.ones((1, s, s), bool))["params"]
  return jax.eval_shape(init)


def save_backbone(path: str, cfg: vilt_lib.ViltConfig, params, metrics: dict) -> None:
  """Writes a cache entry atomically: a temp dir next to `path`, completion marker last, then a rename.

  If another writer got there first, its (equivalent) entry is kept and ours dropped.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  parent, key = os.path.split(path)
  tmp = os.path.join(parent, f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
    ckptr.close()
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(dataclasses.asdict(cfg), f, indent=1)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
      json.dump({k: float(v) for k, v in metrics.items()}, f, indent=1)
    with open(os.path.join(tmp, _COMPLETE), "w") as f:
      f.write("ok\n")
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.exists(os.path.join(path, _COMPLETE)):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_backbone(path: str):
  """-> (ViltConfig, params, metrics) of a complete cache entry written by `save_backbone`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  if not os.path.exists(os.path.join(path, _COMPLETE)):
    raise FileNotFoundError(f"{path} is not a complete pretrained-backbone cache entry")
  with open(os.path.join(path, "config.json")) as f:
    cfg = vilt_lib.ViltConfig(**json.load(f))
  with open(os.path.join(path, "metrics.json")) as f:
    metrics = json.load(f)
  ckptr = ocp.StandardCheckpointer()
  params = ckptr.restore(os.path.join(path, "params"), _abstract_params(cfg))
  ckptr.close()
  return cfg, params, metrics


def load_cached(path: str):
  """`load_backbone` for an entry found in the cache: a damaged one is a one-line ConfigError naming it."""
  try:
    return load_backbone(path)
  except Exception as e:  # orbax, JSON and the config raise many types for damaged files
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConfigError(f"the cached pretrained backbone {path} is damaged ({type(e).__name__}: {first}); delete that "
                      "directory and rerun to pretrain it again") from None


def backbone_hparams(size: str, *, steps: Optional[int] = None, batch_size: Optional[int] = None, seed: int = 0,
                     image_size: Optional[int] = None, patch_size: Optional[int] = None, text_len: int = 40,
                     lr: Optional[float] = None, corpus_size: Optional[int] = None, eval_size: int = 128,
                     mask_prob: Optional[float] = None, visual_mask_prob: Optional[float] = None,
                     hard_negatives: Optional[float] = None) -> dict[str, Any]:
  """Every pretraining hyperparameter after defaults (DEFAULTS[size]), as `pretrain` takes them and as the cache
  key hashes them (options at their old defaults are left out, so older entries keep their names)."""
  steps, batch_size, lr, image_size, mask_prob = _resolve(size, steps, batch_size, lr, image_size, mask_prob)
  d = DEFAULTS[size]
  hparams = dict(steps=steps, batch_size=batch_size, seed=seed, image_size=image_size, text_len=text_len,
                 lr=lr, corpus_size=corpus_size or d.get("corpus_size"), eval_size=eval_size)
  if patch_size:
    hparams["patch_size"] = patch_size
  if mask_prob != MASK_PROB:
    hparams["mask_prob"] = mask_prob
  for name, value in (("visual_mask_prob", visual_mask_prob), ("hard_negatives", hard_negatives)):
    value = d.get(name, 0.0) if value is None else value
    if value:
      hparams[name] = value
  return hparams


def pretrained_backbone(size: str, tokenizer, *, cache_dir: str, log: Callable[[str], None] = print, **options):
  """(ViltConfig, backbone params): shipped (SHIPPED_DIR), from the cache in `cache_dir`, or `pretrain`ed and
  cached there. options: `backbone_hparams`'s (None or 0: the size's default).

  The entry's name hashes the size, seed, every hyperparameter (after defaults) and the tokenizer, so a
  change of any of them pretrains anew. Entries appear atomically; half-written ones are never loaded.
  """
  _, cfg, params, _ = _backbone_entry(size, tokenizer, cache_dir=cache_dir, log=log, use_shipped=True, **options)
  return cfg, params


def _backbone_entry(size: str, tokenizer, *, cache_dir: str, log: Callable[[str], None], use_shipped: bool,
                    **options):
  """`pretrained_backbone`, the shipped files skipped unless `use_shipped`; -> (key, cfg, params, metrics)."""
  hparams = backbone_hparams(size, **options)
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  os.makedirs(cache_dir, exist_ok=True)
  key = cache_key(size, tokenizer, **hparams)
  if use_shipped and os.path.exists(os.path.join(SHIPPED_DIR, key + ".safetensors")):
    cfg, params, meta = load_shipped(key, SHIPPED_DIR)
    log(f"pretrain[{size}]: loaded the shipped backbone {key} (made by `{meta['command']}` at {meta['commit'][:10]})")
    return key, cfg, params, meta["metrics"]
  path = os.path.join(cache_dir, key)
  _clean_stale(cache_dir, key)
  if os.path.exists(os.path.join(path, _COMPLETE)):
    cfg, params, metrics = load_cached(path)
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("eval_itm_acc", "eval_mlm_acc") if k in metrics)
    log(f"pretrain[{size}]: loaded the pretrained backbone from {path}" + (f" ({summary})" if summary else ""))
    return key, cfg, params, metrics
  # Checkpoints of the training under way, so that a killed pretraining resumes; one process at a time.
  partial = os.path.join(cache_dir, key + ".partial")
  os.makedirs(partial, exist_ok=True)
  try:
    workdir_lock.acquire(partial)
  except workdir_lock.WorkdirLocked as e:
    log(f"pretrain[{size}]: another process is pretraining this backbone ({e}); this one keeps no checkpoints")
    partial = None
  try:
    cfg, params, metrics = pretrain(size, tokenizer, log=log, **{"mask_prob": MASK_PROB, **hparams},
                                    checkpoint_dir=partial and os.path.join(partial, "checkpoints"), fingerprint=key)
    save_backbone(path, cfg, params, metrics)
  finally:
    if partial:
      workdir_lock.release(partial)
  if partial:  # the entry is complete: its checkpoints are spent
    shutil.rmtree(partial, ignore_errors=True)
  log(f"pretrain[{size}]: saved to {path}")
  return key, cfg, params, metrics


# -------------------------------------------------------------------------------------------------- shipped


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def ship_backbone(key: str, cfg: vilt_lib.ViltConfig, params, metrics: dict, *, command: str, commit: str,
                  out_dir: str = SHIPPED_DIR) -> tuple[str, bool]:
  """Writes `params` as <out_dir>/<key>.safetensors (flat "a/b/c" names, float32) and <key>.json.

  -> (the path, whether anything changed). Weights equal bit for bit to those already shipped under `key` leave
  both files alone, so the record keeps naming the commit that first made them.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
  path, record = os.path.join(out_dir, key + ".safetensors"), os.path.join(out_dir, key + ".json")
  save_file(flat, path + ".tmp")
  digest = file_sha256(path + ".tmp")
  if os.path.exists(path) and os.path.exists(record) and file_sha256(path) == digest:
    with open(record) as f:
      if json.load(f).get("sha256") == digest:
        os.remove(path + ".tmp")
        return path, False
  os.replace(path + ".tmp", path)
  meta = dict(key=key, config=dataclasses.asdict(cfg), sha256=digest,
              parameters=int(sum(v.size for v in flat.values())), command=command, commit=commit,
              metrics={k: float(v) for k, v in metrics.items()})
  reporting.write_atomic(record, json.dumps(meta, indent=1))
  return path, True


def ship_pretrained(size: str, tokenizer, *, cache_dir: str, command: str, out_dir: str = SHIPPED_DIR,
                    log: Callable[[str], None] = print, **options) -> str:
  """Pretrains (or loads from `cache_dir`, never from the shipped files) and ships; -> the path.

  The weights already shipped are not the input: shipping them again would stamp the current commit on weights
  an older one made. Pretraining again either reproduces them bit for bit (the record is kept) or replaces them.
  """
  import subprocess  # pylint: disable=g-import-not-at-top

  key, cfg, params, metrics = _backbone_entry(size, tokenizer, cache_dir=cache_dir, log=log, use_shipped=False,
                                              **options)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
  path, changed = ship_backbone(key, cfg, params, metrics, command=command, commit=commit or "unknown",
                                out_dir=out_dir)
  log(f"pretrain[{size}]: shipped {path}" if changed else
      f"pretrain[{size}]: reproduced the shipped {path} bit for bit; its record is kept")
  return path


def load_shipped(key: str, shipped_dir: str = SHIPPED_DIR):
  """-> (ViltConfig, params, meta) of a shipped backbone, its weights checked against the recorded sha256."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  path = os.path.join(shipped_dir, key + ".safetensors")
  with open(os.path.join(shipped_dir, key + ".json")) as f:
    meta = json.load(f)
  digest = file_sha256(path)
  if digest != meta["sha256"]:
    raise ConfigError(f"the shipped backbone {path} does not match its recorded sha256 ({digest[:12]} vs "
                      f"{meta['sha256'][:12]}); restore it with `git checkout -- {path}`")
  cfg = vilt_lib.ViltConfig(**meta["config"])
  flat = load_file(path)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
  want = jax.tree_util.tree_structure(_abstract_params(cfg))
  if jax.tree_util.tree_structure(params) != want:
    raise ConfigError(f"the shipped backbone {path} does not hold a ViLT of its recorded config; restore it with "
                      f"`git checkout -- {path}`")
  return cfg, params, meta


def main(argv=None):
  """python -m feddat_jax.pretrain --size=mini --ship: pretrain (or load from the cache) and ship the weights."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from feddat_jax.data.tokenizer import SyntheticTokenizer  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog="python -m feddat_jax.pretrain", description=main.__doc__)
  parser.add_argument("--size", default="mini", choices=sorted(DEFAULTS))
  parser.add_argument("--text_len", type=int, default=40, help="text positions (the configs' text_len)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps (default: the size's, DEFAULTS); a killed run resumes from its checkpoints")
  parser.add_argument("--cache_dir", default="~/.cache/feddat_jax/foundation")
  parser.add_argument("--ship", action="store_true", help=f"also write the weights to {SHIPPED_DIR}")
  args = parser.parse_args(argv)
  tok = SyntheticTokenizer()
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps={args.steps} must be at least 1")
  options = dict(text_len=args.text_len, steps=args.steps)
  if args.ship:
    ship_pretrained(args.size, tok, cache_dir=args.cache_dir, log=lambda line: print(line, file=sys.stderr),
                    command=f"python -m feddat_jax.pretrain --size={args.size}"
                    + (f" --steps={args.steps}" if args.steps else "") + " --ship", **options)
  else:
    pretrained_backbone(args.size, tok, cache_dir=args.cache_dir, **options)


if __name__ == "__main__":
  main()
