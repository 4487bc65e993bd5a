"""The random search's spaces: what each optimizer's hyperparameters may be, and the sampler.

Each entry of `SEARCH_SPACES` is one optimizer as the sweep tunes it: the optimizer's
recipe (`config.optimizers.<optimizer>`, as examples.compare trains it), the recipe fields
the entry fixes (`fixed`), and the fields it samples (`dimensions`), each on a log scale:

- coolmomentum: lr = 10^U(-4, 0), rho_0 = 1 - 10^U(-3, -1);
- coolmomentum_thermostat (coolmomentum, cooling='thermostat'): the same space;
- momentum, with a step schedule (the rate times the decay factor after every epoch):
  lr = 10^U(-4, 0), momentum = 1 - 10^U(-3, -0.5), decay factor = 1 - 10^U(-2.5, -0.3);
- adam: lr = 10^U(-5, -1), beta_1 = 1 - 10^U(-2.5, -0.3), beta_2 = 1 - 10^U(-4, -1),
  epsilon = 10^U(-10, -3);
- adam_lr (adam, only the rate tuned): lr = 10^U(-5, -1), beta_1 0.9, beta_2 0.999,
  epsilon 1e-8 (optax's);
- sgd_sa: the multipliers' scale = 10^U(-1.5, 0.5), T_0 = 10^U(-4, 1).

CoolMomentum's third knob, the cooling length, is the run's length (`num_epochs`), as in
the paper. The trials of an entry are drawn from a generator seeded by the sampler's seed
and the entry's name, one trial after another: the first 8 trials of a 32-trial search
are those of an 8-trial search with the same seed.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LOG = 'log'  # value = 10^u.
ONE_MINUS_LOG = 'one_minus_log'  # value = 1 - 10^u.
SCALES = (LOG, ONE_MINUS_LOG)


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One sampled config field: `10^u` or `1 - 10^u`, u uniform in [low, high].

  Attributes:
    field: the config field it sets ('learning_rate' is the multipliers' scale for
      'sgd_sa', as in the sweep's grid).
    low, high: the exponent's range.
    scale: `LOG` or `ONE_MINUS_LOG`.
    label: how the docs and tables name it.
  """

  field: str
  low: float
  high: float
  scale: str = LOG
  label: str = ''

  def __post_init__(self):
    if self.scale not in SCALES:
      raise ValueError(f'scale must be one of {SCALES}, got scale={self.scale!r}.')
    if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
      raise ValueError(
        f'The exponents of {self.field} must be finite with low < high, got '
        f'low={self.low}, high={self.high}.'
      )

  def value(self, u: float) -> float:
    """The field's value at exponent `u`."""
    power = 10.0**u
    return power if self.scale == LOG else 1.0 - power

  def position(self, value: float) -> float:
    """Where `value` lies in the range: 0 at `low`'s end, 1 at `high`'s."""
    u = math.log10(value if self.scale == LOG else 1.0 - value)
    return (u - self.low) / (self.high - self.low)

  def describe(self) -> str:
    power = f'10^U({self.low:g}, {self.high:g})'
    return f'{self.label or self.field} = {power if self.scale == LOG else "1 - " + power}'


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """An optimizer as the random search tunes it.

  Attributes:
    optimizer: the `config.optimizer` trained.
    dimensions: the sampled fields.
    fixed: recipe fields the entry sets (applied over `config.optimizers.<optimizer>`).
  """

  optimizer: str
  dimensions: tuple[Dimension, ...]
  fixed: tuple[tuple[str, Any], ...] = ()

  def describe(self) -> str:
    fixed = ', '.join(f'{k}={v!r}' for k, v in self.fixed)
    dims = ', '.join(d.describe() for d in self.dimensions)
    return f'{self.optimizer}{f" ({fixed})" if fixed else ""}: {dims}'

  def record(self) -> dict[str, Any]:
    """The space as a config.json records it, for refusing a resumed search in another."""
    return {
      'optimizer': self.optimizer,
      'fixed': dict(self.fixed),
      'dimensions': [dataclasses.asdict(d) for d in self.dimensions],
    }


def _coolmomentum_dimensions() -> tuple[Dimension, ...]:
  return (
    Dimension('learning_rate', -4.0, 0.0, label='lr'),
    Dimension('rho_0', -3.0, -1.0, ONE_MINUS_LOG),
  )


_ADAM_RATE = Dimension('learning_rate', -5.0, -1.0, label='lr')

SEARCH_SPACES: dict[str, SearchSpace] = {
  'coolmomentum': SearchSpace('coolmomentum', _coolmomentum_dimensions()),
  'coolmomentum_thermostat': SearchSpace(
    'coolmomentum', _coolmomentum_dimensions(), (('cooling', 'thermostat'),)
  ),
  'momentum': SearchSpace(
    'momentum',
    (
      Dimension('learning_rate', -4.0, 0.0, label='lr'),
      Dimension('momentum', -3.0, -0.5, ONE_MINUS_LOG),
      Dimension('lr_decay_rate', -2.5, -0.3, ONE_MINUS_LOG, label='decay factor'),
    ),
    # A step schedule: the rate times the decay factor after every epoch.
    (('lr_schedule', 'exponential'), ('lr_decay_epochs', 1.0), ('lr_warmup_epochs', 0.0)),
  ),
  'adam': SearchSpace(
    'adam',
    (
      _ADAM_RATE,
      Dimension('adam_b1', -2.5, -0.3, ONE_MINUS_LOG, label='beta_1'),
      Dimension('adam_b2', -4.0, -1.0, ONE_MINUS_LOG, label='beta_2'),
      Dimension('adam_eps', -10.0, -3.0, label='epsilon'),
    ),
  ),
  'adam_lr': SearchSpace('adam', (_ADAM_RATE,)),
  'sgd_sa': SearchSpace(
    'sgd_sa',
    (
      Dimension('learning_rate', -1.5, 0.5, label='multiplier scale'),
      Dimension('metropolis_temperature', -4.0, 1.0, label='T_0'),
    ),
  ),
}


def get_space(name: str) -> SearchSpace:
  """The `SearchSpace` of entry `name`, one of `SEARCH_SPACES`."""
  if name not in SEARCH_SPACES:
    raise ValueError(
      f'No search space for {name!r}: the random search tunes {", ".join(SEARCH_SPACES)} '
      '(examples/search.py).'
    )
  return SEARCH_SPACES[name]


def sample(name: str, num_trials: int, seed: int = 0) -> list[dict[str, float]]:
  """`num_trials` settings of entry `name`, `{field: value}` each, from a generator
  seeded by `seed` and the name (trial i is the same for every `num_trials` > i).

  Raises:
    ValueError: for an unknown entry or a non-positive `num_trials`.
  """
  space = get_space(name)
  if num_trials < 1:
    raise ValueError(f'trials must be a positive number of trials, got trials={num_trials}.')
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  exponents = rng.uniform(size=(num_trials, len(space.dimensions)))
  return [
    {
      d.field: d.value(d.low + u * (d.high - d.low))
      for d, u in zip(space.dimensions, row, strict=True)
    }
    for row in exponents
  ]


def positions(name: str, values: Mapping[str, float]) -> dict[str, float]:
  """Where each sampled field of `values` lies in entry `name`'s ranges (0 to 1)."""
  return {d.field: d.position(values[d.field]) for d in get_space(name).dimensions}


def table(names: Sequence[str] = tuple(SEARCH_SPACES)) -> str:
  """The spaces of `names` as a markdown table."""
  lines = ['| entry | space |', '|---|---|']
  lines += [f'| {name} | {get_space(name).describe()} |' for name in names]
  return '\n'.join(lines) + '\n'


@dataclasses.dataclass(frozen=True)
class RandomSearch:
  """What a random search tries, for every entry of the sweep.

  Attributes:
    trials: the settings drawn per entry (N).
    seeds: the training seeds of every setting (its score is the mean over them).
    sampler_seed: the seed of the draws, the same for every entry and every rerun.
  """

  trials: int
  seeds: tuple[int, ...] = (0, 1, 2)
  sampler_seed: int = 0

  def __post_init__(self):
    if not (isinstance(self.trials, int) and self.trials >= 1):
      raise ValueError(f'trials must be a positive number of trials, got trials={self.trials!r}.')
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f'seeds must be a non-empty list of distinct seeds, got {self.seeds!r}.')

  def record(self, name: str) -> dict[str, Any]:
    """What a resumed search of entry `name` must agree with: its space, trials and seed."""
    return {
      'entry': name,
      'trials': self.trials,
      'sampler_seed': self.sampler_seed,
      **get_space(name).record(),
    }
