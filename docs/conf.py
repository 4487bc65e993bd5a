"""Sphinx configuration of the coolopt documentation.

Build offline with warnings as errors::

  sphinx-build -W --keep-going -b html docs docs/_build/html

The notebooks are stored without outputs and executed when the site is built
(cached in the build directory's ``.jupyter_cache``, so a rebuild runs only those that
changed); a cell that raises fails the build. The schedules figure of the method
page is drawn from coolopt itself when the build starts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# coolopt from this checkout, whether or not it is installed, here and in the
# kernels that execute the notebooks.
sys.path.insert(0, str(ROOT))
os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
# The kernels draw with the notebook backend, whatever MPLBACKEND the build was started
# with (Agg, in the tests, would make plt.show() draw nothing).
os.environ.pop('MPLBACKEND', None)

import coolopt  # noqa: E402

project = 'coolopt'
author = 'The coolopt authors'
copyright = '2025, The coolopt authors'
release = coolopt.__version__
version = release

extensions = [
  'myst_nb',
  'sphinx.ext.autodoc',
  'sphinx.ext.mathjax',
  'sphinx.ext.napoleon',
  'sphinx.ext.viewcode',
]

exclude_patterns = ['_build', '_scripts', 'Thumbs.db', '.DS_Store', '**.ipynb_checkpoints']
source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb', '.rst': 'restructuredtext'}
root_doc = 'index'

# A reference to a coolopt object that does not exist fails the build. Without
# intersphinx (no network) names from other packages cannot be resolved, so they
# are let through.
nitpicky = True
nitpick_ignore_regex = [
  (r'py:.*', r'(optax|chex|jax|jnp|np|numpy|flax|typing|collections|types)(\..*)?'),
  (r'py:.*', r'(Any|Callable|Sequence|NamedTuple|PRNGKey|Array|Numeric|Params|Updates)'),
  (r'py:.*', r'(int|float|str|bool|tuple|list|dict|type|None|object)'),
]

# Autodoc and Google-style docstrings.
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
# Keep the names of optax's and chex's type aliases instead of their expansions.
autodoc_type_aliases = {
  name: name
  for name in (
    'chex.Array',
    'chex.Numeric',
    'chex.PRNGKey',
    'optax.OptState',
    'optax.Params',
    'optax.ScalarOrSchedule',
    'optax.Schedule',
    'optax.Updates',
  )
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `Attributes:` of the state NamedTuples as a field list: no duplicate object
# descriptions next to the fields that autodoc finds on the class.
napoleon_use_ivar = True

# MyST and notebooks.
myst_enable_extensions = ['amsmath', 'dollarmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
nb_execution_mode = 'cache'
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 600

# No network while building.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

html_theme = 'sphinx_book_theme'
html_title = 'coolopt'
html_theme_options = {
  'show_toc_level': 2,
  'navigation_with_keys': False,
}
html_static_path: list[str] = []


def _plot_schedules(app) -> None:
  """Draws `_static/schedules.png` before the sources are read."""
  spec = importlib.util.spec_from_file_location(
    'plot_schedules', DOCS / '_scripts' / 'plot_schedules.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.plot_schedules(Path(app.srcdir) / '_static' / 'schedules.png')


def _unwrap_alias_refs(app, what, name, obj, options, signature, return_annotation):
  """Writes `X | None` for an alias `X` in a union, which autodoc renders as a repr."""

  def unwrap(text):
    return None if text is None else _ALIAS_REF.sub(r'\1', text)

  return unwrap(signature), unwrap(return_annotation)


_ALIAS_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def setup(app):
  app.connect('builder-inited', _plot_schedules)
  app.connect('autodoc-process-signature', _unwrap_alias_refs)
  return {'parallel_read_safe': True}
