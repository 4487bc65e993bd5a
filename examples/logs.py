"""What a run shows while it trains: a line per epoch and TensorBoard event files.

The line of an epoch (`epoch_line`) is printed by process 0 (examples/train.py); the
event files are written into the run's workdir by process 0 with TensorBoard's own
event writer (`SummaryWriter`; Flax's needs TensorFlow), so that

  tensorboard --logdir workdir/digits

shows the runs under it (examples.compare's <workdir>/<optimizer>/) side by side:

- `epoch/<field>`: every number of the epoch's metrics.jsonl row (train and test loss
  and accuracy or perplexity, kinetic temperature, rho, learning rate, acceptance
  rate, throughput, ...) at the run's step at the epoch's end;
- `step/<name>`: every `config.log_every_steps` steps of the run, the loss and kinetic
  temperature of that step (and the thermostat's target temperature), the rho and
  learning rate of the schedules at the optimizer's step after it (as the epoch's row
  reads them), and, for a Metropolis optimizer, the acceptance rate of the steps
  since the previous point of the epoch.

metrics.jsonl stays the record of a run: a resume trims it to its checkpoint. The
event files are not trimmed: a resumed run writes again, into a new event file, the
points after its checkpoint. A resume is exact, so the points of the steps trained
again are the same numbers, and the curves do not change (only the epoch's
throughput and wall time, which measure the clock, differ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.scalar import summary_v2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# The row's fields that say where, not what: the events' step is the row's 'step'.
_POSITION_FIELDS = ('epoch', 'step')


class SummaryWriter:
  """Scalars into an event file of `logdir`, as `tf.summary.scalar` writes them."""

  def __init__(self, logdir: str):
    self._writer = EventFileWriter(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    summary = summary_v2.scalar_pb(tag, np.float32(value))
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def create_writer(workdir: str) -> SummaryWriter:
  """An event file writer into `workdir`, flushed by `flush` (see `write_epoch`)."""
  return SummaryWriter(workdir)


def write_epoch(writer: SummaryWriter, row: Mapping[str, Any]) -> None:
  """Writes the numbers of an epoch's metrics row as `epoch/<field>` and flushes."""
  for key, value in row.items():
    if key not in _POSITION_FIELDS and isinstance(value, int | float):
      writer.scalar(f'epoch/{key}', value, row['step'])
  writer.flush()


def write_step(writer: SummaryWriter, step: int, values: Mapping[str, Any]) -> None:
  """Writes `values` (None: absent) as `step/<name>` at the run's `step`."""
  for key, value in values.items():
    if value is not None:
      writer.scalar(f'step/{key}', value, step)


def step_values(
  step_metrics: Mapping[str, np.ndarray],
  stop: int,
  *,
  every: int,
  rho: float | None,
  learning_rate: float,
) -> dict[str, float | None]:
  """The per-step event values after the first `stop` steps of an epoch.

  Args:
    step_metrics: the epoch's per-step metrics (examples/train.py's `StepMetrics`).
    stop: the steps of the epoch taken; the values are those of its step `stop - 1`.
    every: the steps between two points (`config.log_every_steps`); the acceptance
      rate is that of the last `every` steps, within the epoch.
    rho: rho after the step (None without one).
    learning_rate: the learning rate after the step.
  """
  index = stop - 1
  values = {
    'loss': float(step_metrics['loss'][index]),
    'kinetic_temperature': float(step_metrics['kinetic_temperature'][index]),
    'rho': rho,
    'learning_rate': learning_rate,
  }
  if 'target_temperature' in step_metrics:
    values['target_temperature'] = float(step_metrics['target_temperature'][index])
  if 'accepted' in step_metrics:
    values['acceptance_rate'] = float(
      np.mean(step_metrics['accepted'][max(stop - every, 0) : stop])
    )
  return values


def _format(value: float | None, spec: str) -> str:
  return '-' if value is None or not math.isfinite(value) else format(value, spec)


def epoch_line(
  name: str, row: Mapping[str, Any], num_epochs: int, seconds: float, scores: Sequence[Any]
) -> str:
  """The line printed after an epoch: what a reader follows of its metrics row.

  `name` is the optimizer; `seconds` the epoch's training and evaluation time; `scores`
  the task's (see `examples.tasks.Score`).
  """
  parts = [f'{name} epoch {row["epoch"]}/{num_epochs}:']
  parts.append(f'train loss {_format(row["train_loss"], ".4f")}')
  for score in scores:
    parts.append(f'{score.label} {_format(row[score.key], score.spec)}')
  if row.get('rho') is not None:
    parts.append(f'rho {_format(row["rho"], ".4g")}')
  parts.append(f'kinetic temperature {_format(row["kinetic_temperature"], ".3g")}')
  if row.get('acceptance_rate') is not None:
    parts.append(f'acceptance {_format(row["acceptance_rate"], ".1%")}')
  if row.get('skipped_steps'):
    parts.append(f'{row["skipped_steps"]} steps skipped (non-finite)')
  parts.append(f'{seconds:.1f}s')
  return parts[0] + ' ' + ', '.join(parts[1:])
