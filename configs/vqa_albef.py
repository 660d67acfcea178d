"""The paper's ALBEF setting: a local copy of the official `ALBEF.pth` (14M pretraining checkpoint), its BERT
tokenizer and the real datasets.

  python -m feddat_jax.main \
      --config=configs/vqa_albef.py:ckpt=/ckpt/ALBEF.pth,tokenizer=/ckpt/bert-base-uncased,data=/data/feddat

`ckpt`: the PyTorch state dict ALBEF's authors released (read with torch.load(weights_only=True); its position
embeddings are interpolated to 384 and the answer decoder is initialised from the last text-encoder layers, as
ALBEF's VQA finetuning does); `tokenizer`: a directory with bert-base-uncased's vocab.txt; `data`: the real
datasets in their official formats (feddat_jax/data/builders). Hyperparameters are the released ALBEF script's
(the released ALBEF scripts, docs/released_code.md: 20 rounds, batch 2, lr 1e-4, 100 candidates, top-64 ranking).
"""
import importlib.util
import os

from feddat_jax import config_utils


def get_config(arg=None):
  a = config_utils.parse_arg(arg, ckpt="", tokenizer="", data="", benchmark="domain", algorithm="feddat", seed=2)
  if not a["ckpt"] or not a["tokenizer"] or not a["data"]:
    raise ValueError("configs/vqa_albef.py needs ckpt=<local ALBEF.pth>,tokenizer=<local bert-base-uncased dir>,"
                     "data=<real data dir>")
  spec = importlib.util.spec_from_file_location("_vqa", os.path.join(os.path.dirname(__file__), "vqa.py"))
  vqa = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(vqa)
  c = vqa.get_config(f"benchmark={a['benchmark']},algorithm={a['algorithm']},size=base,data={a['data']},"
                     f"backbone=albef:{a['ckpt']},seed={a['seed']}")
  c.albef.tokenizer = a["tokenizer"]
  c.rounds = 20  # the ALBEF script's default
  c.batch_size = 2
  c.optim.lr = 1e-4
  c.image_size = 384  # ALBEF's VQA resolution (the checkpoint's 256 position grid is interpolated)
  c.albef.answer_len = 10
  return c
