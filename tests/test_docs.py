"""The shell commands in README.md and docs/*.md still match the code: cheap checks, nothing is trained.

Every line of a ```bash block that starts with `python`, `pip` or a launcher (continuation lines joined, `&&`
chains split) is a command. For `python -m MODULE` the module must exist; `--config=PATH[:args]` must name an
existing config file whose get_config accepts args; `--config.a.b=...` must be a field of that config (of
configs/vqa.py when the command names none); any other `--flag` must be defined in the module's source (absl
DEFINE_*("flag", ...) or argparse add_argument("--flag", ...)). A `feddat_jax.compare` command must read sweep
directories that some documented sweep writes, so a page cannot point at runs that its commands never make.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# CI (.ci/run) runs this line verbatim; it must stay in the README exactly so.
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest -q tests'


def bash_lines(text: str) -> list[str]:
  """Lines inside ```bash blocks, continuation lines ("\\" at the end) joined."""
  lines, inside, pending = [], False, ""
  for raw in text.splitlines():
    if raw.strip().startswith("```"):
      inside = raw.strip() == "```bash" if not inside else False
      continue
    if not inside:
      continue
    line = pending + raw.strip()
    if line.endswith("\\"):
      pending = line[:-1] + " "
      continue
    pending = ""
    lines.append(line)
  return lines


def commands(text: str) -> list[list[str]]:
  """The documented commands as argument lists (comments dropped, `&&` chains split)."""
  out = []
  for line in bash_lines(text):
    for part in line.split("&&"):
      args = shlex.split(part, comments=True)
      if args and (args[0] in ("python", "pip") or args[0].startswith("launch/")):
        out.append(args)
  return out


def all_commands() -> list[tuple[str, list[str]]]:
  return [(page.name, args) for page in PAGES for args in commands(page.read_text(encoding="utf-8"))]


def _id(item) -> str:
  page, args = item
  return f"{page}: {' '.join(args)[:80]}"


COMMANDS = all_commands()
PYTHON_MODULE = [c for c in COMMANDS if c[1][:2] == ["python", "-m"]]


def load_config(spec: str):
  """`configs/x.py[:args]` -> its get_config(args)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_doc_config", ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def flag_value(args: list[str], name: str) -> str | None:
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def test_pages_exist_and_have_commands():
  assert (ROOT / "README.md").is_file()
  assert COMMANDS, "no commands found in README.md or docs/*.md"


def test_readme_keeps_the_ci_test_command_verbatim():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert f"```bash\n{TEST_COMMAND}\n```" in readme


def test_readme_is_short():
  words = len((ROOT / "README.md").read_text(encoding="utf-8").split())
  assert words < 2000, f"README.md has {words} words; move detail to docs/"


@pytest.mark.parametrize("item", PYTHON_MODULE, ids=_id)
def test_module_exists(item):
  _, args = item
  assert importlib.util.find_spec(args[2]) is not None, f"no module {args[2]}"


@pytest.mark.parametrize("item", [c for c in COMMANDS if flag_value(c[1], "config")], ids=_id)
def test_config_file_and_arguments(item):
  _, args = item
  spec = flag_value(args, "config")
  path = spec.partition(":")[0]
  assert (ROOT / path).is_file(), f"--config names {path}, which does not exist"
  load_config(spec)  # unknown variant keys or bad choices raise


@pytest.mark.parametrize("item", [c for c in COMMANDS if any(a.startswith("--config.") for a in c[1])], ids=_id)
def test_config_overrides_are_fields(item):
  _, args = item
  config = load_config(flag_value(args, "config") or "configs/vqa.py")
  for a in args:
    if a.startswith("--config."):
      node = config
      for key in a.split("=", 1)[0].removeprefix("--config.").split("."):
        assert key in node, f"{a}: the config has no field {key!r} here"
        node = node[key]


def _defines(source: str, name: str) -> bool:
  absl = re.search(r"DEFINE_\w+\(\s*[\"']" + re.escape(name) + r"[\"']", source)
  argparse = re.search(r"add_argument\(\s*[\"']--" + re.escape(name) + r"[\"']", source)
  return bool(absl or argparse)


def _source(args: list[str]) -> str | None:
  """The source of the command's own program: a project module or script; None for other tools (pytest)."""
  if args[:2] == ["python", "-m"]:
    origin = importlib.util.find_spec(args[2]).origin
    return pathlib.Path(origin).read_text(encoding="utf-8") if args[2].startswith("feddat_jax") else None
  if args[0] == "python" and args[1].endswith(".py"):
    return (ROOT / args[1]).read_text(encoding="utf-8")
  return None


@pytest.mark.parametrize("item", [c for c in COMMANDS if c[1][0] == "python" and any(
    a.startswith("--") and not a.startswith("--config.") for a in c[1])], ids=_id)
def test_flags_are_defined(item):
  _, args = item
  if args[1] != "-m":
    assert (ROOT / args[1]).is_file(), f"no script {args[1]}"
  source = _source(args)
  if source is None:
    pytest.skip(f"{args[2]} is not this project's")
  for a in args:
    if a.startswith("--") and not a.startswith("--config."):
      name = a[2:].split("=", 1)[0]
      assert _defines(source, name), f"{a}: no flag {name!r} in {args[1:3]}"


@pytest.mark.parametrize("item", [c for c in COMMANDS if c[1][0].startswith("launch/")], ids=_id)
def test_launchers_exist(item):
  _, args = item
  assert (ROOT / args[0]).is_file(), f"no launcher {args[0]}"


@pytest.mark.parametrize("item", [c for c in COMMANDS if c[1][0] == "pip"], ids=_id)
def test_pip_extras_exist(item):
  _, args = item
  extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {}))
  for a in args:
    m = re.fullmatch(r"\.\[([\w,-]+)\]", a)
    if m:
      missing = set(m.group(1).split(",")) - extras
      assert not missing, f"pyproject.toml has no extra {sorted(missing)}"


def test_compared_sweeps_are_written_by_a_documented_sweep():
  written = {os.path.normpath(flag_value(args, "workdir")) for _, args in PYTHON_MODULE
             if args[2] == "feddat_jax.sweep" and flag_value(args, "workdir")}
  for page, args in PYTHON_MODULE:
    if args[2] == "feddat_jax.compare":
      for sweep_dir in [a for a in args[3:] if not a.startswith("-")]:
        assert os.path.normpath(sweep_dir) in written, (
            f"{page}: `{' '.join(args)}` reads {sweep_dir}, which no documented sweep command writes")


def _slug(heading: str) -> str:
  """GitHub's anchor for a markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  return {_slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_resolve(page):
  for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
    if re.match(r"[a-z]+:", link):
      continue
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    assert target.exists(), f"{page.name}: link {link} points at nothing"
    if anchor and target.suffix == ".md":
      assert anchor in _anchors(target), f"{page.name}: link {link}: no such heading"


def test_pages_cited_in_code_exist():
  """Code comments cite docs pages (e.g. docs/released_code.md#zero-gradient-adamw-steps); they must resolve."""
  for source in sorted([*(ROOT / "feddat_jax").rglob("*.py"), *(ROOT / "configs").glob("*.py")]):
    text = source.read_text(encoding="utf-8")
    for page, anchor in re.findall(r"\b(docs/[\w/]+\.md)(?:#([\w-]+))?", text):
      assert (ROOT / page).is_file(), f"{source.relative_to(ROOT)} cites {page}, which does not exist"
      if anchor:
        assert anchor in _anchors(ROOT / page), f"{source.relative_to(ROOT)} cites {page}#{anchor}: no such heading"
    if "docs/released_code.md" in text:  # bare "(#anchor)" items in such a file cite that page
      for anchor in re.findall(r"\(#([\w-]+)\)", text):
        assert anchor in _anchors(ROOT / "docs" / "released_code.md"), f"{source.name} cites #{anchor}"


def _tables(text: str) -> list[list[str]]:
  """The markdown tables of a page, each as its list of `|` rows (header and separator included)."""
  tables, current = [], []
  for line in text.splitlines():
    if line.startswith("|"):
      current.append(line.strip())
    elif current:
      tables.append(current)
      current = []
  if current:
    tables.append(current)
  return tables


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_embedded_result_tables_match_their_files(page):
  """A table with the header row of a docs/results/X.md that the page links must be a verbatim copy of one
  such file's table: a regenerated result file cannot leave stale numbers on the pages that quote it."""
  text = page.read_text(encoding="utf-8")
  linked = []
  for link in sorted(set(re.findall(r"\]\(([^)\s#]*results/[\w.-]+\.md)\)", text))):
    source = (page.parent / link).resolve()
    if source.is_file():
      linked += [(link, table) for table in _tables(source.read_text(encoding="utf-8"))]
  for table in _tables(text):
    candidates = [(link, original) for link, original in linked if original[0] == table[0]]
    if candidates:
      assert any(original == table for _, original in candidates), (
          f"{page.name}: the table headed {table[0]!r} is not a copy of "
          f"{' or '.join(link for link, _ in candidates)}; copy the regenerated table")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_p_value_printed_as_zero(page):
  """compare prints p below 0.001 as `< 0.001`; a `0.000` in a table is a stale copy."""
  for table in _tables(page.read_text(encoding="utf-8")):
    header = [c.strip() for c in table[0].strip("|").split("|")]
    columns = [i for i, c in enumerate(header) if c.endswith("p")]
    for row in table[2:]:
      cells = [c.strip() for c in row.strip("|").split("|")]
      for i in columns:
        assert i >= len(cells) or cells[i] != "0.000", f"{page.name}: p printed as 0.000 in {row}"
