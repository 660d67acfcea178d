"""The default job's round, run every way the engine can run its clients, side by side in one process.

  python benchmarks/default_round.py --json
  python benchmarks/default_round.py --modes=vmap,lanes:2 --repeats=5 --json

The default job (`configs/vqa.py`: FedDAT on the synthetic Function benchmark, five clients of 1,800 / 1,500 /
1,200 / 900 / 700 training examples, one epoch of batches of 16) has clients of 113 / 94 / 75 / 57 / 44 local
steps. `vmap` and `scan` run every client for the largest client's 113 steps, masked; `lanes:L` packs the
clients into L lanes that run their clients back to back. Per mode: the fraction of the program's
client-steps that are real, and the median round time over --repeats rounds, the modes interleaved round by
round (so machine noise hits them alike), each after one warm-up round. A random backbone: speed does not
depend on the weights. With --json the last line printed is one JSON object.
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

flags.DEFINE_list("modes", ["vmap", "scan", "lanes:1", "lanes:2", "lanes:3"], "vmap | scan | lanes:L.")
flags.DEFINE_integer("repeats", 3, "Timed rounds per mode (after one warm-up round each).")
flags.DEFINE_string("config", "configs/vqa.py:backbone=random", "The job whose round is timed.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import numpy as np
  from tqdm import tqdm

  from feddat_jax import config_utils, experiment
  from feddat_jax.data import pipeline
  from feddat_jax.federated import feeder as feeder_lib, sharding

  config = config_utils.load_config(FLAGS.config)
  datasets, tok = experiment.load_data(config)
  model, pretrained, image_size, _ = experiment.build_model(config, tok, max(d.num_images for d in datasets))
  algo = experiment.build_algorithm(config, model)
  data = pipeline.FederatedData(datasets, tok, image_hw=(image_size,) * 2, text_len=config.text_len,
                                batch_size=config.batch_size, num_answers=config.num_answers, seed=config.seed)
  placement = sharding.Placement()
  frozen, server, store = experiment.init_states(algo, config.seed, pretrained, data.num_clients)
  frozen = placement.put_replicated(frozen)
  runs = {}
  for mode in FLAGS.modes:
    parallelism, _, lanes = mode.partition(":")
    feed = feeder_lib.Feeder(data, placement, seed=config.seed, cohort_size=config.cohort_size,
                             local_epochs=config.local_epochs, lanes=int(lanes or 0))
    rnd = feed.round(0)
    rows = store.gather(rnd.cohort)
    mask = np.asarray(rnd.inputs.step_mask)
    program = mask.size if not lanes else rnd.inputs.schedule["slot"].size
    runs[mode] = {"fn": placement.build_round(algo, donate=False, client_parallelism=parallelism), "inputs": rnd.inputs,
                  "rows": placement.put_rows(rows, len(rnd.cohort)), "times": [],
                  "client_steps_real": int(mask.sum()), "client_steps_program": int(program)}

  def one(mode):
    r = runs[mode]
    server_in = placement.put_replicated(server)
    t = time.perf_counter()
    jax.block_until_ready(r["fn"](frozen, server_in, r["rows"], r["inputs"]))
    return time.perf_counter() - t

  out = {"config": FLAGS.config, "steps_per_client": data.local_steps().tolist(), "device": jax.devices()[0].device_kind,
         "modes": {}}
  for mode in tqdm(FLAGS.modes, desc="compile + warm-up"):
    runs[mode]["first_s"] = one(mode)
  for _ in tqdm(range(FLAGS.repeats), desc="timed rounds"):
    for mode in FLAGS.modes:
      runs[mode]["times"].append(one(mode))
  base = statistics.median(runs[FLAGS.modes[0]]["times"])
  for mode, r in runs.items():
    round_s = statistics.median(r["times"])
    out["modes"][mode] = {"round_s": round_s, "times": r["times"], "first_s": r["first_s"],
                          "client_steps_real": r["client_steps_real"],
                          "client_steps_program": r["client_steps_program"],
                          "real_fraction": r["client_steps_real"] / r["client_steps_program"],
                          f"speedup_vs_{FLAGS.modes[0]}": base / round_s}
    print(f"{mode:>8}: {round_s:6.2f} s/round (median of {len(r['times'])}), real client-steps "
          f"{r['client_steps_real']}/{r['client_steps_program']} = {out['modes'][mode]['real_fraction']:.1%}, "
          f"{base / round_s:.2f}x {FLAGS.modes[0]}")
  if FLAGS.json:
    print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
