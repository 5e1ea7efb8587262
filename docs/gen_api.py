"""Writes one API page per module of the vdm_jax package into docs/api/ (run by conf.py).

The module list is read from the file tree, not from a hand-written index, so a new module, or a
module moved into a subpackage, gets its page at the next build with no edit here. Each page is
an `automodule` of the module with its members; the text is the module's docstrings.

    python docs/gen_api.py      # also run by every sphinx-build through docs/conf.py
"""

from __future__ import annotations

import os
import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vdm_jax"
API_DIR = pathlib.Path(__file__).resolve().parent / "api"
# Pages this script owns: every api/vdm_jax*.md. api/index.md is written by hand.
GENERATED_GLOB = "vdm_jax*.md"

PAGE = """\
# `{name}`

```{{eval-rst}}
.. automodule:: {name}
   :members:
   :show-inheritance:
```
"""


def module_names(package: pathlib.Path = PACKAGE) -> list[str]:
  """Dotted names of the package's modules and subpackages, sorted; `__init__` files and
  `__main__` excluded (a package's page documents its `__init__`)."""
  names = []
  for path in sorted(package.rglob("*.py")):
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if any(p.startswith((".", "_")) and p != "__init__" for p in parts):
      continue
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names.append(".".join(parts))
  return sorted(set(names))


def write_pages(api_dir: pathlib.Path = API_DIR, package: pathlib.Path = PACKAGE) -> list[str]:
  """Writes api/<module>.md for every module, removes pages of modules that no longer exist, and
  rewrites a page only when its text changes (Sphinx then rebuilds only what changed). Each write
  is a rename of a complete file, so two builds at once never read a half-written page."""
  api_dir.mkdir(parents=True, exist_ok=True)
  names = module_names(package)
  wanted = {f"{n}.md": PAGE.format(name=n) for n in names}
  for old in api_dir.glob(GENERATED_GLOB):
    if old.name not in wanted:
      old.unlink(missing_ok=True)
  for fname, text in wanted.items():
    path = api_dir / fname
    if not path.exists() or path.read_text() != text:
      fd, tmp = tempfile.mkstemp(dir=api_dir, prefix=".tmp-", suffix=".md")
      with os.fdopen(fd, "w") as f:
        f.write(text)
      os.replace(tmp, path)
  return names


if __name__ == "__main__":
  for name in write_pages():
    print(name)
