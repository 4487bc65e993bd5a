"""What a run keeps in its workdir: the resolved config, the metrics rows, the curves and
the lock that keeps a second run out.

`config.json` is the resolved config of the run (`--config.*` overrides, the
per-optimizer recipe and the derived steps per epoch applied). It is written with the
first checkpoint, and a later run in the same workdir must agree with it on every field
that changes the trajectory: resuming a checkpoint under another learning rate, seed,
batch size or number of epochs would silently continue another schedule from the middle.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from matplotlib.figure import Figure

from examples.configs import default

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
LOCK_FILE = 'lock.json'
# The largest process id: Linux's pid_t is a signed 32-bit integer.
MAX_PID = 2**31 - 1

# Fields that change what is logged, kept or how fast it runs, never the parameters a
# run ends with: a resumed run may change them. (`parallelism` and the process count
# change the order of float sums only.) `optimizers` holds the recipes of the optimizers
# not trained; the one trained is already applied to the top-level fields.
HARMLESS_FIELDS = frozenset(
  {
    'progress_bar',
    'checkpoint_max_to_keep',
    'checkpoint_every_steps',
    'log_every_steps',
    'data_dir',
    'cache',
    'parallelism',
    'steps_per_eval',
    'eval_train',
    'optimizers',
    'divergence_steps',
    'divergence_loss_ratio',
  }
)

_ABSENT = '<absent>'


def _atomic_write(path: str, text: str) -> None:
  # Written whole to a temporary file and renamed, so a crash never leaves half a file.
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    f.write(text)
  os.replace(temporary, path)


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config` as the plain JSON values it is stored as (tuples become lists)."""
  return json.loads(config.to_json(sort_keys=True))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Stores the resolved `config` as `workdir/config.json`."""
  _atomic_write(os.path.join(workdir, CONFIG_FILE), json.dumps(config_dict(config), indent=2))


class WorkdirLockedError(RuntimeError):
  """The workdir is held by another run."""


def _read_lock(path: str) -> dict[str, Any] | None:
  """The holder a lock file names; None if it does not read (yet: it is written after
  it is created).

  Raises:
    WorkdirLockedError: naming the file, if its pid is not a process id.
  """
  for _ in range(20):
    try:
      with open(path) as f:
        holder = json.load(f)
      if isinstance(holder, dict) and {'host', 'pid', 'start_time'} <= holder.keys():
        pid = holder['pid']
        if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= MAX_PID):
          raise WorkdirLockedError(
            f'The lock file {path} names the pid {pid!r}, which is not a process id (an '
            f'integer in [1, {MAX_PID}]): it was not written by a run. If no run uses this '
            'workdir, delete the file and rerun.'
          )
        return holder
    except FileNotFoundError:
      return {}
    except (OSError, json.JSONDecodeError):
      pass
    time.sleep(0.05)
  return None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def _is_held(holder: Mapping[str, Any], host: str) -> bool:
  """Whether the run a lock names may still be running: it is alive on this host, or on
  another host, which cannot be checked from here."""
  return holder['host'] != host or _alive(holder['pid'])


def _held_around(workdir: str, host: str) -> str | None:
  """Why `workdir` may not be taken beside the runs that hold the directories above or
  below it (a trainer inside a sweep's workdir would mix its checkpoints with the
  sweep's); None if no other run holds one. Locks of this process are its own nested
  runs (a sweep's range test) and are allowed."""
  directory = os.path.abspath(workdir)
  above = _parents(workdir)
  below = []
  if os.path.isdir(directory):
    for root, directories, files in os.walk(directory):
      if root != directory and LOCK_FILE in files:
        below.append(root)
      directories.sort()
  for other in above + below:
    path = os.path.join(other, LOCK_FILE)
    if not os.path.isfile(path):
      continue
    holder = _read_lock(path)
    if not holder:
      continue
    if holder['host'] == host and holder['pid'] == os.getpid():
      continue
    if _is_held(holder, host):
      where = 'inside' if other in above else 'around'
      return (
        f'The workdir {workdir} is {where} the workdir {other}, which is in use by another '
        f'run: process {holder["pid"]} on host {holder["host"]}, started '
        f"{holder['start_time']} ({path}). Two runs in one another's workdir would mix "
        'their checkpoints and files: use a workdir outside it.'
      )
  return None


def acquire_lock(workdir: str) -> dict[str, Any]:
  """Takes `workdir/lock.json` for this process, creating the workdir if need be.

  A lock whose holder ran on this host and is gone (a killed run) is taken over with a
  warning. A run on another host cannot be checked: its lock must be deleted by hand
  once that run is gone. A workdir inside the workdir of another run, or holding one,
  is refused as well.

  Returns:
    The holder record written: host, pid and start time.

  Raises:
    WorkdirLockedError: naming the holder, if another run holds the workdir, a workdir
      above it or one inside it, or naming the lock file if it does not say who holds it.
    ValueError: if `workdir` (or a directory above it) is a file.
  """
  for parent in [workdir, *_parents(workdir)]:
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise ValueError(
        f'The workdir {workdir} cannot be created: {parent} is a file, not a directory. '
        'Give a directory (new or existing) as --workdir.'
      )
  host = socket.gethostname()
  nested = _held_around(workdir, host)
  if nested:
    raise WorkdirLockedError(nested)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  record = {
    'host': host,
    'pid': os.getpid(),
    'start_time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  while True:
    try:
      descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(path)
      if holder == {}:
        continue  # Released meanwhile.
      if holder is None:
        raise WorkdirLockedError(
          f'The workdir {workdir} is locked by {path}, which does not say by whom. If no '
          'run uses this workdir, delete the file and rerun.'
        ) from None
      if not _is_held(holder, host):
        message = (
          f'Taking over the lock of the workdir {workdir}: its holder, process '
          f'{holder["pid"]} on {host} (started {holder["start_time"]}), is gone.'
        )
        logging.warning('%s', message)
        print(f'Warning: {message}', flush=True)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      raise WorkdirLockedError(
        f'The workdir {workdir} is in use by another run: process {holder["pid"]} on host '
        f'{holder["host"]}, started {holder["start_time"]} ({path}). Wait for it to end, or '
        'use another workdir. If that run is gone (on another host, which cannot be '
        'checked from here), delete the lock file and rerun.'
      ) from None
    with os.fdopen(descriptor, 'w') as f:
      json.dump(record, f)
    return record


def _parents(workdir: str) -> list[str]:
  """The directories above `workdir`, nearest first."""
  parents = [os.path.dirname(os.path.abspath(workdir))]
  while os.path.dirname(parents[-1]) != parents[-1]:
    parents.append(os.path.dirname(parents[-1]))
  return parents


def release_lock(workdir: str, record: Mapping[str, Any]) -> None:
  """Removes `workdir/lock.json` if it is still the lock `record` took."""
  path = os.path.join(workdir, LOCK_FILE)
  if _read_lock(path) == dict(record):
    os.remove(path)


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds `workdir` for one run: process 0 takes the lock (`acquire_lock`), and every
  process of a multi-process run fails alike if it could not. A workdir created for the
  lock and left empty is removed again.

  Raises:
    WorkdirLockedError: if another run holds the workdir.
  """
  record, error = None, None
  created = not os.path.exists(workdir)
  if jax.process_index() == 0:
    try:
      record = acquire_lock(workdir)
    except WorkdirLockedError as caught:
      error = caught
  if jax.process_count() > 1:
    taken = multihost_utils.broadcast_one_to_all(np.int32(record is not None))
    if not taken and error is None:
      error = WorkdirLockedError(
        f'The workdir {workdir} is in use by another run: process 0 could not take its '
        'lock (its error says by whom).'
      )
  if error is not None:
    raise error
  try:
    yield
  finally:
    if record is not None:
      release_lock(workdir, record)
      if created and not os.listdir(workdir):
        os.rmdir(workdir)  # A run that failed before writing anything leaves no workdir.


def hold_lock(function: Callable[..., Any]) -> Callable[..., Any]:
  """Runs `function(config, workdir, ...)` holding `workdir` (see `locked`)."""

  @functools.wraps(function)
  def run_locked(config: ml_collections.ConfigDict, workdir: str, *args: Any, **kwargs: Any):
    with locked(workdir):
      return function(config, workdir, *args, **kwargs)

  return run_locked


def _invalid_json(path: str, line: int, error: Exception) -> ValueError:
  return ValueError(
    f'{path}, line {line}: not valid JSON ({error}). The file is damaged: restore it, or '
    'use another workdir.'
  )


def read_config(workdir: str) -> dict[str, Any] | None:
  """The stored config of `workdir`, or None if it holds none.

  Raises:
    ValueError: naming the file and line, if it is not a JSON object.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    text = f.read()
  try:
    stored = json.loads(text)
  except json.JSONDecodeError as error:
    raise _invalid_json(path, error.lineno, error) from error
  if not isinstance(stored, dict):
    raise ValueError(f'{path}, line 1: expected a JSON object of config fields, got {stored!r}.')
  return stored


def trajectory_fields(stored: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of a config (as `config_dict` gives it) that decide the trajectory: all
  but `HARMLESS_FIELDS`."""
  return {field: value for field, value in stored.items() if field not in HARMLESS_FIELDS}


def config_differences(
  stored: Mapping[str, Any], new: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
  """`(field, stored value, new value)` for every field outside `HARMLESS_FIELDS` whose
  values differ. A field that `stored` lacks (it was declared later) counts as stored
  with its default of `examples/configs/default.py`."""
  stored = {**config_dict(default.get_config()), **stored}
  return [
    (field, stored.get(field, _ABSENT), new.get(field, _ABSENT))
    for field in sorted(stored.keys() | new.keys())
    if field not in HARMLESS_FIELDS and stored.get(field, _ABSENT) != new.get(field, _ABSENT)
  ]


def format_differences(differences: Sequence[tuple[str, Any, Any]]) -> str:
  """The lines of an error that lists `config_differences`."""
  return '\n'.join(
    f'  config.{field}: stored {old!r}, new {value!r}' for field, old, value in differences
  )


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to continue `workdir` with a config that would change its trajectory.

  Args:
    workdir: the run's directory; nothing is checked if it stores no config yet.
    config: the resolved config of the new run.

  Raises:
    ValueError: listing every field outside `HARMLESS_FIELDS` whose stored and new
      values differ (see `config_differences`).
  """
  stored = read_config(workdir)
  if stored is None:
    return
  differences = config_differences(stored, config_dict(config))
  if differences:
    raise ValueError(
      f'The workdir {workdir} holds a run of another config ({CONFIG_FILE}); resuming it '
      f'with this one would change its trajectory:\n{format_differences(differences)}\n'
      'Use a new workdir for the new config, or rerun with the stored values.'
    )


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl file; [] if it does not exist.

  Raises:
    ValueError: naming the file and line of a row that is not valid JSON, or not an
      object with an integer 'epoch' and a number 'wall_time'.
  """
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise _invalid_json(path, number, error) from error
      missing = [
        field
        for field, kind in (('epoch', int), ('wall_time', (int, float)))
        if not (isinstance(row, dict) and isinstance(row.get(field), kind))
      ]
      if missing:
        raise ValueError(
          f'{path}, line {number}: a metrics row must be a JSON object with an integer '
          f"'epoch' and a number 'wall_time'; this one lacks {', '.join(map(repr, missing))}. "
          'The file is damaged: restore it, or use another workdir.'
        )
      rows.append(row)
  return rows


def write_metrics(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes the rows of a metrics.jsonl file, atomically."""
  _atomic_write(path, ''.join(json.dumps(row) + '\n' for row in rows))


def finite_or_none(value: Any) -> Any:
  """`value`, with a non-finite float replaced by None (JSON has no NaN)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str, score: Any) -> None:
  """The paper's three panels per epoch, one line per run: training loss (log scale),
  the task's `score` (see `examples.tasks.Score`; test accuracy for an image classifier)
  and kinetic temperature (log scale; a thermostat's target dotted).

  The training loss is the loss over the whole training set in inference mode
  (`eval_train_loss`, the paper's Fig. 1) for a run that logs it, and the mean of the
  epoch's minibatch losses (`train_loss`) otherwise.
  """
  panels = (
    (('eval_train_loss', 'train_loss'), 'training loss', 'log'),
    ((score.key,), score.label, score.scale),
    (('kinetic_temperature',), 'kinetic temperature (mean dx²)', 'log'),
  )
  # Fixed margins: a layout engine would cost more than the drawing, every epoch.
  figure = Figure(figsize=(13, 3.8))
  figure.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.91, wspace=0.22)
  axes = figure.subplots(1, len(panels))
  for ax, (keys, label, scale) in zip(axes, panels, strict=True):
    for name, rows in runs.items():
      key = next((k for k in keys if any(row.get(k) is not None for row in rows)), keys[-1])
      points = [
        (row['epoch'], row[key])
        for row in rows
        if row.get(key) is not None and (scale == 'linear' or row[key] > 0)
      ]
      if not points:
        continue
      epochs, values = zip(*points, strict=True)
      line = ax.plot(epochs, values, marker='.' if len(points) < 30 else None, label=name)[0]
      targets = [(row['epoch'], row.get('target_temperature')) for row in rows]
      targets = [(epoch, value) for epoch, value in targets if value]
      if key == 'kinetic_temperature' and targets:
        ax.plot(*zip(*targets, strict=True), color=line.get_color(), linestyle=':')
    ax.set_yscale(scale)
    ax.set_xlabel('epoch')
    ax.set_title(label)
    ax.grid(True, alpha=0.3)
  axes[1].legend(
    loc='lower right' if score.best is max else 'upper right'
  )  # 'best' would cost more than the whole drawing.
  figure.savefig(path, dpi=100)
