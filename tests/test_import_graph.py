"""The package's layout is its architecture: subpackages that name the layers, imported only
downwards, and an acyclic graph of modules.

  cli                      flag parsing and dispatch
  apps, official,          using runs (eval, sample, the benchmark, launch recipes), the official
  compression              models, the bits-back compressor
  training                 tasks, config rules, state, optimiser, compiled steps, the trainer loop,
                           run control, runs read back
  nets, datasets           the networks and the VDM module; data sets and pipelines
  maths, storage           the maths (jax and numpy only); run directories anywhere (files,
                           checkpoints, metrics)
  core                     registries, validators, devices
  testing                  helpers shipped for tests (the GCS emulator): imports storage only

Every `import vdm_jax.x.y` / `from vdm_jax.x import y` / `from vdm_jax.x.y import z` of every
module is read with `ast`, including imports inside functions. A module may import its own
subpackage and the subpackages of lower levels, never one of its level or above.
"""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vdm_jax"

LEVELS = {"core": 0, "maths": 1, "storage": 1, "nets": 2, "datasets": 2, "testing": 2,
          "training": 3, "official": 4, "compression": 4, "apps": 4, "cli": 5}
# The maths imports no network library and no config (house rule): of the packages outside the
# standard library, only these.
MATHS_THIRD_PARTY = {"jax", "numpy"}


def _modules() -> dict[str, pathlib.Path]:
  """{"sub.module" (or "cli"): path} of every module of the package but the __init__ files."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] != "__init__":
      out[".".join(parts)] = path
  return out


def _imports(module: str) -> tuple[set[str], set[str]]:
  """(vdm_jax modules as "sub.module", other top-level packages) imported anywhere in `module`."""
  known = _modules()
  tree = ast.parse(known[module].read_text(), filename=module)
  ours, others = set(), set()

  def add(dotted: str, names=()):
    parts = dotted.split(".")[1:]
    if ".".join(parts) in known:
      ours.add(".".join(parts))
    for name in names:   # from vdm_jax.sub import module
      if ".".join(parts + [name]) in known:
        ours.add(".".join(parts + [name]))

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "vdm_jax":
          add(alias.name)
        else:
          others.add(alias.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module.split(".")[0] == "vdm_jax":
        add(node.module, [a.name for a in node.names])
      else:
        others.add(node.module.split(".")[0])
  return ours - {module}, others


def _subpackage(module: str) -> str:
  return module.split(".")[0]


def _graph() -> dict[str, set[str]]:
  return {module: _imports(module)[0] for module in _modules()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a path [a, b, ..., a], or None (depth-first search)."""
  state: dict[str, int] = {}   # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_every_module_is_in_a_layer():
  """No module directly under vdm_jax/ but the CLI, and every subpackage has a level."""
  loose = [m for m in _modules() if "." not in m and m != "cli"]
  assert not loose, f"modules outside the layer subpackages: {loose}"
  unknown = sorted({_subpackage(m) for m in _modules()} - set(LEVELS))
  assert not unknown, f"subpackages without a level in LEVELS: {unknown}"


def test_import_graph_is_acyclic():
  cycle = _cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_its_level_or_above():
  wrong = [f"{m} ({_subpackage(m)}) imports {d} ({_subpackage(d)})"
           for m, deps in sorted(_graph().items()) for d in sorted(deps)
           if _subpackage(d) != _subpackage(m)
           and LEVELS[_subpackage(d)] >= LEVELS[_subpackage(m)]]
  assert not wrong, "imports against the layer order:\n  " + "\n  ".join(wrong)


def test_maths_imports_only_jax_and_numpy():
  bad = {m: sorted(p for p in _imports(m)[1]
                   if p not in sys.stdlib_module_names and p not in MATHS_THIRD_PARTY)
         for m in _modules() if _subpackage(m) == "maths"}
  assert any(m.startswith("maths.") for m in _modules())
  assert not any(bad.values()), f"maths modules importing other packages: {bad}"


def test_the_checks_can_fail():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
  assert _imports("training.train")[0] >= {"storage.rundir", "training.steps", "core.parallel"}
