"""coolopt: training neural networks by simulated annealing, as Optax transformations.

- :func:`coolmomentum`: momentum SGD read as Langevin dynamics, cooled by lowering
  the momentum coefficient (Borysenko & Byshkin, 2021).
- :func:`metropolis`: the Metropolis accept/reject test around any optimizer, and
  :func:`sgd_sa`, SGD-SA (Fischetti & Stringher, 2019).
- :func:`scale_by_thermostat`: CoolMomentum whose momentum follows the measured
  temperature along a target path (``coolmomentum(..., cooling='thermostat')``).
- :func:`track_kinetic_temperature`: the rescaled kinetic temperature (mean squared
  displacement) of any optimizer, paper Eq. 22.
- :func:`random_walk`: Gaussian proposals that ignore the gradient; inside
  :func:`metropolis`, classical simulated annealing of any objective.
- :func:`lr_range_schedule` and :func:`suggest_learning_rate`: the learning-rate
  range test.
"""

from coolopt.alias import coolmomentum, sgd_sa
from coolopt.coolmomentum import CoolMomentumState, scale_by_coolmomentum
from coolopt.diagnostics import (
  KineticTemperatureState,
  kinetic_temperature,
  track_kinetic_temperature,
)
from coolopt.metropolis import (
  SGD_SA_LEARNING_RATES,
  MetropolisState,
  acceptance_rate,
  metropolis,
)
from coolopt.random_walk import RandomWalkState, random_walk
from coolopt.range_test import (
  divergence_step,
  lr_range_schedule,
  smooth_losses,
  suggest_learning_rate,
)
from coolopt.schedules import (
  exponential_cooling,
  friction_cooling,
  linear_cooling,
  staircase_decay,
)
from coolopt.thermostat import ThermostatState, scale_by_thermostat, thermostat_state

__version__ = '0.1.0'

__all__ = [
  'SGD_SA_LEARNING_RATES',
  'CoolMomentumState',
  'KineticTemperatureState',
  'MetropolisState',
  'RandomWalkState',
  'ThermostatState',
  'acceptance_rate',
  'coolmomentum',
  'divergence_step',
  'exponential_cooling',
  'friction_cooling',
  'kinetic_temperature',
  'linear_cooling',
  'lr_range_schedule',
  'metropolis',
  'random_walk',
  'scale_by_coolmomentum',
  'scale_by_thermostat',
  'sgd_sa',
  'smooth_losses',
  'staircase_decay',
  'suggest_learning_rate',
  'thermostat_state',
  'track_kinetic_temperature',
]
