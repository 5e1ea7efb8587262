"""The documentation (docs/): it builds with warnings as errors, every module has an API page,
and a reference to a function that does not exist fails the build.

Needs the docs extra (`pip install -e ".[docs]"`, part of the README's test command); without it
these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_MISSING = [m for m in ("sphinx", "myst_parser", "sphinx_book_theme")
            if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"docs extra not installed ({', '.join(_MISSING)}): "
    "pip install -e '.[docs]'")


def _gen_api():
  spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _sphinx_build(src: pathlib.Path, out: pathlib.Path) -> subprocess.CompletedProcess:
  """sphinx-build -W --keep-going -b html SRC OUT in a fresh process (fresh environment in OUT)."""
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
         "-d", str(out / ".doctrees"), str(src), str(out)]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
  out = tmp_path / "html"
  result = _sphinx_build(DOCS, out)
  assert result.returncode == 0, (
      "sphinx-build -W failed; each warning below names the file and line (a docstring or a "
      "page in docs/):\n" + result.stdout[-6000:] + result.stderr[-6000:])
  # Every module of the package has its API page, generated from the source tree.
  names = _gen_api().module_names()
  assert "vdm_jax.maths.elbo" in names and "vdm_jax.testing.gcs_emulator" in names
  missing = [n for n in names if not (out / "api" / f"{n}.html").is_file()]
  assert not missing, f"modules without an API page: {missing}"
  # The maths page links its equations to the functions that implement them.
  maths = (out / "maths.html").read_text()
  assert 'href="api/vdm_jax.maths.elbo.html#vdm_jax.maths.elbo.elbo_terms"' in maths
  assert 'href="api/vdm_jax.maths.diffusion.html#vdm_jax.maths.diffusion.transition"' in maths


def test_broken_cross_reference_fails_the_build(tmp_path):
  """A small project with docs/conf.py's settings: a reference to an existing function
  resolves, one to a missing function and a link to a missing heading each fail the build."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "conf.py").write_text(textwrap.dedent(f"""\
      import runpy
      globals().update({{k: v for k, v in runpy.run_path({str(DOCS / "conf.py")!r}).items()
                        if not k.startswith("__")}})
      """))
  (src / "index.md").write_text(textwrap.dedent("""\
      # Test

      ```{toctree}
      elbo
      ```

      Good: {py:func}`vdm_jax.maths.elbo.elbo_terms`, [a heading](elbo.md#a-heading).
      Broken: {py:func}`vdm_jax.maths.elbo.no_such_function`, [no heading](elbo.md#no-such-heading).
      """))
  (src / "elbo.md").write_text(textwrap.dedent("""\
      # elbo

      ## A heading

      ```{eval-rst}
      .. automodule:: vdm_jax.maths.elbo
         :members:
      ```
      """))
  result = _sphinx_build(src, tmp_path / "html")
  log = result.stdout + result.stderr
  assert result.returncode != 0, log
  warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
  assert len(warnings) == 2, log
  assert any("vdm_jax.maths.elbo.no_such_function" in w for w in warnings), log
  assert any("no-such-heading" in w for w in warnings), log


def test_api_pages_follow_the_source_tree(tmp_path):
  """gen_api lists modules and subpackages from the files (so a module moved into a subpackage
  gets its page with no edit), and removes the pages of modules that are gone."""
  gen_api = _gen_api()
  pkg = tmp_path / "pkg"
  for rel in ("__init__.py", "a.py", "_private.py", "sub/__init__.py", "sub/b.py",
              "sub/__main__.py"):
    (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
    (pkg / rel).write_text("")
  assert gen_api.module_names(pkg) == ["pkg", "pkg.a", "pkg.sub", "pkg.sub.b"]

  api = tmp_path / "api"
  api.mkdir()
  (api / "vdm_jax.gone.md").write_text("stale")
  (api / "index.md").write_text("kept")
  names = gen_api.write_pages(api, ROOT / "vdm_jax")
  pages = sorted(p.name for p in api.glob("*.md"))
  assert pages == sorted(["index.md"] + [f"{n}.md" for n in names])
  assert ".. automodule:: vdm_jax.maths.elbo\n" in (api / "vdm_jax.maths.elbo.md").read_text()


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 200, "README.md is an overview; details go to docs/"
  command = 'pip install -e ".[test,docs]" && python -m pytest -n 2 tests'
  assert command in readme
  ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")]
  assert ci[-1] == command


def _check_docstrings():
  spec = importlib.util.spec_from_file_location("check_docstrings", DOCS / "check_docstrings.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_docstrings_read_as_restructuredtext(tmp_path):
  """The fast check (docs/check_docstrings.py) passes on the package and flags the three traps:
  an indented display straight after a line of text, `**kwargs` outside backticks, `|x|`."""
  check = _check_docstrings()
  config = check._napoleon_config()
  found = [line for path in sorted((ROOT / "vdm_jax").rglob("*.py"))
           for line in check.problems(path, config)]
  assert not found, "\n".join(found)

  bad = tmp_path / "bad.py"
  bad.write_text(textwrap.dedent('''\
      """A module.

      The bound is
        L = a + b,
      a sum.
      """


      def f(**kwargs):
        """Passes **kwargs on."""


      def g(x):
        """Returns |x|."""


      def h(x):
        """Fine: `**kwargs`, `|x|`, and a display::

          L = a + b

        after a blank line.
        """
      '''))
  flagged = check.problems(bad, config)
  assert [line.split(": ")[1] for line in flagged] == ["<module>", "f", "g"], flagged
