"""The documentation works: the site builds, and every example in it runs.

- The Sphinx site builds offline with warnings as errors (a broken reference, a
  malformed docstring or a missing page fails it), and its API page documents every
  name of `coolopt.__all__`.
- Every docstring example of coolopt passes as a doctest.
- Every ```python block of a page runs: the blocks of one page run in order, as one
  script, in a fresh interpreter. Fragments that cannot run on their own are written
  as ```{code-block} python instead, or in another language (```sh).
- The code of the README's "With Optax" section runs.
"""

from __future__ import annotations

import doctest
import importlib
import io
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import coolopt
from tests.helpers import run_python
from tests.library_helpers import once_per_session

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
# Its commands are the benchmark scripts, minutes long: run by hand, not as tests.
PAGES_NOT_RUN = {'benchmarks.md'}
PYTHON_BLOCK = re.compile(r'^```python[ \t]*\n(.*?)^```[ \t]*$', re.MULTILINE | re.DOTALL)


def python_blocks(markdown: str) -> list[str]:
  """The ```python fenced blocks of a Markdown text, in order."""
  return PYTHON_BLOCK.findall(markdown)


def run_script(code: str, path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `code`, written to `path`, with this interpreter and this checkout's coolopt."""
  path.write_text(code)
  return run_python([str(path)], path.parent, timeout)


def _pages_with_examples() -> list[Path]:
  pages = sorted(p for p in DOCS.rglob('*.md') if '_build' not in p.relative_to(DOCS).parts)
  return [p for p in pages if p.name not in PAGES_NOT_RUN and python_blocks(p.read_text())]


# The site.


def _build_site(directory: str) -> Path:
  """The HTML site, built from scratch into `directory`."""
  out = Path(directory)
  command = [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html']
  result = subprocess.run(
    [*command, '-d', str(out / 'doctrees'), str(DOCS), str(out / 'html')],
    cwd=ROOT,
    env=dict(os.environ, MPLBACKEND='Agg'),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, f'sphinx-build failed:\n{result.stdout}\n{result.stderr}'
  return out / 'html'


@pytest.fixture(scope='module')
def site() -> Path:
  """The HTML site, built once per test session (by whichever process needs it first)."""
  return once_per_session('site', _build_site)


def test_site_builds_without_warnings(site):
  assert (site / 'index.html').is_file()
  for page in ('method', 'api', 'reproducing', 'benchmarks', 'howto/optax', 'notebooks/quickstart'):
    assert (site / f'{page}.html').is_file(), page


def test_notebooks_show_their_outputs(site):
  # Executed when the site is built: every notebook page shows its outputs, and the
  # figures of those that draw.
  notebooks = sorted((DOCS / 'notebooks').glob('*.ipynb'))
  assert notebooks
  for notebook in notebooks:
    html = (site / 'notebooks' / f'{notebook.stem}.html').read_text()
    assert 'cell_output' in html, notebook.name
    if 'plt.show()' in notebook.read_text():
      assert re.search(r'<img [^>]*src="[^"]*\.png"', html), notebook.name


def test_api_page_documents_every_public_name(site):
  api = (site / 'api.html').read_text()
  missing = [name for name in coolopt.__all__ if f'id="coolopt.{name}"' not in api]
  assert not missing, f'not in docs/api.md: {missing}'


def test_method_page_shows_the_schedules_drawn_at_build_time(site):
  assert 'schedules.png' in (site / 'method.html').read_text()
  figure = site / '_images' / 'schedules.png'
  assert figure.is_file() and figure.read_bytes().startswith(b'\x89PNG')


# Docstring examples.


def run_doctests(module: types.ModuleType) -> tuple[int, int, str]:
  """Runs the examples of every docstring defined in `module`: (failed, attempted, report)."""
  report = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in doctest.DocTestFinder().find(module, module.__name__):
    runner.run(test, out=report.write)
  failed, attempted = runner.summarize(verbose=False)
  return failed, attempted, report.getvalue()


MODULES = sorted(
  ['coolopt', *(m.name for m in pkgutil.walk_packages(coolopt.__path__, 'coolopt.'))]
)


@pytest.mark.parametrize('module_name', MODULES)
def test_docstring_examples(module_name):
  failed, _, report = run_doctests(importlib.import_module(module_name))
  assert failed == 0, report


def test_docstring_examples_cover_the_public_api():
  attempted = sum(run_doctests(importlib.import_module(name))[1] for name in MODULES)
  with_examples = [
    name for name in coolopt.__all__ if '>>>' in (getattr(coolopt, name).__doc__ or '')
  ]
  assert attempted > 0
  assert {'coolmomentum', 'metropolis', 'track_kinetic_temperature'} <= set(with_examples)


def test_a_broken_docstring_example_is_caught():
  module = types.ModuleType('broken_example')
  source = '''
    def double(x):
      """Doubles a number.

      Examples:
        >>> double(2)
        5
      """
      return 2 * x
  '''
  exec(textwrap.dedent(source), module.__dict__)
  failed, attempted, report = run_doctests(module)
  assert (failed, attempted) == (1, 1)
  assert 'Expected:\n    5\nGot:\n    4' in report


# Examples of the pages and of the README.


@pytest.mark.parametrize(
  'page', _pages_with_examples(), ids=lambda p: p.relative_to(DOCS).as_posix()
)
def test_page_examples_run(page, tmp_path):
  code = '\n\n'.join(python_blocks(page.read_text()))
  # Not named after the page: howto/optax.py would shadow optax.
  result = run_script(code, tmp_path / f'page_{page.stem}.py')
  assert result.returncode == 0, f'{page.relative_to(ROOT)}:\n{result.stdout}\n{result.stderr}'


def test_every_how_to_guide_has_examples_or_commands():
  for page in sorted((DOCS / 'howto').glob('*.md')):
    text = page.read_text()
    assert python_blocks(text) or '```sh' in text, page.name


def test_a_failing_page_example_fails(tmp_path):
  markdown = textwrap.dedent("""
    # A page

    ```python
    x = 1
    ```

    ```sh
    echo not run
    ```

    ```python
    assert x == 2, 'x should be 2'
    ```
  """)
  blocks = python_blocks(markdown)
  assert blocks == ['x = 1\n', "assert x == 2, 'x should be 2'\n"]
  result = run_script('\n\n'.join(blocks), tmp_path / 'page.py')
  assert result.returncode != 0
  assert 'AssertionError: x should be 2' in result.stderr


def test_readme_optax_example_runs(tmp_path):
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('\n## With Optax\n', 1)[1].split('\n## ', 1)[0]
  blocks = python_blocks(section)
  assert blocks, 'README.md has no python block under "## With Optax"'
  result = run_script('\n\n'.join(blocks), tmp_path / 'readme_optax.py')
  assert result.returncode == 0, result.stderr
  loss, temperature = map(float, result.stdout.split())
  assert loss < 1e-2 and temperature >= 0.0
