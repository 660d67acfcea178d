"""The tiny foundation model: objectives, a few optimisation steps, the atomic on-disk cache, loading into the VLM."""
import io
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feddat_jax import checkpoint
from feddat_jax import pretrain
from feddat_jax.config_checks import ConfigError
from feddat_jax.data import synthetic
from feddat_jax.data.tokenizer import SyntheticTokenizer
from feddat_jax.models import peft
from feddat_jax.models import vilt
from feddat_jax.models import vlm

# Every pretraining run here has these shapes, so the train step compiles once per session (or comes from
# the persistent compilation cache).
TINY = dict(steps=3, batch_size=8, corpus_size=16, eval_size=0, seed=0)


@pytest.fixture(scope="module")
def tok():
  return SyntheticTokenizer()


@pytest.fixture(scope="module")
def cached(tok, tmp_path_factory):
  """A cache dir holding one tiny entry, the params that the first (training) call returned and its log."""
  cache_dir = str(tmp_path_factory.mktemp("foundation"))
  lines = []
  cfg, params = pretrain.pretrained_backbone("tiny", tok, cache_dir=cache_dir, log=lines.append, **TINY)
  return cache_dir, cfg, params, lines


def _trained(lines):
  return any(" step " in line for line in lines)


def _leaves_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(fa, fb))


def test_bert_mask_rates():
  ids = jnp.full((64, 128), 7, jnp.int32)
  candidates = jnp.ones(ids.shape, bool).at[:, :4].set(False)
  masked, picked = pretrain.bert_mask(jax.random.PRNGKey(0), ids, candidates, mask_token_id=4, vocab_size=200)
  assert not bool(picked[:, :4].any())  # never a non-candidate
  assert 0.13 < float(picked.mean()) / float(candidates.mean()) < 0.17
  as_mask = float(((masked == 4) & picked).sum() / picked.sum())
  assert 0.75 < as_mask < 0.85  # 80% [MASK]; the rest random (10%) or kept (10%)
  assert bool((masked[~picked] == 7).all())


def test_itm_pairs_never_pair_an_image_with_itself():
  ids = jnp.arange(32 * 5, dtype=jnp.int32).reshape(32, 5)  # distinct captions
  pairs = jax.jit(pretrain.make_itm_pairs)
  for seed in range(5):
    image_idx, labels = pairs(jax.random.PRNGKey(seed), ids)
    np.testing.assert_array_equal(labels, (image_idx == jnp.arange(32)).astype(jnp.int32))
  same = jnp.ones((8, 5), jnp.int32)  # identical captions describe every image: always a match
  _, labels = pairs(jax.random.PRNGKey(0), same)
  assert bool((labels == 1).all())


def test_steps_reduce_loss_on_a_fixed_batch(tok):
  cfg = vilt.ViltConfig.preset("tiny", vocab_size=tok.vocab_size)
  data = pretrain.encode_corpus(synthetic.caption_corpus(TINY["batch_size"], seed=1), tok, image_size=64,
                                text_len=40)
  assert data["input_ids"].shape[1] < 40  # trailing all-padding columns dropped
  opt = pretrain.make_optimizer(3e-3, 100)
  params = pretrain.init_params(cfg, jax.random.PRNGKey(0))
  step = pretrain.make_train_step(cfg, tok, opt)
  state = dict(params=params, opt_state=opt.init(params))
  rng = jax.random.PRNGKey(1)  # same masks and negatives every step: the same objective
  losses = []
  for _ in range(12):
    state, m = step(state, data, rng)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0], losses


def test_pretrained_backbone_is_cached(cached, tok, monkeypatch):
  cache_dir, cfg, params, lines = cached
  assert _trained(lines)
  entries = [n for n in os.listdir(cache_dir) if not n.startswith(".")]
  assert len(entries) == 1 and os.path.exists(os.path.join(cache_dir, entries[0], "COMPLETE"))
  assert not [n for n in os.listdir(cache_dir) if n.startswith(".tmp")]

  def no_training(*a, **k):
    raise AssertionError("the second call must load from the cache")

  monkeypatch.setattr(pretrain, "pretrain", no_training)
  lines2 = []
  cfg2, params2 = pretrain.pretrained_backbone("tiny", tok, cache_dir=cache_dir, log=lines2.append, **TINY)
  assert not _trained(lines2) and any("loaded" in line for line in lines2)
  assert cfg2 == cfg
  assert _leaves_equal(params2, params)


def test_a_killed_pretraining_resumes_bitwise(tok, tmp_path, monkeypatch):
  opts = dict(TINY, steps=6, log_every=2)
  _, want, _ = pretrain.pretrain("tiny", tok, log=lambda line: None, **opts)
  real, calls = pretrain.make_train_step, []

  def dying(*args, **kwargs):
    step = real(*args, **kwargs)

    def killed_at_the_fifth_step(state, batch, rng):
      calls.append(1)
      if len(calls) == 5:  # after the checkpoint of step 4
        raise KeyboardInterrupt
      return step(state, batch, rng)
    return killed_at_the_fifth_step

  ckpt = str(tmp_path / "checkpoints")
  monkeypatch.setattr(pretrain, "make_train_step", dying)
  with pytest.raises(KeyboardInterrupt):
    pretrain.pretrain("tiny", tok, log=lambda line: None, checkpoint_dir=ckpt, fingerprint="this", **opts)
  monkeypatch.setattr(pretrain, "make_train_step", real)
  lines = []
  _, got, metrics = pretrain.pretrain("tiny", tok, log=lines.append, checkpoint_dir=ckpt, fingerprint="this", **opts)
  assert any("resuming at step 4/6" in line for line in lines) and metrics["resumed_at_step"] == 4
  assert _leaves_equal(got, want)
  with pytest.raises(checkpoint.CheckpointError, match="another config"):
    pretrain.pretrain("tiny", tok, log=lambda line: None, checkpoint_dir=ckpt, fingerprint="other", **opts)


def test_pretraining_shows_a_progress_bar(tok, monkeypatch):
  """A tqdm bar over the steps (shown on a terminal; forced on here), its postfix the latest losses."""
  out = io.StringIO()
  bars = []

  class Bar(pretrain.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **{**kwargs, "disable": False, "file": out})
      bars.append(self)

  monkeypatch.setattr(pretrain, "tqdm", Bar)
  lines = []
  pretrain.pretrain("tiny", tok, log=lines.append, **TINY)
  (bar,) = bars
  assert bar.n == bar.total == TINY["steps"]
  text = out.getvalue()
  assert "pretrain[tiny]" in text and f"{TINY['steps']}/{TINY['steps']}" in text and "mlm=" in text
  assert _trained(lines)  # the log lines still come


def test_cache_key_depends_on_hyperparameters_and_tokenizer(tok):
  base = pretrain.cache_key("tiny", tok, steps=3, seed=0)
  assert base == pretrain.cache_key("tiny", SyntheticTokenizer(), steps=3, seed=0)
  assert base != pretrain.cache_key("tiny", tok, steps=4, seed=0)
  assert base != pretrain.cache_key("tiny", tok, steps=3, seed=1)
  assert base != pretrain.cache_key("small", tok, steps=3, seed=0)
  assert base != pretrain.cache_key("tiny", SyntheticTokenizer(extra_words=["zebra"]), steps=3, seed=0)


def test_masking_rate_reaches_pretraining_and_names_the_cache_entry(tok, tmp_path, monkeypatch):
  """ViLT's 0.15 unless another rate is given; only another rate enters the entry's name (older entries keep
  theirs)."""
  seen = []

  def fake_pretrain(size, tokenizer, *, mask_prob, log, **hparams):
    seen.append(mask_prob)
    raise RuntimeError("stop before training")

  monkeypatch.setattr(pretrain, "pretrain", fake_pretrain)
  names = []
  monkeypatch.setattr(pretrain, "cache_key", lambda size, tokenizer, **hp: names.append(hp) or "entry")
  for rate in (None, 0.15, 0.6):
    with pytest.raises(RuntimeError, match="stop before training"):
      pretrain.pretrained_backbone("tiny", tok, cache_dir=str(tmp_path), mask_prob=rate, **TINY)
  assert seen == [0.15, 0.15, 0.6]
  assert names[0] == names[1] and "mask_prob" not in names[0] and names[2] == dict(names[0], mask_prob=0.6)
  with pytest.raises(ValueError, match="mask_prob=1.5 must be in"):
    pretrain.pretrained_backbone("tiny", tok, cache_dir=str(tmp_path), mask_prob=1.5, **TINY)


def test_partial_and_temp_entries_are_never_loaded(cached, tok, tmp_path):
  src_dir, _, params, _ = cached
  (key,) = [n for n in os.listdir(src_dir) if not n.startswith(".")]
  # A half-written entry (no completion marker) and a dead writer's temp dir with a complete-looking entry.
  partial = tmp_path / key
  partial.mkdir()
  (partial / "config.json").write_text("{not json")
  stale = tmp_path / f".tmp-{key}-999999999-deadbeef"
  stale.mkdir()
  (stale / "COMPLETE").write_text("ok\n")
  lines = []
  cfg, params2 = pretrain.pretrained_backbone("tiny", tok, cache_dir=str(tmp_path), log=lines.append, **TINY)
  assert _trained(lines)
  assert not stale.exists()
  assert (partial / "COMPLETE").exists()  # replaced by a complete entry
  assert _leaves_equal(params2, params)  # deterministic: the same as the first run's
  with pytest.raises(FileNotFoundError):
    pretrain.load_backbone(str(tmp_path / "missing"))


def test_damaged_cache_entry_is_one_line_naming_it(cached, tok, tmp_path):
  src_dir = cached[0]
  (key,) = [n for n in os.listdir(src_dir) if not n.startswith(".")]
  shutil.copytree(os.path.join(src_dir, key), tmp_path / key)
  (tmp_path / key / "config.json").write_text('{"hidden_size": 6')  # cut short
  with pytest.raises(ConfigError) as e:
    pretrain.pretrained_backbone("tiny", tok, cache_dir=str(tmp_path), **TINY)
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path / key) in msg and "delete that directory" in msg, msg


def test_params_load_into_the_vision_language_model(cached):
  _, cfg, params, _ = cached
  ref = vilt.ViLT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32),
                            jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 64, 64), bool))["params"]
  assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(params)
  model = vlm.VisionLanguageModel(cfg, peft.PeftConfig("adapter"), num_answers=5)
  full = jax.jit(model.init)(jax.random.PRNGKey(1), pretrained=params)
  frozen, trainable = peft.split(full["backbone"], "adapter")
  assert _leaves_equal(frozen, params)  # every backbone leaf is the pretrained one; only adapters are new
  assert trainable and "adapter" in trainable["encoder"]["layer_0"]
  feats = jax.jit(model.features)(full["backbone"], model.dummy_batch(2))
  assert feats.shape == (2, 1, cfg.hidden_size) and bool(jnp.isfinite(feats).all())


def test_visual_words_get_their_own_masking_rate(tok):
  vis = np.concatenate(list(pretrain.visual_word_ids(tok).values()))
  words = np.asarray(tok(["red", "circle", "small", "left", "and", "the"], max_length=4)["input_ids"])[:, 1]
  assert np.isin(words[:4], vis).all() and not np.isin(words[4:], vis).any()
  ids = jnp.asarray(np.tile(words, (512, 1)))
  prob = jnp.where(jnp.isin(ids, vis), 0.5, 0.15)
  _, picked = pretrain.bert_mask(jax.random.PRNGKey(0), ids, jnp.ones(ids.shape, bool), 4, 200, prob)
  rates = np.asarray(picked.mean(0))
  assert (np.abs(rates[:4] - 0.5) < 0.08).all() and (np.abs(rates[4:] - 0.15) < 0.06).all(), rates


def test_hard_negatives_are_false_captions_of_the_same_image(tok):
  corpus = synthetic.caption_corpus(64, seed=0)
  assert all(ex["negative"] != ex["caption"] for ex in corpus)
  assert all(len(ex["negative"].split()) == len(ex["caption"].split()) for ex in corpus)  # one word swapped
  cfg = vilt.ViltConfig.preset("tiny", vocab_size=tok.vocab_size)
  data = pretrain.encode_corpus(corpus[:TINY["batch_size"]], tok, image_size=64, text_len=40, with_negatives=True)
  assert data["negative_ids"].shape == data["input_ids"].shape
  opt = pretrain.make_optimizer(3e-3, 100)
  params = pretrain.init_params(cfg, jax.random.PRNGKey(0))
  step = pretrain.make_train_step(cfg, tok, opt, visual_mask_prob=0.5, hard_negatives=1.0)
  state, m = step(dict(params=params, opt_state=opt.init(params)), data, jax.random.PRNGKey(1))
  assert np.isfinite(float(m["loss"])) and 0.0 <= float(m["itm_acc"]) <= 1.0


def test_shipped_backbone_round_trips_and_checks_its_checksum(cached, tok, tmp_path, monkeypatch):
  cache_dir, cfg, params, _ = cached
  (key,) = [n for n in os.listdir(cache_dir) if not n.startswith(".")]
  path, changed = pretrain.ship_backbone(key, cfg, params, {"eval_itm_acc": 0.5}, command="cmd", commit="abc",
                                         out_dir=str(tmp_path))
  assert changed
  cfg2, params2, meta = pretrain.load_shipped(key, str(tmp_path))
  assert cfg2 == cfg and _leaves_equal(params2, params) and meta["command"] == "cmd"
  # pretrained_backbone prefers a shipped entry of the same key: no training, no cache entry.
  monkeypatch.setattr(pretrain, "SHIPPED_DIR", str(tmp_path))
  monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
  lines = []
  _, params3 = pretrain.pretrained_backbone("tiny", tok, cache_dir=str(tmp_path / "empty"), log=lines.append, **TINY)
  assert _leaves_equal(params3, params) and "shipped" in lines[0]
  blob = bytearray(open(path, "rb").read())
  blob[-1] ^= 1
  open(path, "wb").write(bytes(blob))
  with pytest.raises(ConfigError) as e:
    pretrain.load_shipped(key, str(tmp_path))
  assert "\n" not in str(e.value) and "sha256" in str(e.value) and "git checkout" in str(e.value)


def test_shipping_again_pretrains_and_keeps_the_record_of_equal_weights(cached, tok, tmp_path, monkeypatch):
  """`--ship` never re-exports the shipped file (that would stamp today's commit on older weights): it pretrains
  (here: loads the cache entry), keeps the record when the weights come out bit for bit the same, and replaces
  weights that differ."""
  cache_dir, cfg, params, _ = cached
  (key,) = [n for n in os.listdir(cache_dir) if not n.startswith(".")]
  out = str(tmp_path)
  pretrain.ship_backbone(key, cfg, params, {"eval_itm_acc": 0.5}, command="first", commit="a" * 40, out_dir=out)
  monkeypatch.setattr(pretrain, "SHIPPED_DIR", out)
  lines = []
  pretrain.ship_pretrained("tiny", tok, cache_dir=cache_dir, command="again", out_dir=out, log=lines.append, **TINY)
  _, params2, meta = pretrain.load_shipped(key, out)
  assert _leaves_equal(params2, params) and (meta["command"], meta["commit"]) == ("first", "a" * 40)
  assert "bit for bit" in lines[-1] and not os.path.exists(os.path.join(out, key + ".safetensors.tmp"))
  # Different weights shipped under the key (or a damaged file): pretraining replaces them, with a new record.
  pretrain.ship_backbone(key, cfg, jax.tree_util.tree_map(lambda x: x + 1, params), {}, command="other",
                         commit="b" * 40, out_dir=out)
  pretrain.ship_pretrained("tiny", tok, cache_dir=cache_dir, command="again", out_dir=out, log=lines.append, **TINY)
  _, params3, meta = pretrain.load_shipped(key, out)
  assert _leaves_equal(params3, params) and meta["command"] == "again"
  assert lines[-1].startswith("pretrain[tiny]: shipped ")
  assert not _trained(lines)  # from the cache entry, not from the shipped file and not pretrained again


def test_the_shipped_mini_backbone_is_the_one_the_default_job_asks_for(tok):
  """The weights in the package load, match their recorded sha256 and hold a mini ViLT, and their name is the
  cache key of the default config's request (size mini, backbone pretrained), so the default job loads them
  instead of pretraining for 40 minutes."""
  from feddat_jax import config_utils
  config = config_utils.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "vqa.py"))
  assert (config.size, config.backbone) == ("mini", "pretrained")
  key = pretrain.cache_key("mini", tok, **pretrain.backbone_hparams(
      "mini", steps=config.pretrain.steps or None, text_len=config.text_len, image_size=config.image_size or None,
      patch_size=config.patch_size or None, mask_prob=config.pretrain.mask_prob or None))
  cfg, params, meta = pretrain.load_shipped(key)
  assert cfg == vilt.ViltConfig.preset("mini", vocab_size=tok.vocab_size)
  assert meta["command"] == "python -m feddat_jax.pretrain --size=mini --ship" and len(meta["commit"]) == 40
  assert meta["parameters"] == sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  assert meta["metrics"]["eval_mlm_acc_color"] > 3 * meta["metrics"]["eval_mlm_acc_color_blank"]  # it sees colours


def test_the_command_line_passes_steps_and_refuses_nonsense(monkeypatch, capsys):
  seen = {}
  monkeypatch.setattr(pretrain, "pretrained_backbone", lambda size, tok, **kw: seen.update(kw, size=size) or (0, 0))
  pretrain.main(["--size=tiny", "--steps=7", "--cache_dir=/nowhere"])
  assert seen == dict(size="tiny", cache_dir="/nowhere", text_len=40, steps=7)
  with pytest.raises(SystemExit) as e:
    pretrain.main(["--steps=0"])
  assert e.value.code == 2 and "--steps=0 must be at least 1" in capsys.readouterr().err
