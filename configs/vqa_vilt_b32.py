"""The paper's ViLT-B/32 setting: a local `dandelin/vilt-b32-mlm` directory and the real datasets.

  python -m feddat_jax.main \
      --config=configs/vqa_vilt_b32.py:ckpt=/ckpt/vilt-b32-mlm,data=/data/feddat,benchmark=domain

`ckpt`: a directory written by transformers' save_pretrained (model + tokenizer); `data`: a directory holding
each dataset of the benchmark in its official format (see feddat_jax/data/builders). Hyperparameters are the
released scripts' (docs/released_code.md) except what DESIGN changes on purpose (A_C trained every round, one
schedule over the run); the released code's behaviour is one switch away (configs/vqa.py, `options.*`).
"""
import importlib.util
import os

from feddat_jax import config_utils


def get_config(arg=None):
  a = config_utils.parse_arg(arg, ckpt="", data="", benchmark="domain", algorithm="feddat", seed=1)
  if not a["ckpt"] or not a["data"]:
    raise ValueError("configs/vqa_vilt_b32.py needs ckpt=<local vilt-b32-mlm dir>,data=<real data dir>")
  spec = importlib.util.spec_from_file_location("_vqa", os.path.join(os.path.dirname(__file__), "vqa.py"))
  vqa = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(vqa)
  c = vqa.get_config(f"benchmark={a['benchmark']},algorithm={a['algorithm']},size=base,data={a['data']},"
                     f"backbone=hf:{a['ckpt']},seed={a['seed']}")
  c.rounds = 30  # --comm_round 30
  c.batch_size = 2  # the scripts' per-process batch
  c.optim.lr = 1e-4
  c.image_size = 384  # ViLT's shorter side (the checkpoint's own config.json says 384 too)
  # As ViltImageProcessor: shorter side 384, longer at most 640, multiples of 32, a pixel mask; one padded canvas
  # per run, the smallest of 384x384, 384x608, 608x384, 608x608 holding every image (docs/real_data.md).
  c.image_preprocess = "vilt"
  return c
