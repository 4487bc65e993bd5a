"""Trains and evaluates an image classifier with coolopt, after Flax's examples/imagenet.

One step body, `train_step`, runs under `jax.pmap` (`config.parallelism = 'pmap'`:
gradients, losses, metrics and batch statistics are averaged over the axis 'batch')
and under a sharded `jax.jit` over a 1-D device mesh (`'jit'`: the batch is one global
array split over the devices and no axis name appears inside).

The workdir receives, from process 0, `metrics.jsonl` (one row per epoch) and
`curves.png` (the paper's training loss, test accuracy and kinetic temperature), and, from
all processes together, an orbax checkpoint after every epoch. Running again with
the same workdir resumes after the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from flax import jax_utils, struct
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib.figure import Figure

import coolopt
from examples import input_pipeline, models

OPTIMIZERS = ('coolmomentum', 'momentum', 'adam', 'rmsprop', 'sgd_sa', 'metropolis_coolmomentum')
COOLMOMENTUM_OPTIMIZERS = ('coolmomentum', 'metropolis_coolmomentum')
METROPOLIS_OPTIMIZERS = ('sgd_sa', 'metropolis_coolmomentum')
PARALLELISMS = ('pmap', 'jit')
LR_SCHEDULES = ('constant', 'piecewise', 'exponential')
COOLING_SCHEDULES = {
  'exponential': coolopt.exponential_cooling,
  'linear': coolopt.linear_cooling,
  'friction': coolopt.friction_cooling,
}
# Cooling by feedback instead of a schedule: rho follows the measured temperature.
THERMOSTAT = 'thermostat'
AXIS_NAME = 'batch'
METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
CHECKPOINT_DIR = 'checkpoints'

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


# --------------------------------------------------------------------------------------------
# Configuration


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with references resolved and `config.optimizers[optimizer]` applied."""
  config = config.copy_and_resolve_references()
  overrides = config.optimizers.get(config.optimizer)
  if overrides is not None:
    for field, value in overrides.items():
      config[field] = value
  return config


def _invalid(field: str, value: Any, expected: str) -> ValueError:
  return ValueError(f'config.{field} must be {expected}, got config.{field}={value!r}.')


def _check_choice(config: ml_collections.ConfigDict, field: str, choices: Iterable[str]) -> None:
  choices = tuple(choices)
  if config[field] not in choices:
    raise _invalid(field, config[field], 'one of ' + ', '.join(map(repr, choices)))


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(
  config: ml_collections.ConfigDict,
  field: str,
  *,
  lower: float | None = None,
  upper: float | None = None,
  lower_inclusive: bool = True,
  upper_inclusive: bool = False,
  integer: bool = False,
) -> None:
  value = config[field]
  ok = _is_number(value) and (isinstance(value, int) or not integer)
  ok = ok and (lower is None or (value >= lower if lower_inclusive else value > lower))
  ok = ok and (upper is None or (value <= upper if upper_inclusive else value < upper))
  if not ok:
    kind = 'an integer' if integer else 'a number'
    left, right = '[' if lower_inclusive else '(', ']' if upper_inclusive else ')'
    low = '-inf' if lower is None else f'{lower:g}'
    high = 'inf' if upper is None else f'{upper:g}'
    raise _invalid(field, value, f'{kind} in {left}{low}, {high}{right}')


def _check_steps(config: ml_collections.ConfigDict, field: str) -> None:
  value = config[field]
  if not (isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value > 0)):
    raise _invalid(field, value, '-1 (derived from the dataset) or a positive integer')


def _check_overrides(config: ml_collections.ConfigDict) -> None:
  for name, overrides in config.optimizers.items():
    if name not in OPTIMIZERS:
      raise ValueError(
        f'config.optimizers may only hold entries for {", ".join(map(repr, OPTIMIZERS))}, '
        f'got config.optimizers.{name}.'
      )
    for field in overrides:
      if field in ('optimizer', 'optimizers') or field not in config:
        raise ValueError(
          f'config.optimizers.{name}.{field} overrides no field of the config; it may '
          'override the optimizer fields, such as learning_rate or lr_schedule.'
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before anything is compiled, on a configuration that cannot run.

  Checks `config` and every per-optimizer override in `config.optimizers`, as
  resolved for `config.optimizer`. Needs the devices (the batch size must divide
  among them), so call it after `jax.distributed.initialize`.

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  _check_choice(config, 'optimizer', OPTIMIZERS)
  _check_overrides(config)
  config = resolve_config(config)
  _check_choice(config, 'model', models.MODELS)
  _check_choice(config, 'dataset', input_pipeline.KNOWN_DATASETS)
  _check_choice(config, 'parallelism', PARALLELISMS)
  _check_choice(config, 'cooling', (*COOLING_SCHEDULES, THERMOSTAT))
  if config.cooling == THERMOSTAT and config.warmup_epochs:
    raise _invalid('warmup_epochs', config.warmup_epochs, "0 with config.cooling='thermostat'")
  _check_choice(config, 'lr_schedule', LR_SCHEDULES)
  for field in ('num_epochs', 'batch_size', 'num_classes', 'image_size'):
    _check_number(config, field, lower=1, integer=True)
  if config.batch_size % jax.device_count():
    raise _invalid(
      'batch_size', config.batch_size, f'a multiple of the device count {jax.device_count()}'
    )
  _check_steps(config, 'steps_per_epoch')
  _check_steps(config, 'steps_per_eval')
  _check_number(config, 'seed', integer=True)
  _check_number(config, 'learning_rate', lower=0, lower_inclusive=False)
  _check_number(config, 'rho_0', lower=0, upper=1)
  _check_number(config, 'momentum', lower=0, upper=1)
  _check_number(config, 'rmsprop_decay', lower=0, upper=1)
  _check_number(config, 'rmsprop_eps', lower=0, lower_inclusive=False)
  _check_number(config, 'label_smoothing', lower=0, upper=1)
  for field in ('warmup_epochs', 'lr_warmup_epochs', 'weight_decay', 'l2_regularization'):
    _check_number(config, field, lower=0)
  _check_number(config, 'lr_decay_epochs', lower=0, lower_inclusive=False)
  _check_number(
    config, 'lr_decay_rate', lower=0, upper=1, lower_inclusive=False, upper_inclusive=True
  )
  _check_number(config, 'metropolis_temperature', lower=0, lower_inclusive=False)
  _check_number(
    config, 'metropolis_cooling', lower=0, upper=1, lower_inclusive=False, upper_inclusive=True
  )
  multipliers = config.metropolis_multipliers
  if not (
    isinstance(multipliers, (tuple, list))
    and multipliers
    and all(_is_number(m) and m > 0 for m in multipliers)
  ):
    raise _invalid('metropolis_multipliers', multipliers, 'a non-empty tuple of positive numbers')
  boundaries, scales = config.lr_boundaries, config.lr_scales
  if not (
    isinstance(boundaries, (tuple, list))
    and all(_is_number(b) and b >= 0 for b in boundaries)
    and list(boundaries) == sorted(boundaries)
  ):
    raise _invalid('lr_boundaries', boundaries, 'a sorted tuple of epochs >= 0')
  if not (
    isinstance(scales, (tuple, list))
    and len(scales) == len(boundaries)
    and all(_is_number(s) and s > 0 for s in scales)
  ):
    raise _invalid(
      'lr_scales', scales, f'a tuple of {len(boundaries)} positive numbers, one per lr_boundaries'
    )
  if not isinstance(config.half_precision, bool):
    raise _invalid('half_precision', config.half_precision, 'True or False')
  _check_number(config, 'checkpoint_max_to_keep', lower=1, integer=True)


# --------------------------------------------------------------------------------------------
# Model, optimizer and train state


def create_model(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> nn.Module:
  """`config.model`, computing in bfloat16 when `config.half_precision`."""
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  return models.get_model(config.model, config.num_classes, dtype, axis_name=axis_name)


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  return round(epochs * steps_per_epoch)


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """The learning rate as a function of the optimizer's step, after `config.lr_schedule`."""
  base = config.learning_rate
  if config.lr_schedule == 'piecewise':
    boundaries_and_scales = {}
    for epoch, scale in zip(config.lr_boundaries, config.lr_scales, strict=True):
      step = _epochs_to_steps(epoch, steps_per_epoch)
      boundaries_and_scales[step] = boundaries_and_scales.get(step, 1.0) * scale
    return optax.piecewise_constant_schedule(base, boundaries_and_scales)
  if config.lr_schedule == 'exponential':
    warmup_steps = _epochs_to_steps(config.lr_warmup_epochs, steps_per_epoch)
    decay = optax.exponential_decay(
      base,
      transition_steps=max(1, _epochs_to_steps(config.lr_decay_epochs, steps_per_epoch)),
      decay_rate=config.lr_decay_rate,
      staircase=True,
    )
    if warmup_steps == 0:
      return decay
    warmup = optax.linear_schedule(0.0, base, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])
  return optax.constant_schedule(base)


def create_rho_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule | None:
  """CoolMomentum's rho as a function of its step; None for the other optimizers and
  for the thermostat, whose rho is in its state."""
  if config.optimizer not in COOLMOMENTUM_OPTIMIZERS or config.cooling == THERMOSTAT:
    return None
  return COOLING_SCHEDULES[config.cooling](
    config.rho_0,
    config.num_epochs * steps_per_epoch,
    _epochs_to_steps(config.warmup_epochs, steps_per_epoch),
  )


def _kernel_mask(params: Any) -> Any:
  # Kernels of convolutions and dense layers; biases and BatchNorm scales are not decayed.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _base_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  learning_rate: optax.Schedule,
  constant_rho: bool = False,
  axis_name: str | None = None,
) -> optax.GradientTransformation:
  name = config.optimizer
  if name in COOLMOMENTUM_OPTIMIZERS:
    # A constant rho (the range test) has no cooling, so no thermostat; the thermostat
    # averages its measured temperature over the replicas.
    thermostat = not constant_rho and config.cooling == THERMOSTAT
    return coolopt.coolmomentum(
      learning_rate,
      config.rho_0,
      None if constant_rho else config.num_epochs * steps_per_epoch,
      cooling='exponential' if constant_rho else config.cooling,
      warmup_steps=0 if constant_rho else _epochs_to_steps(config.warmup_epochs, steps_per_epoch),
      **({'axis_name': axis_name} if thermostat else {}),
    )
  if name == 'momentum':
    return optax.sgd(learning_rate, momentum=config.momentum)
  if name == 'adam':
    return optax.adam(learning_rate)
  if name == 'rmsprop':
    # The TensorFlow RMSProp of the EfficientNet reference: mean square started at 1,
    # epsilon inside the square root.
    return optax.rmsprop(
      learning_rate,
      decay=config.rmsprop_decay,
      eps=config.rmsprop_eps,
      initial_scale=1.0,
      eps_in_sqrt=True,
      momentum=config.momentum,
    )
  raise ValueError(f'config.optimizer must be one of {OPTIMIZERS}, got {name!r}.')


def create_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  *,
  axis_name: str | None = None,
  learning_rate: optax.Schedule | None = None,
  constant_rho: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """`config.optimizer`, with weight decay first and `coolopt.track_kinetic_temperature()` last.

  The Metropolis optimizers test every step at a temperature `metropolis_temperature`
  multiplied by `metropolis_cooling` after every epoch, averaging the losses over
  `axis_name` under `pmap` so that every replica decides alike: 'sgd_sa' is
  `coolopt.sgd_sa` with the learning rates `metropolis_multipliers`, and
  'metropolis_coolmomentum' wraps CoolMomentum in `coolopt.metropolis`.

  Args:
    config: a resolved config (see `resolve_config`).
    steps_per_epoch: optimizer steps in an epoch; sets the schedules' lengths.
    axis_name: the `pmap` axis, or None under `jit` with global arrays.
    learning_rate: replaces the schedule of `create_learning_rate_fn` (not for 'sgd_sa',
      whose rates are its multipliers); the learning-rate range test sweeps it.
    constant_rho: hold CoolMomentum's rho at rho_0, without cooling or momentum warm-up.
  """
  if config.optimizer == 'sgd_sa':
    optimizer = coolopt.sgd_sa(
      tuple(config.metropolis_multipliers),
      config.metropolis_temperature,
      config.metropolis_cooling,
      steps_per_epoch,
      key=config.seed,
      axis_name=axis_name,
    )
  else:
    if learning_rate is None:
      learning_rate = create_learning_rate_fn(config, steps_per_epoch)
    optimizer = _base_optimizer(config, steps_per_epoch, learning_rate, constant_rho, axis_name)
  if config.optimizer == 'metropolis_coolmomentum':
    temperature = optax.exponential_decay(
      config.metropolis_temperature,
      transition_steps=steps_per_epoch,
      decay_rate=config.metropolis_cooling,
      staircase=True,
    )
    optimizer = coolopt.metropolis(
      optimizer,
      temperature,
      multipliers=tuple(config.metropolis_multipliers),
      key=config.seed,
      axis_name=axis_name,
    )
  transforms = []
  if config.weight_decay > 0:
    transforms.append(optax.add_decayed_weights(config.weight_decay, mask=_kernel_mask))
  return optax.chain(*transforms, optimizer, coolopt.track_kinetic_temperature())


class TrainState(struct.PyTreeNode):
  """Everything a run needs to continue, as arrays (orbax saves it whole).

  Attributes:
    step: steps taken so far, skipped ones included.
    params: the model parameters.
    batch_stats: BatchNorm running statistics.
    opt_state: the optimizer state (Metropolis keys and cooling counters included).
    rng: raw key data; the dropout key of step n is `fold_in(rng, n)`.
    tx: the optimizer (static).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_train_state(
  rng: jax.Array,
  model: nn.Module,
  image_shape: Sequence[int],
  tx: optax.GradientTransformation,
) -> TrainState:
  """A freshly initialised train state, on the host (numpy arrays)."""
  params_rng, dropout_rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model.init, train=False))(
    {'params': params_rng}, jnp.zeros((1, *image_shape), jnp.float32)
  )
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    opt_state=jax.jit(tx.init)(variables['params']),
    rng=dropout_rng,
    tx=tx,
  )
  return jax.device_get(state)


def _find_states(tree: Any, state_type: type) -> list[Any]:
  """The nodes of type `state_type` in a nested optimizer state."""
  nodes = jax.tree.leaves(tree, is_leaf=lambda node: isinstance(node, state_type))
  return [node for node in nodes if isinstance(node, state_type)]


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


def conv_kernel_l2(params: Any) -> jax.Array:
  """sum(w**2) over the convolution kernels: Keras' l2 regularizer without its factor."""
  mask = models.conv_kernel_mask(params)
  return sum(
    (
      jnp.sum(jnp.square(w))
      for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
      if m
    ),
    start=jnp.zeros([], jnp.float32),
  )


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model: nn.Module,
  label_smoothing: float = 0.0,
  l2_regularization: float = 0.0,
  axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a (per-device under `pmap`, global under `jit`) batch.

  A step whose averaged loss, gradients or updates are not finite changes neither
  the parameters, nor the optimizer state, nor the batch statistics; it is counted
  in the 'skipped' metric.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    # Each replica draws its own dropout masks, as the examples of one global batch do.
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': dropout_rng},
    )
    loss = jnp.mean(cross_entropy_loss(logits, batch['label'], label_smoothing))
    if l2_regularization:
      loss += l2_regularization * conv_kernel_l2(params)
    return loss, (logits, updates['batch_stats'])

  def candidate_loss(params):
    # The Metropolis test compares this with `loss`: the same batch, BatchNorm mode,
    # dropout key and L2 term; its batch-statistics update is thrown away.
    return loss_fn(params)[0]

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  if axis_name is not None:
    grads, loss, accuracy, batch_stats = jax.lax.pmean(
      (grads, loss, accuracy, batch_stats), axis_name
    )
  updates, opt_state = state.tx.update(
    grads, state.opt_state, state.params, value=loss, value_fn=candidate_loss
  )
  params = optax.apply_updates(state.params, updates)

  # After the pmean the flag is the same on every replica, so they stay in step. An
  # overflowing update (finite gradients, too large a step) is refused as well: it
  # would leave parameters that no later step could repair.
  finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(updates)

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = state.replace(
    step=state.step + 1,
    params=keep_if_finite(params, state.params),
    batch_stats=keep_if_finite(batch_stats, state.batch_stats),
    opt_state=keep_if_finite(opt_state, state.opt_state),
  )
  metrics = {
    'loss': loss,
    'accuracy': accuracy,
    'kinetic_temperature': coolopt.kinetic_temperature(new_state.opt_state),
    'skipped': jnp.logical_not(finite).astype(jnp.float32),
  }
  thermostat_states = _find_states(new_state.opt_state, coolopt.ThermostatState)
  if thermostat_states:
    metrics['target_temperature'] = thermostat_states[0].target_temperature
  metropolis_states = _find_states(opt_state, coolopt.MetropolisState)
  if metropolis_states:
    metrics['accepted'] = (metropolis_states[0].accepted & finite).astype(jnp.float32)
  return new_state, metrics


def eval_step(
  state: TrainState, batch: Batch, *, model: nn.Module, axis_name: str | None = None
) -> Metrics:
  """Sums of loss, correct predictions and real examples (mask 1) over a test batch."""
  logits = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
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
# Data parallelism: pmap or sharded jit


@dataclasses.dataclass(frozen=True)
class Parallel:
  """The compiled steps, and how state, batches and metrics move to and from devices.

  Attributes:
    train_step: `(device state, device batch) -> (device state, metrics)`.
    eval_step: `(device state, device batch) -> sums`.
    put_state: host `TrainState` -> device state.
    get_state: device state -> host `TrainState` (numpy).
    put_batch: a pipeline batch `[local devices, per device, ...]` -> device batch.
    get_metrics: device metrics (any pytree) -> numpy.
  """

  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  eval_step: Callable[[TrainState, Batch], Metrics]
  put_state: Callable[[TrainState], TrainState]
  get_state: Callable[[TrainState], TrainState]
  put_batch: Callable[[Batch], Batch]
  get_metrics: Callable[[Any], Any]


def _replicate(state: TrainState) -> TrainState:
  # Through a pmap, so that the copies are laid out as the train step's outputs are
  # and the second step does not compile again.
  return jax.pmap(lambda x: x, axis_name=AXIS_NAME)(jax_utils.replicate(state))


def _pmap_parallel(config: ml_collections.ConfigDict, model: nn.Module) -> Parallel:
  step = functools.partial(
    train_step,
    model=model,
    label_smoothing=config.label_smoothing,
    l2_regularization=config.l2_regularization,
    axis_name=AXIS_NAME,
  )
  evaluate = functools.partial(eval_step, model=model, axis_name=AXIS_NAME)
  return Parallel(
    train_step=jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,)),
    eval_step=jax.pmap(evaluate, axis_name=AXIS_NAME),
    put_state=_replicate,
    get_state=lambda state: jax.device_get(jax_utils.unreplicate(state)),
    # pmap splits the leading (local device) axis of numpy arrays itself.
    put_batch=lambda batch: batch,
    # Every replica holds the same averaged values; read the first.
    get_metrics=lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(tree)),
  )


def _jit_parallel(config: ml_collections.ConfigDict, model: nn.Module) -> Parallel:
  mesh = Mesh(np.asarray(jax.devices()), (AXIS_NAME,))
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(AXIS_NAME))
  step = functools.partial(
    train_step,
    model=model,
    label_smoothing=config.label_smoothing,
    l2_regularization=config.l2_regularization,
  )
  evaluate = functools.partial(eval_step, model=model)

  def put_state(state):
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), state
    )

  def put_batch(batch):
    # One global array per field: this process's devices hold its rows.
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharded, x.reshape(-1, *x.shape[2:])),
      batch,
    )

  return Parallel(
    train_step=jax.jit(
      step, in_shardings=(replicated, sharded), out_shardings=replicated, donate_argnums=(0,)
    ),
    eval_step=jax.jit(evaluate, in_shardings=(replicated, sharded), out_shardings=replicated),
    put_state=put_state,
    get_state=jax.device_get,
    put_batch=put_batch,
    get_metrics=jax.device_get,
  )


def create_parallel(config: ml_collections.ConfigDict, model: nn.Module) -> Parallel:
  """The steps for `config.parallelism`; `model` must have the matching BatchNorm axis."""
  if config.parallelism == 'pmap':
    return _pmap_parallel(config, model)
  return _jit_parallel(config, model)


# --------------------------------------------------------------------------------------------
# Epochs


def _mean(values: np.ndarray) -> float | None:
  values = values[np.isfinite(values)]
  return float(np.mean(values)) if values.size else None


def train_epoch(
  parallel: Parallel,
  state: TrainState,
  config: ml_collections.ConfigDict,
  *,
  epoch: int,
  steps_per_epoch: int,
) -> tuple[TrainState, dict[str, Any]]:
  """One pass over the epoch's batches; returns the device state and epoch metrics."""
  batches = input_pipeline.create_input_iter(
    config, 'train', epoch=epoch, global_batch_size=config.batch_size
  )
  show = config.progress_bar and jax.process_index() == 0
  progress = tqdm.tqdm(
    total=steps_per_epoch,
    desc=f'epoch {epoch + 1}/{config.num_epochs}',
    unit='step',
    disable=None if show else True,  # None: off when stderr is not a terminal.
  )
  step_metrics = []
  start = time.perf_counter()
  for i, batch in enumerate(batches):
    state, metrics = parallel.train_step(state, parallel.put_batch(batch))
    step_metrics.append(metrics)
    progress.update()
    if not progress.disable and (i + 1) % 20 == 0:
      # Reading a loss waits for its step; every 20 steps keeps the devices busy.
      progress.set_postfix(loss=f'{float(parallel.get_metrics(metrics["loss"])):.4f}')
  step_metrics = parallel.get_metrics(step_metrics)
  seconds = time.perf_counter() - start
  progress.close()

  stacked = {k: np.asarray([m[k] for m in step_metrics], np.float64) for k in step_metrics[0]}
  summary = {
    'train_loss': _mean(stacked['loss']),
    'train_accuracy': _mean(stacked['accuracy']),
    'kinetic_temperature': _mean(stacked['kinetic_temperature']),
    'acceptance_rate': float(np.mean(stacked['accepted'])) if 'accepted' in stacked else None,
    # The thermostat's target, to compare with the measured kinetic temperature.
    'target_temperature': _mean(stacked['target_temperature'])
    if 'target_temperature' in stacked
    else None,
    'skipped_steps': int(np.sum(stacked['skipped'])),
    'images_per_sec': len(step_metrics) * config.batch_size / seconds,
  }
  return state, summary


def evaluate(parallel: Parallel, state: TrainState, config: ml_collections.ConfigDict) -> dict:
  """Loss and accuracy over the test split (or `config.steps_per_eval` batches)."""
  batches = input_pipeline.create_input_iter(
    config, 'test', epoch=0, global_batch_size=config.batch_size
  )
  sums = [parallel.eval_step(state, parallel.put_batch(batch)) for batch in batches]
  totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get_metrics(sums))
  count = max(totals['count'], 1.0)
  return {'test_loss': totals['loss'] / count, 'test_accuracy': totals['correct'] / count}


def _thermostat_rho(state: TrainState) -> float | None:
  """The rho of the thermostat's last update, if the optimizer has one."""
  thermostat = _find_states(state.opt_state, coolopt.ThermostatState)
  return float(thermostat[0].rho) if thermostat else None


def _optimizer_step(state: TrainState) -> int:
  """The step at which the schedules are read: CoolMomentum's own count if any.

  Skipped (non-finite) steps leave the optimizer's count behind the training step;
  Metropolis rejections do not (the wrapped optimizer counts every proposal).
  """
  cool = _find_states(state.opt_state, coolopt.CoolMomentumState)
  return int(cool[0].count) if cool else int(state.step)


# --------------------------------------------------------------------------------------------
# Workdir: metrics, curves, checkpoints


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl file; [] if it does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_metrics(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  # Written whole to a temporary file and renamed, so a crash never leaves half a file.
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  os.replace(temporary, path)


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str) -> None:
  """The paper's three panels per epoch, one line per run: training loss (log scale),
  test accuracy and kinetic temperature (log scale; a thermostat's target dotted)."""
  panels = (
    ('train_loss', 'training loss', 'log'),
    ('test_accuracy', 'test accuracy', 'linear'),
    ('kinetic_temperature', 'kinetic temperature (mean dx²)', 'log'),
  )
  # Fixed margins: a layout engine would cost more than the drawing, every epoch.
  figure = Figure(figsize=(13, 3.8))
  figure.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.91, wspace=0.22)
  axes = figure.subplots(1, len(panels))
  for ax, (key, label, scale) in zip(axes, panels, strict=True):
    for name, rows in runs.items():
      points = [
        (row['epoch'], row[key])
        for row in rows
        if row.get(key) is not None and (scale == 'linear' or row[key] > 0)
      ]
      if points:
        epochs, values = zip(*points, strict=True)
        line = ax.plot(epochs, values, marker='.' if len(points) < 30 else None, label=name)[0]
      targets = [(row['epoch'], row.get('target_temperature')) for row in rows]
      targets = [(epoch, value) for epoch, value in targets if value]
      if key == 'kinetic_temperature' and points and targets:
        ax.plot(*zip(*targets, strict=True), color=line.get_color(), linestyle=':')
    ax.set_yscale(scale)
    ax.set_xlabel('epoch')
    ax.set_title(label)
    ax.grid(True, alpha=0.3)
  axes[1].legend(loc='lower right')  # 'best' would cost more than the whole drawing.
  figure.savefig(path, dpi=100)


def _checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
    options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint_max_to_keep, create=True),
  )


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, int]:
  """The last checkpoint's state and number of completed epochs; `(state, 0)` if none."""
  latest = manager.latest_step()
  if latest is None:
    return state, 0
  target = {'epoch': np.zeros([], np.int32), 'state': state}
  try:
    restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
  except ValueError as error:
    raise ValueError(
      f'The checkpoint {latest} in {manager.directory} does not fit this config: it was '
      'written with another model or optimizer. Use another workdir, or the config the '
      f'checkpoint was written with. Orbax says: {error}'
    ) from error
  return restored['state'], int(restored['epoch'])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` for `config.num_epochs` epochs, resuming from `workdir` if it holds
  a checkpoint; evaluates and logs after every epoch.

  Args:
    config: the experiment config (see examples/configs/default.py); validated first.
    workdir: where checkpoints, `metrics.jsonl` and `curves.png` go.

  Returns:
    The final train state, on the host.
  """
  validate_config(config)
  config = resolve_config(config)
  info = input_pipeline.dataset_info(config)
  if info.num_classes != config.num_classes:
    raise _invalid('num_classes', config.num_classes, f'{info.num_classes} for {config.dataset}')
  steps_per_epoch = input_pipeline.steps_per_epoch(config, info, config.batch_size)
  axis_name = AXIS_NAME if config.parallelism == 'pmap' else None
  model = create_model(config, axis_name=axis_name)
  tx = create_optimizer(config, steps_per_epoch, axis_name=axis_name)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  rho_fn = create_rho_fn(config, steps_per_epoch)

  is_writer = jax.process_index() == 0
  metrics_path = os.path.join(workdir, METRICS_FILE)
  curves_path = os.path.join(workdir, CURVES_FILE)
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
  manager = _checkpoint_manager(workdir, config)
  host_state = create_train_state(jax.random.PRNGKey(config.seed), model, info.image_shape, tx)
  host_state, start_epoch = restore_checkpoint(manager, host_state)
  # Rows past the checkpoint belong to epochs that will be trained again.
  history = [row for row in read_metrics(metrics_path) if row['epoch'] <= start_epoch]
  if is_writer:
    _write_metrics(metrics_path, history)
  if start_epoch:
    logging.info('Resuming from the checkpoint after epoch %d.', start_epoch)
  elapsed_before = history[-1]['wall_time'] if history else 0.0

  parallel = create_parallel(config, model)
  state = parallel.put_state(host_state)
  start = time.perf_counter()
  for epoch in range(start_epoch, config.num_epochs):
    state, summary = train_epoch(
      parallel, state, config, epoch=epoch, steps_per_epoch=steps_per_epoch
    )
    host_state = parallel.get_state(state)
    # Saved in the background while the test split is evaluated.
    manager.save(
      epoch + 1,
      args=ocp.args.StandardSave({'epoch': np.asarray(epoch + 1, np.int32), 'state': host_state}),
    )
    summary.update(evaluate(parallel, state, config))
    optimizer_step = _optimizer_step(host_state)
    row = {
      'epoch': epoch + 1,
      'step': int(host_state.step),
      **summary,
      'rho': float(rho_fn(optimizer_step)) if rho_fn else _thermostat_rho(host_state),
      'learning_rate': float(learning_rate_fn(optimizer_step)),
      'wall_time': elapsed_before + time.perf_counter() - start,
    }
    row = {key: _finite_or_none(value) for key, value in row.items()}
    # The row is written only once its checkpoint is on disk: after a crash the
    # metrics never run ahead of what a resumed run restores.
    manager.wait_until_finished()
    history.append(row)
    logging.info(
      'epoch %d: ' + ', '.join(f'{k}=%s' for k in row if k != 'epoch'),
      *row.values(),
    )
    if is_writer:
      _write_metrics(metrics_path, history)
      plot_curves({config.optimizer: history}, curves_path)
  manager.close()
  return host_state
