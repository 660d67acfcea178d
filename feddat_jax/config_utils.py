"""big_vision-style config arguments: `--config=configs/vqa.py:benchmark=function,size=base`."""
from __future__ import annotations

import re
from typing import Any


def _cast(key: str, text: str, default: Any):
  if isinstance(default, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"config argument {key}={text!r}: expected true or false")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"config argument {key}={text!r}: expected an integer") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"config argument {key}={text!r}: expected a number") from None
  return text


def parse_arg(arg: str | None, **defaults) -> dict[str, Any]:
  """"k=v,k2=v2" -> defaults updated, values cast to the defaults' types; unknown keys fail.

  A value may contain ":" and "/" (paths, "hf:/ckpt/vilt"), not ",".
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq:
      raise ValueError(f"config argument {item!r} is not key=value; known keys: {sorted(defaults)}")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    out[key] = _cast(key, value.strip(), defaults[key])
  return out


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"config {name}={value!r} is not one of {tuple(choices)}")


def _unknown_field_message(e: AttributeError, argv) -> str:
  """ml_collections' AttributeError(KeyError("'name'\nDid you mean ...?")) for an override of a field that does
  not exist -> one readable line naming the override."""
  inner = e.args[0] if e.args else e
  text = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner)
  first, _, rest = text.partition("\n")
  name = first.strip().strip("'\"")
  override = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                   and re.split(r"[.=]", a[len("--config."):]).count(name)), None)
  hint = re.search(r'Did you mean "([^"]+)"', rest)
  return (f"unknown config field {name!r}" + (f" in {override}" if override else "")
          + (f" (did you mean {hint[1]!r}?)" if hint else "") + "; see the config file for the fields that exist")


def parse_flags_or_exit(argv):
  """absl flags parser for `app.run`: a bad config argument, override or flag is one line and exit status 2."""
  import sys

  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS["config"].value.keys()  # config_flags defers a file's read error to the first use: use it here
    return rest
  except OSError as e:  # a config file that does not exist or cannot be read
    reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    print(f"error: config file {flags.FLAGS['config'].config_filename}: cannot be read ({reason})", file=sys.stderr)
    sys.exit(2)
  except SyntaxError as e:  # a config file that is not valid Python
    print(f"error: config file {e.filename}: invalid Python at line {e.lineno} ({e.msg})", file=sys.stderr)
    sys.exit(2)
  except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as e:
    if isinstance(e, AttributeError):  # ml_collections' error for an override of a key that does not exist
      msg = _unknown_field_message(e, argv)
    else:
      msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      msg = re.sub(r"^(ValueError|KeyError|TypeError): ", "", msg)  # the last line of a wrapped traceback
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def load_config(spec: str):
  """"configs/vqa.py:arg" -> the ConfigDict its get_config(arg) returns (as --config=... would)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_feddat_config", path)
  if module_spec is None or not __import__("os").path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
