r"""The learning-rate range test: sweep the rate exponentially, read the loss, pick a rate.

Train from the initial state for a few hundred steps while the learning rate grows
exponentially from ``lr_min`` to ``lr_max`` (:func:`coolopt.lr_range_schedule`),
recording the loss of every step. The loss first barely moves, then falls, then blows
up. :func:`coolopt.smooth_losses` smooths the record, :func:`coolopt.divergence_step`
says where to stop, and :func:`coolopt.suggest_learning_rate` turns the record into a
rate (Smith, 2017; the ``lr_find`` of fastai). These run on the host, on recorded
numbers, in any loop; ``examples/lr_find.py`` runs the whole test with the reference
trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax.numpy as jnp
import numpy as np
import optax

from coolopt import _checks

__all__ = ['divergence_step', 'lr_range_schedule', 'smooth_losses', 'suggest_learning_rate']

SUGGESTION_RULES = ('steepest', 'minimum')
# The fewest steps a suggestion is read from: a central-difference slope needs 3.
MIN_STEPS = 3


def lr_range_schedule(lr_min: chex.Numeric, lr_max: chex.Numeric, num_steps: int) -> optax.Schedule:
  r"""The exponentially growing learning rate of a range test.

  .. math::

    \eta_n = \eta_\mathrm{min} \left(\frac{\eta_\mathrm{max}}{\eta_\mathrm{min}}
    \right)^{\min(n, N - 1) / (N - 1)},

  so that the first step uses :math:`\eta_\mathrm{min}`, step :math:`N - 1` uses
  :math:`\eta_\mathrm{max}`, and the rate stays there afterwards. Equal ratios of
  the rate take equal numbers of steps. Computed in float32 (float64 under x64) as
  :math:`\exp` of a linear function of :math:`n`.

  Examples:
    >>> import coolopt
    >>> schedule = coolopt.lr_range_schedule(1e-4, 1.0, num_steps=5)
    >>> print(', '.join(f'{schedule(n):.0e}' for n in range(6)))
    1e-04, 1e-03, 1e-02, 1e-01, 1e+00, 1e+00

  Args:
    lr_min: the first learning rate, > 0.
    lr_max: the last learning rate, > ``lr_min``.
    num_steps: :math:`N \geq 2`, the number of steps of the sweep.

  Returns:
    An `optax.Schedule` of the step count, to pass as an optimizer's learning rate.

  References:
    Smith, `Cyclical Learning Rates for Training Neural Networks
    <https://arxiv.org/abs/1506.01186>`_, WACV 2017, Sec. 3.3.
  """
  _checks.check_range('lr_min', lr_min, lower=0.0, lower_inclusive=False, upper=None)
  _checks.check_range('lr_max', lr_max, lower=0.0, lower_inclusive=False, upper=None)
  if (
    _checks.is_concrete_number(lr_min)
    and _checks.is_concrete_number(lr_max)
    and not float(lr_max) > float(lr_min)
  ):
    raise ValueError(f'lr_max must be greater than lr_min={lr_min!r}, got lr_max={lr_max!r}.')
  if not (isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)):
    raise ValueError(f'num_steps must be an integer >= 2, got num_steps={num_steps!r}.')
  _checks.check_range('num_steps', num_steps, lower=2.0, upper=None)
  last = num_steps - 1

  def schedule(count: chex.Numeric) -> chex.Array:
    dtype = jnp.result_type(float)
    fraction = jnp.minimum(jnp.asarray(count, dtype), last) * (1.0 / last)
    log_min = jnp.log(jnp.asarray(lr_min, dtype))
    log_max = jnp.log(jnp.asarray(lr_max, dtype))
    return jnp.exp(log_min + fraction * (log_max - log_min))

  return schedule


def smooth_losses(losses: Sequence[float] | np.ndarray, smoothing: float = 0.98) -> np.ndarray:
  r"""The bias-corrected exponential moving average of a sequence of losses.

  With :math:`\beta` = ``smoothing`` and :math:`a_{-1} = 0`:

  .. math::

    a_n = \beta a_{n-1} + (1 - \beta) L_n, \qquad \bar L_n = \frac{a_n}{1 - \beta^{n+1}},

  the correction making :math:`\bar L_n` a weighted mean of :math:`L_0, \dots, L_n`
  from the first step on (as Adam corrects its moments). :math:`\beta = 0.98`
  averages over about 50 steps. A non-finite loss makes every later value
  non-finite.

  Examples:
    >>> import coolopt
    >>> print(coolopt.smooth_losses([2.0, 2.0, 2.0]))
    [2. 2. 2.]
    >>> print(coolopt.smooth_losses([4.0, 1.0], smoothing=0.5))  # (0.5*4 + 1) / 1.5
    [4. 2.]

  Args:
    losses: the loss of each step, in order.
    smoothing: :math:`\beta \in [0, 1)`; 0 returns the losses as they are.

  Returns:
    The smoothed losses, float64, one per step.
  """
  _checks.check_range('smoothing', smoothing, lower=0.0, upper=1.0)
  losses = np.asarray(losses, np.float64).reshape(-1)
  smoothed = np.empty_like(losses)
  average = 0.0
  with np.errstate(invalid='ignore', over='ignore'):
    for n, loss in enumerate(losses):
      average = smoothing * average + (1.0 - smoothing) * loss
      smoothed[n] = average / (1.0 - smoothing ** (n + 1))
  return smoothed


def divergence_step(
  smoothed_losses: Sequence[float] | np.ndarray, threshold: float = 4.0
) -> int | None:
  r"""The first step at which a range test has diverged, or ``None``.

  Step :math:`n` has diverged when its smoothed loss is not finite or exceeds
  ``threshold`` times the lowest smoothed loss of steps :math:`0, \dots, n`:
  the same answer whether it is asked after every step (to stop the test early)
  or once at the end. The losses are taken to be positive (a cross-entropy, a
  squared error).

  Examples:
    >>> import coolopt
    >>> print(coolopt.divergence_step([3.0, 2.0, 1.0, 3.0, 5.0]))
    4
    >>> print(coolopt.divergence_step([3.0, 2.0, float('nan')]))
    2
    >>> print(coolopt.divergence_step([3.0, 2.0, 1.0]))
    None

  Args:
    smoothed_losses: the smoothed loss of each step (see :func:`smooth_losses`).
    threshold: the multiple of the lowest loss so far that counts as divergence, > 1.

  Returns:
    The index of the first diverged step, or ``None`` if there is none.
  """
  _checks.check_range('threshold', threshold, lower=1.0, lower_inclusive=False, upper=None)
  smoothed_losses = np.asarray(smoothed_losses, np.float64).reshape(-1)
  with np.errstate(invalid='ignore'):
    lowest = np.minimum.accumulate(smoothed_losses)
    diverged = ~np.isfinite(smoothed_losses) | (smoothed_losses > threshold * lowest)
  steps = np.flatnonzero(diverged)
  return int(steps[0]) if steps.size else None


def suggest_learning_rate(
  learning_rates: Sequence[float] | np.ndarray,
  losses: Sequence[float] | np.ndarray,
  *,
  rule: str = 'steepest',
  smoothing: float = 0.98,
  divergence_threshold: float = 4.0,
) -> float:
  r"""The learning rate that a range test suggests.

  The losses are smoothed (:func:`smooth_losses`) and cut before the first diverged
  step (:func:`divergence_step`); of the steps left, ``rule`` picks:

  - ``'steepest'`` (the default): the rate at which the smoothed loss falls fastest
    per unit of :math:`\log \eta` (the most negative slope, by central differences),
    among the steps up to the lowest loss, leaving out the first
    :math:`1/(1 - \beta)` steps, whose averages hold too few losses.
  - ``'minimum'``: the rate of the lowest smoothed loss, divided by 10.

  Both are fastai's (``lr_find``). The steepest descent is the default because it
  keeps a margin to divergence that the minimum does not: the moving average lags
  the losses by about :math:`\beta/(1 - \beta)` steps (50 for :math:`\beta = 0.98`,
  a decade of rates in a sweep of 300 steps over 6 decades), so the smoothed minimum
  lies past the raw one and a tenth of it is near the rate at which training blows
  up. On the digits example both rules' rates train CoolMomentum as well as the best
  rate of a grid, but the minimum's are 2 to 3 times below a rate that diverges, the
  steepest's 16 to 22 times (``docs/howto/lr_find.md``). The slope is noisier than
  the minimum: the steepest rule needs the smoothing, and a sweep of a few hundred
  steps.

  Examples:
    >>> import numpy as np
    >>> import coolopt
    >>> rates = np.geomspace(1e-4, 10.0, 101)
    >>> # A curve that falls fastest at 3e-3, is lowest at 0.1 and diverges beyond.
    >>> losses = 2.0 - np.tanh(np.log10(rates / 3e-3)) + 20.0 * np.maximum(rates - 0.1, 0.0)
    >>> print(f'{coolopt.suggest_learning_rate(rates, losses, smoothing=0.0):.4f}')
    0.0032
    >>> print(f"{coolopt.suggest_learning_rate(rates, losses, rule='minimum', smoothing=0):.4f}")
    0.0100

  Args:
    learning_rates: the learning rate of each step, increasing.
    losses: the loss of each step (the same length).
    rule: ``'steepest'`` or ``'minimum'``.
    smoothing: :math:`\beta` of :func:`smooth_losses`.
    divergence_threshold: ``threshold`` of :func:`divergence_step`.

  Returns:
    The suggested learning rate.

  Raises:
    ValueError: for sequences of different lengths or of fewer than 3 steps, or if
      fewer than 3 steps remain before the divergence (lower the first rate of the
      sweep).

  References:
    Smith, `Cyclical Learning Rates for Training Neural Networks
    <https://arxiv.org/abs/1506.01186>`_, WACV 2017.

    Howard & Gugger, `fastai: A Layered API for Deep Learning
    <https://arxiv.org/abs/2002.04688>`_, 2020 (``Learner.lr_find``).
  """
  _checks.check_choice('rule', rule, SUGGESTION_RULES)
  learning_rates = np.asarray(learning_rates, np.float64).reshape(-1)
  losses = np.asarray(losses, np.float64).reshape(-1)
  if learning_rates.shape != losses.shape:
    raise ValueError(
      f'learning_rates and losses must have the same length, got {learning_rates.size} '
      f'and {losses.size}.'
    )
  if learning_rates.size < MIN_STEPS:
    raise ValueError(
      f'learning_rates and losses must hold at least {MIN_STEPS} steps of a range test, got '
      f'{learning_rates.size}: learning_rates={learning_rates.tolist()!r}, '
      f'losses={losses.tolist()!r}. A slope needs 3 points; a sweep of a few hundred '
      'steps gives a reliable one.'
    )
  if not (np.all(learning_rates > 0) and np.all(np.diff(learning_rates) > 0)):
    raise ValueError('learning_rates must be positive and increasing.')
  smoothed = smooth_losses(losses, smoothing)
  stop = divergence_step(smoothed, divergence_threshold)
  kept = smoothed.size if stop is None else stop
  if kept < MIN_STEPS:
    raise ValueError(
      f'The loss diverged at step {stop} of the sweep, before {MIN_STEPS} steps could be read: '
      f'start the sweep at a learning rate below {learning_rates[0]:g}.'
    )
  smoothed, learning_rates = smoothed[:kept], learning_rates[:kept]
  lowest = int(np.argmin(smoothed))
  if rule == 'minimum':
    return float(learning_rates[lowest] / 10.0)
  # The first 1 / (1 - smoothing) averages hold few losses: their slopes are noise.
  start = min(round(1.0 / (1.0 - smoothing)) - 1, lowest)
  slopes = np.gradient(smoothed, np.log(learning_rates))
  return float(learning_rates[start + int(np.argmin(slopes[start : lowest + 1]))])
