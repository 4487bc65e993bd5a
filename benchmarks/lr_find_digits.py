r"""Does the range test's rate train? CoolMomentum on digits at the suggested rates and on a grid.

For each seed: the range test of examples/configs/digits.py (`examples.lr_find`, rho
held at rho_0 = 0.99) gives a rate by each rule ('minimum': the rate of the lowest
smoothed loss / 10; 'steepest': the steepest descent); then the full recipe (10
epochs, CoolMomentum cooled from rho_0 = 0.99) trains at each suggested rate and at
each rate of a grid. Printed: the suggestions, the final test accuracy of every run,
and the mean over the seeds per rate, with each suggestion's gap to the best grid
rate in accuracy points.

From the repository root:

  python -m benchmarks.lr_find_digits
  python -m benchmarks.lr_find_digits --seeds 0,1,2 --plot docs/howto/lr_find_digits.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile

import coolopt
from benchmarks.machine import machine
from examples import lr_find, train
from examples.configs import digits

GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


def digits_config(seed: int, learning_rate: float | None = None):
  config = digits.get_config()
  config.seed = seed
  config.progress_bar = False
  if learning_rate is not None:
    config.learning_rate = learning_rate
  return config


def test_accuracy(seed: int, learning_rate: float, workdir: str) -> float:
  """The final test accuracy of the digits recipe at `learning_rate`."""
  train.train_and_evaluate(digits_config(seed, learning_rate), workdir)
  rows = train.read_metrics(os.path.join(workdir, train.METRICS_FILE))
  return rows[-1]['test_accuracy']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
  parser.add_argument('--grid', default=','.join(map(str, GRID)), help='comma-separated rates')
  parser.add_argument('--num_steps', type=int, default=300, help='steps of the range test')
  parser.add_argument('--plot', default=None, help="copy the first seed's lr_find.png here")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  grid = [float(r) for r in args.grid.split(',')]
  print(machine())

  accuracies: dict[tuple[str, float], list[float]] = {}
  suggestions: dict[str, list[float]] = {rule: [] for rule in coolopt.range_test.SUGGESTION_RULES}
  with tempfile.TemporaryDirectory() as root:
    for seed in seeds:
      workdir = os.path.join(root, f'lr_find_{seed}')
      result = lr_find.lr_find(digits_config(seed), workdir, num_steps=args.num_steps)
      if args.plot and seed == seeds[0]:
        shutil.copyfile(os.path.join(workdir, lr_find.PLOT_FILE), args.plot)
      kept = result['diverged_at_step'] or len(result['losses'])
      for rule in suggestions:
        rate = coolopt.suggest_learning_rate(
          result['learning_rates'][:kept], result['losses'][:kept], rule=rule
        )
        suggestions[rule].append(rate)
        accuracy = test_accuracy(seed, rate, os.path.join(root, f'{rule}_{seed}'))
        accuracies.setdefault((rule, seed), []).append(accuracy)
        print(f'seed {seed}: {rule} rule suggests {rate:.4g}; test accuracy {accuracy:.4f}')
      for rate in grid:
        accuracy = test_accuracy(seed, rate, os.path.join(root, f'grid_{rate}_{seed}'))
        accuracies.setdefault(('grid', rate), []).append(accuracy)
        print(f'seed {seed}: grid rate {rate:g}; test accuracy {accuracy:.4f}')

  print('\n| learning rate | test accuracy, mean over seeds | per seed |')
  print('|---|---:|---|')
  grid_means = {}
  for rate in grid:
    values = accuracies[('grid', rate)]
    grid_means[rate] = statistics.mean(values)
    print(f'| {rate:g} | {grid_means[rate]:.2%} | {", ".join(f"{v:.2%}" for v in values)} |')
  best_rate = max(grid_means, key=grid_means.get)
  for rule, rates in suggestions.items():
    values = [accuracies[(rule, seed)][0] for seed in seeds]
    mean = statistics.mean(values)
    print(
      f'| {rule} rule: {", ".join(f"{r:.3g}" for r in rates)} | {mean:.2%} '
      f'| {", ".join(f"{v:.2%}" for v in values)} |'
    )
  print(f'\nbest grid rate {best_rate:g}: {grid_means[best_rate]:.2%}')
  for rule in suggestions:
    mean = statistics.mean(accuracies[(rule, seed)][0] for seed in seeds)
    print(
      f'{rule} rule: {100 * (mean - grid_means[best_rate]):+.2f} points from the best grid rate'
    )


if __name__ == '__main__':
  main()
