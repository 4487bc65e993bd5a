"""Trains and evaluates an image classifier or a language model with coolopt, after
Flax's examples/imagenet.

This module holds the steps and the loop, in reading order: `train_step`, `build` (what
a run needs, from its config), the epoch and `train_and_evaluate`. Around it:

- `examples/tasks.py` holds what differs between the tasks (image classification,
  language model): the model, the loss, the eval step, the pipeline and the row fields.
  The task is chosen once, by `tasks.create_task(config)`.
- `examples/configs/default.py` declares every config field; `examples/schema.py` checks
  them and applies the per-optimizer overrides.
- `examples/train_state.py` holds the train state (`TrainState`, `create_train_state`,
  `update_ema`).
- `examples/optimizers.py` builds the optax transformation of `config.optimizer` and the
  schedules it runs on, and the L2 and weight decay penalty (`regularization`).
- `examples/data_parallel.py` compiles the steps under a sharded `jax.jit` over a 1-D
  device mesh (`config.parallelism = 'jit'`, the default: the batch is one global array
  split over the devices and no axis name appears inside) or under `jax.pmap`
  (`'pmap'`: gradients, losses, metrics and batch statistics are averaged over the axis
  'batch').
- `examples/checkpoints.py` and `examples/workdir.py` write the workdir.

A run is a function of its config: the global batches do not depend on the number of
processes or devices, the resolved config is stored in the workdir (`config.json`) and
a rerun that would change the trajectory is refused, and a rerun continues from the last
checkpoint (at every epoch's end, and every `checkpoint_every_steps` steps) exactly where
an uninterrupted run would be.

The workdir receives, from process 0, `config.json`, `metrics.jsonl` (one row per
epoch), `curves.png` (the paper's training loss, test accuracy and kinetic
temperature) and TensorBoard event files (examples/logs.py), and, from all processes
together, the orbax checkpoints, named by step. Process 0 prints a line per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax import linen as nn

import coolopt
from examples import (
  checkpoints,
  data_parallel,
  divergence,
  logs,
  optimizers,
  rows,
  schema,
  tasks,
)
from examples.optimizers import regularization
from examples.train_state import TrainState, create_train_state, update_ema
from examples.workdir import (
  CONFIG_FILE,
  METRICS_FILE,
  check_config,
  finite_or_none,
  hold_lock,
  read_metrics,
  write_config,
  write_metrics,
)

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
StepMetrics = checkpoints.StepMetrics


# --------------------------------------------------------------------------------------------
# Steps


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  task: tasks.Task,
  model: nn.Module,
  l2_regularization: float = 0.0,
  weight_decay: float = 0.0,
  decay_gradient: bool = True,
  ema_decay: float = 0.0,
  axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a (per-device under `pmap`, global under `jit`) batch.

  The loss is the objective the optimizer descends: the task's loss (see
  `examples.tasks`) plus `regularization(params)`. A Metropolis optimizer judges that
  same objective at the current and the candidate parameters. Without `decay_gradient`,
  the weight decay counts in the loss but not in its gradient: the optimizer adds it to
  the clipped gradient (see `examples.optimizers.decays_after_clipping`).

  A step whose averaged loss, gradients or updates are not finite changes neither the
  parameters, nor the optimizer state, nor what the forward pass carries (batch
  statistics, LSTM state); it is counted in the 'skipped' metric. With `state.ema`, the
  moving averages are updated with `ema_decay` (see `update_ema`).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    # Each replica draws its own dropout masks, as the examples of one global batch do.
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    loss, aux = task.loss(model, params, state, batch, dropout_rng, axis_name)
    penalty = regularization(
      params,
      l2_regularization=l2_regularization,
      weight_decay=weight_decay,
      decay_gradient=decay_gradient,
    )
    return loss + penalty, aux

  def candidate_loss(params):
    # The Metropolis test compares this with `loss`: the same batch, BatchNorm mode,
    # dropout key, carried state and penalty; what its forward pass changes is dropped.
    return loss_fn(params)[0]

  (loss, (metrics, forward_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, loss, metrics = jax.lax.pmean((grads, loss, metrics), axis_name)
  forward_state = task.share(forward_state, axis_name)
  updates, opt_state = state.tx.update(
    grads, state.opt_state, state.params, value=loss, value_fn=candidate_loss
  )
  params = optax.apply_updates(state.params, updates)

  # After the pmean the flag is the same on every replica, so they stay in step. An
  # overflowing update (finite gradients, too large a step) is refused as well: it
  # would leave parameters that no later step could repair.
  finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(updates)

  def keep_if_finite(new, old):
    return optax.tree_utils.tree_where(finite, new, old)

  new_state = state.replace(
    step=state.step + 1,
    params=keep_if_finite(params, state.params),
    opt_state=keep_if_finite(opt_state, state.opt_state),
    **{name: keep_if_finite(new, getattr(state, name)) for name, new in forward_state.items()},
  )
  if state.ema is not None:
    variables = {'params': new_state.params, 'batch_stats': new_state.batch_stats}
    new_state = new_state.replace(ema=update_ema(state.ema, variables, state.step, ema_decay))
  step_metrics = {
    'loss': loss,
    'kinetic_temperature': coolopt.kinetic_temperature(new_state.opt_state),
    'skipped': jnp.logical_not(finite).astype(jnp.float32),
  }
  thermostat = optax.tree_utils.tree_get(new_state.opt_state, 'ThermostatState')
  if thermostat is not None:
    step_metrics['target_temperature'] = thermostat.target_temperature
  metropolis = optax.tree_utils.tree_get(opt_state, 'MetropolisState')
  if metropolis is not None:
    step_metrics['accepted'] = (metropolis.accepted & finite).astype(jnp.float32)
  # The task's metrics last: a language model's 'loss' is the cross-entropy alone.
  return new_state, {**step_metrics, **metrics}


# --------------------------------------------------------------------------------------------
# What a run needs


def prepare(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, tasks.Task]:
  """`config` validated and resolved (its recipe applied, `steps_per_epoch` read from
  the data set), and its task. Nothing is compiled.

  Raises:
    ValueError: for an invalid config.
  """
  schema.validate_config(config)
  config = schema.resolve_config(config)
  task = tasks.create_task(config)
  # The stored config says how long an epoch was, so that a changed data set shows too.
  config.steps_per_epoch = task.steps_per_epoch()
  return config, task


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run of a config needs, from `build`.

  Attributes:
    config: the resolved config (see `prepare`).
    task: its task.
    model: the model, with the BatchNorm axis of `config.parallelism`.
    schedules: the schedules the optimizer runs on.
    state: the initial train state, on the host.
    parallel: the compiled steps (see `examples.data_parallel`).
    metric_keys: the keys of the train step's metrics, as the step returns them.
  """

  config: ml_collections.ConfigDict
  task: tasks.Task
  model: nn.Module
  schedules: optimizers.Schedules
  state: TrainState
  parallel: data_parallel.Parallel
  metric_keys: tuple[str, ...]


def build(
  config: ml_collections.ConfigDict,
  task: tasks.Task,
  *,
  learning_rate: optax.Schedule | None = None,
  constant_rho: bool = False,
  model: nn.Module | None = None,
) -> Run:
  """The model, optimizer, initial state and compiled steps of the prepared `config`.

  `learning_rate` and `constant_rho` go to `optimizers.create_optimizer` (the range
  test sweeps its own rate); `model` replaces the task's (a benchmark's variant).
  """
  axis_name = data_parallel.AXIS_NAME if config.parallelism == 'pmap' else None
  model = model or task.create_model(axis_name=axis_name)
  tx, schedules = optimizers.create_optimizer(
    config,
    config.steps_per_epoch,
    axis_name=axis_name,
    learning_rate=learning_rate,
    constant_rho=constant_rho,
  )
  state = create_train_state(
    jax.random.PRNGKey(config.seed),
    model,
    task.init_inputs(model),
    tx,
    ema=config.ema_decay > 0,
    carry=task.initial_carry(model),
  )
  step = functools.partial(
    train_step,
    task=task,
    l2_regularization=config.l2_regularization,
    weight_decay=config.weight_decay,
    decay_gradient=not optimizers.decays_after_clipping(config),
    ema_decay=config.ema_decay,
  )
  # The metrics' keys from the step itself, traced (not compiled) as one replica.
  axis = data_parallel.AXIS_NAME
  one_replica = jax.vmap(
    functools.partial(step, model=model, axis_name=axis), in_axes=(None, 0), axis_name=axis
  )
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), task.abstract_batch()
  )
  metric_keys = tuple(jax.eval_shape(one_replica, state, batch)[1])
  parallel = data_parallel.compile_steps(
    config.parallelism,
    functools.partial(step, model=model),
    functools.partial(task.eval_step, model=model),
  )
  return Run(config, task, model, schedules, state, parallel, metric_keys)


# --------------------------------------------------------------------------------------------
# Epochs


@dataclasses.dataclass(frozen=True)
class WallClock:
  """Seconds of training so far: `offset` from earlier sessions plus this one's."""

  offset: float
  start: float = dataclasses.field(default_factory=time.perf_counter)

  def __call__(self) -> float:
    return self.offset + time.perf_counter() - self.start


def is_due(every: int, epoch: int, steps_done: int, steps_per_epoch: int) -> bool:
  """Whether an action every `every` steps of the run (0: never) falls after the step
  `steps_done` of `epoch`."""
  return bool(every) and (epoch * steps_per_epoch + steps_done) % every == 0


def record(
  history: list[dict[str, Any]], first_loss: float | None, epoch: int, step_metrics: StepMetrics
) -> dict[str, Any]:
  """What a checkpoint in `epoch` (from 0) keeps of the run beside its state: the rows
  `history` of the epochs before, and the loss of the run's first step (see
  `examples.divergence.first_loss`; `first_loss` if known already)."""
  return {
    'rows': list(history),
    'first_loss': divergence.first_loss(first_loss, epoch, step_metrics),
  }


def save(run: Run, workdir: str, manager: Any, host_state: TrainState, position) -> None:
  """Starts saving a checkpoint; the first one writes the resolved config beside it."""
  if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    write_config(workdir, run.config)
  checkpoints.save_checkpoint(manager, host_state, position, run.config)


def train_epoch(
  run: Run,
  state: TrainState,
  position: checkpoints.Position,
  *,
  workdir: str,
  manager: Any,
  writer: Any,
  clock: WallClock,
  history: list[dict[str, Any]],
  first_loss: float | None,
) -> tuple[TrainState, dict[str, Any], StepMetrics]:
  """The steps of the epoch `position.epoch` from its step `position.step_in_epoch` on.

  Writes the per-step values every `config.log_every_steps` steps of the run (with a
  `writer`) and a checkpoint every `config.checkpoint_every_steps` steps, but at the
  epoch's end, with the run's record (`record`: the rows `history` and `first_loss`).

  Returns:
    The device state, the epoch's training fields (see `summarize_steps`) and its
    per-step metrics.
  """
  config, parallel, epoch = run.config, run.parallel, position.epoch
  steps_per_epoch = config.steps_per_epoch
  step_metrics = {key: np.array(values) for key, values in position.step_metrics.items()}
  pending = []  # (step in epoch, device metrics) not yet read.
  progress = tqdm.tqdm(
    total=steps_per_epoch,
    initial=position.step_in_epoch,
    desc=f'epoch {epoch + 1}/{config.num_epochs}',
    unit='step',
    # None: off when stderr is not a terminal.
    disable=None if config.progress_bar and jax.process_index() == 0 else True,
  )
  start, timed_steps = None, 0
  batches = run.task.train_batches(epoch, position.step_in_epoch)
  for step, batch in enumerate(batches, start=position.step_in_epoch):
    state, metrics = parallel.train_step(state, parallel.put_batch(batch))
    pending.append((step, metrics))
    if start is None:
      # The clock starts once the first step is done: it may have compiled.
      jax.block_until_ready(metrics)
      start = time.perf_counter()
    else:
      timed_steps += 1
    progress.update()
    if not progress.disable and (step + 1) % 20 == 0:
      # Reading a loss waits for its step; every 20 steps keeps the devices busy.
      progress.set_postfix(loss=f'{float(parallel.get_metrics(metrics["loss"])):.4f}')
    done = step + 1
    if writer and is_due(config.log_every_steps, epoch, done, steps_per_epoch):
      _read_metrics(parallel, pending, step_metrics)
      rows.log_steps(run, writer, state, epoch, done, step_metrics)
    if done < steps_per_epoch and is_due(
      config.checkpoint_every_steps, epoch, done, steps_per_epoch
    ):
      _read_metrics(parallel, pending, step_metrics)
      saved = checkpoints.Position(
        epoch, done, step_metrics, clock(), record(history, first_loss, epoch, step_metrics)
      )
      save(run, workdir, manager, parallel.get_state(state), saved)
  _read_metrics(parallel, pending, step_metrics)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start if start is not None else 0.0
  progress.close()
  # The steps after the first of this process; None without such steps.
  steps_per_sec = timed_steps / seconds if timed_steps else None
  return state, rows.summarize_steps(run.task, step_metrics, steps_per_sec), step_metrics


def _read_metrics(parallel: data_parallel.Parallel, pending: list, step_metrics) -> None:
  """Moves the `pending` (step, device metrics) pairs into `step_metrics`."""
  if pending:
    steps, device_metrics = zip(*pending, strict=True)
    for i, values in zip(steps, parallel.get_metrics(list(device_metrics)), strict=True):
      for key in step_metrics:
        step_metrics[key][i] = values[key]
  pending.clear()


def epoch_row(
  run: Run,
  parallel_state: TrainState,
  host_state: TrainState,
  epoch: int,
  summary: Mapping[str, Any],
  clock: WallClock,
) -> dict[str, Any]:
  """The metrics row of `epoch` (from 0): its training fields `summary`, the task's
  evaluation of `parallel_state` (on the devices; `host_state` is the same state on the
  host), the rho and learning rate of the last step, and the training time so far,
  evaluation included."""
  penalty = regularization(
    host_state.eval_variables()['params'],
    l2_regularization=run.config.l2_regularization,
    weight_decay=run.config.weight_decay,
  )
  row = {
    'epoch': epoch + 1,
    'step': int(host_state.step),
    **summary,
    **run.task.eval_row(run.parallel, parallel_state, float(penalty)),
    **rows.scheduled(rows.clock(host_state), run.schedules),
    'wall_time': clock(),
  }
  return {key: finite_or_none(value) for key, value in row.items()}


# --------------------------------------------------------------------------------------------
# The run


def recorded_rows(
  path: str, rows: list[dict[str, Any]], position: checkpoints.Position
) -> list[dict[str, Any]]:
  """The metrics rows up to `position`, from its checkpoint's record, with the row of the
  epoch it ends if `rows` (read from `path`) holds that row.

  A checkpoint's record holds the rows of the epochs before it, and the row of the epoch
  it ends is written after it: rows of `path` that are missing, repeated or changed are
  restored from the record (with a warning). Without a record (no checkpoint yet, or a
  checkpoint of an earlier trainer), `rows` must be the epochs 1, 2, ... in order.

  Raises:
    ValueError: naming `path`, if it cannot be restored and lacks or repeats rows.
  """
  if position.record is None:
    epochs = [row['epoch'] for row in rows]
    # A checkpoint at an epoch's end may precede that epoch's row, which is made again.
    least = position.epoch - 1 if position.epoch and not position.step_in_epoch else position.epoch
    if epochs != list(range(1, len(rows) + 1)) or len(rows) < least:
      raise ValueError(
        f'{path} holds the rows of the epochs {epochs}, where the checkpoint of epoch '
        f'{position.epoch} needs each of the epochs 1 to {least} once, in order, and its '
        'checkpoint holds no copy to restore them from. Restore the file, or use another '
        'workdir.'
      )
    return rows
  saved = list(position.record['rows'])
  later = [row for row in rows if row['epoch'] == len(saved) + 1 == position.epoch]
  if [row for row in rows if row['epoch'] <= len(saved)] != saved:
    message = (
      f'{path} did not hold the rows of the epochs 1 to {len(saved)} that the checkpoint '
      f'of epoch {position.epoch} holds (it held the epochs '
      f'{[row["epoch"] for row in rows]}): they are written again from the checkpoint.'
    )
    logging.warning('%s', message)
    if jax.process_index() == 0:
      print(f'Warning: {message}', flush=True)
  return saved + later[:1]


def restore(
  run: Run, workdir: str, manager: Any, empty: StepMetrics
) -> tuple[TrainState, checkpoints.Position, list[dict[str, Any]]]:
  """Where the run in `workdir` stands: the host state and position of its last
  checkpoint (the initial state and the start without one; `empty`: the per-step metrics
  of an epoch not begun), and the rows up to that checkpoint (`recorded_rows`), which
  process 0 writes back to metrics.jsonl. A checkpoint without the workdir's config.json
  beside it writes it again (its trajectory fields are the config's, `restore_checkpoint`
  checks)."""
  host_state, position = checkpoints.restore_checkpoint(manager, run.state, empty, run.config)
  # Rows past the checkpoint belong to epochs that will be trained again.
  metrics_path = os.path.join(workdir, METRICS_FILE)
  stored = [row for row in read_metrics(metrics_path) if row['epoch'] <= position.epoch]
  history = recorded_rows(metrics_path, stored, position)
  if jax.process_index() == 0:
    write_metrics(metrics_path, history)
    if manager.latest_step() is not None and not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
      write_config(workdir, run.config)
  if manager.latest_step() is not None:
    logging.info(
      'Resuming from the checkpoint after epoch %d and %d steps of the next.',
      position.epoch,
      position.step_in_epoch,
    )
  return host_state, position, history


@hold_lock
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` for `config.num_epochs` epochs, resuming from `workdir` if it holds
  a checkpoint; evaluates and logs after every epoch.

  A checkpoint is written at every epoch's end and, with `config.checkpoint_every_steps`,
  every that many steps inside epochs too; a rerun continues from the last one exactly
  where an uninterrupted run would be. The row of an epoch is written to metrics.jsonl
  only once the checkpoint at its end is on disk.

  Args:
    config: the experiment config (see examples/configs/default.py); validated first.
    workdir: where checkpoints, `config.json`, `metrics.jsonl`, `curves.png` and the
      TensorBoard event files (see examples/logs.py) go.

  Returns:
    The final train state, on the host.

  Raises:
    ValueError: for an invalid config, or one that would change the trajectory of the
      run stored in `workdir`.
    examples.workdir.WorkdirLockedError: if another run holds `workdir`.
    examples.divergence.DivergedError: once `config.divergence_steps` steps in a row
      were skipped as non-finite.
  """
  config, task = prepare(config)
  # Before anything is compiled: a resume must not change the trajectory.
  check_config(workdir, config)
  run = build(config, task)
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
  # TensorBoard event files beside metrics.jsonl (see examples/logs.py).
  writer = logs.create_writer(workdir) if is_writer else None
  manager = checkpoints.checkpoint_manager(workdir, config.checkpoint_max_to_keep)
  empty = rows.empty_step_metrics(run.metric_keys, config.steps_per_epoch)
  host_state, position, history = restore(run, workdir, manager, empty)
  state = run.parallel.put_state(host_state)
  clock = WallClock(position.wall_time)
  first_loss = position.record and position.record['first_loss']

  if position.epoch and not position.step_in_epoch and len(history) < position.epoch:
    # Stopped between the checkpoint at an epoch's end and that epoch's row: the
    # checkpoint holds the epoch's per-step metrics, the row is made again from them.
    summary = rows.summarize_steps(task, position.step_metrics, None)
    row = epoch_row(run, state, host_state, position.epoch - 1, summary, clock)
    rows.write_row(run, workdir, writer, history, row)

  for epoch in range(position.epoch, config.num_epochs):
    if epoch > position.epoch or not position.step_in_epoch:
      position = checkpoints.Position(epoch, 0, empty, clock())
    state, summary, step_metrics = train_epoch(
      run,
      state,
      position,
      workdir=workdir,
      manager=manager,
      writer=writer,
      clock=clock,
      history=history,
      first_loss=first_loss,
    )
    host_state = run.parallel.get_state(state)
    first_loss = divergence.first_loss(first_loss, epoch, step_metrics)
    # Saved in the background while the test split is evaluated, with the epoch's
    # per-step metrics, from which its row can be made again.
    end = checkpoints.Position(
      epoch + 1, 0, step_metrics, clock(), record(history, first_loss, epoch, step_metrics)
    )
    save(run, workdir, manager, host_state, end)
    row = epoch_row(run, state, host_state, epoch, summary, clock)
    # The row is written only once its checkpoint is on disk: after a crash the
    # metrics never run ahead of what a resumed run restores.
    manager.wait_until_finished()
    rows.write_row(run, workdir, writer, history, row)
    divergence.check(config, history, step_metrics, first_loss)
  manager.close()
  if is_writer:
    writer.close()
  return host_state
