"""The expected best of k trials: the exact formula against enumeration, ties, the band."""

import itertools
import json
import os

import numpy as np
import pytest

from examples import budget


def _enumerated(validation, test, tiebreak, k):
  """E[best validation] and E[test of the choice] over every sequence of k draws, the
  choice uniform among the distinct tied trials drawn."""
  n = len(validation)
  best_total = test_total = 0.0
  for draws in itertools.product(range(n), repeat=k):
    key = max((validation[i], tiebreak[i]) for i in draws)
    tied = sorted({i for i in draws if (validation[i], tiebreak[i]) == key})
    best_total += key[0]
    test_total += np.mean([test[i] for i in tied])
  return best_total / n**k, test_total / n**k


@pytest.mark.parametrize(
  'validation,test,tiebreak',
  [
    ([0.5, 0.9, 0.7, 0.8], [0.4, 0.85, 0.75, 0.6], [0, 0, 0, 0]),
    # Ties on validation, broken by the loss for two of them and not for the other two.
    ([0.8, 0.8, 0.6, 0.8, 0.8], [0.1, 0.9, 0.5, 0.3, 0.7], [-1.0, -2.0, 0.0, -0.5, -0.5]),
  ],
)
def test_exact_against_enumeration(validation, test, tiebreak):
  curve = budget.budget_curve(validation, test, tiebreak=tiebreak, resamples=10)
  assert curve['k'] == list(range(1, len(validation) + 1))
  for k in (1, 2, 3):
    expected_best, expected_test = _enumerated(validation, test, tiebreak, k)
    assert curve['expected_validation_accuracy'][k - 1] == pytest.approx(expected_best, abs=1e-12)
    assert curve['expected_test_accuracy'][k - 1] == pytest.approx(expected_test, abs=1e-12)


def test_one_trial_is_the_mean_and_many_tend_to_the_best():
  rng = np.random.default_rng(1)
  validation = rng.uniform(0.5, 0.95, 16)
  test = validation - 0.02
  curve = budget.budget_curve(validation, test)
  assert curve['expected_validation_accuracy'][0] == pytest.approx(validation.mean())
  assert curve['expected_test_accuracy'][0] == pytest.approx(test.mean())
  # (15/16)^16 of the mass is off the best at k = N: the curve is below the maximum.
  assert curve['expected_validation_accuracy'][-1] < validation.max()
  assert np.all(np.diff(curve['expected_validation_accuracy']) >= 0)
  low, high = np.array(curve['low']), np.array(curve['high'])
  mean = np.array(curve['expected_validation_accuracy'])
  assert np.all(low <= mean) and np.all(mean <= high)
  # The band is of the best of k, whose distribution is P(best <= v_(i)) = (i/N)^k: each
  # bootstrap percentile lies within one rank of the exact one.
  ranked = np.sort(validation)
  for k in (1, 4, 16):
    for key, q in (('low', 0.1), ('high', 0.9)):
      exact = int(np.argmax((np.arange(1, 17) / 16) ** k >= q))
      near = ranked[max(exact - 1, 0)], ranked[min(exact + 1, 15)]
      assert near[0] <= curve[key][k - 1] <= near[1], (k, key)


def test_the_bootstrap_is_seeded_and_the_expectation_is_not_sampled():
  rng = np.random.default_rng(2)
  values = rng.uniform(0, 1, 30)
  a = budget.budget_curve(values, values, seed=3, resamples=50)
  assert a == budget.budget_curve(values, values, seed=3, resamples=50)
  b = budget.budget_curve(values, values, seed=4, resamples=50)
  assert a['expected_validation_accuracy'] == b['expected_validation_accuracy']
  assert (a['low'], a['high']) != (b['low'], b['high'])


def test_diverged_trials_score_zero_and_rank_last():
  grid = [
    {
      'validation_accuracy_mean': 0.9,
      'validation_loss_mean': 0.3,
      'test_accuracy_mean': 0.8,
      'diverged': False,
    },
    {
      'validation_accuracy_mean': 0.95,
      'validation_loss_mean': None,
      'test_accuracy_mean': 0.9,
      'diverged': True,
    },
    {
      'validation_accuracy_mean': None,
      'validation_loss_mean': None,
      'test_accuracy_mean': None,
      'diverged': True,
    },
  ]
  scores = budget.trial_scores(grid)
  assert scores['validation'] == [0.9, 0.0, 0.0]
  assert scores['test'] == [0.8, 0.0, 0.0]
  curve = budget.budget_curve(**scores)
  assert curve['expected_validation_accuracy'][0] == pytest.approx(0.3)
  # At k draws, the finished trial is chosen unless every draw diverged: 1 - (2/3)^k.
  assert curve['expected_test_accuracy'][1] == pytest.approx(0.8 * (1 - (2 / 3) ** 2))


@pytest.mark.parametrize(
  'kwargs,match',
  [
    ({'validation': [], 'test': []}, 'validation must be a non-empty'),
    ({'validation': [0.5, 0.6], 'test': [0.5]}, r'test must hold one score per trial \(2\)'),
    ({'validation': [0.5, float('nan')], 'test': [0.5, 0.5]}, 'validation must be finite'),
    ({'validation': [0.5], 'test': [0.5], 'resamples': 0}, 'resamples must be a positive'),
  ],
)
def test_bad_scores(kwargs, match):
  with pytest.raises(ValueError, match=match):
    budget.budget_curve(**kwargs)


def test_write(tmp_path):
  rng = np.random.default_rng(0)
  grid = [
    {
      'validation_accuracy_mean': v,
      'validation_loss_mean': 1 - v,
      'test_accuracy_mean': v,
      'diverged': False,
    }
    for v in rng.uniform(0.3, 0.9, 20)
  ]
  curves = budget.write(str(tmp_path), {'a': {'grid': grid}, 'b': {'grid': grid[:3]}})
  with open(tmp_path / budget.BUDGET_JSON) as f:
    assert json.load(f) == curves
  table = (tmp_path / budget.BUDGET_MD).read_text()
  # Rows k = 1, 2, 4, 8, 16, N for 20 trials, and 1, 2, N for 3.
  assert [line.split('|')[2].strip() for line in table.splitlines()[2:]] == [
    '1',
    '2',
    '4',
    '8',
    '16',
    '20',
    '1',
    '2',
    '3',
  ]
  assert os.path.getsize(tmp_path / budget.BUDGET_PNG) > 0
