"""The optimizer recipes of the trainer: `config.optimizer` as an optax transformation.

`create_optimizer` is the one place that reads the optimizer fields of a config. It
returns the transformation together with the schedules it was built with, so that what
the trainer logs (the learning rate and CoolMomentum's rho at each step) is read from
the functions the optimizer runs on. The recipe's L2 regularization and weight decay
are penalties in the loss, `regularization`, which the train step adds.

To add an optimizer: a name in `OPTIMIZERS` and a branch in `_base_optimizer`; its
per-optimizer recipe (learning rate, schedule) goes in `config.optimizers.<name>` of
the configs that train it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

import coolopt
from examples import models

OPTIMIZERS = (
  'coolmomentum',
  'momentum',
  'sgd',
  'adam',
  'rmsprop',
  'sgd_sa',
  'metropolis_coolmomentum',
)
COOLMOMENTUM_OPTIMIZERS = ('coolmomentum', 'metropolis_coolmomentum')
METROPOLIS_OPTIMIZERS = ('sgd_sa', 'metropolis_coolmomentum')
LR_SCHEDULES = ('constant', 'piecewise', 'exponential')
# Cooling by feedback instead of a clock schedule: rho follows the measured temperature.
THERMOSTAT = 'thermostat'
COOLINGS = (*coolopt.schedules.COOLING_SCHEDULES, THERMOSTAT)


class Schedules(NamedTuple):
  """The functions of the optimizer's step that the optimizer runs on.

  Attributes:
    learning_rate: the learning rate (for 'sgd_sa', the base rate its multipliers scale).
    rho: CoolMomentum's momentum coefficient; None for the other optimizers and for
      the thermostat, whose rho is in its state (`coolopt.thermostat_state`).
  """

  learning_rate: optax.Schedule
  rho: optax.Schedule | None


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """A length in (possibly fractional) epochs as a whole number of steps."""
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
    warmup_steps = epochs_to_steps(config.lr_warmup_epochs, steps_per_epoch)
    # Traceable in the decay rate, which the sweep's random search sets per run.
    decay = coolopt.staircase_decay(
      base, max(1, epochs_to_steps(config.lr_decay_epochs, steps_per_epoch)), config.lr_decay_rate
    )
    if warmup_steps == 0:
      return decay

    def warmup_then_decay(step):
      step = jnp.asarray(step)
      warmup = base * step.astype(jnp.float32) / warmup_steps
      return jnp.where(step < warmup_steps, warmup, decay(step))

    return warmup_then_decay
  return optax.constant_schedule(base)


def _coolmomentum(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  learning_rate: optax.Schedule,
  constant_rho: bool,
  axis_name: str | None,
) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
  """CoolMomentum and its rho schedule (None for the thermostat)."""
  if constant_rho:
    # The range test: rho held at rho_0, no cooling, no warm-up, so no thermostat.
    return coolopt.coolmomentum(learning_rate, config.rho_0, None), optax.constant_schedule(
      config.rho_0
    )
  total_steps = config.num_epochs * steps_per_epoch
  if config.cooling == THERMOSTAT:
    # The thermostat averages its measured temperature over the replicas.
    tx = coolopt.coolmomentum(
      learning_rate, config.rho_0, total_steps, cooling=THERMOSTAT, axis_name=axis_name
    )
    return tx, None
  # The clock schedule that coolopt.coolmomentum builds from these same arguments.
  warmup_steps = epochs_to_steps(config.warmup_epochs, steps_per_epoch)
  tx = coolopt.coolmomentum(
    learning_rate, config.rho_0, total_steps, cooling=config.cooling, warmup_steps=warmup_steps
  )
  rho = coolopt.schedules.COOLING_SCHEDULES[config.cooling](config.rho_0, total_steps, warmup_steps)
  return tx, rho


def _base_optimizer(
  config: ml_collections.ConfigDict, learning_rate: optax.Schedule
) -> optax.GradientTransformation:
  """The optimizers whose only schedule is the learning rate."""
  name = config.optimizer
  if name == 'momentum':
    return optax.sgd(learning_rate, momentum=config.momentum)
  if name == 'sgd':
    return optax.sgd(learning_rate)
  if name == 'adam':
    return optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
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
  raise ValueError(
    f'config.optimizer must be one of {", ".join(map(repr, OPTIMIZERS))}, got {name!r}.'
  )


def decays_after_clipping(config: ml_collections.ConfigDict) -> bool:
  """Whether the optimizer adds `config.weight_decay` to the clipped gradient itself.

  With `config.gradient_clip`, as the AWD-LSTM reference clips the gradient and then its
  PyTorch `SGD(weight_decay=...)` adds the decay; the loss keeps the decay's value (a
  Metropolis test judges it) but not its gradient (see `regularization`).
  Otherwise the decay's gradient comes with the loss's.
  """
  return config.gradient_clip > 0 and config.weight_decay > 0


def _masked_square_sum(params: Any, mask: Any) -> jax.Array:
  return sum(
    (
      jnp.sum(jnp.square(w))
      for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
      if m
    ),
    start=jnp.zeros([], jnp.float32),
  )


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
  parameter but the normalisation layers' (the EfficientNet reference's `weight_decay *
  tf.nn.l2_loss`), whose gradient is the coupled decay `weight_decay * w`. Without
  `decay_gradient` the decay term counts in the value only, for an optimizer that adds
  the decay itself (see `examples.optimizers.decays_after_clipping`).
  """
  penalty = jnp.zeros([], jnp.float32)
  if l2_regularization:
    penalty += l2_regularization * _masked_square_sum(params, models.conv_kernel_mask(params))
  if weight_decay:
    decay = weight_decay / 2 * _masked_square_sum(params, models.weight_decay_mask(params))
    penalty += decay if decay_gradient else jax.lax.stop_gradient(decay)
  return penalty


def create_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  *,
  axis_name: str | None = None,
  learning_rate: optax.Schedule | None = None,
  constant_rho: bool = False,
) -> tuple[optax.GradientTransformationExtraArgs, Schedules]:
  """`config.optimizer`, followed by `coolopt.track_kinetic_temperature()`.

  Weight decay is not part of it: `config.weight_decay` and `config.l2_regularization`
  are penalties in the loss (see `regularization`), so that the
  gradients and a Metropolis test see one objective. With `config.gradient_clip`, the
  gradient's global norm is clipped first and the weight decay added after (the
  language model's recipe; see `decays_after_clipping`).

  The Metropolis optimizers test every step at a temperature `metropolis_temperature`
  multiplied by `metropolis_cooling` after every epoch, averaging the losses over
  `axis_name` under `pmap` so that every replica decides alike: 'sgd_sa' is
  `coolopt.sgd_sa` with the learning rates `metropolis_multipliers`, and
  'metropolis_coolmomentum' wraps CoolMomentum in `coolopt.metropolis`.

  Args:
    config: a resolved config (see `examples.schema.resolve_config`).
    steps_per_epoch: optimizer steps in an epoch; sets the schedules' lengths.
    axis_name: the `pmap` axis, or None under `jit` with global arrays.
    learning_rate: replaces the schedule of `create_learning_rate_fn` (not for 'sgd_sa',
      whose rates are its multipliers); the learning-rate range test sweeps it.
    constant_rho: hold CoolMomentum's rho at rho_0, without cooling or momentum warm-up.

  Returns:
    The transformation and the `Schedules` it runs on.
  """
  if learning_rate is None:
    learning_rate = create_learning_rate_fn(config, steps_per_epoch)
  rho = None
  if config.optimizer == 'sgd_sa':
    optimizer = coolopt.sgd_sa(
      tuple(config.metropolis_multipliers),
      config.metropolis_temperature,
      config.metropolis_cooling,
      steps_per_epoch,
      key=config.seed,
      axis_name=axis_name,
    )
  elif config.optimizer in COOLMOMENTUM_OPTIMIZERS:
    optimizer, rho = _coolmomentum(config, steps_per_epoch, learning_rate, constant_rho, axis_name)
  else:
    optimizer = _base_optimizer(config, learning_rate)
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
  if config.gradient_clip > 0:
    clip = optax.clip_by_global_norm(config.gradient_clip)
    if decays_after_clipping(config):
      decay = optax.add_decayed_weights(config.weight_decay, models.weight_decay_mask)
      optimizer = optax.chain(clip, decay, optimizer)
    else:
      optimizer = optax.chain(clip, optimizer)
  tx = optax.chain(optimizer, coolopt.track_kinetic_temperature())
  return tx, Schedules(learning_rate=learning_rate, rho=rho)
