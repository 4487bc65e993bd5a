"""Trains and evaluates an image classifier with coolopt, after Flax's examples/imagenet.

One step body, `train_step`, runs under a sharded `jax.jit` over a 1-D device mesh
(`config.parallelism = 'jit'`, the default: the batch is one global array split over
the devices and no axis name appears inside) and under `jax.pmap` (`'pmap'`: gradients,
losses, metrics and batch statistics are averaged over the axis 'batch').

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

import coolopt
from examples import input_pipeline, language_model, logs, models, text_pipeline
from examples.workdir import (
  CONFIG_FILE,
  CURVES_FILE,
  METRICS_FILE,
  check_config,
  finite_or_none,
  plot_curves,
  read_metrics,
  write_config,
  write_metrics,
)

OPTIMIZERS = (
  'coolmomentum',
  'momentum',
  'sgd',
  'adam',
  'rmsprop',
  'sgd_sa',
  'metropolis_coolmomentum',
)
# Models that read text in BPTT windows (examples/language_model.py) rather than images.
LANGUAGE_MODELS = ('awd_lstm',)
COOLMOMENTUM_OPTIMIZERS = ('coolmomentum', 'metropolis_coolmomentum')
METROPOLIS_OPTIMIZERS = ('sgd_sa', 'metropolis_coolmomentum')
PARALLELISMS = ('jit', 'pmap')
LR_SCHEDULES = ('constant', 'piecewise', 'exponential')
COOLING_SCHEDULES = coolopt.schedules.COOLING_SCHEDULES
# Cooling by feedback instead of a schedule: rho follows the measured temperature.
THERMOSTAT = 'thermostat'
AXIS_NAME = 'batch'
CHECKPOINT_DIR = 'checkpoints'

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
StepMetrics = dict[str, np.ndarray]


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


def is_language_model(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.model` is a language model, trained on text in BPTT windows."""
  return config.model in LANGUAGE_MODELS


def _validate_language_model(config: ml_collections.ConfigDict) -> None:
  _check_choice(config, 'dataset', text_pipeline.TEXT_DATASETS)
  for field in ('embedding_size', 'hidden_size', 'num_layers', 'bptt', 'eval_batch_size'):
    _check_number(config, field, lower=1, integer=True)
  for field in (
    'output_dropout',
    'hidden_dropout',
    'input_dropout',
    'embedding_dropout',
    'weight_dropout',
  ):
    _check_number(config, field, lower=0, upper=1)
  for field in (
    'activation_regularization',
    'temporal_activation_regularization',
    'gradient_clip',
  ):
    _check_number(config, field, lower=0)
  if config.eval_batch_size % jax.device_count():
    raise _invalid(
      'eval_batch_size',
      config.eval_batch_size,
      f'a multiple of the device count {jax.device_count()}',
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
  _check_choice(config, 'model', (*models.MODELS, *LANGUAGE_MODELS))
  if is_language_model(config):
    _validate_language_model(config)
  else:
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
    and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in boundaries)
    and list(boundaries) == sorted(boundaries)
  ):
    raise _invalid('lr_boundaries', boundaries, 'a sorted tuple of whole epochs >= 0')
  if not (
    isinstance(scales, (tuple, list))
    and len(scales) == len(boundaries)
    and all(_is_number(s) and s > 0 for s in scales)
  ):
    raise _invalid(
      'lr_scales', scales, f'a tuple of {len(boundaries)} positive numbers, one per lr_boundaries'
    )
  for field in ('half_precision', 'eval_train'):
    if not isinstance(config[field], bool):
      raise _invalid(field, config[field], 'True or False')
  _check_number(config, 'ema_decay', lower=0, upper=1)
  _check_number(config, 'batch_norm_group_size', lower=0, integer=True)
  group, per_device = config.batch_norm_group_size, config.batch_size // jax.device_count()
  if group and config.batch_size % group:
    raise _invalid(
      'batch_norm_group_size', group, f'0 or a divisor of batch_size {config.batch_size}'
    )
  if group and config.parallelism == 'pmap' and per_device % group and group % per_device:
    raise _invalid(
      'batch_norm_group_size',
      group,
      f'under pmap a divisor or a multiple of the {per_device} examples on each device',
    )
  _check_number(config, 'checkpoint_max_to_keep', lower=1, integer=True)
  _check_number(config, 'checkpoint_every_steps', lower=0, integer=True)
  _check_number(config, 'log_every_steps', lower=0, integer=True)


# --------------------------------------------------------------------------------------------
# Model, optimizer and train state


def create_model(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> nn.Module:
  """`config.model`, computing in bfloat16 when `config.half_precision`, with BatchNorm
  statistics over groups of `config.batch_norm_group_size` examples (0: the whole batch)."""
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  if is_language_model(config):
    corpus = text_pipeline.load_corpus(config.dataset, config.get('data_dir'))
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
    batch_norm_group_size=config.get('batch_norm_group_size') or None,
  )


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  return round(epochs * steps_per_epoch)


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """The learning rate as a function of the optimizer's step, after `config.lr_schedule`.

  'piecewise' counts as Keras' `lr_schedule(epoch)` of cifar10_resnet.py does: the rate
  is multiplied by `lr_scales[i]` in the epochs whose 0-based index exceeds
  `lr_boundaries[i]`, i.e. from step `(lr_boundaries[i] + 1) * steps_per_epoch` on.
  'exponential' is the EfficientNet TPU reference's rate: x `lr_decay_rate` every
  `lr_decay_epochs` counted from step 0, and during the first `lr_warmup_epochs` a linear
  ramp from 0 to the base rate in its place (the decay does not restart after it).
  """
  base = config.learning_rate
  if config.lr_schedule == 'piecewise':
    boundaries_and_scales = {}
    for epoch, scale in zip(config.lr_boundaries, config.lr_scales, strict=True):
      step = (epoch + 1) * steps_per_epoch
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

    def warmup_then_decay(step):
      step = jnp.asarray(step)
      warmup = base * step.astype(jnp.float32) / warmup_steps
      return jnp.where(step < warmup_steps, warmup, decay(step))

    return warmup_then_decay
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
  if name == 'sgd':
    return optax.sgd(learning_rate)
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
  """`config.optimizer`, followed by `coolopt.track_kinetic_temperature()`.

  Weight decay is not part of it: `config.weight_decay` and `config.l2_regularization`
  are penalties in the loss (see `regularization`), so that the gradients and a
  Metropolis test see one objective.

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
  if config.get('gradient_clip', 0.0) > 0:
    # The language model's recipe: the gradient's global norm clipped first.
    optimizer = optax.chain(optax.clip_by_global_norm(config.gradient_clip), optimizer)
  return optax.chain(optimizer, coolopt.track_kinetic_temperature())


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


def _find_states(tree: Any, state_type: type) -> list[Any]:
  """The nodes of type `state_type` in a nested optimizer state (as coolopt finds them)."""
  found = optax.tree_utils.tree_get_all_with_path(tree, state_type.__name__)
  return [node for _, node in found if isinstance(node, state_type)]


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
  params: Any, *, l2_regularization: float = 0.0, weight_decay: float = 0.0
) -> jax.Array:
  """The penalty added to the loss.

  `l2_regularization * sum(w**2)` over the convolution kernels (Keras' `l2` kernel
  regularizer of the ResNet reference) plus `weight_decay * sum(w**2) / 2` over every
  parameter but BatchNorm's (the EfficientNet reference's `weight_decay *
  tf.nn.l2_loss`), whose gradient is the coupled decay `weight_decay * w`.
  """
  penalty = jnp.zeros([], jnp.float32)
  if l2_regularization:
    penalty += l2_regularization * conv_kernel_l2(params)
  if weight_decay:
    decayed = jax.tree.map(lambda bn: not bn, models.batch_norm_mask(params))
    penalty += weight_decay / 2 * _masked_square_sum(params, decayed)
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
  ema_decay: float = 0.0,
  activation_regularization: float = 0.0,
  temporal_activation_regularization: float = 0.0,
  axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a (per-device under `pmap`, global under `jit`) batch.

  The loss is the objective the optimizer descends: the mean cross-entropy plus
  `regularization(params)`. A Metropolis optimizer judges that same objective at the
  current and the candidate parameters. A step whose averaged loss, gradients or
  updates are not finite changes neither the parameters, nor the optimizer state, nor
  the batch statistics; it is counted in the 'skipped' metric. With `state.ema`, the
  moving averages are updated with `ema_decay` (see `update_ema`).

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
      penalty=functools.partial(regularization, weight_decay=weight_decay),
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
    loss += regularization(params, l2_regularization=l2_regularization, weight_decay=weight_decay)
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
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

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
  thermostat_states = _find_states(new_state.opt_state, coolopt.ThermostatState)
  if thermostat_states:
    metrics['target_temperature'] = thermostat_states[0].target_temperature
  metropolis_states = _find_states(opt_state, coolopt.MetropolisState)
  if metropolis_states:
    metrics['accepted'] = (metropolis_states[0].accepted & finite).astype(jnp.float32)
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
    weight_decay=config.weight_decay,
    ema_decay=config.ema_decay,
    activation_regularization=config.get('activation_regularization', 0.0),
    temporal_activation_regularization=config.get('temporal_activation_regularization', 0.0),
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
    weight_decay=config.weight_decay,
    ema_decay=config.ema_decay,
    activation_regularization=config.get('activation_regularization', 0.0),
    temporal_activation_regularization=config.get('temporal_activation_regularization', 0.0),
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


def empty_step_metrics(config: ml_collections.ConfigDict, steps_per_epoch: int) -> StepMetrics:
  """The per-step metrics of an epoch before its first step: NaN, one entry per step."""
  keys = ('loss', 'kinetic_temperature', 'skipped')
  if not is_language_model(config):
    keys += ('accuracy',)
  if config.optimizer in METROPOLIS_OPTIMIZERS:
    keys += ('accepted',)
  if config.optimizer in COOLMOMENTUM_OPTIMIZERS and config.cooling == THERMOSTAT:
    keys += ('target_temperature',)
  return {key: np.full(steps_per_epoch, np.nan, np.float32) for key in keys}


def train_epoch(
  parallel: Parallel,
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
  batches = _pipeline(config).create_input_iter(
    config, 'train', epoch=epoch, global_batch_size=config.batch_size, start_step=start_step
  )
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
  if is_language_model(config):
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
  parallel: Parallel, state: TrainState, config: ml_collections.ConfigDict, split: str = 'test'
) -> dict[str, float]:
  """Mean loss and accuracy in inference mode, with `state.eval_variables()`.

  Over the test split (or its first `config.steps_per_eval` batches), or over the
  whole training split, without augmentation, for `split='train'`. A language model
  returns the loss per token and the perplexity over `split` ('valid' or 'test') in
  `config.eval_batch_size` streams, the LSTM state carried from window to window.
  """
  if is_language_model(config):
    return _evaluate_language_model(parallel, state, config, split)
  batches = input_pipeline.create_input_iter(
    config, split, epoch=0, global_batch_size=config.batch_size, evaluation=True
  )
  sums = [parallel.eval_step(state, parallel.put_batch(batch)) for batch in batches]
  totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get_metrics(sums))
  count = max(totals['count'], 1.0)
  return {'loss': totals['loss'] / count, 'accuracy': totals['correct'] / count}


def _evaluate_language_model(
  parallel: Parallel, state: TrainState, config: ml_collections.ConfigDict, split: str
) -> dict[str, float]:
  # Zero states for the evaluation streams, placed on the devices as the train state.
  carry = parallel.put_state(
    jax.tree.map(lambda x: np.zeros((config.eval_batch_size, x.shape[-1]), x.dtype), state.carry)
  )
  sums = []
  for batch in text_pipeline.create_input_iter(config, split):
    window = parallel.eval_step(state.replace(carry=carry), parallel.put_batch(batch))
    carry = window.pop('carry')
    sums.append(window)
  totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get_metrics(sums))
  loss = totals['loss'] / max(totals['count'], 1.0)
  return {'loss': loss, 'perplexity': math.exp(loss)}


def _pipeline(config: ml_collections.ConfigDict) -> Any:
  """The module that reads `config.dataset`: text_pipeline or input_pipeline."""
  return text_pipeline if is_language_model(config) else input_pipeline


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


def _checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
    options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint_max_to_keep, create=True),
  )


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run stands: what a checkpoint holds beside the train state.

  Attributes:
    epoch: epochs completed.
    step_in_epoch: steps of the next epoch taken.
    step_metrics: their per-step metrics (see `empty_step_metrics`); at an epoch's end
      (`step_in_epoch` 0), those of the epoch completed.
    wall_time: seconds of training so far, across resumptions.
  """

  epoch: int
  step_in_epoch: int
  step_metrics: StepMetrics
  wall_time: float


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, position: Position) -> None:
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
  manager: ocp.CheckpointManager, state: TrainState, step_metrics: StepMetrics
) -> tuple[TrainState, Position]:
  """The last checkpoint's state and position; `state` at the start if there is none.

  Args:
    manager: the run's checkpoints.
    state: a fresh train state: the target's structure, and the state if there is none.
    step_metrics: empty per-step metrics of an epoch (see `empty_step_metrics`).
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
  """
  validate_config(config)
  config = resolve_config(config)
  language = is_language_model(config)
  if language:
    image_shape = ()
    steps_per_epoch = text_pipeline.steps_per_epoch(config)
  else:
    info = input_pipeline.dataset_info(config)
    if info.num_classes != config.num_classes:
      raise _invalid('num_classes', config.num_classes, f'{info.num_classes} for {config.dataset}')
    image_shape = info.image_shape
    steps_per_epoch = input_pipeline.steps_per_epoch(config, info, config.batch_size)
  # The stored config says how long an epoch was, so that a changed data set shows too.
  config.steps_per_epoch = steps_per_epoch
  # Before anything is compiled: a resume must not change the trajectory.
  check_config(workdir, config)
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
  # TensorBoard event files beside metrics.jsonl (see examples/logs.py).
  writer = logs.create_writer(workdir) if is_writer else None
  manager = _checkpoint_manager(workdir, config)
  host_state = create_train_state(
    jax.random.PRNGKey(config.seed),
    model,
    image_shape,
    tx,
    ema=config.ema_decay > 0,
    streams=config.batch_size if language else 0,
  )
  host_state, position = restore_checkpoint(
    manager, host_state, empty_step_metrics(config, steps_per_epoch)
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

  def save(host_state: TrainState, saved: Position) -> None:
    if is_writer and not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
      write_config(workdir, config)
    save_checkpoint(manager, host_state, saved)

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
    optimizer_step = _optimizer_step(host_state)
    row = {
      'epoch': epoch + 1,
      'step': int(host_state.step),
      **summary,
      'rho': float(rho_fn(optimizer_step)) if rho_fn else _thermostat_rho(host_state),
      'learning_rate': float(learning_rate_fn(optimizer_step)),
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
      save(parallel.get_state(device_state), Position(epoch, steps, step_metrics, wall_time()))

    def log_steps(device_state, steps, step_metrics, epoch=epoch):
      # The schedules are read at the optimizer's step, as for the epoch's row.
      cool = _find_states(device_state.opt_state, coolopt.CoolMomentumState)
      thermostat = _find_states(device_state.opt_state, coolopt.ThermostatState)
      read = parallel.get_metrics(
        {
          'step': cool[0].count if cool else device_state.step,
          'rho': thermostat[0].rho if thermostat else None,
        }
      )
      rho = float(rho_fn(int(read['step']))) if rho_fn else read['rho']
      values = logs.step_values(
        step_metrics,
        steps,
        every=config.log_every_steps,
        rho=None if rho is None else float(rho),
        learning_rate=float(learning_rate_fn(int(read['step']))),
      )
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
    save(host_state, Position(epoch + 1, 0, step_metrics, wall_time()))
    finish_epoch(epoch, host_state, summary)
  manager.close()
  if is_writer:
    writer.close()
  return host_state
