"""Entry point: `python -m feddat_jax.main --config=configs/vqa.py [--workdir=runs/...]`.

Intentionally short: all logic lives in `experiment.run`, which tests call directly.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from feddat_jax import cli, config_utils, experiment

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vqa.py[:variant=...]", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and reports go (default: runs/<config name>).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", name + (("_" + variant.replace(",", "_").replace("=", "-").replace("/", "-"))
                                      if variant else ""))


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # the run prints its own progress; library INFO logs (orbax) are noise
    logging.set_verbosity(logging.WARNING)
  workdir = flags.FLAGS.workdir or default_workdir(flags.FLAGS["config"].config_filename)
  cli.run_or_exit(experiment.run, flags.FLAGS.config, workdir)  # user errors, a full disk, Ctrl-C: one line


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags_or_exit)
