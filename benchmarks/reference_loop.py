"""The released code's FedDAT round in PyTorch, timed beside this project's round on the same shapes.

  python benchmarks/reference_loop.py --size=small --clients=5 --steps=4 --batch=8 --rounds=3 --json

The peer is the reference loop as docs/released_code.md describes it, on transformers' `ViltModel` (needs the
`parity` extra: `pip install -e ".[parity]"`): the clients one after another, each starting from a
`copy.deepcopy` of the global model (backbone included) and a fresh AdamW over its trainable parameters;
per batch three forwards and two backwards (the DAT teacher without gradients, then A_S with the task and
distillation losses and a step, then the DAT through A_C against the A_S logits and a step); then the server
averages A_S. Adapters are bottlenecks (reduction 16) added after each layer's residual; the head is
Linear(d, 2d), LayerNorm, GELU, Linear(2d, A) on the pooler, as in the released ViLT head. Random weights and
inputs of the given shapes (speed does not depend on them), torch's default thread count.

Then, in the same run, `benchmarks/round_throughput.py` with the same shapes and no parallelism flag (what a
user gets by default) in a subprocess. The two loops take turns, one round each (after a warm-up round each,
ours compiled first), so that the machine's slow drifts hit both alike; the ratio is of the two medians.
With --json the last line printed is one JSON object: `reference_round_s`, `round_s` (ours), `speedup`, the
round times of both and the per-pair ratios (`speedup_pairs`), and the shapes.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_enum("size", "small", ["tiny", "small", "base"], "ViLT size preset (feddat_jax.models.vilt.PRESETS).")
flags.DEFINE_integer("clients", 5, "Clients per round C.")
flags.DEFINE_integer("steps", 4, "Local steps per round S.")
flags.DEFINE_integer("batch", 8, "Batch per client B.")
flags.DEFINE_integer("answers", 100, "Answer-head width A.")
flags.DEFINE_integer("text_len", 40, "Text tokens L.")
flags.DEFINE_integer("rounds", 3, "Timed rounds of each loop, after one warm-up round each.")
flags.DEFINE_bool("ours", True, "Also run benchmarks/round_throughput.py on the same shapes and print the ratio.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

TEMPERATURE = 3.0


def build(size: str, answers: int, text_len: int):
  """-> (model, adapters, head): transformers' ViLT at the preset's sizes with A_C/A_S hooks, and the head."""
  import torch
  import transformers
  from torch import nn

  from feddat_jax.models.vilt import PRESETS
  p = PRESETS[size]
  cfg = transformers.ViltConfig(vocab_size=1000, hidden_size=p["hidden_size"], num_hidden_layers=p["num_layers"],
                                num_attention_heads=p["num_heads"], intermediate_size=p["mlp_dim"],
                                image_size=p["image_size"], patch_size=p["patch_size"],
                                max_position_embeddings=max(40, text_len))
  d = cfg.hidden_size

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.vilt = transformers.ViltModel(cfg)
      bottleneck = lambda: nn.ModuleList(nn.Sequential(nn.Linear(d, d // 16), nn.ReLU(), nn.Linear(d // 16, d))
                                         for _ in range(cfg.num_hidden_layers))
      self.adapters = nn.ModuleDict({"A_C": bottleneck(), "A_S": bottleneck(), "A_S_frozen": bottleneck()})
      self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, answers))
      self.mode = "A_S"
      for i, layer in enumerate(self.vilt.encoder.layer):
        layer.register_forward_hook(self._hook(i))
      for p in self.vilt.parameters():
        p.requires_grad_(False)

    def _hook(self, i):
      def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if self.mode == "A_S":
          h = h + self.adapters["A_S"][i](h)
        else:  # the DAT: the mean of the personal and the frozen received adapter's deltas
          h = h + 0.5 * self.adapters["A_C"][i](h) + 0.5 * self.adapters["A_S_frozen"][i](h)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
      return hook

    def forward(self, batch, mode):
      self.mode = mode
      out = self.vilt(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
      return self.head(out.pooler_output)

  torch.manual_seed(0)
  return Model(), cfg


def losses(logits, targets, teacher):
  import torch.nn.functional as F
  task = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
  kd = F.kl_div(F.log_softmax(logits / TEMPERATURE, -1), F.softmax(teacher / TEMPERATURE, -1),
                reduction="batchmean") * TEMPERATURE**2
  return 0.5 * (task + kd)


def client_update(global_model, personal, batches):
  """One client's round as the released code runs it -> its A_S state dict."""
  import torch
  model = copy.deepcopy(global_model)  # the released code copies the whole model for every client
  model.adapters["A_C"].load_state_dict(personal["A_C"])
  model.head.load_state_dict(personal["head"])
  model.adapters["A_S_frozen"].load_state_dict(model.adapters["A_S"].state_dict())
  for p in model.adapters["A_S_frozen"].parameters():
    p.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
  model.train()
  for batch in batches:
    with torch.no_grad():
      z_dat = model(batch, "DAT")  # (1) the teacher of A_S
    z_s = model(batch, "A_S")  # (2) A_S against the DAT
    loss = losses(z_s, batch["targets"], z_dat)
    opt.zero_grad()
    loss.backward()
    opt.step()
    z_d = model(batch, "DAT")  # (3) the DAT through A_C against the pre-update A_S logits
    loss = losses(z_d, batch["targets"], z_s.detach())
    opt.zero_grad()
    loss.backward()
    opt.step()
  personal["A_C"] = model.adapters["A_C"].state_dict()
  personal["head"] = model.head.state_dict()
  return model.adapters["A_S"].state_dict()


def make_batches(cfg, clients, steps, batch, answers, text_len):
  import torch
  g = torch.Generator().manual_seed(0)
  s = cfg.image_size
  return [[{"input_ids": torch.randint(5, 1000, (batch, text_len), generator=g),
            "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
            "pixel_values": torch.randn(batch, 3, s, s, generator=g),
            "pixel_mask": torch.ones(batch, s, s, dtype=torch.long),
            "targets": (torch.rand(batch, answers, generator=g) < 0.02).float()}
           for _ in range(steps)] for _ in range(clients)]


class Reference:
  """The reference loop's state across rounds: the global model, the clients' personal parts, their data."""

  def __init__(self, size, clients, steps, batch, answers, text_len):
    self.model, cfg = build(size, answers, text_len)
    self.data = make_batches(cfg, clients, steps, batch, answers, text_len)
    self.personal = [{"A_C": copy.deepcopy(self.model.adapters["A_C"].state_dict()),
                      "head": copy.deepcopy(self.model.head.state_dict())} for _ in range(clients)]

  def round(self) -> float:
    """One round (each client in turn, then the server's uniform mean of A_S) -> its seconds."""
    import torch
    t = time.perf_counter()
    uploads = [client_update(self.model, p, d) for p, d in zip(self.personal, self.data)]
    with torch.no_grad():
      self.model.adapters["A_S"].load_state_dict(
          {n: torch.stack([u[n] for u in uploads]).mean(0) for n in uploads[0]})
    return time.perf_counter() - t


class Ours:
  """benchmarks/round_throughput.py --serve on the same shapes with its default parallelism, in a subprocess."""

  def __init__(self, shape: dict):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "round_throughput.py")
    args = [sys.executable, script, "--serve", "--algorithm=feddat"] + [f"--{k}={v}" for k, v in shape.items()]
    self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    self.info = json.loads(self._line())  # compiled and warmed up

  def _line(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"round_throughput.py --serve failed:\n{self.proc.stderr.read()[-2000:]}")
    return line

  def round(self) -> float:
    self.proc.stdin.write("round\n")
    self.proc.stdin.flush()
    return float(self._line())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def main(argv):
  del argv
  import torch
  shape = dict(size=FLAGS.size, clients=FLAGS.clients, steps=FLAGS.steps, batch=FLAGS.batch, answers=FLAGS.answers,
               text_len=FLAGS.text_len)
  mine = Ours(shape) if FLAGS.ours else None
  reference = Reference(**shape)
  reference.round()  # warm-up
  times, our_times = [], []
  for _ in range(FLAGS.rounds):
    times.append(reference.round())
    if mine:
      time.sleep(0.2)  # let the other process's idle threads stop spinning before the next timed round
      our_times.append(mine.round())
      time.sleep(0.2)
  median = statistics.median
  out = {**shape, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
         "reference_round_s": median(times), "reference_times_s": times}
  print(f"reference loop (PyTorch, transformers ViltModel), size={FLAGS.size} C={FLAGS.clients} S={FLAGS.steps} "
        f"B={FLAGS.batch}: {out['reference_round_s']:.3f} s per round (median of {len(times)} after a warm-up; "
        f"{torch.get_num_threads()} threads)")
  if mine:
    mine.close()
    pairs = [r / o for r, o in zip(times, our_times)]
    out.update(round_s=median(our_times), round_times_s=our_times, client_parallelism=mine.info["client_parallelism"],
               speedup=out["reference_round_s"] / median(our_times), speedup_pairs=pairs)
    print(f"feddat_jax round ({out['client_parallelism']}): {out['round_s']:.3f} s per round, taking turns with the "
          f"reference; {out['speedup']:.2f}x the reference loop (per pair {min(pairs):.2f}x to {max(pairs):.2f}x)")
  if FLAGS.json:
    print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
