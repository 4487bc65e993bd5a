"""What a run keeps in its workdir: the resolved config, the metrics rows and the curves.

`config.json` is the resolved config of the run (`--config.*` overrides, the
per-optimizer recipe and the derived steps per epoch applied). It is written with the
first checkpoint, and a later run in the same workdir must agree with it on every field
that changes the trajectory: resuming a checkpoint under another learning rate, seed,
batch size or number of epochs would silently continue another schedule from the middle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from matplotlib.figure import Figure

from examples.configs import default

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'

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


def read_config(workdir: str) -> dict[str, Any] | None:
  """The stored config of `workdir`, or None if it holds none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to continue `workdir` with a config that would change its trajectory.

  Args:
    workdir: the run's directory; nothing is checked if it stores no config yet.
    config: the resolved config of the new run.

  Raises:
    ValueError: listing every field outside `HARMLESS_FIELDS` whose stored and new
      values differ. A field that the stored config lacks (it was declared later)
      counts as stored with its default of `examples/configs/default.py`.
  """
  stored = read_config(workdir)
  if stored is None:
    return
  # A field declared after the run was stored held its default then.
  stored = {**config_dict(default.get_config()), **stored}
  new = config_dict(config)
  differences = [
    (field, stored.get(field, _ABSENT), new.get(field, _ABSENT))
    for field in sorted(stored.keys() | new.keys())
    if field not in HARMLESS_FIELDS and stored.get(field, _ABSENT) != new.get(field, _ABSENT)
  ]
  if differences:
    lines = '\n'.join(
      f'  config.{field}: stored {old!r}, new {value!r}' for field, old, value in differences
    )
    raise ValueError(
      f'The workdir {workdir} holds a run of another config ({CONFIG_FILE}); resuming it '
      f'with this one would change its trajectory:\n{lines}\n'
      'Use a new workdir for the new config, or rerun with the stored values.'
    )


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl file; [] if it does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
