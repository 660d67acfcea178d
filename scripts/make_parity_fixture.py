"""Writes the torch-free ViLT parity fixture: a tiny random HF checkpoint, its tokenizer, inputs and outputs.

Run once (needs torch and transformers, no network); the outputs are committed under tests/fixtures/:
  tiny_vilt/            config.json + model.safetensors (transformers' save_pretrained) + tokenizer files
  tiny_vilt_parity.npz  inputs, HF's last_hidden_state and pooler_output, and HF's image-token order

HF's `visual_embed` shuffles the valid patches of the image with most valid patches and pads the others with
randomly drawn masked patches, so the script records which grid patch every HF image token came from
(`patch_index`, returned by `visual_embed`) by wrapping that method; tests compare valid tokens through it.

Usage:
  python scripts/make_parity_fixture.py [--out tests/fixtures]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# The tiny preset of feddat_jax.models.vilt.PRESETS, with a small vocabulary and text length.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
            patch_size=16, max_position_embeddings=16)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("a the is are of on in what how many color red blue green white black man woman dog cat car "
         "table left right two three yes no there picture photo sky street animal person sitting standing "
         "holding wearing shirt hat ?").split()
PIECES = ["##s", "##ing", "##ed", "##er", "##ly", "##y", "##es", "##en", "##e", "##a", "##o", "##t", "##n",
          "##r", "##d", "##i", "##l"]
VOCAB = SPECIALS + WORDS + PIECES  # 64 tokens
SENTENCES = ["what color is the dog ?", "how many cats are on the table ?", "is there a man ?"]
TEXT_LEN = 12
SEED = 0
# Batch images are 64 x 96 (a 4 x 6 patch grid, larger than the pretrained 4 x 4 one). Valid pixel regions,
# (rows, cols) from the top left: all of it; the square part; fewer valid rows *and* columns, not multiples
# of the patch size (40 x 70 pixels -> 3 x 5 patches under nearest resizing of the mask).
IMAGE_HW = (64, 96)
VALID_HW = [(64, 96), (64, 64), (40, 70)]


def tiny_hf_config(vocab_size: int = len(VOCAB)):
  return transformers.ViltConfig(vocab_size=vocab_size, **TINY)


def randomize_(model, seed: int = SEED, std: float = 0.1):
  """Every parameter random (HF zero-initialises cls_token/position_embeddings and LayerNorm to 1/0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      is_ln_scale = name.endswith(".weight") and ("LayerNorm" in name or "layernorm" in name)
      if "position_embeddings" in name and "text" not in name:
        noise = noise * 5  # large, so that a wrong position-embedding resize shows
      p.copy_(1.0 + noise if is_ln_scale else noise)
  return model


def make_inputs(tokenizer, seed: int = SEED):
  """numpy inputs: ids/mask [B, L] int64, pixels uint8 [B, H, W, 3], pixel_mask [B, H, W] int64."""
  enc = tokenizer(SENTENCES, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="np")
  rng = np.random.default_rng(seed)
  b, (h, w) = len(SENTENCES), IMAGE_HW
  pixels = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
  pixel_mask = np.zeros((b, h, w), np.int64)
  for i, (vh, vw) in enumerate(VALID_HW):
    pixel_mask[i, :vh, :vw] = 1
  return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
          "pixels": pixels, "pixel_mask": pixel_mask}


def normalize(pixels_uint8):
  """uint8 [.., H, W, 3] -> float32 in [-1, 1], the same arithmetic in the script and the tests."""
  return pixels_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def run_hf(model, inputs, seed: int = SEED):
  """HF forward on numpy inputs -> dict of numpy arrays.

  The images are `inputs["pixel_values"]` (float32 [B, H, W, 3], already normalised) when present, else
  `normalize(inputs["pixels"])`.

  Keys: last_hidden_state, pooler_output; image_index [B, K]: row * grid_w + col of the patch each HF image
  token (after the image CLS) came from; image_mask [B, K]; image_embeds [B, K, d]: those tokens after
  `visual_embed` (patch + position embeddings, before the modality type).
  """
  record = {}
  pixel_values = inputs.get("pixel_values")
  if pixel_values is None:
    pixel_values = normalize(inputs["pixels"])
  original = model.embeddings.visual_embed

  def recording_visual_embed(*args, **kwargs):
    x, x_mask, (patch_index, (_, grid_w)) = out = original(*args, **kwargs)
    record["index"] = (patch_index[..., 0] * grid_w + patch_index[..., 1]).numpy()
    record["mask"] = x_mask[:, 1:].numpy()
    record["image_embeds"] = x[:, 1:].detach().numpy()  # patch + position embeddings of the kept patches
    return out

  model.embeddings.visual_embed = recording_visual_embed
  try:
    torch.manual_seed(seed)
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(inputs["input_ids"]),
                  attention_mask=torch.from_numpy(inputs["attention_mask"]),
                  pixel_values=torch.from_numpy(pixel_values).permute(0, 3, 1, 2),
                  pixel_mask=torch.from_numpy(inputs["pixel_mask"]))
  finally:
    del model.embeddings.visual_embed
  return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy(),
          "image_index": record["index"].astype(np.int32), "image_mask": record["mask"].astype(np.int32),
          "image_embeds": record["image_embeds"]}


def build_tokenizer():
  return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
  args = parser.parse_args()
  ckpt = os.path.join(args.out, "tiny_vilt")
  torch.manual_seed(SEED)
  model = randomize_(transformers.ViltModel(tiny_hf_config())).eval()
  model.save_pretrained(ckpt, safe_serialization=True)
  tokenizer = build_tokenizer()
  tokenizer.save_pretrained(ckpt)
  inputs = make_inputs(tokenizer)
  hf = run_hf(model, inputs)
  np.savez_compressed(os.path.join(args.out, "tiny_vilt_parity.npz"), **inputs,
                      last_hidden_state=hf["last_hidden_state"], pooler_output=hf["pooler_output"],
                      hf_image_index=hf["image_index"], hf_image_mask=hf["image_mask"],
                      sentences=np.array(SENTENCES))
  print(f"wrote {os.path.normpath(ckpt)} and tiny_vilt_parity.npz: last_hidden_state "
        f"{hf['last_hidden_state'].shape}, image tokens {hf['image_index'].shape}")


if __name__ == "__main__":
  main()
