"""coolopt: training neural networks by simulated annealing, as Optax transformations.

- :func:`coolmomentum`: momentum SGD read as Langevin dynamics, cooled by lowering
  the momentum coefficient (Borysenko & Byshkin, 2021).
- :func:`metropolis`: the Metropolis accept/reject test around any optimizer, and
  :func:`sgd_sa`, SGD-SA (Fischetti & Stringher, 2019).
- :func:`track_temperature`: the rescaled temperature (mean squared displacement)
  of any optimizer.
"""

from coolopt.coolmomentum import CoolMomentumState, coolmomentum, scale_by_coolmomentum
from coolopt.metropolis import MetropolisState, acceptance_rate, metropolis, sgd_sa
from coolopt.schedules import exponential_cooling, friction_cooling, linear_cooling
from coolopt.temperature import TemperatureState, temperature, track_temperature

__version__ = '0.1.0'

__all__ = [
  'CoolMomentumState',
  'MetropolisState',
  'TemperatureState',
  'acceptance_rate',
  'coolmomentum',
  'exponential_cooling',
  'friction_cooling',
  'linear_cooling',
  'metropolis',
  'scale_by_coolmomentum',
  'sgd_sa',
  'temperature',
  'track_temperature',
]
