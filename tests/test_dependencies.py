"""The `[examples]` and `[test]` extras install no TensorFlow.

Their requirements are read from pyproject.toml (what `pip install -e '.[examples]'`
installs) and followed through the metadata of the distributions installed here.
"""

import importlib.metadata
import os
import re

import pytest
import tomllib
from packaging.requirements import Requirement

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow Datasets and its metadata protos are read without TensorFlow.
ALLOWED = {'tensorflow-datasets', 'tensorflow-metadata'}


def _normalized(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _is_tensorflow(name: str) -> bool:
  name = _normalized(name)
  return name not in ALLOWED and (name.startswith(('tensorflow', 'tf-')) or name == 'tf-keras')


def _requirements(extra: str) -> dict[str, list[str]]:
  """Every distribution `.[extra]` requires, to the chain of names that requires it."""
  with open(os.path.join(REPO_ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  pending = [(Requirement(r), ['coolopt']) for r in project['optional-dependencies'][extra]]
  pending += [(Requirement(r), ['coolopt']) for r in project['dependencies']]
  seen: dict[str, list[str]] = {}
  while pending:
    requirement, chain = pending.pop()
    name = _normalized(requirement.name)
    if requirement.marker and not any(
      requirement.marker.evaluate({'extra': e}) for e in ('', extra)
    ):
      continue
    if name == 'coolopt':  # coolopt[examples] within [test]
      for extra_name in requirement.extras:
        pending += [
          (Requirement(r), [*chain, f'coolopt[{extra_name}]'])
          for r in project['optional-dependencies'][extra_name]
        ]
      continue
    if name in seen:
      continue
    seen[name] = [*chain, name]
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue  # Not installed here: its own requirements cannot be read.
    for text in dist.requires or []:
      nested = Requirement(text)
      extras = ('', *requirement.extras)
      if nested.marker is None or any(nested.marker.evaluate({'extra': e}) for e in extras):
        pending.append((nested, seen[name]))
  return seen


@pytest.mark.parametrize('extra', ['examples', 'test'])
def test_the_extra_requires_no_tensorflow(extra):
  required = _requirements(extra)
  assert {'grain', 'flax', 'tensorflow-datasets', 'pillow'} <= required.keys()
  tensorflow = {name: ' <- '.join(reversed(chain)) for name, chain in required.items()}
  assert {n: c for n, c in tensorflow.items() if _is_tensorflow(n)} == {}


def test_the_check_finds_tensorflow_where_it_is_required():
  # The Keras benchmark's extra does require TensorFlow: the check can fail.
  assert any(_is_tensorflow(name) for name in _requirements('keras_peer'))
