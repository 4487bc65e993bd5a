"""The random search's spaces and sampler: in range, seeded, each trial fixed by its index."""

import math

import pytest

from examples import search


@pytest.mark.parametrize('name', list(search.SEARCH_SPACES))
def test_draws_lie_in_the_space_and_extend_a_shorter_search(name):
  trials = search.sample(name, 32, seed=0)
  assert search.sample(name, 8, seed=0) == trials[:8]
  assert search.sample(name, 8, seed=1) != trials[:8]
  space = search.get_space(name)
  for trial in trials:
    assert set(trial) == {d.field for d in space.dimensions}
    for position in search.positions(name, trial).values():
      assert 0.0 <= position <= 1.0
  # Spread over the range, not bunched at one end.
  for d in space.dimensions:
    spread = [search.positions(name, t)[d.field] for t in trials]
    assert min(spread) < 0.25 and max(spread) > 0.75


def test_one_minus_log_dimension():
  d = search.Dimension('rho_0', -3.0, -1.0, search.ONE_MINUS_LOG)
  assert d.value(-3.0) == pytest.approx(0.999)
  assert d.value(-1.0) == pytest.approx(0.9)
  assert d.position(0.99) == pytest.approx(0.5)
  assert d.describe() == 'rho_0 = 1 - 10^U(-3, -1)'


def test_the_spaces_of_the_paper_claim():
  # CoolMomentum tunes 2 knobs (its third, the cooling length, is the run's), momentum 3,
  # Adam 4, and Adam with the rate alone 1.
  counts = {name: len(s.dimensions) for name, s in search.SEARCH_SPACES.items()}
  assert counts == {
    'coolmomentum': 2,
    'coolmomentum_thermostat': 2,
    'momentum': 3,
    'adam': 4,
    'adam_lr': 1,
    'sgd_sa': 2,
  }
  assert dict(search.SEARCH_SPACES['coolmomentum_thermostat'].fixed) == {'cooling': 'thermostat'}
  assert '| adam_lr | adam: lr = 10^U(-5, -1) |' in search.table()


@pytest.mark.parametrize(
  'call,match',
  [
    (lambda: search.sample('nadam', 4), "No search space for 'nadam'"),
    (lambda: search.sample('adam', 0), 'trials must be a positive number'),
    (lambda: search.Dimension('lr', 0.0, -1.0), 'low < high'),
    (lambda: search.Dimension('lr', -1.0, math.inf), 'finite'),
    (lambda: search.Dimension('lr', -2.0, -1.0, 'linear'), 'scale must be one of'),
    (lambda: search.RandomSearch(0), 'trials must be a positive'),
    (lambda: search.RandomSearch(4, seeds=(1, 1)), 'distinct'),
  ],
)
def test_bad_spaces_and_searches_are_refused(call, match):
  with pytest.raises(ValueError, match=match):
    call()
