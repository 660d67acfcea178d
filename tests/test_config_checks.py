"""config_checks: every numeric field of configs/vqa.py has a range, and a value outside it is one line naming
the field, the value and the range (the CLI cases are in tests/test_bad_input.py)."""
import os

import pytest

from feddat_jax import config_checks, config_utils, experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base():
  return config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random"))


def _with(base, **values):
  config = base.copy_and_resolve_references()
  for name, value in values.items():
    *parents, leaf = name.split("__")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_defaults_pass():
  for arg in ("", ":runlocal=true", ":backbone=albef", ":size=small,backbone=random"):
    config_checks.check(config_utils.load_config(os.path.join(REPO, "configs/vqa.py" + arg)))


def test_every_numeric_field_has_a_range(base):
  """A new numeric field needs its range in config_checks.RANGES (where it is added)."""
  missing = sorted(set(config_checks.numeric_fields(base)) - set(config_checks.RANGES))
  assert not missing, f"add these fields to config_checks.RANGES: {missing}"


@pytest.mark.parametrize("field,value,words", [
    ("optim__lr", float("nan"), ["optim.lr=nan", "finite", "> 0"]),
    ("optim__lr", 0.0, ["optim.lr=0.0", "> 0"]),
    ("optim__b1", 1.5, ["optim.b1=1.5", "[0, 1)"]),
    ("optim__b2", 1.0, ["optim.b2=1.0", "[0, 1)"]),
    ("optim__eps", float("inf"), ["optim.eps=inf", "finite"]),
    ("options__temperature", 0.0, ["options.temperature=0.0", "> 0"]),
    ("seed", -1, ["seed=-1", ">= 0"]),
    ("synthetic__scale", 0.0, ["synthetic.scale=0.0", "> 0"]),
    ("synthetic__image_size", 0, ["synthetic.image_size=0", "> 0"]),
    ("optim__warmup_frac", 1.5, ["optim.warmup_frac=1.5", "[0, 1]"]),
    ("peft__lora_rank", 0, ["peft.lora_rank=0", "> 0"]),
    ("distributed__num_processes", 0, ["distributed.num_processes=0", ">= 1"]),
    ("image_size", 50, ["image_size=50", "patch_size=16"]),
])
def test_out_of_range_is_one_line(base, field, value, words):
  config = _with(base, **{field: value}, **({"patch_size": 16} if field == "image_size" else {}))
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(config)
  msg = str(e.value)
  assert "\n" not in msg and all(w in msg for w in words), msg


def test_population(base):
  with pytest.raises(config_checks.ConfigError, match=r"cohort_size=8 exceeds the 5 clients"):
    config_checks.check_population(_with(base, cohort_size=8), 5)
  config_checks.check_population(_with(base, cohort_size=5), 5)


def test_backbone_fit():
  with pytest.raises(config_checks.ConfigError, match=r"tokenizer's 120 token ids do not fit the backbone's 64-row"):
    config_checks.check_backbone(64, 40, 64, 16, tokenizer_vocab=120, text_len=40, what="backbone=hf:x")
  with pytest.raises(config_checks.ConfigError, match=r"text_len=41 exceeds the backbone's 40 positions"):
    config_checks.check_backbone(64, 40, 64, 16, tokenizer_vocab=60, text_len=41, what="backbone=hf:x")
  with pytest.raises(config_checks.ConfigError, match=r"image size 60 is not a multiple of patch size 16"):
    config_checks.check_backbone(64, 40, 60, 16, tokenizer_vocab=60, text_len=40, what="backbone=hf:x")


def test_image_preprocess(base):
  config_checks.check(_with(base, image_preprocess="vilt"))
  with pytest.raises(config_checks.ConfigError, match=r"image_preprocess='letterbox' is not one of \('square', 'vilt'\)"):
    config_checks.check(_with(base, image_preprocess="letterbox"))
  with pytest.raises(config_checks.ConfigError, match=r"image_preprocess=vilt .* ALBEF"):
    config_checks.check(_with(base, image_preprocess="vilt", backbone="albef"))
  vilt_b32 = config_utils.load_config(os.path.join(REPO, "configs/vqa_vilt_b32.py:ckpt=/c,data=/d"))
  assert vilt_b32.image_preprocess == "vilt" and base.image_preprocess == "square"


def test_data_loading(base):
  assert base.data_loading == "memory"
  config_checks.check(_with(base, data_loading="stream"))
  with pytest.raises(config_checks.ConfigError, match=r"data_loading='disk' is not one of \('memory', 'stream'\)"):
    config_checks.check(_with(base, data_loading="disk"))
  # How the host reads the data is not what the run computes: a run may resume with the other loader.
  assert experiment.fingerprint(base) == experiment.fingerprint(_with(base, data_loading="stream"))
  assert experiment.fingerprint(base) == experiment.fingerprint(_with(base, stream_cache_mb=0))
  with pytest.raises(config_checks.ConfigError, match=r"stream_cache_mb=-1 must be >= 0"):
    config_checks.check(_with(base, stream_cache_mb=-1))


def test_backbone_names_parse_to_what_they_name():
  from feddat_jax.models import backbones
  assert backbones.parse("pretrained") == backbones.parse("pretrained_tiny") == backbones.Backbone("pretrained")
  assert backbones.parse("hf:/ckpt") == backbones.Backbone("hf", "/ckpt")
  with pytest.raises(ValueError, match=r"backbone='pretrained_mini': use pretrained \(or its older name"):
    backbones.parse("pretrained_mini")
