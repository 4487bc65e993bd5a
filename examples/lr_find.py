"""The learning-rate range test of a config: which learning rate to train it with.

  python -m examples.lr_find --config examples/configs/digits.py --workdir /tmp/digits_lr
  python -m examples.lr_find --config examples/configs/cifar10_resnet20.py \
    --workdir /tmp/cifar10_lr --num_steps=500 --lr_min=1e-5 --lr_max=1

Trains the config's model with its optimizer from the initial state while the
learning rate grows exponentially from `--lr_min` to `--lr_max` over `--num_steps`
steps (`coolopt.lr_range_schedule`), with the trainer's own jitted step (every model,
dataset and parallelism of examples/train.py; the language model carries the LSTM
state of its streams from window to window). CoolMomentum's rho stays at rho_0: the
test probes the hot start, before any cooling. The loss is smoothed by a
bias-corrected moving average and the test stops once it exceeds
`--divergence_threshold` times its minimum or is not finite.

Writes <workdir>/lr_find.json (the learning rates, losses and smoothed losses of
every step, the suggested learning rate and its rule) and <workdir>/lr_find.png (the
smoothed loss against the learning rate, the suggestion marked), and prints the
suggestion. A sweep that reads fewer steps than twice the moving average's length
(1 / (1 - smoothing): 100 steps at 0.98), because it is short or diverged early, is too
short for a reliable suggestion: the result carries a warning, which is printed. A
sweep of fewer than 3 steps before its end or its divergence suggests nothing: an
error says what happened and what to change. Nothing is checkpointed: a training
workdir's checkpoints stay as they are. Takes the multi-process and verbosity flags of
examples.main (library logs from WARNING on unless `-v 0`), and sets up as it does
(`examples.main.setup`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure

import coolopt
from examples import main as trainer_main
from examples import schema, tasks, train

FLAGS = flags.FLAGS

RESULT_FILE = 'lr_find.json'
PLOT_FILE = 'lr_find.png'

flags.DEFINE_integer('num_steps', 300, 'Steps of the sweep from lr_min to lr_max.')
flags.DEFINE_float('lr_min', 1e-5, 'Learning rate of the first step.')
flags.DEFINE_float('lr_max', 10.0, 'Learning rate of the last step.')
flags.DEFINE_enum('rule', 'steepest', coolopt.range_test.SUGGESTION_RULES, 'Suggestion rule.')
flags.DEFINE_float('smoothing', 0.98, 'Factor of the moving average of the loss.')
flags.DEFINE_float(
  'divergence_threshold', 4.0, 'Stop once the smoothed loss exceeds this multiple of its minimum.'
)


def _train_batches(task: tasks.Task) -> Iterator[dict[str, np.ndarray]]:
  """The training batches of epoch 0, 1, ... in the trainer's order, without end."""
  epoch = 0
  while True:
    yield from task.train_batches(epoch)
    epoch += 1


# Steps a suggestion needs at least, whatever the smoothing.
MIN_SUGGESTION_STEPS = 3


def reliable_steps(smoothing: float) -> int:
  """The steps a sweep must read for a reliable suggestion: twice the moving average's
  length 1 / (1 - smoothing), and at least `MIN_SUGGESTION_STEPS`."""
  return max(MIN_SUGGESTION_STEPS, 2 * round(1.0 / (1.0 - smoothing)))


def _too_short(
  kept: int, num_steps: int, diverged_at: int | None, learning_rates: list[float]
) -> str:
  """What happened to a sweep that read only `kept` steps."""
  if diverged_at is None:
    return f'The sweep ran all its {num_steps} steps (--num_steps={num_steps})'
  return (
    f'The loss diverged at step {diverged_at} of {num_steps}, at the learning rate '
    f'{learning_rates[diverged_at]:.3g}, after {kept} steps'
  )


def _json_number(value: float) -> float | None:
  return value if math.isfinite(value) else None


def plot(result: dict[str, Any], path: str) -> None:
  """The smoothed loss against the learning rate (log scale), the suggestion marked."""
  rates = np.asarray(result['learning_rates'])
  losses = np.asarray([np.nan if x is None else x for x in result['losses']])
  smoothed = np.asarray([np.nan if x is None else x for x in result['smoothed_losses']])
  suggestion = result['suggested_learning_rate']
  figure = Figure(figsize=(6.4, 4.2))
  figure.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
  ax = figure.subplots()
  ax.plot(rates, losses, color='0.75', linewidth=0.8, label='loss')
  ax.plot(rates, smoothed, color='C0', label='smoothed loss')
  at_suggestion = np.interp(np.log(suggestion), np.log(rates), smoothed)
  ax.axvline(suggestion, color='C3', linestyle='--', linewidth=1)
  ax.plot([suggestion], [at_suggestion], 'o', color='C3', label=f'suggested {suggestion:.3g}')
  # From the lowest loss before the divergence to the divergence threshold.
  kept = slice(result['diverged_at_step'])
  lowest = np.nanmin(np.concatenate([losses[kept], smoothed[kept]]))
  top = min(np.nanmax(smoothed[kept]), result['divergence_threshold'] * np.nanmin(smoothed))
  ax.set_ylim(lowest - 0.05 * (top - lowest), top + 0.05 * (top - lowest))
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel('training loss')
  ax.set_title(f'{result["optimizer"]}: rule {result["rule"]!r}')
  ax.grid(True, alpha=0.3)
  ax.legend(loc='upper left')
  figure.savefig(path, dpi=100)


def lr_find(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  num_steps: int = 300,
  lr_min: float = 1e-5,
  lr_max: float = 10.0,
  rule: str = 'steepest',
  smoothing: float = 0.98,
  divergence_threshold: float = 4.0,
) -> dict[str, Any]:
  """Runs the range test of `config` and writes lr_find.json and lr_find.png to `workdir`.

  'metropolis_coolmomentum' is tested without its Metropolis test, as CoolMomentum:
  the test would roll back the diverging steps that the range test looks for.

  Returns:
    What lr_find.json holds: 'learning_rates', 'losses', 'smoothed_losses' (one per
    step run; None for a non-finite loss), 'suggested_learning_rate', 'rule',
    'diverged_at_step' (None if the sweep ended first), 'warning' (None, or why the
    suggestion is uncertain: too few steps read), 'optimizer' and the arguments.

  Raises:
    ValueError: for a config that cannot train, for 'sgd_sa' (its rates are its
      multipliers: there is no learning rate to find), for bad arguments, or for a
      sweep that read fewer than 3 steps before it ended or diverged.
  """
  config, task = train.prepare(config)
  if config.optimizer == 'sgd_sa':
    raise ValueError(
      "config.optimizer must have a learning rate for the range test, got 'sgd_sa', whose "
      'rates are config.metropolis_multipliers.'
    )
  if config.optimizer == 'metropolis_coolmomentum':
    config.optimizer = 'coolmomentum'
  if not (isinstance(num_steps, int) and num_steps >= MIN_SUGGESTION_STEPS):
    raise ValueError(
      f'num_steps must be an integer >= {MIN_SUGGESTION_STEPS}, the fewest steps a '
      f'suggestion reads, got num_steps={num_steps!r}.'
    )
  schedule = coolopt.lr_range_schedule(lr_min, lr_max, num_steps)
  coolopt.smooth_losses([], smoothing)  # Checks the arguments before anything compiles.
  coolopt.divergence_step([], divergence_threshold)

  run = train.build(config, task, learning_rate=schedule, constant_rho=True)
  parallel = run.parallel
  state = parallel.put_state(run.state)

  learning_rates, losses, diverged_at = [], [], None
  for step, batch in zip(range(num_steps), _train_batches(task), strict=False):
    state, metrics = parallel.train_step(state, parallel.put_batch(batch))
    metrics = parallel.get_metrics(metrics)
    learning_rates.append(float(schedule(step)))
    losses.append(float(metrics['loss']))
    # A skipped step (non-finite gradients or update) has diverged whatever its loss.
    smoothed = coolopt.smooth_losses(losses, smoothing)
    if metrics['skipped'] or coolopt.divergence_step(smoothed, divergence_threshold) is not None:
      diverged_at = step
      break
  kept = len(losses) if diverged_at is None else diverged_at
  what = _too_short(kept, num_steps, diverged_at, learning_rates)
  if kept < MIN_SUGGESTION_STEPS:
    raise ValueError(
      f'{what}: too few to suggest a learning rate (at least {MIN_SUGGESTION_STEPS}). Start '
      f'the sweep lower than --lr_min={lr_min:g}.'
    )
  warning = None
  if kept < reliable_steps(smoothing):
    warning = (
      f'{what}: fewer than the {reliable_steps(smoothing)} steps a reliable suggestion '
      f'needs with --smoothing={smoothing:g} (twice the moving average of '
      f'{round(1.0 / (1.0 - smoothing))} steps). The suggestion is uncertain: '
      + (
        f'run a longer sweep (--num_steps={max(300, reliable_steps(smoothing))}).'
        if diverged_at is None
        else f'start the sweep lower than --lr_min={lr_min:g}, or sweep more slowly.'
      )
    )
    logging.warning('%s', warning)
  suggestion = coolopt.suggest_learning_rate(
    learning_rates[:kept],
    losses[:kept],
    rule=rule,
    smoothing=smoothing,
    divergence_threshold=divergence_threshold,
  )
  result = {
    'suggested_learning_rate': suggestion,
    'rule': rule,
    'optimizer': config.optimizer,
    'diverged_at_step': diverged_at,
    'warning': warning,
    'learning_rates': learning_rates,
    'losses': [_json_number(x) for x in losses],
    'smoothed_losses': [_json_number(float(x)) for x in smoothed],
    'num_steps': num_steps,
    'lr_min': lr_min,
    'lr_max': lr_max,
    'smoothing': smoothing,
    'divergence_threshold': divergence_threshold,
  }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULT_FILE), 'w') as f:
      json.dump(result, f, indent=1)
    plot(result, os.path.join(workdir, PLOT_FILE))
  logging.info(
    'Range test of %s: %d steps, suggested learning rate %.3g.',
    config.optimizer,
    len(losses),
    suggestion,
  )
  return result


def flag_arguments() -> dict[str, Any]:
  """The keyword arguments of `lr_find` that its flags give (also examples.sweep's, with
  `--center=lr_find`)."""
  return {
    'num_steps': FLAGS.num_steps,
    'lr_min': FLAGS.lr_min,
    'lr_max': FLAGS.lr_max,
    'rule': FLAGS.rule,
    'smoothing': FLAGS.smoothing,
    'divergence_threshold': FLAGS.divergence_threshold,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  trainer_main.setup()
  schema.prefer_given(FLAGS.config, trainer_main.given_fields(), (FLAGS.config.optimizer,))
  result = lr_find(FLAGS.config, FLAGS.workdir, **flag_arguments())
  print(
    f'suggested learning rate: {result["suggested_learning_rate"]:.3g} '
    f'({result["rule"]} rule, {len(result["losses"])} steps); '
    f'{os.path.join(FLAGS.workdir, RESULT_FILE)}, {os.path.join(FLAGS.workdir, PLOT_FILE)}'
  )
  if result['warning']:
    print(f'Warning: {result["warning"]}')


if __name__ == '__main__':
  app.run(main)
