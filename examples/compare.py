"""Trains one config with several optimizers and compares them.

  python -m examples.compare --config examples/configs/digits.py --workdir /tmp/compare \
    [--optimizers coolmomentum,momentum,adam,sgd_sa]

Each optimizer trains into <workdir>/<optimizer>/ with its recipe from
`config.optimizers` (see examples/configs/default.py), resuming if that directory
holds a checkpoint. The comparison lands in <workdir>/comparison.md (a table),
comparison.json and comparison.png (the paper's three panels, all optimizers).
Takes the same flags as examples.main, multi-process and verbosity ones included,
and prints as it does: a progress bar per epoch on a terminal, one line per epoch of
each optimizer, then the table. `tensorboard --logdir WORKDIR` shows the optimizers'
curves side by side (each run's event files are in its directory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags

from examples import main as trainer_main
from examples import schema, tasks, train
from examples.workdir import plot_curves

FLAGS = flags.FLAGS

DEFAULT_OPTIMIZERS = ('coolmomentum', 'momentum', 'adam', 'sgd_sa')

flags.DEFINE_list('optimizers', list(DEFAULT_OPTIMIZERS), 'Optimizers to train and compare.')


def optimizer_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` that trains optimizer `name` (its overrides apply in training)."""
  config = config.copy_and_resolve_references()
  config.optimizer = name
  return config


def summarize(rows: Sequence[Mapping[str, Any]], scores: Sequence[Any]) -> dict[str, Any]:
  """The comparison entry of one optimizer from its metrics rows: the last training loss,
  the last value of each of the task's `scores` (see `examples.tasks.Score`) and the
  best of the first.

  'seconds' is the training time the run logged (`wall_time`, across resumptions), so
  that a resumed or already finished run reports its whole cost.
  """
  last = rows[-1] if rows else {}
  result = {'final_train_loss': last.get('train_loss')}
  for i, score in enumerate(scores):
    result[score.key] = last.get(score.key)
    if i == 0:
      values = [row[score.key] for row in rows if row.get(score.key) is not None]
      result[f'best_{score.key}'] = score.best(values) if values else None
  result['seconds'] = last.get('wall_time')
  return result


def _format(value: Any, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def markdown_table(results: Mapping[str, Mapping[str, Any]], scores: Sequence[Any]) -> str:
  """The entries of `summarize` as a table, a row per optimizer."""
  header = ['optimizer', 'final train loss']
  for i, score in enumerate(scores):
    header += [f'final {score.label}'] + ([f'best {score.label}'] if i == 0 else [])
  header.append('seconds')
  lines = ['| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(header) - 1)]
  for name, result in results.items():
    cells = [name, _format(result['final_train_loss'], '.4f')]
    for i, score in enumerate(scores):
      cells.append(_format(result[score.key], score.spec))
      if i == 0:
        cells.append(_format(result[f'best_{score.key}'], score.spec))
    cells.append(_format(result['seconds'], '.1f'))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def compare(
  config: ml_collections.ConfigDict, workdir: str, optimizers: Sequence[str]
) -> dict[str, dict[str, Any]]:
  """Trains `config` with each of `optimizers` and writes the comparison files.

  Returns:
    `{optimizer: summarize(its rows)}`, e.g. `{'final_train_loss', 'test_accuracy',
    'best_test_accuracy', 'seconds'}` for an image classifier.
  """
  if not optimizers:
    raise ValueError(
      'optimizers must name at least one optimizer to train, got none (--optimizers=); '
      f'e.g. --optimizers={",".join(DEFAULT_OPTIMIZERS)}.'
    )
  scores = tasks.create_task(config).scores
  configs = {name: optimizer_config(config, name) for name in optimizers}
  # Every configuration is checked before the first one spends time training.
  for name_config in configs.values():
    schema.validate_config(name_config)
  results, runs = {}, {}
  for name, name_config in configs.items():
    run_dir = os.path.join(workdir, name)
    train.train_and_evaluate(name_config, run_dir)
    runs[name] = train.read_metrics(os.path.join(run_dir, train.METRICS_FILE))
    results[name] = summarize(runs[name], scores)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'comparison.json'), 'w') as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, 'comparison.md'), 'w') as f:
      f.write(markdown_table(results, scores))
    plot_curves(runs, os.path.join(workdir, 'comparison.png'), scores[0])
  return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  trainer_main.setup()
  schema.prefer_given(FLAGS.config, trainer_main.given_fields(), FLAGS.optimizers)

  def run():
    results = compare(FLAGS.config, FLAGS.workdir, FLAGS.optimizers)
    print(markdown_table(results, tasks.create_task(FLAGS.config).scores))

  trainer_main.exit_on_run_errors(run)


if __name__ == '__main__':
  app.run(main)
