"""Checks that docstrings read as the API pages will read them, in a second, without a build.

    python docs/check_docstrings.py                   # every module of vdm_jax/
    python docs/check_docstrings.py vdm_jax/maths/elbo.py   # some files

The API pages parse each public docstring as Google style (napoleon, with docs/conf.py's settings)
and then as reStructuredText, where an indented display needs a blank line (or `::`) before it, a
list needs a blank line before it, and `*args`, `**kwargs` or `|x|` outside backticks are markup.
This script does the same to the docstrings the pages show (modules, public classes and their
public methods, public functions) and prints each problem with its file and object; it exits 1 if
there is any. The full build (`sphinx-build -W`, tests/test_docs.py) remains the authority: it
also checks cross-references.
"""

from __future__ import annotations

import ast
import io
import pathlib
import runpy
import sys

from docutils.core import publish_doctree
from sphinx.ext.napoleon import Config, GoogleDocstring

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent


def _napoleon_config() -> Config:
  """docs/conf.py's napoleon settings (reading conf.py also refreshes the API pages)."""
  conf = runpy.run_path(str(DOCS / "conf.py"))
  return Config(**{k: v for k, v in conf.items() if k.startswith("napoleon_")})


def _documented(tree: ast.Module):
  """(name, docstring) of what autodoc shows: the module, public classes with their public
  methods, public functions."""
  yield "<module>", ast.get_docstring(tree)
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      if node.name.startswith("_"):
        continue
      yield node.name, ast.get_docstring(node)
      if isinstance(node, ast.ClassDef):
        for sub in node.body:
          if (isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
              and not sub.name.startswith("_")):
            yield f"{node.name}.{sub.name}", ast.get_docstring(sub)


def problems(path: pathlib.Path, config: Config) -> list[str]:
  """One line per docstring of `path` that docutils warns about."""
  out = []
  for name, doc in _documented(ast.parse(path.read_text(), filename=str(path))):
    if not doc:
      continue
    rst = str(GoogleDocstring(doc, config, what="function"))
    stream = io.StringIO()
    publish_doctree(rst, settings_overrides={"warning_stream": stream, "report_level": 2,
                                             "default_role": "code", "halt_level": 5})
    if stream.getvalue():
      messages = " ".join(stream.getvalue().replace("<string>", "docstring line").split())
      out.append(f"{path}: {name}: {messages}")
  return out


def main(argv: list[str]) -> int:
  paths = [pathlib.Path(a) for a in argv] or sorted((ROOT / "vdm_jax").rglob("*.py"))
  config = _napoleon_config()
  found = [line for path in paths for line in problems(path, config)]
  for line in found:
    print(line)
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
