"""How many loader cores a base-size FedDAT round needs: images/s per core of decoding and ViLT's preprocessing
at 384x640, beside the images/s one base-size FedDAT local step consumes at a stated FLOP rate.

  python benchmarks/loader_throughput.py --images=200 --json

Loader: JPEG photos of landscape shapes (640x480, 640x427, 800x600, 500x333; smooth random content, quality 90,
made here), each decoded with PIL and resized and padded onto the 384x640 canvas as a run with
`image_preprocess=vilt` does (`feddat_jax.data.vilt_preprocess.preprocess`, uint8 on the host: normalisation
runs on the device), one after the other in one thread: images/s per core (wall, and CPU time of the process).

Consumer: the FLOPs per example of one FedDAT local step of ViLT-B/32 on a 384x640 canvas (240 patches, 40 text
tokens, B = 8, 3,129 answers), from XLA's cost analysis of the compiled step (compiled here on the CPU, not run),
and the examples/s that rate gives at --tflops x --mfu (defaults: an H100/H200's dense bfloat16 peak, 989
TFLOP/s, at an assumed 40% model FLOPs utilisation; no accelerator was measured), and the loader cores that
need. With --json the last line printed is one JSON object.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_costs  # noqa: E402

flags.DEFINE_integer("images", 200, "Photos decoded and preprocessed.")
flags.DEFINE_float("tflops", 989.0, "The accelerator's peak TFLOP/s for the consumer figure.")
flags.DEFINE_float("mfu", 0.4, "The model FLOPs utilisation assumed at that peak.")
flags.DEFINE_integer("batch", 8, "Batch of the consumer step.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

SHAPES = ((480, 640), (427, 640), (600, 800), (333, 500))  # (height, width)
CANVAS = (384, 640)


def photos(n: int) -> list[bytes]:
  """n JPEG-encoded photos of SHAPES: smooth random colour fields (upsampled noise) plus fine grain."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    h, w = SHAPES[i % len(SHAPES)]
    coarse = Image.fromarray(rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.int16)
    img = np.clip(smooth + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def load(encoded: bytes):
  """What the loader does per image: decode, resize as ViLT does, pad onto the canvas (uint8 and mask)."""
  import numpy as np
  from PIL import Image

  from feddat_jax.data import vilt_preprocess
  image = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
  return vilt_preprocess.preprocess(image, CANVAS, normalize_pixels=False)


def step_flops_per_example(batch: int) -> float:
  """XLA's FLOPs of one FedDAT step of ViLT-B/32 on the canvas, per example (compiled, not run)."""
  import jax
  import jax.numpy as jnp

  from feddat_jax.federated import algorithms as registry
  from feddat_jax.federated import optim
  from feddat_jax.models import peft, vilt, vlm
  cfg = vilt.ViltConfig.preset("base")
  model = vlm.VisionLanguageModel(cfg, peft.PeftConfig(registry.peft_method("feddat")), 3129)
  algo = registry.make("feddat", model, optim.OptimConfig(), total_rounds=10)
  frozen, server, clients = jax.eval_shape(lambda: algo.init(jax.random.key(0), 1))
  client = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), clients)
  h, w = CANVAS
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  batch_spec = {"input_ids": spec((batch, 40), jnp.int32), "attention_mask": spec((batch, 40), jnp.int32),
                "pixel_values": spec((batch, 1, h, w, 3), jnp.uint8), "pixel_mask": spec((batch, 1, h, w), bool),
                "targets": spec((batch, 3129), jnp.float32), "example_mask": spec((batch,), jnp.float32),
                "answer_mask": spec((3129,), jnp.float32)}
  return xla_costs.step_flops(algo, frozen, server, client, batch_spec) / batch


def main(argv):
  del argv
  encoded = photos(FLAGS.images)
  load(encoded[0])  # imports and first-call costs out of the timing
  wall, cpu = time.perf_counter(), time.process_time()
  for e in encoded:
    load(e)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  out = {"images": FLAGS.images, "canvas": list(CANVAS), "jpeg_kib_mean": sum(map(len, encoded)) / len(encoded) / 1024,
         "images_per_s_per_core": FLAGS.images / wall, "images_per_cpu_s": FLAGS.images / cpu}
  print(f"loader: {FLAGS.images} JPEG photos ({out['jpeg_kib_mean']:.0f} KiB mean) decoded and preprocessed onto "
        f"{CANVAS[0]}x{CANVAS[1]} in one thread: {out['images_per_s_per_core']:.1f} images/s "
        f"({out['images_per_cpu_s']:.1f} per CPU-second)")
  flops = step_flops_per_example(FLAGS.batch)
  rate = FLAGS.tflops * 1e12 * FLAGS.mfu
  out.update(step_gflops_per_example=flops / 1e9, tflops=FLAGS.tflops, mfu=FLAGS.mfu,
             consumed_images_per_s=rate / flops)
  out["loader_cores_needed"] = out["consumed_images_per_s"] / out["images_per_s_per_core"]
  print(f"consumer: one base-size FedDAT step costs {flops / 1e9:.1f} GFLOP per example; at {FLAGS.tflops:g} "
        f"TFLOP/s x {FLAGS.mfu:.0%} that is {out['consumed_images_per_s']:.0f} images/s, "
        f"{out['loader_cores_needed']:.1f} loader cores at this machine's rate")
  if FLAGS.json:
    print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
