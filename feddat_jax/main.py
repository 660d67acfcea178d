r"""Train and evaluate one federated run: FedDAT or a baseline on a VQA-style benchmark.

  python -m feddat_jax.main --config=configs/vqa.py [--workdir=runs/...]

Variants in the config's argument string, comma-separated key=value (configs/vqa.py):
  benchmark   domain | function (default) | scene | task
  algorithm   feddat (default), <family>_<peft> (e.g. fedavg_adapter, fedavg_lora) or module:function
  size        tiny (default) | small | base
  data        synthetic (default) | a directory holding the real datasets
  backbone    pretrained_tiny (default) | random | hf:<dir> | albef | albef:<ALBEF.pth>
  population  natural (default: one client per dataset) | iid:N | dirichlet:N:ALPHA (N clients per dataset)
  runlocal    true: a smoke run in seconds
  seed        training seed (default 0)
  e.g.  python -m feddat_jax.main --config=configs/vqa.py:benchmark=domain,algorithm=fedavg_adapter

Any field of the config, nested ones too, with --config.<field>=<value>, e.g.
  python -m feddat_jax.main --config=configs/vqa.py --config.rounds=30 --config.dp.noise_multiplier=1.1
(the fields and what they mean: configs/vqa.py). Reports and checkpoints go to --workdir (default:
runs/<config name>_<variant>); a rerun with the same config resumes there.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from feddat_jax import cli, config_utils, experiment

config_flags.DEFINE_config_file("config", None, "Config file and its variants, e.g. configs/vqa.py:benchmark=domain; "
                                "any field: --config.<field>=<value>", lock_config=True)
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
