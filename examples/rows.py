"""The rows of a run: an epoch's training fields from its per-step metrics, the rho and
learning rate a row reports, and where the rows go (the epoch line, metrics.jsonl,
curves.png and the TensorBoard values; process 0 writes them).

examples/train.py makes an epoch's row (`train.epoch_row`) from these pieces.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import optax
from absl import logging

from examples import checkpoints, logs, optimizers
from examples.workdir import CURVES_FILE, METRICS_FILE, plot_curves, write_metrics

if TYPE_CHECKING:
  from examples import tasks, train, train_state

StepMetrics = checkpoints.StepMetrics


def empty_step_metrics(keys: tuple[str, ...], steps_per_epoch: int) -> StepMetrics:
  """The per-step metrics of an epoch before its first step: NaN, one entry per step."""
  return {key: np.full(steps_per_epoch, np.nan, np.float32) for key in keys}


def finite_mean(values: np.ndarray) -> float | None:
  """The mean of the finite `values`; None if there is none."""
  values = values[np.isfinite(values)]
  return float(np.mean(values)) if values.size else None


def summarize_steps(
  task: tasks.Task, step_metrics: StepMetrics, steps_per_sec: float | None
) -> dict[str, Any]:
  """The epoch's training fields of its row, from its per-step metrics, with the
  throughput of `steps_per_sec` (None: not measured)."""
  stacked = {key: values.astype(np.float64) for key, values in step_metrics.items()}
  return {
    'train_loss': finite_mean(stacked['loss']),
    **task.train_row(stacked),
    'kinetic_temperature': finite_mean(stacked['kinetic_temperature']),
    'acceptance_rate': float(np.mean(stacked['accepted'])) if 'accepted' in stacked else None,
    # The thermostat's target, to compare with the measured kinetic temperature.
    'target_temperature': finite_mean(stacked['target_temperature'])
    if 'target_temperature' in stacked
    else None,
    'skipped_steps': int(np.sum(stacked['skipped'])),
    task.throughput_key: steps_per_sec and steps_per_sec * task.items_per_step(),
  }


def log_steps(
  run: train.Run,
  writer: Any,
  device_state: train_state.TrainState,
  epoch: int,
  steps_done: int,
  step_metrics,
) -> None:
  """Writes the per-step TensorBoard values after the step `steps_done` of `epoch`."""
  # Read as the epoch's row is, from the few leaves of the clock on the host.
  now = scheduled(run.parallel.get_metrics(clock(device_state)), run.schedules)
  every = run.config.log_every_steps
  values = logs.step_values(step_metrics, steps_done, every=every, **now)
  logs.write_step(writer, epoch * run.config.steps_per_epoch + steps_done, values)


def clock(state: train_state.TrainState) -> dict[str, Any]:
  """What the logged rho and learning rate are read from: the optimizer's step
  (CoolMomentum's own count if any, else the training step) and the thermostat's rho.

  Skipped (non-finite) steps leave the optimizer's count behind the training step;
  Metropolis rejections do not (the wrapped optimizer counts every proposal).
  """
  cool = optax.tree_utils.tree_get(state.opt_state, 'CoolMomentumState')
  thermostat = optax.tree_utils.tree_get(state.opt_state, 'ThermostatState')
  return {
    'step': state.step if cool is None else cool.count,
    'rho': None if thermostat is None else thermostat.rho,
  }


def scheduled(clock: Mapping[str, Any], schedules: optimizers.Schedules) -> dict[str, Any]:
  """The rho and learning rate of the optimizer's last step from its `_clock` (on the
  host): the schedules it runs on, read at its step, or the thermostat's rho."""
  step = int(clock['step'])
  rho = clock['rho'] if schedules.rho is None else schedules.rho(step)
  return {
    'rho': None if rho is None else float(rho),
    'learning_rate': float(schedules.learning_rate(step)),
  }


def write_row(run: train.Run, workdir: str, writer: Any, history: list[dict], row: dict) -> None:
  """Appends `row` to `history` and, on process 0, prints its line and writes
  metrics.jsonl, curves.png and the TensorBoard values."""
  seconds = row['wall_time'] - (history[-1]['wall_time'] if history else 0.0)
  history.append(row)
  logging.info('epoch %d: ' + ', '.join(f'{k}=%s' for k in row if k != 'epoch'), *row.values())
  if jax.process_index() == 0:
    config = run.config
    line = logs.epoch_line(config.optimizer, row, config.num_epochs, seconds, run.task.scores)
    print(line, flush=True)
    write_metrics(os.path.join(workdir, METRICS_FILE), history)
    curves = os.path.join(workdir, CURVES_FILE)
    plot_curves({config.optimizer: history}, curves, run.task.scores[0])
    logs.write_epoch(writer, row)
