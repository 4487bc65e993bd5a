"""Trains and evaluates an image classifier or a language model with coolopt, after
Flax's examples/imagenet.

This module holds the steps and the loop, in reading order: the model and train state,
`train_step` and `eval_step`, the epoch, and `train_and_evaluate`. Around it:

- `examples/configs/default.py` declares every config field; `examples/schema.py` checks
  them and applies the per-optimizer overrides.
- `examples/optimizers.py` builds the optax transformation of `config.optimizer` and the
  schedules it runs on.
- `examples/data_parallel.py` compiles the steps under a sharded `jax.jit` over a 1-D
  device mesh (`config.parallelism = 'jit'`, the default: the batch is one global array
  split over the devices and no axis name appears inside) or under `jax.pmap`
  (`'pmap'`: gradients, losses, metrics and batch statistics are averaged over the axis
  'batch').
- `examples/input_pipeline.py` and `examples/text_pipeline.py` feed images and text;
  `examples/models.py` and `examples/language_model.py` hold the models.
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

import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax import linen as nn
from flax import struct

import coolopt
from examples import (
  checkpoints,
  data_parallel,
  divergence,
  input_pipeline,
  language_model,
  logs,
  models,
  optimizers,
  schema,
  text_pipeline,
)
from examples.workdir import (
  CONFIG_FILE,
  CURVES_FILE,
  METRICS_FILE,
  check_config,
  finite_or_none,
  hold_lock,
  plot_curves,
  read_metrics,
  write_config,
  write_metrics,
)

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
StepMetrics = checkpoints.StepMetrics


# --------------------------------------------------------------------------------------------
# Model and train state


def create_model(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> nn.Module:
  """`config.model`, computing in bfloat16 when `config.half_precision`, with BatchNorm
  statistics over groups of `config.batch_norm_group_size` examples (0: the whole batch)."""
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  if schema.is_language_model(config):
    corpus = text_pipeline.load_corpus(config.dataset, config.data_dir)
    return language_model.AWDLSTM(
      corpus.vocab_size,
      embedding_size=config.embedding_size,
      hidden_size=config.hidden_size,
      num_layers=config.num_layers,
      output_dropout=config.output_dropout,
      hidden_dropout=config.hidden_dropout,
      input_dropout=config.input_dropout,
      embedding_dropout=config.embedding_dropout,
      weight_dropout=config.weight_dropout,
      dtype=dtype,
    )
  return models.get_model(
    config.model,
    config.num_classes,
    dtype,
    axis_name=axis_name,
    batch_norm_group_size=config.batch_norm_group_size or None,
  )


class TrainState(struct.PyTreeNode):
  """Everything a run needs to continue, as arrays (orbax saves it whole).

  Attributes:
    step: steps taken so far, skipped ones included.
    params: the model parameters.
    batch_stats: BatchNorm running statistics.
    opt_state: the optimizer state (Metropolis keys and cooling counters included).
    rng: raw key data; the dropout key of step n is `fold_in(rng, n)`.
    tx: the optimizer (static).
    ema: None, or the exponential moving averages `{'params', 'batch_stats'}` that
      evaluation uses (see `update_ema`).
    carry: a language model's LSTM state after the last window, for all the
      `batch_size` streams (see `examples.language_model`); None for image models.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  ema: Any = None
  carry: Any = None

  def eval_variables(self) -> dict[str, Any]:
    """The variables evaluation uses: the moving averages if kept, else the weights."""
    if self.ema is not None:
      return self.ema
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_train_state(
  rng: jax.Array,
  model: nn.Module,
  image_shape: Sequence[int],
  tx: optax.GradientTransformation,
  *,
  ema: bool = False,
  streams: int = 0,
) -> TrainState:
  """A freshly initialised train state, on the host (numpy arrays); with `ema`, moving
  averages that start at the initial weights and statistics. A language model ignores
  `image_shape` and carries a zero LSTM state for `streams` streams."""
  params_rng, dropout_rng = jax.random.split(rng)
  carry = None
  if isinstance(model, language_model.AWDLSTM):
    inputs = (jnp.zeros((1, 2), jnp.int32), language_model.initial_carry(model, 1))
    carry = language_model.initial_carry(model, streams)
  else:
    inputs = (jnp.zeros((1, *image_shape), jnp.float32),)
  variables = jax.jit(functools.partial(model.init, train=False))({'params': params_rng}, *inputs)
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    opt_state=jax.jit(tx.init)(variables['params']),
    rng=dropout_rng,
    tx=tx,
    carry=carry,
  )
  if ema:
    state = state.replace(ema={'params': state.params, 'batch_stats': state.batch_stats})
  return jax.device_get(state)


def update_ema(ema: Any, variables: Any, step: jax.Array, decay: float) -> Any:
  """The moving averages after the optimizer's step `step` (0-based) left `variables`.

  As TensorFlow's `ExponentialMovingAverage(decay, num_updates=global_step)` of the
  EfficientNet reference, applied after the step: with n = step + 1 updates done, the
  rate is `min(decay, (1 + n) / (10 + n))`, so the first averages follow the weights
  closely.
  """
  n = jnp.asarray(step, jnp.float32) + 1
  rate = jnp.minimum(decay, (1 + n) / (10 + n))
  return jax.tree.map(lambda a, v: rate * a + (1 - rate) * v, ema, variables)


# --------------------------------------------------------------------------------------------
# Steps


def cross_entropy_loss(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _masked_square_sum(params: Any, mask: Any) -> jax.Array:
  return sum(
    (
      jnp.sum(jnp.square(w))
      for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
      if m
    ),
    start=jnp.zeros([], jnp.float32),
  )


def conv_kernel_l2(params: Any) -> jax.Array:
  """sum(w**2) over the convolution kernels: Keras' l2 regularizer without its factor."""
  return _masked_square_sum(params, models.conv_kernel_mask(params))


def regularization(
  params: Any,
  *,
  l2_regularization: float = 0.0,
  weight_decay: float = 0.0,
  decay_gradient: bool = True,
) -> jax.Array:
  """The penalty added to the loss.

  `l2_regularization * sum(w**2)` over the convolution kernels (Keras' `l2` kernel
  regularizer of the ResNet reference) plus `weight_decay * sum(w**2) / 2` over every
  parameter but BatchNorm's (the EfficientNet reference's `weight_decay *
  tf.nn.l2_loss`), whose gradient is the coupled decay `weight_decay * w`. Without
  `decay_gradient` the decay term counts in the value only, for an optimizer that adds
  the decay itself (see `examples.optimizers.decays_after_clipping`).
  """
  penalty = jnp.zeros([], jnp.float32)
  if l2_regularization:
    penalty += l2_regularization * conv_kernel_l2(params)
  if weight_decay:
    decay = weight_decay / 2 * _masked_square_sum(params, models.weight_decay_mask(params))
    penalty += decay if decay_gradient else jax.lax.stop_gradient(decay)
  return penalty


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model: nn.Module,
  label_smoothing: float = 0.0,
  l2_regularization: float = 0.0,
  weight_decay: float = 0.0,
  decay_gradient: bool = True,
  ema_decay: float = 0.0,
  activation_regularization: float = 0.0,
  temporal_activation_regularization: float = 0.0,
  axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a (per-device under `pmap`, global under `jit`) batch.

  The loss is the objective the optimizer descends: the mean cross-entropy plus
  `regularization(params)`. A Metropolis optimizer judges that same objective at the
  current and the candidate parameters. Without `decay_gradient`, the weight decay
  counts in the loss but not in its gradient: the optimizer adds it to the clipped
  gradient (see `examples.optimizers.decays_after_clipping`).

  A step whose averaged loss, gradients or updates are not finite changes neither the
  parameters, nor the optimizer state, nor the batch statistics; it is counted in the
  'skipped' metric. With `state.ema`, the moving averages are updated with
  `ema_decay` (see `update_ema`).

  A language model (`state.carry` not None) descends the mean cross-entropy per token
  of a BPTT window plus the AR and TAR terms, starting from the carried LSTM state of
  its streams (zero where the batch's 'reset' is 1); its 'loss' metric is the
  cross-entropy alone, and the state after the window is carried to the next step.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    # Each replica draws its own dropout masks, as the examples of one global batch do.
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  if state.carry is not None:
    return _language_model_step(
      state,
      batch,
      model=model,
      dropout_rng=dropout_rng,
      penalty=functools.partial(
        regularization, weight_decay=weight_decay, decay_gradient=decay_gradient
      ),
      ema_decay=ema_decay,
      alpha=activation_regularization,
      beta=temporal_activation_regularization,
      axis_name=axis_name,
    )

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': dropout_rng},
    )
    loss = jnp.mean(cross_entropy_loss(logits, batch['label'], label_smoothing))
    loss += regularization(
      params,
      l2_regularization=l2_regularization,
      weight_decay=weight_decay,
      decay_gradient=decay_gradient,
    )
    return loss, (logits, updates['batch_stats'])

  def candidate_loss(params):
    # The Metropolis test compares this with `loss`: the same batch, BatchNorm mode,
    # dropout key and penalty; its batch-statistics update is thrown away.
    return loss_fn(params)[0]

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  if axis_name is not None:
    grads, loss, accuracy, batch_stats = jax.lax.pmean(
      (grads, loss, accuracy, batch_stats), axis_name
    )
  new_state, metrics = _apply_gradients(
    state, grads, loss, candidate_loss, ema_decay=ema_decay, batch_stats=batch_stats
  )
  return new_state, {**metrics, 'accuracy': accuracy}


def _apply_gradients(
  state: TrainState,
  grads: Any,
  loss: jax.Array,
  value_fn: Callable[[Any], jax.Array],
  *,
  ema_decay: float,
  **forward_state: Any,
) -> tuple[TrainState, Metrics]:
  """The optimizer's step from the (averaged) gradients of `loss`, for every model.

  `forward_state` holds the new values of the state fields the forward pass changed
  (`batch_stats`, `carry`); like the parameters, they are kept only if the step is
  finite.
  """
  updates, opt_state = state.tx.update(
    grads, state.opt_state, state.params, value=loss, value_fn=value_fn
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
  metrics = {
    'loss': loss,
    'kinetic_temperature': coolopt.kinetic_temperature(new_state.opt_state),
    'skipped': jnp.logical_not(finite).astype(jnp.float32),
  }
  thermostat = optax.tree_utils.tree_get(new_state.opt_state, 'ThermostatState')
  if thermostat is not None:
    metrics['target_temperature'] = thermostat.target_temperature
  metropolis = optax.tree_utils.tree_get(opt_state, 'MetropolisState')
  if metropolis is not None:
    metrics['accepted'] = (metropolis.accepted & finite).astype(jnp.float32)
  return new_state, metrics


def _replica_rows(tree: Any, rows: int, axis_name: str | None) -> Any:
  """This replica's `rows` rows of arrays that hold all the streams; all of them under jit."""
  if axis_name is None:
    return tree
  first = jax.lax.axis_index(axis_name) * rows
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, first, rows), tree)


def _all_rows(tree: Any, axis_name: str | None) -> Any:
  """The rows of every replica, in replica order: the inverse of `_replica_rows`."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), tree)


def _window_carry(state: TrainState, batch: Batch, axis_name: str | None) -> Any:
  """The LSTM state entering the window: the carried one, zero where 'reset' is 1."""
  carry = _replica_rows(state.carry, batch['inputs'].shape[0], axis_name)
  keep = (1.0 - batch['reset'])[:, None]
  return jax.tree.map(lambda x: x * keep.astype(x.dtype), carry)


def _language_model_step(
  state: TrainState,
  batch: Batch,
  *,
  model: language_model.AWDLSTM,
  dropout_rng: jax.Array,
  penalty: Callable[[Any], jax.Array],
  ema_decay: float,
  alpha: float,
  beta: float,
  axis_name: str | None,
) -> tuple[TrainState, Metrics]:
  """`train_step` for a language model: one BPTT window of every stream."""
  carry = _window_carry(state, batch, axis_name)

  def loss_fn(params):
    objective, (token_loss, _, new_carry) = language_model.window_loss(
      model, params, carry, batch, train=True, rng=dropout_rng, alpha=alpha, beta=beta
    )
    return objective + penalty(params), (token_loss, new_carry)

  def candidate_loss(params):
    # The same window, dropout key and carried state as `loss`.
    return loss_fn(params)[0]

  (loss, (token_loss, new_carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    # Every stream ends a window at the same position, so each replica counts alike.
    grads, loss, token_loss = jax.lax.pmean((grads, loss, token_loss), axis_name)
  new_state, metrics = _apply_gradients(
    state, grads, loss, candidate_loss, ema_decay=ema_decay, carry=_all_rows(new_carry, axis_name)
  )
  return new_state, {**metrics, 'loss': token_loss}


def eval_step(
  state: TrainState, batch: Batch, *, model: nn.Module, axis_name: str | None = None
) -> Metrics:
  """Sums of loss, correct predictions and real examples (mask 1) over an evaluation
  batch, with `state.eval_variables()`.

  A language model sums the cross-entropy and the real tokens of a window of its
  evaluation streams, from the state `state.carry`, and returns the state after the
  window as 'carry'.
  """
  if state.carry is not None:
    _, (token_loss, count, carry) = language_model.window_loss(
      model,
      state.eval_variables()['params'],
      _window_carry(state, batch, axis_name),
      batch,
      train=False,
    )
    sums = {'loss': token_loss * count, 'count': count}
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return {**sums, 'carry': _all_rows(carry, axis_name)}
  logits = model.apply(state.eval_variables(), batch['image'], train=False)
  mask = batch['mask']
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  sums = {
    'loss': jnp.sum(cross_entropy_loss(logits, batch['label']) * mask),
    'correct': jnp.sum(correct * mask),
    'count': jnp.sum(mask),
  }
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


# --------------------------------------------------------------------------------------------
# The compiled steps


def create_parallel(config: ml_collections.ConfigDict, model: nn.Module) -> data_parallel.Parallel:
  """`train_step` and `eval_step` for `model`, compiled for `config.parallelism`.

  `model` must have the matching BatchNorm axis: `data_parallel.AXIS_NAME` under
  'pmap', none under 'jit'.
  """
  step = functools.partial(
    train_step,
    model=model,
    label_smoothing=config.label_smoothing,
    l2_regularization=config.l2_regularization,
    weight_decay=config.weight_decay,
    decay_gradient=not optimizers.decays_after_clipping(config),
    ema_decay=config.ema_decay,
    activation_regularization=config.activation_regularization,
    temporal_activation_regularization=config.temporal_activation_regularization,
  )
  evaluate = functools.partial(eval_step, model=model)
  return data_parallel.compile_steps(config.parallelism, step, evaluate)


# --------------------------------------------------------------------------------------------
# Epochs


def _mean(values: np.ndarray) -> float | None:
  values = values[np.isfinite(values)]
  return float(np.mean(values)) if values.size else None


def empty_step_metrics(config: ml_collections.ConfigDict, steps_per_epoch: int) -> StepMetrics:
  """The per-step metrics of an epoch before its first step: NaN, one entry per step."""
  keys = ('loss', 'kinetic_temperature', 'skipped')
  if not schema.is_language_model(config):
    keys += ('accuracy',)
  if config.optimizer in optimizers.METROPOLIS_OPTIMIZERS:
    keys += ('accepted',)
  if (
    config.optimizer in optimizers.COOLMOMENTUM_OPTIMIZERS
    and config.cooling == optimizers.THERMOSTAT
  ):
    keys += ('target_temperature',)
  return {key: np.full(steps_per_epoch, np.nan, np.float32) for key in keys}


def train_epoch(
  parallel: data_parallel.Parallel,
  state: TrainState,
  config: ml_collections.ConfigDict,
  *,
  epoch: int,
  steps_per_epoch: int,
  start_step: int = 0,
  step_metrics: StepMetrics | None = None,
  checkpoint: Callable[[TrainState, int, StepMetrics], None] | None = None,
  log: Callable[[TrainState, int, StepMetrics], None] | None = None,
) -> tuple[TrainState, dict[str, Any], StepMetrics]:
  """The epoch's batches from `start_step` on.

  Returns:
    The device state, the epoch's metrics (see `summarize_steps`) and its per-step
    metrics.

  Args:
    parallel: the compiled steps (see `create_parallel`).
    state: the device state after `start_step` steps of the epoch.
    config: the resolved config.
    epoch: the epoch, from 0.
    steps_per_epoch: the steps of a whole epoch.
    start_step: the steps of the epoch already taken (when resuming inside it).
    step_metrics: the metrics of those steps (see `empty_step_metrics`).
    checkpoint: called as `checkpoint(device state, steps taken in the epoch, per-step
      metrics so far)` after every `config.checkpoint_every_steps`-th step of the run,
      except at the epoch's end.
    log: called as `checkpoint` is, after every `config.log_every_steps`-th step of
      the run, at the epoch's end too.
  """
  step_metrics = {
    key: np.array(values)
    for key, values in (step_metrics or empty_step_metrics(config, steps_per_epoch)).items()
  }
  batches = train_batches(config, epoch, start_step)
  show = config.progress_bar and jax.process_index() == 0
  progress = tqdm.tqdm(
    total=steps_per_epoch,
    initial=start_step,
    desc=f'epoch {epoch + 1}/{config.num_epochs}',
    unit='step',
    disable=None if show else True,  # None: off when stderr is not a terminal.
  )
  every = config.checkpoint_every_steps
  pending = []  # (step in epoch, device metrics) not yet read.

  def read_pending():
    if pending:
      steps, device_metrics = zip(*pending, strict=True)
      for i, values in zip(steps, parallel.get_metrics(list(device_metrics)), strict=True):
        for key in step_metrics:
          step_metrics[key][i] = values[key]
    pending.clear()

  start = None
  timed_steps = 0
  for i, batch in enumerate(batches, start=start_step):
    state, metrics = parallel.train_step(state, parallel.put_batch(batch))
    pending.append((i, metrics))
    if start is None:
      # The clock starts once the first step is done: it may have compiled.
      jax.block_until_ready(metrics)
      start = time.perf_counter()
    else:
      timed_steps += 1
    progress.update()
    if not progress.disable and (i + 1) % 20 == 0:
      # Reading a loss waits for its step; every 20 steps keeps the devices busy.
      progress.set_postfix(loss=f'{float(parallel.get_metrics(metrics["loss"])):.4f}')
    done = i + 1
    if (
      log
      and config.log_every_steps
      and (epoch * steps_per_epoch + done) % config.log_every_steps == 0
    ):
      read_pending()
      log(state, done, step_metrics)
    if (
      checkpoint
      and every
      and done < steps_per_epoch
      and (epoch * steps_per_epoch + done) % every == 0
    ):
      read_pending()
      checkpoint(state, done, step_metrics)
  read_pending()
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start if start is not None else 0.0
  progress.close()
  # The steps after the first of this process; None without such steps.
  steps_per_sec = timed_steps / seconds if timed_steps else None
  return state, summarize_steps(step_metrics, throughput(config, steps_per_sec)), step_metrics


def throughput(
  config: ml_collections.ConfigDict, steps_per_sec: float | None
) -> dict[str, float | None]:
  """`{'images_per_sec': ...}`, or a language model's `{'tokens_per_sec': ...}`."""
  if schema.is_language_model(config):
    return {'tokens_per_sec': steps_per_sec and steps_per_sec * config.batch_size * config.bptt}
  return {'images_per_sec': steps_per_sec and steps_per_sec * config.batch_size}


def summarize_steps(
  step_metrics: StepMetrics, throughput: Mapping[str, float | None]
) -> dict[str, Any]:
  """The epoch's training metrics from its per-step metrics, with `throughput`."""
  stacked = {key: values.astype(np.float64) for key, values in step_metrics.items()}
  return {
    'train_loss': _mean(stacked['loss']),
    'train_accuracy': _mean(stacked['accuracy']) if 'accuracy' in stacked else None,
    'kinetic_temperature': _mean(stacked['kinetic_temperature']),
    'acceptance_rate': float(np.mean(stacked['accepted'])) if 'accepted' in stacked else None,
    # The thermostat's target, to compare with the measured kinetic temperature.
    'target_temperature': _mean(stacked['target_temperature'])
    if 'target_temperature' in stacked
    else None,
    'skipped_steps': int(np.sum(stacked['skipped'])),
    **throughput,
  }


def evaluate(
  parallel: data_parallel.Parallel,
  state: TrainState,
  config: ml_collections.ConfigDict,
  split: str = 'test',
) -> dict[str, float]:
  """Mean loss and accuracy in inference mode, with `state.eval_variables()`.

  Over the test split (or its first `config.steps_per_eval` batches), or over the
  whole training split, without augmentation, for `split='train'`. A language model
  returns the loss per token and the perplexity over `split` ('valid' or 'test') in
  `config.eval_batch_size` streams, the LSTM state carried from window to window.
  """
  if schema.is_language_model(config):
    return _evaluate_language_model(parallel, state, config, split)
  batches = input_pipeline.create_input_iter(
    split=split,
    global_batch_size=config.batch_size,
    num_steps=config.steps_per_eval,
    evaluation=True,
    **pipeline_args(config),
  )
  sums = [parallel.eval_step(state, parallel.put_batch(batch)) for batch in batches]
  totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get_metrics(sums))
  count = max(totals['count'], 1.0)
  return {'loss': totals['loss'] / count, 'accuracy': totals['correct'] / count}


def _evaluate_language_model(
  parallel: data_parallel.Parallel, state: TrainState, config: ml_collections.ConfigDict, split: str
) -> dict[str, float]:
  # Zero states for the evaluation streams, placed on the devices as the train state.
  carry = parallel.put_state(
    jax.tree.map(lambda x: np.zeros((config.eval_batch_size, x.shape[-1]), x.dtype), state.carry)
  )
  sums = []
  batches = text_pipeline.create_input_iter(
    split=split,
    global_batch_size=config.eval_batch_size,
    num_steps=config.steps_per_eval,
    **pipeline_args(config),
  )
  for batch in batches:
    window = parallel.eval_step(state.replace(carry=carry), parallel.put_batch(batch))
    carry = window.pop('carry')
    sums.append(window)
  totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get_metrics(sums))
  loss = totals['loss'] / max(totals['count'], 1.0)
  return {'loss': loss, 'perplexity': math.exp(loss)}


def _pipeline(config: ml_collections.ConfigDict) -> Any:
  """The module that reads `config.dataset`: text_pipeline or input_pipeline."""
  return text_pipeline if schema.is_language_model(config) else input_pipeline


def dataset_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's fields that name the data: the keyword arguments of
  `input_pipeline.dataset_info`, or of the corpus functions of `text_pipeline`."""
  fields = ['dataset', 'data_dir']
  if not schema.is_language_model(config):
    fields += ['image_size', 'num_channels', 'num_classes']
    fields += ['synthetic_train_size', 'synthetic_test_size']
  return {field: config[field] for field in fields}


def pipeline_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's keyword arguments of `_pipeline(config).create_input_iter`, besides
  the split, the batch size and the steps."""
  if schema.is_language_model(config):
    return {**dataset_args(config), 'bptt': config.bptt}
  return {**dataset_args(config), 'seed': config.seed, 'cache': config.cache}


def input_shape_and_steps(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], int]:
  """The shape of an image (`()` for a language model, which reads windows of tokens)
  and the steps of an epoch of `config` (resolved), from its data set.

  Raises:
    ValueError: if `config.num_classes` is not the data set's.
  """
  if schema.is_language_model(config):
    steps = text_pipeline.steps_per_epoch(
      batch_size=config.batch_size,
      bptt=config.bptt,
      steps=config.steps_per_epoch,
      **dataset_args(config),
    )
    return (), steps
  info = input_pipeline.dataset_info(**dataset_args(config))
  if info.num_classes != config.num_classes:
    raise schema.invalid_field(
      'num_classes', config.num_classes, f'{info.num_classes} for {config.dataset}'
    )
  return info.image_shape, input_pipeline.steps_per_epoch(
    info, config.batch_size, config.steps_per_epoch
  )


def train_batches(
  config: ml_collections.ConfigDict, epoch: int, start_step: int = 0
) -> Iterator[Batch]:
  """The training batches of `epoch` from its step `start_step` on: this process's
  rows of the global batches, which do not depend on the processes or devices."""
  return _pipeline(config).create_input_iter(
    split='train',
    epoch=epoch,
    global_batch_size=config.batch_size,
    num_steps=config.steps_per_epoch,
    start_step=start_step,
    **pipeline_args(config),
  )


def _clock(state: TrainState) -> dict[str, Any]:
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


def _scheduled(clock: Mapping[str, Any], schedules: optimizers.Schedules) -> dict[str, Any]:
  """The rho and learning rate of the optimizer's last step from its `_clock` (on the
  host): the schedules it runs on, read at its step, or the thermostat's rho."""
  step = int(clock['step'])
  rho = clock['rho'] if schedules.rho is None else schedules.rho(step)
  return {
    'rho': None if rho is None else float(rho),
    'learning_rate': float(schedules.learning_rate(step)),
  }


# --------------------------------------------------------------------------------------------
# The run


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
  schema.validate_config(config)
  config = schema.resolve_config(config)
  language = schema.is_language_model(config)
  image_shape, steps_per_epoch = input_shape_and_steps(config)
  # The stored config says how long an epoch was, so that a changed data set shows too.
  config.steps_per_epoch = steps_per_epoch
  # Before anything is compiled: a resume must not change the trajectory.
  check_config(workdir, config)
  axis_name = data_parallel.AXIS_NAME if config.parallelism == 'pmap' else None
  model = create_model(config, axis_name=axis_name)
  tx, schedules = optimizers.create_optimizer(config, steps_per_epoch, axis_name=axis_name)

  is_writer = jax.process_index() == 0
  metrics_path = os.path.join(workdir, METRICS_FILE)
  curves_path = os.path.join(workdir, CURVES_FILE)
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
  # TensorBoard event files beside metrics.jsonl (see examples/logs.py).
  writer = logs.create_writer(workdir) if is_writer else None
  manager = checkpoints.checkpoint_manager(workdir, config.checkpoint_max_to_keep)
  host_state = create_train_state(
    jax.random.PRNGKey(config.seed),
    model,
    image_shape,
    tx,
    ema=config.ema_decay > 0,
    streams=config.batch_size if language else 0,
  )
  host_state, position = checkpoints.restore_checkpoint(
    manager, host_state, empty_step_metrics(config, steps_per_epoch), config
  )
  # Rows past the checkpoint belong to epochs that will be trained again.
  history = [row for row in read_metrics(metrics_path) if row['epoch'] <= position.epoch]
  if is_writer:
    write_metrics(metrics_path, history)
  if manager.latest_step() is not None:
    logging.info(
      'Resuming from the checkpoint after epoch %d and %d steps of the next.',
      position.epoch,
      position.step_in_epoch,
    )

  parallel = create_parallel(config, model)
  state = parallel.put_state(host_state)
  start = time.perf_counter()

  def wall_time() -> float:
    return position.wall_time + time.perf_counter() - start

  def save(host_state: TrainState, saved: checkpoints.Position) -> None:
    if is_writer and not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
      write_config(workdir, config)
    checkpoints.save_checkpoint(manager, host_state, saved, config)

  def finish_epoch(epoch: int, host_state: TrainState, summary: dict[str, Any]) -> None:
    if language:
      for split in ('valid', 'test'):
        result = evaluate(parallel, state, config, split)
        summary.update(
          {f'{split}_loss': result['loss'], f'{split}_perplexity': result['perplexity']}
        )
    else:
      test = evaluate(parallel, state, config)
      summary.update(test_loss=test['loss'], test_accuracy=test['accuracy'])
    if config.eval_train and not language:
      # The paper's training loss (its Fig. 1, the authors' Keras callback): the
      # objective over the whole training set in inference mode, penalty included.
      train_eval = evaluate(parallel, state, config, 'train')
      penalty = regularization(
        host_state.eval_variables()['params'],
        l2_regularization=config.l2_regularization,
        weight_decay=config.weight_decay,
      )
      summary.update(
        eval_train_loss=train_eval['loss'] + float(penalty),
        eval_train_accuracy=train_eval['accuracy'],
      )
    row = {
      'epoch': epoch + 1,
      'step': int(host_state.step),
      **summary,
      **_scheduled(_clock(host_state), schedules),
      'wall_time': wall_time(),
    }
    row = {key: finite_or_none(value) for key, value in row.items()}
    # The row is written only once its checkpoint is on disk: after a crash the
    # metrics never run ahead of what a resumed run restores.
    manager.wait_until_finished()
    seconds = row['wall_time'] - (history[-1]['wall_time'] if history else 0.0)
    history.append(row)
    logging.info(
      'epoch %d: ' + ', '.join(f'{k}=%s' for k in row if k != 'epoch'),
      *row.values(),
    )
    if is_writer:
      print(logs.epoch_line(config.optimizer, row, config.num_epochs, seconds), flush=True)
      write_metrics(metrics_path, history)
      plot_curves({config.optimizer: history}, curves_path)
      logs.write_epoch(writer, row)

  if position.epoch and not position.step_in_epoch and len(history) < position.epoch:
    # Stopped between the checkpoint at an epoch's end and that epoch's row: the
    # checkpoint holds the epoch's per-step metrics, the row is made again from them.
    finish_epoch(
      position.epoch - 1,
      host_state,
      summarize_steps(position.step_metrics, throughput(config, None)),
    )

  for epoch in range(position.epoch, config.num_epochs):
    partial = epoch == position.epoch and position.step_in_epoch > 0

    def checkpoint(device_state, steps, step_metrics, epoch=epoch):
      saved = checkpoints.Position(epoch, steps, step_metrics, wall_time())
      save(parallel.get_state(device_state), saved)

    def log_steps(device_state, steps, step_metrics, epoch=epoch):
      # Read as the epoch's row is, from the few leaves of the clock on the host.
      scheduled = _scheduled(parallel.get_metrics(_clock(device_state)), schedules)
      values = logs.step_values(step_metrics, steps, every=config.log_every_steps, **scheduled)
      logs.write_step(writer, epoch * steps_per_epoch + steps, values)

    state, summary, step_metrics = train_epoch(
      parallel,
      state,
      config,
      epoch=epoch,
      steps_per_epoch=steps_per_epoch,
      start_step=position.step_in_epoch if partial else 0,
      step_metrics=position.step_metrics if partial else None,
      checkpoint=checkpoint,
      log=log_steps if is_writer else None,
    )
    host_state = parallel.get_state(state)
    # Saved in the background while the test split is evaluated, with the epoch's
    # per-step metrics, from which its row can be made again.
    save(host_state, checkpoints.Position(epoch + 1, 0, step_metrics, wall_time()))
    finish_epoch(epoch, host_state, summary)
    divergence.check(config, history, step_metrics)
  manager.close()
  if is_writer:
    writer.close()
  return host_state
