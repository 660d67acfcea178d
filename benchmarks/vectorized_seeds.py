"""N seeds of one job as one program (`experiment.run_seeds`, `sweep --vectorize_seeds`) beside N separate runs,
side by side in one process.

  python benchmarks/vectorized_seeds.py --json
  python benchmarks/vectorized_seeds.py --seeds=8 --rounds=4 --json

The default job (`configs/vqa.py`: FedDAT, Function, tiny ViLT pretrained here, 10 rounds) is run --seeds times
as a sweep runs it without the flag (`experiment.run` per seed, one after the other, each compiling its own
round and evaluation, as in one `sweep` process), then the same seeds as one program. Both write full
workdirs (logs, checkpoints, reports) under --workdir. The data and the pretrained backbone are prepared before
either is timed. Per seed: the largest |difference| of its final scores (every variant and client, VQA score
points) and of its training losses (every round and client) between the two ways. Wall times are of the whole
runs (set-up, compiles, rounds, evaluations, checkpoints, reports). With --json the last line printed is one
JSON object.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags, logging

flags.DEFINE_integer("seeds", 8, "Training seeds 0..N-1.")
flags.DEFINE_integer("rounds", 0, "Rounds per run; 0: the config's (10 for the default job).")
flags.DEFINE_string("config", "configs/vqa.py", "The job.")
flags.DEFINE_string("workdir", "", "Where both sets of runs write (default: a fresh temporary directory).")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS


def _losses(workdir):
  from feddat_jax import reporting
  return [[r["loss"][c] for c in sorted(r["loss"])] for r in reporting.read_metrics(workdir) if r["kind"] == "train"]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import numpy as np

  from feddat_jax import config_utils, experiment

  base = config_utils.load_config(FLAGS.config)
  configs = []
  for seed in range(FLAGS.seeds):
    config = base.copy_and_resolve_references()
    config.seed = seed
    if FLAGS.rounds:
      config.rounds = FLAGS.rounds
    configs.append(config)
  experiment.check_seeds(configs)
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="vectorized_seeds_")
  datasets, tok = experiment.load_data(base)  # the data and the pretrained backbone on disk before any timing
  experiment.build_model(base, tok, max(d.num_images for d in datasets))

  t0 = time.perf_counter()
  separate = [experiment.run(c, os.path.join(root, "separate", f"seed{c.seed}")) for c in configs]
  t_separate = time.perf_counter() - t0
  t0 = time.perf_counter()
  vectorized = experiment.run_seeds(configs, [os.path.join(root, "vectorized", f"seed{c.seed}") for c in configs])
  t_vectorized = time.perf_counter() - t0

  per_seed = []
  for c, a, b in zip(configs, separate, vectorized):
    score = max(abs(a["final"][v][k] - b["final"][v][k]) for v in a["final"] for k in a["final"][v])
    la, lb = (np.asarray(_losses(os.path.join(root, way, f"seed{c.seed}"))) for way in ("separate", "vectorized"))
    per_seed.append({"seed": c.seed, "max_abs_diff_final_scores": score,
                     "max_abs_diff_train_losses": float(np.max(np.abs(la - lb))),
                     "final_mean": {v: a["final_mean"][v] for v in a["final_mean"]}})
  out = {"config": FLAGS.config, "seeds": FLAGS.seeds, "rounds": configs[0].rounds,
         "separate_s": round(t_separate, 1), "vectorized_s": round(t_vectorized, 1),
         "speedup": round(t_separate / t_vectorized, 2), "per_seed": per_seed, "workdir": root}
  print(f"{FLAGS.seeds} seeds x {configs[0].rounds} rounds of {FLAGS.config}:")
  print(f"  {FLAGS.seeds} separate runs: {t_separate:.1f} s;  one program: {t_vectorized:.1f} s;  "
        f"{t_separate / t_vectorized:.2f}x")
  for p in per_seed:
    print(f"  seed {p['seed']}: max |diff| final scores {p['max_abs_diff_final_scores']:.2e}, train losses "
          f"{p['max_abs_diff_train_losses']:.2e}")
  if FLAGS.json:
    print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
