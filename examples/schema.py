"""The trainer's config schema, checked: what `examples/configs/default.py` declares.

Every field a run reads is declared, with its default and meaning, in
`examples/configs/default.py`; the recipe configs set some of them. This module checks
a config before anything is built (`validate_config`), so that a bad field fails with
its name, its value and what is allowed, and applies the per-optimizer overrides
(`resolve_config`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import ml_collections

from examples import data_parallel, optimizers, tasks
from examples.checks import check_choice, check_number, invalid_field, is_number

# The run's random streams (jax.random.PRNGKey, the data order) take the seed modulo 2**32.
MAX_SEED = 2**32 - 1


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with references resolved and `config.optimizers[optimizer]` applied."""
  config = config.copy_and_resolve_references()
  overrides = config.optimizers.get(config.optimizer)
  if overrides is not None:
    for field, value in overrides.items():
      config[field] = value
  return config


def prefer_given(
  config: ml_collections.ConfigDict, given: Iterable[str], trained: Sequence[str]
) -> None:
  """Makes the top-level fields set on the command line win over the recipes.

  `config.optimizers.<name>` overrides the top-level fields when `<name>` is trained
  (see `resolve_config`), so that `--config.optimizer=adam` trains at Adam's rate. A
  top-level field given on the command line (`--config.learning_rate=0.05`) is meant
  for the optimizer trained, so it is written into that optimizer's recipe too.

  Args:
    config: the config of the command line, changed in place.
    given: the fields given on the command line (`config_flags.get_override_values`).
    trained: the optimizers the command trains.

  Raises:
    ValueError: if several optimizers are trained and the recipe of one of them sets
      a given field: the value would be used by some and not by others.
  """
  for field in given:
    if '.' in field or field in ('optimizer', 'optimizers') or field not in config:
      continue
    recipes = [name for name in trained if field in config.optimizers.get(name, {})]
    if not recipes:
      continue
    if len(trained) > 1:
      own = ', '.join(f'config.optimizers.{name}.{field}' for name in recipes)
      raise ValueError(
        f'--config.{field}={config[field]!r} would not reach {", ".join(recipes)}: their '
        f'recipes set their own ({own}). Give it per optimizer, e.g. '
        f'--config.optimizers.{recipes[0]}.{field}={config[field]!r}.'
      )
    config.optimizers[recipes[0]][field] = config[field]


def _check_steps(config: ml_collections.ConfigDict, field: str) -> None:
  value = config[field]
  if not (isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value > 0)):
    raise invalid_field(field, value, '-1 (derived from the dataset) or a positive integer')


def _check_overrides(config: ml_collections.ConfigDict) -> None:
  for name, overrides in config.optimizers.items():
    if name not in optimizers.OPTIMIZERS:
      names = ', '.join(map(repr, optimizers.OPTIMIZERS))
      raise ValueError(
        f'config.optimizers may only hold entries for {names}, got config.optimizers.{name}.'
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
  check_choice(config, 'optimizer', optimizers.OPTIMIZERS)
  _check_overrides(config)
  config = resolve_config(config)
  check_choice(config, 'model', tasks.TASKS)
  # The fields only one task reads (its data set, its model's sizes) are its own to check.
  tasks.TASKS[config.model].check_config(config)
  tasks.TASKS[config.model].check_unread_fields(config)
  check_choice(config, 'parallelism', data_parallel.PARALLELISMS)
  check_choice(config, 'cooling', optimizers.COOLINGS)
  if config.cooling == optimizers.THERMOSTAT and config.warmup_epochs:
    raise invalid_field('warmup_epochs', config.warmup_epochs, "0 with config.cooling='thermostat'")
  if config.optimizer == 'sgd_sa' and config.learning_rate != 1.0:
    raise ValueError(
      f"config.learning_rate must be 1 with config.optimizer='sgd_sa', got "
      f'config.learning_rate={config.learning_rate!r}: SGD-SA draws its learning rate at every '
      'step from config.metropolis_multipliers (now '
      f'{tuple(config.metropolis_multipliers)}). Scale those instead, e.g. '
      '--config.optimizers.sgd_sa.metropolis_multipliers="(0.09, 0.08, 0.07)".'
    )
  check_choice(config, 'lr_schedule', optimizers.LR_SCHEDULES)
  for field in (
    'num_epochs',
    'batch_size',
    'num_classes',
    'image_size',
    'num_channels',
    'synthetic_train_size',
    'synthetic_test_size',
  ):
    check_number(config, field, lower=1, integer=True)
  if config.cache is not None and not isinstance(config.cache, bool):
    raise invalid_field('cache', config.cache, "None (the data set's default), True or False")
  if config.batch_size % jax.device_count():
    raise invalid_field(
      'batch_size', config.batch_size, f'a multiple of the device count {jax.device_count()}'
    )
  _check_steps(config, 'steps_per_epoch')
  _check_steps(config, 'steps_per_eval')
  seed = config.seed
  if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
    raise invalid_field(
      'seed',
      seed,
      f'an integer in [0, {MAX_SEED}]: the random streams of a run take the seed modulo 2**32',
    )
  check_number(config, 'learning_rate', lower=0, lower_inclusive=False)
  check_number(config, 'rho_0', lower=0, upper=1)
  check_number(config, 'momentum', lower=0, upper=1)
  check_number(config, 'rmsprop_decay', lower=0, upper=1)
  check_number(config, 'rmsprop_eps', lower=0, lower_inclusive=False)
  check_number(config, 'adam_b1', lower=0, upper=1, upper_inclusive=False)
  check_number(config, 'adam_b2', lower=0, upper=1, upper_inclusive=False)
  check_number(config, 'adam_eps', lower=0, lower_inclusive=False)
  check_number(config, 'label_smoothing', lower=0, upper=1)
  for field in (
    'warmup_epochs',
    'lr_warmup_epochs',
    'weight_decay',
    'l2_regularization',
    'gradient_clip',
  ):
    check_number(config, field, lower=0)
  if (
    config.optimizer in optimizers.COOLMOMENTUM_OPTIMIZERS
    and config.warmup_epochs
    and config.warmup_epochs >= config.num_epochs
  ):
    raise invalid_field(
      'warmup_epochs',
      config.warmup_epochs,
      f'less than config.num_epochs={config.num_epochs}: rho is 0 during the momentum '
      'warm-up, so a warm-up as long as the run trains without momentum throughout',
    )
  check_number(config, 'lr_decay_epochs', lower=0, lower_inclusive=False)
  check_number(
    config, 'lr_decay_rate', lower=0, upper=1, lower_inclusive=False, upper_inclusive=True
  )
  check_number(config, 'metropolis_temperature', lower=0, lower_inclusive=False)
  check_number(
    config, 'metropolis_cooling', lower=0, upper=1, lower_inclusive=False, upper_inclusive=True
  )
  multipliers = config.metropolis_multipliers
  if not (
    isinstance(multipliers, (tuple, list))
    and multipliers
    and all(is_number(m) and m > 0 for m in multipliers)
  ):
    raise invalid_field(
      'metropolis_multipliers', multipliers, 'a non-empty tuple of positive numbers'
    )
  boundaries, scales = config.lr_boundaries, config.lr_scales
  if not (
    isinstance(boundaries, (tuple, list))
    and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in boundaries)
    and list(boundaries) == sorted(boundaries)
  ):
    raise invalid_field('lr_boundaries', boundaries, 'a sorted tuple of whole epochs >= 0')
  if not (
    isinstance(scales, (tuple, list))
    and len(scales) == len(boundaries)
    and all(is_number(s) and s > 0 for s in scales)
  ):
    raise invalid_field(
      'lr_scales', scales, f'a tuple of {len(boundaries)} positive numbers, one per lr_boundaries'
    )
  for field in ('half_precision', 'eval_train', 'progress_bar'):
    if not isinstance(config[field], bool):
      raise invalid_field(field, config[field], 'True or False')
  check_number(config, 'ema_decay', lower=0, upper=1)
  check_number(config, 'batch_norm_group_size', lower=0, integer=True)
  group, per_device = config.batch_norm_group_size, config.batch_size // jax.device_count()
  if group and config.batch_size % group:
    raise invalid_field(
      'batch_norm_group_size', group, f'0 or a divisor of batch_size {config.batch_size}'
    )
  if group and config.parallelism == 'pmap' and per_device % group and group % per_device:
    raise invalid_field(
      'batch_norm_group_size',
      group,
      f'under pmap a divisor or a multiple of the {per_device} examples on each device',
    )
  check_number(config, 'checkpoint_max_to_keep', lower=1, integer=True)
  check_number(config, 'checkpoint_every_steps', lower=0, integer=True)
  check_number(config, 'log_every_steps', lower=0, integer=True)
  if not (
    isinstance(config.divergence_steps, int)
    and not isinstance(config.divergence_steps, bool)
    and config.divergence_steps >= -1
  ):
    raise invalid_field(
      'divergence_steps', config.divergence_steps, '-1 (one epoch), 0 (never) or a positive integer'
    )
  check_number(config, 'divergence_loss_ratio', lower=0)
  if 0 < config.divergence_loss_ratio <= 1:
    raise invalid_field(
      'divergence_loss_ratio',
      config.divergence_loss_ratio,
      "0 (never) or a number above 1: a run's loss may stay near its first step's",
    )
