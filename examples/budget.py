r"""What tuning costs: the expected best validation accuracy after k trials of a search.

From the N trials of one optimizer's search (each trial one setting, its score the mean
over seeds), the curve answers "had I tried only k settings drawn from these N, how good
would the best one be?", for k = 1..N, as Dodge et al. (2019) and Sivaprasad et al. (2020)
report it. The k draws are with replacement (as Dodge et al.'s formula assumes: each draw
is any of the N trials alike), and the expectation is computed, not sampled: for the trials
ranked
$v_{(1)} \le \dots \le v_{(N)}$,

.. math::

  P(\max_k = v_{(i)}) = (i/N)^k - ((i-1)/N)^k, \qquad
  E[\max_k] = \sum_i v_{(i)} \left[(i/N)^k - ((i-1)/N)^k\right].

Trials are ranked as the sweep selects: by validation accuracy, then by lower validation
loss. Trials tied on both form one group whose weight is that of its whole block of ranks,
and among them the chosen trial is any one with equal chance (its test accuracy counts as
the group's mean). A diverged trial (see `examples.sweep.diverged`) is a draw spent at
accuracy 0, validation and test: it is never chosen over a trial that finished.

Beside the expectation: the 10th and 90th percentiles of the best of k, from `resamples`
draws of k trials (a seeded bootstrap), and the test accuracy of the trial that validation
chooses among the k, expected by the same weights. The band is a spread of the best of k,
not a confidence interval: a heavy low tail (many diverged trials) can put the mean below
the 10th percentile.

References:
  Dodge, Gururangan, Card, Schwartz and Smith, "Show Your Work: Improved Reporting of
  Experimental Results", EMNLP 2019 (arXiv:1909.03004).
  Sivaprasad, Mai, Vogels, Jaggi and Fleuret, "Optimizer Benchmarking Needs to Account
  for Hyperparameter Tuning", ICML 2020 (arXiv:1910.11758).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BUDGET_JSON, BUDGET_MD, BUDGET_PNG = 'budget.json', 'budget.md', 'budget.png'
# The percentiles of the best of k that the band spans.
BAND_PERCENTILES = (10.0, 90.0)
RESAMPLES = 2000
# The trial counts budget.md shows a row for (and always N).
TABLE_KS = (1, 2, 4, 8, 16)


def _checked(name: str, values: Sequence[float], size: int | None = None) -> np.ndarray:
  array = np.asarray(values, np.float64)
  if array.ndim != 1 or not array.size:
    raise ValueError(f'{name} must be a non-empty list of trial scores, got {values!r}.')
  if size is not None and array.size != size:
    raise ValueError(
      f'{name} must hold one score per trial ({size}), got {array.size}: {values!r}.'
    )
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{name} must be finite (a diverged trial scores 0), got {values!r}.')
  return array


def _groups(validation: np.ndarray, tiebreak: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  """The trials ranked worst to best, grouped where tied: (cumulative counts, groups)."""
  order = np.lexsort((tiebreak, validation))  # By validation, then by the tie-break.
  groups: list[list[int]] = []
  for i in order:
    if (
      groups
      and validation[groups[-1][0]] == validation[i]
      and tiebreak[groups[-1][0]] == tiebreak[i]
    ):
      groups[-1].append(int(i))
    else:
      groups.append([int(i)])
  counts = np.cumsum([len(g) for g in groups])
  return counts, [np.asarray(g) for g in groups]


def max_weights(counts: np.ndarray, num_trials: int, k: int) -> np.ndarray:
  """P(the best of k draws with replacement falls in each ranked group), the groups
  ending at the cumulative `counts` of `num_trials` trials: (c_g/N)^k - (c_{g-1}/N)^k."""
  cumulative = (counts / num_trials) ** k
  return np.diff(cumulative, prepend=0.0)


def budget_curve(
  validation: Sequence[float],
  test: Sequence[float],
  *,
  tiebreak: Sequence[float] | None = None,
  seed: int = 0,
  resamples: int = RESAMPLES,
) -> dict[str, list[float]]:
  """The expected best validation accuracy after k = 1..N trials, its band and the test
  accuracy of the trial chosen.

  Args:
    validation: per trial, its validation accuracy (0 for a diverged trial).
    test: per trial, its test accuracy (0 for a diverged trial); never read to rank.
    tiebreak: per trial, what ranks trials of equal validation accuracy (higher is
      better; the sweep passes minus the validation loss). None: none, ties stay tied.
    seed: the bootstrap's seed.
    resamples: bootstrap draws of k trials per k.

  Returns:
    `{'k', 'expected_validation_accuracy', 'low', 'high', 'expected_test_accuracy'}`,
    lists of N values; `low` and `high` are the `BAND_PERCENTILES` of the best of k.

  Raises:
    ValueError: for an empty, non-finite or mismatched list, or `resamples` < 1.
  """
  validation = _checked('validation', validation)
  n = validation.size
  test = _checked('test', test, n)
  tiebreak = np.zeros(n) if tiebreak is None else _checked('tiebreak', tiebreak, n)
  if resamples < 1:
    raise ValueError(f'resamples must be a positive number of draws, got resamples={resamples}.')
  counts, groups = _groups(validation, tiebreak)
  group_validation = np.array([validation[g[0]] for g in groups])
  group_test = np.array([test[g].mean() for g in groups])
  # The bootstrap ranks by position in the ranking, so that ties resolve as above.
  rank = np.empty(n, np.int64)
  for position, g in enumerate(groups):
    rank[g] = position
  rng = np.random.default_rng(seed)
  curve: dict[str, list[float]] = {key: [] for key in ('k', 'expected_validation_accuracy')}
  curve.update(low=[], high=[], expected_test_accuracy=[])
  for k in range(1, n + 1):
    weights = max_weights(counts, n, k)
    best = group_validation[rank[rng.integers(0, n, (resamples, k))].max(axis=1)]
    low, high = np.percentile(best, BAND_PERCENTILES)
    curve['k'].append(k)
    curve['expected_validation_accuracy'].append(float(weights @ group_validation))
    curve['low'].append(float(low))
    curve['high'].append(float(high))
    curve['expected_test_accuracy'].append(float(weights @ group_test))
  return curve


def trial_scores(grid: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
  """`budget_curve`'s arguments from a sweep's per-setting entries (`validation_accuracy_mean`,
  `validation_loss_mean`, `test_accuracy_mean`, `diverged`): a diverged setting scores 0
  and ranks last."""
  scores: dict[str, list[float]] = {'validation': [], 'test': [], 'tiebreak': []}
  for entry in grid:
    finished = not entry['diverged'] and entry['validation_accuracy_mean'] is not None
    scores['validation'].append(entry['validation_accuracy_mean'] if finished else 0.0)
    scores['test'].append((entry['test_accuracy_mean'] or 0.0) if finished else 0.0)
    loss = entry.get('validation_loss_mean')
    scores['tiebreak'].append(-loss if finished and loss is not None else -math.inf)
  # A tie-break of -inf is not finite: diverged trials tie among themselves at the bottom.
  floor = min([t for t in scores['tiebreak'] if math.isfinite(t)], default=0.0) - 1.0
  scores['tiebreak'] = [t if math.isfinite(t) else floor for t in scores['tiebreak']]
  return scores


def table_ks(num_trials: int) -> list[int]:
  """The k of budget.md's rows: `TABLE_KS` below `num_trials`, and `num_trials`."""
  return [k for k in TABLE_KS if k < num_trials] + [num_trials]


def markdown_table(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
  """Per optimizer and k of `table_ks`: the expected best validation accuracy, its band and
  the expected test accuracy of the trial chosen."""
  lines = [
    '| optimizer | trials k | expected best validation accuracy | 10th-90th percentile '
    '| expected test accuracy of the choice |',
    '|---|---:|---:|---:|---:|',
  ]
  for name, curve in curves.items():
    for k in table_ks(len(curve['k'])):
      i = k - 1
      lines.append(
        f'| {name} | {k} | {curve["expected_validation_accuracy"][i]:.2%} '
        f'| {curve["low"][i]:.2%} - {curve["high"][i]:.2%} '
        f'| {curve["expected_test_accuracy"][i]:.2%} |'
      )
  return '\n'.join(lines) + '\n'


def plot(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str, title: str = '') -> None:
  """One curve per optimizer, the expected best validation accuracy against k (log axis),
  with its band."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, curve in curves.items():
    k = np.asarray(curve['k'])
    (line,) = ax.plot(k, 100 * np.asarray(curve['expected_validation_accuracy']), label=name)
    ax.fill_between(
      k,
      100 * np.asarray(curve['low']),
      100 * np.asarray(curve['high']),
      color=line.get_color(),
      alpha=0.2,
    )
  ax.set_xscale('log', base=2)
  ax.set_xlabel('trials k')
  ax.set_ylabel('expected best validation accuracy (%)')
  ax.set_title(title or 'Expected best of k trials (10th-90th percentile band)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(
  workdir: str,
  results: Mapping[str, Mapping[str, Any]],
  *,
  seed: int = 0,
  title: str = '',
) -> dict[str, dict[str, list[float]]]:
  """budget.json, budget.md and budget.png in `workdir`, from a sweep's
  `{optimizer: {'grid': [per-setting entries], ...}}`.

  Returns:
    `{optimizer: budget_curve(...)}`.
  """
  curves = {
    name: budget_curve(**trial_scores(result['grid']), seed=seed)
    for name, result in results.items()
    if result['grid']
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, BUDGET_JSON), 'w') as f:
    json.dump(curves, f, indent=2)
  with open(os.path.join(workdir, BUDGET_MD), 'w') as f:
    f.write(markdown_table(curves))
  plot(curves, os.path.join(workdir, BUDGET_PNG), title)
  return curves
