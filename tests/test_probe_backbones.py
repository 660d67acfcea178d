"""benchmarks/probe_backbones.py: the linear probe learns what features carry and not what they lack, the
features have the documented width, and bad backbone names are one-line errors (tiny shapes: seconds)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from feddat_jax.data.tokenizer import SyntheticTokenizer
from feddat_jax.models import vilt

import helpers


@pytest.fixture(scope="module")
def probe():
  return helpers.load_script("probe_backbones")


def test_linear_probe_reads_a_feature_that_carries_the_label_and_not_noise(probe):
  rng = np.random.default_rng(0)
  y_tr, y_te = rng.integers(0, 3, 600), rng.integers(0, 3, 300)
  noise = lambda n: rng.normal(size=(n, 8)).astype(np.float32)
  informative = lambda y: noise(len(y)) + 4.0 * np.eye(8, dtype=np.float32)[y]
  got = probe.linear_probe(informative(y_tr), y_tr, informative(y_te), y_te, 3, steps=200)
  blind = probe.linear_probe(noise(600), y_tr, noise(300), y_te, 3, steps=200)
  assert got["test_acc"] > 0.95 and blind["test_acc"] < 0.5, (got, blind)


def test_features_are_pooled_mean_max_and_quadrants(probe):
  cfg = vilt.ViltConfig.preset("tiny", vocab_size=SyntheticTokenizer().vocab_size, patch_size=8)
  s = cfg.image_size
  params = vilt.ViLT(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
                               jnp.zeros((1, s, s, 3)), jnp.ones((1, s, s), bool))["params"]
  images = np.random.default_rng(0).integers(0, 255, (5, s, s, 3), dtype=np.uint8)
  f = probe.features(cfg, params, images, batch=4)  # a padded last batch
  assert f.shape == (5, 7 * cfg.hidden_size) and np.isfinite(f).all()
  np.testing.assert_allclose(f[:4], probe.features(cfg, params, images[:4], batch=4), atol=1e-5)


@pytest.mark.parametrize("spec", ["base", "huge", "mini_pretrained", "tiny_random_x"])
def test_unknown_backbones_are_usage_errors(probe, spec):
  with pytest.raises(app.UsageError, match=f"unknown backbone '{spec}'"):
    probe.parse_backbone(spec)
  assert probe.parse_backbone("mini") == ("mini", True) and probe.parse_backbone("tiny_random") == ("tiny", False)
