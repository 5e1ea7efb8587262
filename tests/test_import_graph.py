"""The package's import graph: acyclic and layered (maths -> model -> tasks -> state -> runs ->
train / evaluation -> cli).

Every `import vdm_jax.x` / `from vdm_jax import x` / `from vdm_jax.x import y` statement of every
module is read with `ast`, including the imports inside functions (a late import still ties two
modules together). A module may import its own layer and the layers below it, never one above.
"""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vdm_jax"

# Lowest first. "base" modules import no other layer: registries and validators, data sets and
# pipelines, devices, checkpoints, metrics, the optimiser, the reader of official checkpoints,
# the compressed file format.
LAYERS = (
    ("base", ("rundir", "registry", "checks", "data", "photos", "pipeline", "parallel",
              "checkpoint_integrity", "checkpointing", "metrics", "optim", "official_checkpoint",
              "bench_report", "compress_format")),
    ("maths", ("schedules", "diffusion", "elbo", "objectives", "sampling", "guidance",
               "likelihood", "latent")),
    ("model", ("networks", "model", "classifier", "vae")),
    ("tasks", ("tasks", "convert", "config_checks", "stored_config")),
    ("state", ("state", "steps")),
    ("runs", ("runs", "run_control")),
    ("apps", ("train", "evaluation", "bench", "official_import", "compress", "compress_stream",
              "compress_app", "launch", "portable_net", "portable_unet", "portable_quant",
              "portable_levels", "portable", "portable_store", "compress_portable")),
    ("cli", ("cli",)),
)
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
# The maths imports no network library and no config (house rule): of the packages outside the
# standard library, only these.
MATHS_THIRD_PARTY = {"jax", "numpy"}


def _modules() -> list[str]:
  return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> tuple[set[str], set[str]]:
  """(vdm_jax modules, other top-level packages) imported anywhere in `module`."""
  tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"{module}.py")
  ours, others = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "vdm_jax" and len(parts) > 1:
          ours.add(parts[1])
        elif parts[0] != "vdm_jax":
          others.add(parts[0])
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      parts = node.module.split(".")
      if parts[0] == "vdm_jax" and len(parts) > 1:
        ours.add(parts[1])
      elif parts[0] == "vdm_jax":
        ours.update(alias.name for alias in node.names)
      else:
        others.add(parts[0])
  return ours - {module}, others


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


def test_every_module_has_a_layer():
  missing = [m for m in _modules() if m not in LAYER_OF]
  assert not missing, f"modules without a layer in LAYERS: {missing}"
  stale = sorted(set(LAYER_OF) - set(_modules()))
  assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_import_graph_is_acyclic():
  cycle = _cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
  upward = [f"{m} ({LAYERS[LAYER_OF[m]][0]}) imports {d} ({LAYERS[LAYER_OF[d]][0]})"
            for m, deps in sorted(_graph().items()) for d in sorted(deps)
            if m in LAYER_OF and d in LAYER_OF and LAYER_OF[d] > LAYER_OF[m]]
  assert not upward, "imports against the layer order:\n  " + "\n  ".join(upward)


def test_maths_imports_only_jax_and_numpy():
  bad = {m: sorted(p for p in _imports(m)[1]
                   if p not in sys.stdlib_module_names and p not in MATHS_THIRD_PARTY)
         for m in dict(LAYERS)["maths"]}
  assert not any(bad.values()), f"maths modules importing other packages: {bad}"


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
