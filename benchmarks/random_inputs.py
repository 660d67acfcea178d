"""Random client batches of given shapes, as the round reads them: the benchmarks that time or cost a round on
made-up data (round_throughput.py, accelerator.py) share them, so they measure the same inputs."""
from __future__ import annotations

import numpy as np


def random_batches(clients: int, steps: int, batch: int, image_size: int, answers: int,
                   text_len: int) -> dict[str, np.ndarray]:
  """[clients, steps, batch, ...] host arrays: text ids, one square image per example, 2% positive targets."""
  rng = np.random.default_rng(0)
  c, st, b, s = clients, steps, batch, image_size
  return {
      "input_ids": rng.integers(5, 1000, (c, st, b, text_len)).astype(np.int32),
      "attention_mask": np.ones((c, st, b, text_len), np.int32),
      "pixel_values": rng.integers(0, 256, (c, st, b, 1, s, s, 3)).astype(np.uint8),
      "pixel_mask": np.ones((c, st, b, 1, s, s), bool),
      "targets": (rng.random((c, st, b, answers)) < 0.02).astype(np.float32),
      "example_mask": np.ones((c, st, b), np.float32),
      "answer_mask": np.ones((c, answers), np.float32),
  }
