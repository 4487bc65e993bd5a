"""When a run stops: a stretch of steps that were all skipped as non-finite.

A train step whose loss, gradients or updates are not finite is skipped: it changes
neither the parameters nor the optimizer state (see `examples.train.train_step`), and
the epoch's row counts it in 'skipped_steps'. A few skipped steps are harmless; a run
whose steps are all skipped has diverged and would go on changing nothing. After every
epoch `check` stops such a run once `config.divergence_steps` consecutive steps (-1:
one epoch) were skipped; the epoch's checkpoint and row are written before, so the
workdir holds the last finite state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np


class DivergedError(RuntimeError):
  """The run's steps were all skipped as non-finite for `config.divergence_steps` steps."""


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
) -> None:
  """Stops a diverged run after an epoch.

  Args:
    config: the resolved config; `config.divergence_steps` is the stretch (-1: one
      epoch; 0: never stop).
    rows: the metrics rows so far, the epoch's own last.
    step_metrics: the epoch's per-step metrics.

  Raises:
    DivergedError: if `config.divergence_steps` consecutive steps were skipped.
  """
  skipped = step_metrics['skipped']
  stretch = skipped.size if config.divergence_steps == -1 else config.divergence_steps
  if not stretch:
    return
  run = skipped_stretch(rows[:-1], skipped)
  if run < stretch:
    return
  row = rows[-1]
  if config.optimizer == 'sgd_sa':
    advice = (
      'smaller learning rates config.metropolis_multipliers (now '
      f'{tuple(config.metropolis_multipliers)})'
    )
  else:
    advice = (
      f'a smaller learning rate than config.learning_rate={config.learning_rate:g} '
      '(python -m examples.lr_find suggests one)'
    )
  raise DivergedError(
    f'The run diverged: {run} consecutive steps up to step {row["step"]} (epoch '
    f'{row["epoch"]}) were skipped because their loss, gradients or updates were not '
    f'finite, and config.divergence_steps={config.divergence_steps} '
    f'({"one epoch, " if config.divergence_steps == -1 else ""}{stretch} steps) stops the '
    'run. Its checkpoints hold the last finite state. Train with '
    f'{advice}, in a new workdir.'
  )
