"""When a run stops: a stretch of steps that were all skipped as non-finite, or a loss
grown far past where it started.

A train step whose loss, gradients or updates are not finite is skipped: it changes
neither the parameters nor the optimizer state (see `examples.train.train_step`), and
the epoch's row counts it in 'skipped_steps'. A few skipped steps are harmless; a run
whose steps are all skipped has diverged and would go on changing nothing. After every
epoch `check` stops such a run once `config.divergence_steps` consecutive steps (-1:
one epoch) were skipped; the epoch's checkpoint and row are written before, so the
workdir holds the last finite state.

A run can also diverge to finite values: too large a learning rate throws the loss up
by many orders of magnitude and the steps stay finite. After every epoch `check` stops
a run whose mean training loss exceeds `config.divergence_loss_ratio` times the loss of
its first step (`first_loss`; 0: never). The default, 100, is far above what a
training loss reaches while it learns: over the digits recipe with every optimizer (5
epochs), the synthetic CIFAR-10 recipe (coolmomentum, adam, sgd_sa; 4 epochs) and the
language-model recipe (coolmomentum, adam; 4 epochs), an epoch's mean loss was at most
1.1 times its first step's; Adam at a learning rate of 1e6 on digits reaches 6e19 times
it in its first epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np


class DivergedError(RuntimeError):
  """The run's steps were all skipped as non-finite for `config.divergence_steps` steps,
  or its loss grew past `config.divergence_loss_ratio` times its first step's."""


def first_loss(
  known: float | None, epoch: int, step_metrics: Mapping[str, np.ndarray]
) -> float | None:
  """The loss of the run's first step (its first finite one), which the loss bound is
  relative to: `known` if not None, else read from the per-step metrics of the first
  epoch (`epoch` 0); None before it, or if none of its steps was finite.
  """
  if known is not None or epoch:
    return known
  losses = np.asarray(step_metrics['loss'], np.float64)
  losses = losses[np.isfinite(losses)]
  return float(losses[0]) if losses.size else None


def _advice(config: ml_collections.ConfigDict) -> str:
  if config.optimizer == 'sgd_sa':
    return (
      'smaller learning rates config.metropolis_multipliers (now '
      f'{tuple(config.metropolis_multipliers)})'
    )
  return (
    f'a smaller learning rate than config.learning_rate={config.learning_rate:g} '
    '(python -m examples.lr_find suggests one)'
  )


def skipped_stretch(rows: Sequence[Mapping[str, Any]], skipped: np.ndarray) -> int:
  """The longest stretch of consecutive skipped steps that the last epoch is part of.

  Args:
    rows: the metrics rows of the epochs before it.
    skipped: the epoch's per-step 'skipped' metric (1 for a skipped step; NaN for a
      step not taken).
  """
  flags = np.nan_to_num(np.asarray(skipped, np.float64)) > 0
  longest, current = 0, 0
  for flag in flags:
    current = current + 1 if flag else 0
    longest = max(longest, current)
  if flags.size and flags.all():
    # A whole epoch skipped continues the whole epochs skipped before it.
    for row in reversed(rows):
      if row.get('skipped_steps') != flags.size:
        break
      longest += flags.size
  return longest


def check(
  config: ml_collections.ConfigDict,
  rows: Sequence[Mapping[str, Any]],
  step_metrics: Mapping[str, np.ndarray],
  initial_loss: float | None = None,
) -> None:
  """Stops a diverged run after an epoch.

  Args:
    config: the resolved config; `config.divergence_steps` is the stretch (-1: one
      epoch; 0: never stop), `config.divergence_loss_ratio` the bound on the loss.
    rows: the metrics rows so far, the epoch's own last.
    step_metrics: the epoch's per-step metrics.
    initial_loss: the loss of the run's first step (see `first_loss`); None: unknown,
      and the loss is not bounded.

  Raises:
    DivergedError: if `config.divergence_steps` consecutive steps were skipped, or the
      epoch's mean training loss exceeds `config.divergence_loss_ratio` times
      `initial_loss`.
  """
  row = rows[-1]
  skipped = step_metrics['skipped']
  stretch = skipped.size if config.divergence_steps == -1 else config.divergence_steps
  run = skipped_stretch(rows[:-1], skipped) if stretch else 0
  if stretch and run >= stretch:
    raise DivergedError(
      f'The run diverged: {run} consecutive steps up to step {row["step"]} (epoch '
      f'{row["epoch"]}) were skipped because their loss, gradients or updates were not '
      f'finite, and config.divergence_steps={config.divergence_steps} '
      f'({"one epoch, " if config.divergence_steps == -1 else ""}{stretch} steps) stops the '
      f'run. Its checkpoints hold the last finite state. Train with {_advice(config)}, in '
      'a new workdir.'
    )
  ratio, loss = config.divergence_loss_ratio, row.get('train_loss')
  if ratio and initial_loss is not None and loss is not None and loss > ratio * initial_loss:
    raise DivergedError(
      f'The run diverged: its training loss in epoch {row["epoch"]} (up to step '
      f'{row["step"]}), {loss:.4g}, is more than config.divergence_loss_ratio={ratio:g} '
      f'times the loss of its first step, {initial_loss:.4g}, and stops the run. Train '
      f'with {_advice(config)}, in a new workdir.'
    )
