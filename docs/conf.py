"""Sphinx configuration of the vdm_jax documentation (Sphinx + MyST Markdown + sphinx-book-theme).

Build (the docs extra: `pip install -e ".[docs]"`):

    sphinx-build -W --keep-going -b html docs docs/_build/html

`-W` turns every warning into an error, and `nitpicky` makes every cross-reference that does not
resolve a warning, so a reference to a function that does not exist (or no longer exists) fails the
build. References to other libraries are not resolved (no intersphinx: the build runs offline);
`nitpick_ignore_regex` lists them.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))
# The vdm_jax beside these docs, whatever is installed.
sys.path.insert(0, str(ROOT))
# autodoc imports the package: on CPU, so that a build on a GPU or TPU machine does not claim it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gen_api  # noqa: E402

gen_api.write_pages()

project = "vdm_jax"
author = "the vdm_jax authors"
copyright = "the vdm_jax authors, Apache-2.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", ".gitignore", "**/.tmp-*"]   # .tmp-*: gen_api.py mid-write

# --- MyST: $...$ and $$...$$ maths (MathJax), \begin{align} environments, {ref}-able headings.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# --- autodoc / napoleon: Google-style docstrings, members in source order.
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Optional dependencies the docs build need not install (TensorFlow / clu for official
# checkpoints, the GCS emulator of the tests).
autodoc_mock_imports = ["tensorflow", "clu", "gcp_storage_emulator"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False   # the class signature shows the annotations
# "Attributes:" sections are rendered like "Args:" (a field list), not as attribute entries of
# their own, which would duplicate those autodoc writes for NamedTuple / dataclass fields, and
# which cannot hold the docstrings' "gamma_min, gamma_max: ..." lines.
napoleon_custom_sections = [("Attributes", "params_style")]
# A member without a docstring gets none, rather than its base class's (Flax's Module.setup).
autodoc_inherit_docstrings = False
# The docstrings write code as `name` (one backtick, as in Markdown): render it as code.
default_role = "code"

# --- Every reference must resolve: a broken {py:func} etc. is an error under -W.
nitpicky = True
# Names from other libraries and from the typing machinery cannot resolve without intersphinx
# (no network here); a reference into vdm_jax is never ignored.
_EXTERNAL = (
    r"(jax|jnp|jaxlib|flax|nn|np|numpy|optax|orbax|ocp|ml_collections|etils|epath|grain|tfds"
    r"|tensorflow_datasets|constriction|fsspec|gcsfs|PIL|tensorboardX|absl|chex|scipy|sklearn"
    r"|typing|collections|abc|concurrent|pathlib|os|io|logging|threading|subprocess|signal"
    r"|socket|types|enum|dataclasses|contextlib|datetime|http|gcp_storage_emulator)(\..*)?"
)
_BUILTINS = (
    r"(int|float|str|bytes|bool|complex|object|list|dict|tuple|set|frozenset|type|slice"
    r"|None|NoneType|Ellipsis|callable|BaseException|Exception|ValueError|TypeError|RuntimeError"
    r"|OSError|KeyError|IndexError|FloatingPointError|NotImplementedError|EOFError|IOError"
    r"|FileNotFoundError|FileExistsError|PermissionError|TimeoutError|SystemExit"
    r"|KeyboardInterrupt|StopIteration|ArithmeticError|LookupError|AttributeError"
    r"|Any|Callable|Optional|Union|Sequence|Mapping|Iterator|Iterable|Collection|NamedTuple"
    r"|TypeVar|Generic|TextIO|ArrayLike|Array|PRNGKey|PyTree|Self)"
)
# Type variables (one capital letter, e.g. vdm_jax.core.registry.T): not objects to document.
_TYPEVARS = r"(vdm_jax(\.\w+)*\.)?[A-Z]"
nitpick_ignore_regex = [
    (r"py:(class|obj|data|exc|func|meth|mod|attr)", _EXTERNAL),
    (r"py:(class|obj|data|exc)", _BUILTINS),
    (r"py:(class|obj)", _TYPEVARS),
]

# --- HTML: the theme of the JAX ecosystem's docs.
html_theme = "sphinx_book_theme"
html_title = "vdm_jax"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
html_last_updated_fmt = None
# No intersphinx: the build must run with no network. MathJax is loaded by the reader's browser.


# --- Signatures: default values whose repr is not Python (`<class 'jax.numpy.float32'>`, Flax's
# `<flax.linen.module._Sentinel object>`) make a signature unparsable, and Sphinx then splits it
# at every comma (`tuple[int, ...]` becomes two broken types). Flax's own `parent` and `name`
# fields of every nn.Module are left out; a `<class 'X'>` default is written X.
_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")
_FLAX_FIELDS = re.compile(r",\s*parent: [^=]*= <[^>]*>,\s*name: str \| None = None(?=\)$)")
_OTHER_REPR = re.compile(r"<[^<>]*>")


def _clean_signature(app, what, name, obj, options, signature, return_annotation):
  if not signature:
    return None
  signature = _FLAX_FIELDS.sub("", signature)
  signature = _CLASS_REPR.sub(r"\1", signature)
  signature = _OTHER_REPR.sub("...", signature)
  return signature, return_annotation


def setup(app):
  app.connect("autodoc-process-signature", _clean_signature)
