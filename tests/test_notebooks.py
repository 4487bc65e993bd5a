"""The notebooks of docs/notebooks run, and the assertions in their cells hold.

Each notebook runs in a fresh interpreter, this one's, as a plain Python program: its
code cells are executed in order in one namespace, so notebooks hold Python only (no
IPython magics). The first failing cell stops the run, and the test reports the
cell's number and traceback. Notebooks are stored without outputs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest

from tests.helpers import run_python

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'docs' / 'notebooks').glob('*.ipynb'))

# Runs the code cells of the notebook given as its argument; exits with 1 at the
# first cell that raises, after printing which cell it was and its traceback.
CELL_RUNNER = """
import linecache
import sys
import traceback

import nbformat

path = sys.argv[1]
namespace = {'__name__': '__main__'}
for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
  if cell.cell_type != 'code':
    continue
  filename = f'{path} [cell {index}]'
  # Tracebacks show the failing line of the cell.
  lines = cell.source.splitlines(keepends=True)
  linecache.cache[filename] = (len(cell.source), None, lines, filename)
  try:
    exec(compile(cell.source, filename, 'exec'), namespace)
  except BaseException:
    print(f'{path}: code cell {index} failed:', file=sys.stderr)
    traceback.print_exc()
    sys.exit(1)
"""


def run_notebook(path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
  """Executes the notebook at `path` in a fresh interpreter, from its directory."""
  return run_python(['-c', CELL_RUNNER, str(path)], path.parent, timeout)


def test_the_notebooks_are_there():
  assert {p.stem for p in NOTEBOOKS} >= {'quickstart', 'metropolis', 'data_parallel'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
  result = run_notebook(path)
  assert result.returncode == 0, f'{path.name}:\n{result.stdout}\n{result.stderr}'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_valid_and_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert any('assert' in cell.source for cell in code_cells), 'a notebook checks what it shows'
  for cell in code_cells:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def _write_notebook(path: Path, *sources: str) -> Path:
  cells = [nbformat.v4.new_markdown_cell('# A notebook')]
  cells += [nbformat.v4.new_code_cell(source) for source in sources]
  nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
  return path


def test_a_failing_assert_fails_the_run(tmp_path):
  path = _write_notebook(
    tmp_path / 'broken.ipynb', 'x = 1', 'y = x + 1', "assert y == 3, 'y should be 3'", 'z = 0'
  )
  result = run_notebook(path)
  assert result.returncode == 1
  assert 'code cell 3 failed' in result.stderr
  assert "assert y == 3, 'y should be 3'" in result.stderr
  assert 'AssertionError: y should be 3' in result.stderr


def test_a_passing_notebook_passes(tmp_path):
  path = _write_notebook(tmp_path / 'fine.ipynb', 'x = 1', 'assert x + 1 == 2')
  result = run_notebook(path)
  assert result.returncode == 0, result.stderr
