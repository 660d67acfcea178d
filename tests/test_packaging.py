"""pyproject.toml declares what the package imports, and constraints.txt pins every declared dependency."""
import ast
import importlib.metadata
import os
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _imported_top_level() -> set[str]:
  names = set()
  for root, _, files in os.walk(os.path.join(REPO, "feddat_jax")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(root, name)) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
          elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - {"feddat_jax", "__future__"}


def test_every_imported_distribution_is_declared():
  project = _project()
  declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
  declared |= {canonicalize_name(Requirement(r).name) for extra in project["optional-dependencies"].values()
               for r in extra}
  providers = importlib.metadata.packages_distributions()
  missing = {}
  for module in sorted(_imported_top_level()):
    dists = {canonicalize_name(d) for d in providers.get(module, [module])}
    if not dists & declared:
      missing[module] = sorted(dists)
  assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_constraints_pin_every_declared_dependency():
  pins = {}
  with open(os.path.join(REPO, "constraints.txt")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        name, _, version = line.partition("==")
        pins[canonicalize_name(name)] = version
  project = _project()
  for r in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = Requirement(r)
    version = pins.get(canonicalize_name(req.name))
    assert version is not None, f"{req.name} is not pinned in constraints.txt"
    assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} does not satisfy {r}"
  assert "feddat-jax" not in pins and "feddat_jax" not in pins
