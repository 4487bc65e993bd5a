"""coolopt: training neural networks by simulated annealing, as Optax transformations.

- :func:`coolmomentum`: momentum SGD read as Langevin dynamics, cooled by lowering
  the momentum coefficient (Borysenko & Byshkin, 2021).
- :func:`metropolis`: the Metropolis accept/reject test around any optimizer, and
  :func:`sgd_sa`, SGD-SA (Fischetti & Stringher, 2019).
- :func:`scale_by_thermostat`: CoolMomentum whose momentum follows the measured
  temperature along a target path (``coolmomentum(..., cooling='thermostat')``).
- :func:`track_kinetic_temperature`: the rescaled kinetic temperature (mean squared
  displacement) of any optimizer, paper Eq. 22.
"""

from coolopt.coolmomentum import CoolMomentumState, coolmomentum, scale_by_coolmomentum
from coolopt.diagnostics import (
  KineticTemperatureState,
  kinetic_temperature,
  track_kinetic_temperature,
)
from coolopt.metropolis import MetropolisState, acceptance_rate, metropolis, sgd_sa
from coolopt.schedules import exponential_cooling, friction_cooling, linear_cooling
from coolopt.thermostat import ThermostatState, scale_by_thermostat, thermostat_state

__version__ = '0.1.0'

__all__ = [
  'CoolMomentumState',
  'KineticTemperatureState',
  'MetropolisState',
  'ThermostatState',
  'acceptance_rate',
  'coolmomentum',
  'exponential_cooling',
  'friction_cooling',
  'kinetic_temperature',
  'linear_cooling',
  'metropolis',
  'scale_by_coolmomentum',
  'scale_by_thermostat',
  'sgd_sa',
  'thermostat_state',
  'track_kinetic_temperature',
]
