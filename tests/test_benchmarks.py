"""The benchmark scripts stay runnable as `python -m benchmarks.NAME`.

They measure for minutes, so they are not run here; each must import from the
repository root and have the `main` that its `__main__` block calls.
"""

import importlib
import os
import pkgutil

import pytest

import benchmarks

SCRIPTS = sorted(
  name
  for _, name, _ in pkgutil.iter_modules([os.path.dirname(benchmarks.__file__)])
  if name not in ('machine', 'timing')
)


def test_every_script_is_listed():
  assert len(SCRIPTS) >= 8 and 'lstm_lm' in SCRIPTS


@pytest.mark.parametrize('name', SCRIPTS)
def test_script_imports_and_has_main(name):
  module = importlib.import_module(f'benchmarks.{name}')
  assert callable(module.main)
  with open(module.__file__) as f:
    assert "if __name__ == '__main__':" in f.read()
