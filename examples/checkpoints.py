"""The trainer's checkpoints: the train state and where the run stands, by orbax.

A checkpoint is named by the run's step and holds, beside the train state, the
`Position` that a resumed run continues from: epochs done, steps of the next epoch
taken and their per-step metrics, and the training time so far.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
StepMetrics = dict[str, np.ndarray]


def checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """The manager of the checkpoints in `workdir`/checkpoints, keeping the last `max_to_keep`."""
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
  )


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run stands: what a checkpoint holds beside the train state.

  Attributes:
    epoch: epochs completed.
    step_in_epoch: steps of the next epoch taken.
    step_metrics: their per-step metrics (see `examples.train.empty_step_metrics`); at
      an epoch's end (`step_in_epoch` 0), those of the epoch completed.
    wall_time: seconds of training so far, across resumptions.
  """

  epoch: int
  step_in_epoch: int
  step_metrics: StepMetrics
  wall_time: float


def save_checkpoint(manager: ocp.CheckpointManager, state: Any, position: Position) -> None:
  """Starts saving `state` (on the host) and `position`, named by the run's step."""
  manager.save(
    int(state.step),
    args=ocp.args.StandardSave(
      {
        'epoch': np.asarray(position.epoch, np.int32),
        'step_in_epoch': np.asarray(position.step_in_epoch, np.int32),
        'step_metrics': position.step_metrics,
        'wall_time': np.asarray(position.wall_time, np.float64),
        'state': state,
      }
    ),
  )


def restore_checkpoint(
  manager: ocp.CheckpointManager, state: Any, step_metrics: StepMetrics
) -> tuple[Any, Position]:
  """The last checkpoint's state and position; `state` at the start if there is none.

  Args:
    manager: the run's checkpoints.
    state: a fresh train state: the target's structure, and the state if there is none.
    step_metrics: empty per-step metrics of an epoch (see `examples.train.empty_step_metrics`).
  """
  latest = manager.latest_step()
  if latest is None:
    return state, Position(0, 0, step_metrics, 0.0)
  target = {
    'epoch': np.zeros([], np.int32),
    'step_in_epoch': np.zeros([], np.int32),
    'step_metrics': step_metrics,
    'wall_time': np.zeros([], np.float64),
    'state': state,
  }
  try:
    restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
  except ValueError as error:
    raise ValueError(
      f'The checkpoint {latest} in {manager.directory} does not fit this config: it was '
      'written with another model or optimizer. Use another workdir, or the config the '
      f'checkpoint was written with. Orbax says: {error}'
    ) from error
  position = Position(
    epoch=int(restored['epoch']),
    step_in_epoch=int(restored['step_in_epoch']),
    step_metrics={k: np.asarray(v) for k, v in restored['step_metrics'].items()},
    wall_time=float(restored['wall_time']),
  )
  return restored['state'], position
