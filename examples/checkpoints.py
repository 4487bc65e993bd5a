"""The trainer's checkpoints: the train state and where the run stands, by orbax.

A checkpoint is named by the run's step and holds, beside the train state, the
`Position` that a resumed run continues from: epochs done, steps of the next epoch
taken and their per-step metrics, and the training time so far. It also holds the
fields of the config that decide the trajectory (`trajectory`), so that a resume under
another config is refused even without the workdir's config.json, optionally a `record`
of the run (the trainer's: the metrics rows of the epochs before it and its first
step's loss), so that a damaged or deleted metrics.jsonl is written again from it, and
the SHA-256 of everything else it holds (`checksum`), so that a damaged checkpoint is
found.

A resume restores the newest checkpoint that reads and verifies. One that does not is
damaged: it is moved to <workdir>/damaged_checkpoints/ with a warning, and the run
falls back to the checkpoint before it. A checkpoint that reads but does not fit the
config (another model or optimizer, another trajectory) is refused with its own error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from examples import workdir as workdir_files

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'
StepMetrics = dict[str, np.ndarray]


class DamagedCheckpointError(ValueError):
  """A checkpoint that cannot be read, or whose contents fail their checksum."""


def checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """The manager of the checkpoints in `workdir`/checkpoints, keeping the last `max_to_keep`."""
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    # Declared, so that a checkpoint's metadata read before anything is restored.
    item_handlers=ocp.StandardCheckpointHandler(),
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
    record: what the run saved beside them as JSON values (`save_checkpoint`'s
      `record`); None for a checkpoint saved without one, or no checkpoint.
  """

  epoch: int
  step_in_epoch: int
  step_metrics: StepMetrics
  wall_time: float
  record: Any = None


def _key_name(key: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def checksum(tree: Any) -> np.ndarray:
  """The SHA-256 (32 bytes) of the arrays of `tree`: their paths, dtypes, shapes and bytes."""
  sha = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(
    ((('/'.join(map(_key_name, path))), leaf) for path, leaf in leaves), key=lambda x: x[0]
  ):
    array = np.ascontiguousarray(np.asarray(leaf))
    sha.update(f'{path}:{array.dtype.str}:{array.shape};'.encode())
    sha.update(array.tobytes())
  return np.frombuffer(sha.digest(), np.uint8)


def trajectory(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields of `config` that decide the trajectory, as JSON values."""
  return workdir_files.trajectory_fields(workdir_files.config_dict(config))


def _encode(value: Any) -> np.ndarray:
  return np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)


def save_checkpoint(
  manager: ocp.CheckpointManager,
  state: Any,
  position: Position,
  config: ml_collections.ConfigDict,
  *,
  step: int | None = None,
) -> None:
  """Starts saving `state` (on the host), `position` (its `record` too, if not None:
  JSON values) and the trajectory fields of `config`, with their checksum, named by
  `step` (default: the run's, `state.step`)."""
  item = {
    'epoch': np.asarray(position.epoch, np.int32),
    'step_in_epoch': np.asarray(position.step_in_epoch, np.int32),
    'step_metrics': position.step_metrics,
    'wall_time': np.asarray(position.wall_time, np.float64),
    'state': state,
    'trajectory': _encode(trajectory(config)),
  }
  if position.record is not None:
    item['record'] = _encode(position.record)
  item['checksum'] = checksum(item)
  manager.save(int(state.step) if step is None else step, args=ocp.args.StandardSave(item))


def _shapes(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """The sorted shapes and dtypes of the arrays of `tree` (what makes a target fit)."""
  leaves = [leaf for leaf in jax.tree.leaves(tree) if leaf is not None]
  return sorted((tuple(leaf.shape), np.dtype(leaf.dtype).str) for leaf in leaves)


def _read(manager: ocp.CheckpointManager, step: int, target: dict[str, Any]) -> dict[str, Any]:
  """The verified contents of checkpoint `step`.

  Raises:
    DamagedCheckpointError: if it cannot be read or fails its checksum.
    ValueError: if it reads but was written for another model or optimizer.
  """
  where = f'The checkpoint {step} in {manager.directory}'
  try:
    metadata = manager.item_metadata(step)
    tree = dict(getattr(metadata, 'tree', metadata))
  except Exception as error:  # Whatever orbax raises for a file it cannot parse.
    raise DamagedCheckpointError(
      f'{where} is damaged: its metadata do not read ({error}).'
    ) from error
  if 'checksum' not in tree or 'trajectory' not in tree:
    raise ValueError(
      f'{where} has no checksum: it was written by an earlier version of the trainer. Use '
      'another workdir.'
    )
  # The encoded JSON values are read at the lengths they were saved with.
  target = {
    **target,
    **{key: np.zeros(tree[key].shape, np.uint8) for key in ('trajectory', 'record') if key in tree},
  }
  saved = {key: tree[key] for key in target if key in tree}
  if saved.keys() != target.keys() or _shapes(saved) != _shapes(target):
    raise ValueError(
      f'{where} does not fit this config: it was written with another model or optimizer. '
      'Use another workdir, or the config the checkpoint was written with.'
    )
  try:
    restored = manager.restore(
      step, args=ocp.args.StandardRestore({**target, 'checksum': np.zeros(32, np.uint8)})
    )
  except Exception as error:  # A truncated or emptied file; orbax's error varies.
    raise DamagedCheckpointError(f'{where} is damaged: it does not read ({error}).') from error
  stored = np.asarray(restored.pop('checksum'))
  if not np.array_equal(stored, checksum(restored)):
    raise DamagedCheckpointError(
      f'{where} is damaged: its contents do not match the checksum it was saved with.'
    )
  return restored


def _decode(encoded: np.ndarray) -> Any:
  return json.loads(np.asarray(encoded, np.uint8).tobytes().decode())


def _check_trajectory(
  manager: ocp.CheckpointManager, step: int, encoded: np.ndarray, config: ml_collections.ConfigDict
) -> None:
  stored = _decode(encoded)
  differences = workdir_files.config_differences(stored, workdir_files.config_dict(config))
  if differences:
    raise ValueError(
      f'The checkpoint {step} in {manager.directory} was written by a run of another '
      'config; resuming it with this one would change its trajectory:\n'
      f'{workdir_files.format_differences(differences)}\n'
      'Use a new workdir for the new config, or rerun with the stored values.'
    )


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves the damaged checkpoints `steps` to <workdir>/damaged_checkpoints/ (process 0),
  so that the steps they held can be saved again."""
  if jax.process_index() == 0:
    damaged = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
    os.makedirs(damaged, exist_ok=True)
    for step in steps:
      destination = os.path.join(damaged, str(step))
      if os.path.exists(destination):
        shutil.rmtree(destination)
      os.replace(os.path.join(str(manager.directory), str(step)), destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoints set aside')
  manager.reload()


def restore_checkpoint(
  manager: ocp.CheckpointManager,
  state: Any,
  step_metrics: StepMetrics,
  config: ml_collections.ConfigDict,
) -> tuple[Any, Position]:
  """The newest verified checkpoint's state and position; `state` at the start if none.

  A damaged checkpoint (one that does not read, or fails its checksum) is moved to
  <workdir>/damaged_checkpoints/ with a warning, and the one before it is tried.

  Args:
    manager: the run's checkpoints.
    state: a fresh train state: the target's structure, and the state if there is none.
    step_metrics: empty per-step metrics of an epoch (see `examples.train.empty_step_metrics`).
    config: the resolved config; its trajectory fields must be those the checkpoint holds.

  Raises:
    ValueError: if the newest readable checkpoint was written for another model,
      optimizer or trajectory, or if every checkpoint is damaged.
  """
  target = {
    'epoch': np.zeros([], np.int32),
    'step_in_epoch': np.zeros([], np.int32),
    'step_metrics': step_metrics,
    'wall_time': np.zeros([], np.float64),
    'state': state,
  }
  steps = sorted(manager.all_steps(), reverse=True)
  damaged = []
  restored = None
  for step in steps:
    try:
      restored = _read(manager, step, target)
    except DamagedCheckpointError as error:
      damaged.append(step)
      message = f'{error} It is moved to {DAMAGED_DIR}/; trying the checkpoint before it.'
      logging.warning('%s', message)
      if jax.process_index() == 0:
        print(f'Warning: {message}', flush=True)
      continue
    _check_trajectory(manager, step, restored.pop('trajectory'), config)
    break
  if damaged:
    _set_aside(manager, damaged)
  if restored is None:
    if damaged:
      raise ValueError(
        f'Every checkpoint in {manager.directory} is damaged (steps '
        f'{", ".join(map(str, damaged))}, now in {DAMAGED_DIR}/). Rerun to start the run '
        'again from step 0, or use another workdir.'
      )
    return state, Position(0, 0, step_metrics, 0.0)
  if damaged:
    message = f'Resuming from the checkpoint {manager.latest_step()}, the newest that verifies.'
    logging.warning('%s', message)
    if jax.process_index() == 0:
      print(message, flush=True)
  position = Position(
    epoch=int(restored['epoch']),
    step_in_epoch=int(restored['step_in_epoch']),
    step_metrics={k: np.asarray(v) for k, v in restored['step_metrics'].items()},
    wall_time=float(restored['wall_time']),
    record=_decode(restored['record']) if 'record' in restored else None,
  )
  return restored['state'], position
