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
from examples import schema, train

FLAGS = flags.FLAGS

DEFAULT_OPTIMIZERS = ('coolmomentum', 'momentum', 'adam', 'sgd_sa')

flags.DEFINE_list('optimizers', list(DEFAULT_OPTIMIZERS), 'Optimizers to train and compare.')


def optimizer_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` that trains optimizer `name` (its overrides apply in training)."""
  config = config.copy_and_resolve_references()
  config.optimizer = name
  return config


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The comparison entry of one optimizer from its metrics rows.

  'seconds' is the training time the run logged (`wall_time`, across resumptions), so
  that a resumed or already finished run reports its whole cost.
  """
  if rows and 'valid_perplexity' in rows[-1]:
    # A language model: the last and best validation perplexity, and the last test one.
    perplexities = [row['valid_perplexity'] for row in rows if row['valid_perplexity'] is not None]
    return {
      'final_train_loss': rows[-1]['train_loss'],
      'valid_perplexity': rows[-1]['valid_perplexity'],
      'best_valid_perplexity': min(perplexities) if perplexities else None,
      'test_perplexity': rows[-1]['test_perplexity'],
      'seconds': rows[-1]['wall_time'],
    }
  accuracies = [row['test_accuracy'] for row in rows if row['test_accuracy'] is not None]
  return {
    'final_train_loss': rows[-1]['train_loss'] if rows else None,
    'test_accuracy': rows[-1]['test_accuracy'] if rows else None,
    'best_test_accuracy': max(accuracies) if accuracies else None,
    'seconds': rows[-1]['wall_time'] if rows else None,
  }


def _format(value: Any, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  if any('valid_perplexity' in result for result in results.values()):
    lines = [
      '| optimizer | final train loss | final valid perplexity | best valid perplexity '
      '| final test perplexity | seconds |',
      '|---|---:|---:|---:|---:|---:|',
    ]
    for name, result in results.items():
      lines.append(
        f'| {name} | {_format(result["final_train_loss"], ".4f")} '
        f'| {_format(result["valid_perplexity"], ".2f")} '
        f'| {_format(result["best_valid_perplexity"], ".2f")} '
        f'| {_format(result["test_perplexity"], ".2f")} '
        f'| {_format(result["seconds"], ".1f")} |'
      )
    return '\n'.join(lines) + '\n'
  lines = [
    '| optimizer | final train loss | final test accuracy | best test accuracy | seconds |',
    '|---|---:|---:|---:|---:|',
  ]
  for name, result in results.items():
    lines.append(
      f'| {name} | {_format(result["final_train_loss"], ".4f")} '
      f'| {_format(result["test_accuracy"], ".2%")} '
      f'| {_format(result["best_test_accuracy"], ".2%")} '
      f'| {_format(result["seconds"], ".1f")} |'
    )
  return '\n'.join(lines) + '\n'


def compare(
  config: ml_collections.ConfigDict, workdir: str, optimizers: Sequence[str]
) -> dict[str, dict[str, Any]]:
  """Trains `config` with each of `optimizers` and writes the comparison files.

  Returns:
    `{optimizer: {'final_train_loss', 'test_accuracy', 'best_test_accuracy', 'seconds'}}`.
  """
  if not optimizers:
    raise ValueError(
      'optimizers must name at least one optimizer to train, got none (--optimizers=); '
      f'e.g. --optimizers={",".join(DEFAULT_OPTIMIZERS)}.'
    )
  configs = {name: optimizer_config(config, name) for name in optimizers}
  # Every configuration is checked before the first one spends time training.
  for name_config in configs.values():
    schema.validate_config(name_config)
  results, runs = {}, {}
  for name, name_config in configs.items():
    run_dir = os.path.join(workdir, name)
    train.train_and_evaluate(name_config, run_dir)
    runs[name] = train.read_metrics(os.path.join(run_dir, train.METRICS_FILE))
    results[name] = summarize(runs[name])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'comparison.json'), 'w') as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, 'comparison.md'), 'w') as f:
      f.write(markdown_table(results))
    train.plot_curves(runs, os.path.join(workdir, 'comparison.png'))
  return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  trainer_main.setup()
  schema.prefer_given(FLAGS.config, trainer_main.given_fields(), FLAGS.optimizers)

  def run():
    print(markdown_table(compare(FLAGS.config, FLAGS.workdir, FLAGS.optimizers)))

  trainer_main.exit_on_run_errors(run)


if __name__ == '__main__':
  app.run(main)
