"""Tests for the learning-rate range test: `lr_range_schedule`, `smooth_losses`,
`divergence_step` and `suggest_learning_rate`, on synthetic loss curves whose answer
is known."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coolopt


def _curve(rates, steepest=10**-2.5, lowest=0.1, blow_up=20.0):
  """A loss that falls fastest (per unit of log rate) at `steepest`, is lowest at
  `lowest` and grows steeply beyond it."""
  return 2.0 - np.tanh(np.log10(rates / steepest)) + blow_up * np.maximum(rates - lowest, 0.0)


# The schedule.


def test_schedule_grows_exponentially_from_lr_min_to_lr_max_then_stays():
  schedule = coolopt.lr_range_schedule(1e-6, 10.0, num_steps=301)
  rates = np.asarray([schedule(n) for n in range(305)])
  np.testing.assert_allclose(rates[0], 1e-6, rtol=1e-6)
  np.testing.assert_allclose(rates[300], 10.0, rtol=1e-6)
  # 7 decades in 300 steps: every step multiplies the rate by the same factor.
  np.testing.assert_allclose(rates[1:301] / rates[:300], 10 ** (7 / 300), rtol=1e-5)
  np.testing.assert_allclose(rates[300:], 10.0, rtol=1e-6)
  np.testing.assert_allclose(schedule(150), 10**-2.5, rtol=1e-5)


def test_schedule_is_an_optimizer_learning_rate_under_jit():
  schedule = coolopt.lr_range_schedule(1e-3, 1.0, num_steps=4)
  opt = optax.sgd(schedule)
  params = jnp.zeros(1)

  @jax.jit
  def step(state):
    return opt.update(jnp.ones(1), state, params)

  state = opt.init(params)
  moves = []
  for _ in range(5):
    updates, state = step(state)
    moves.append(-float(updates[0]))
  np.testing.assert_allclose(moves, [1e-3, 1e-2, 1e-1, 1.0, 1.0], rtol=1e-5)


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'lr_min': 0.0}, r'lr_min must be in \(0, inf\), got lr_min=0.0'),
    ({'lr_max': 1e-7}, r'lr_max must be greater than lr_min=1e-06, got lr_max=1e-07'),
    ({'num_steps': 1}, r'num_steps must be in \[2, inf\), got num_steps=1'),
    ({'num_steps': 10.0}, r'num_steps must be an integer >= 2, got num_steps=10.0'),
  ],
)
def test_schedule_invalid_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    coolopt.lr_range_schedule(**{'lr_min': 1e-6, 'lr_max': 10.0, 'num_steps': 100, **kwargs})


# Smoothing.


def test_smoothing_is_the_bias_corrected_moving_average():
  losses = np.random.default_rng(0).uniform(1.0, 3.0, size=40)
  beta = 0.9
  smoothed = coolopt.smooth_losses(losses, smoothing=beta)
  for n in (0, 1, 7, 39):
    # A weighted mean of the losses so far, with weights beta**(n - i).
    weights = beta ** np.arange(n, -1, -1)
    np.testing.assert_allclose(smoothed[n], np.sum(weights * losses[: n + 1]) / np.sum(weights))
  assert smoothed[0] == losses[0]
  np.testing.assert_array_equal(coolopt.smooth_losses(losses, smoothing=0.0), losses)


def test_smoothing_reduces_noise_and_propagates_non_finite_losses():
  rng = np.random.default_rng(1)
  losses = 1.0 + 0.2 * rng.normal(size=2000)
  smoothed = coolopt.smooth_losses(losses, smoothing=0.98)
  # The standard deviation of an EMA of white noise: sqrt((1 - beta) / (1 + beta)) = 0.1.
  np.testing.assert_allclose(np.std(smoothed[500:]), 0.2 * 0.1005, rtol=0.2)
  with_nan = coolopt.smooth_losses([1.0, 2.0, np.nan, 1.0], smoothing=0.5)
  assert np.all(np.isfinite(with_nan[:2])) and np.all(np.isnan(with_nan[2:]))


def test_smoothing_invalid_argument():
  with pytest.raises(ValueError, match=r'smoothing must be in \[0, 1\), got smoothing=1.0'):
    coolopt.smooth_losses([1.0], smoothing=1.0)


# The divergence stop.


def test_divergence_step_is_the_first_step_past_the_threshold():
  smoothed = np.asarray([5.0, 3.0, 1.0, 2.0, 3.9, 4.1, 3.0, 9.0])
  assert coolopt.divergence_step(smoothed) == 5
  assert coolopt.divergence_step(smoothed, threshold=2.0) == 4
  assert coolopt.divergence_step(smoothed, threshold=10.0) is None
  assert coolopt.divergence_step([2.0, 1.0, np.inf, 1.0]) == 2
  assert coolopt.divergence_step([2.0, np.nan]) == 1
  # The minimum is the lowest so far: a later dip does not move the stop earlier.
  assert coolopt.divergence_step([4.0, 15.0, 1.0], threshold=4.0) is None


def test_divergence_step_asked_after_every_step_stops_where_it_would_at_the_end():
  rates = np.geomspace(1e-5, 10.0, 400)
  smoothed = coolopt.smooth_losses(_curve(rates))
  at_end = coolopt.divergence_step(smoothed)
  assert at_end is not None
  online = next(
    n for n in range(1, smoothed.size + 1) if coolopt.divergence_step(smoothed[:n]) is not None
  )
  assert online - 1 == at_end
  # It stopped past the lowest loss, once the loss was 4 times the lowest.
  assert smoothed[at_end] > 4 * smoothed[:at_end].min() >= smoothed[at_end - 1]
  assert rates[at_end] > 0.1


def test_divergence_threshold_invalid():
  with pytest.raises(ValueError, match=r'threshold must be in \(1, inf\), got threshold=1.0'):
    coolopt.divergence_step([1.0], threshold=1.0)


# The suggestion.


@pytest.mark.parametrize(('steepest', 'lowest'), [(10**-2.5, 0.1), (1e-4, 1e-2), (1e-2, 1.0)])
def test_suggestion_of_a_noiseless_curve_is_exact(steepest, lowest):
  # 20 steps per decade; both answers lie on the grid of rates.
  rates = 10 ** (np.arange(-100, 21) / 20)
  losses = _curve(rates, steepest, lowest, blow_up=50.0 / lowest)
  minimum = coolopt.suggest_learning_rate(rates, losses, rule='minimum', smoothing=0.0)
  np.testing.assert_allclose(minimum, lowest / 10, rtol=1e-9)
  steep = coolopt.suggest_learning_rate(rates, losses, smoothing=0.0)
  np.testing.assert_allclose(steep, steepest, rtol=1e-9)


def test_suggestion_of_a_noisy_curve_is_within_a_fifth_of_a_decade():
  # 500 steps a decade: the moving average lags by about beta / (1 - beta) = 49
  # steps, 0.1 decade, and averages the noise down to a tenth.
  rates = np.geomspace(1e-4, 10.0, 2500)
  noise = np.random.default_rng(0).normal(size=rates.size)
  losses = _curve(rates) + 0.3 * noise
  minimum = coolopt.suggest_learning_rate(rates, losses, rule='minimum')
  assert abs(np.log10(minimum / 0.01)) < 0.2, minimum
  # Unsmoothed, the noise alone decides where the minimum lies.
  unsmoothed = coolopt.suggest_learning_rate(rates, losses, rule='minimum', smoothing=0.0)
  assert abs(np.log10(unsmoothed / 0.01)) > 0.2, unsmoothed
  # The slope of the smoothed curve is noisier than its minimum: the steepest rule
  # needs ten times less noise to find its answer as closely.
  steep = coolopt.suggest_learning_rate(rates, losses, rule='steepest')
  assert abs(np.log10(steep / 10**-2.5)) > 0.2, steep
  quiet = _curve(rates) + 0.03 * noise
  steep = coolopt.suggest_learning_rate(rates, quiet, rule='steepest')
  assert abs(np.log10(steep / 10**-2.5)) < 0.2, steep


def test_suggestion_ignores_what_comes_after_the_divergence():
  rates = 10 ** (np.arange(-100, 21) / 20)
  losses = _curve(rates)
  stop = coolopt.divergence_step(losses)
  # After a blow-up, a loss that comes back lower than ever is not read.
  losses[stop + 1 :] = 1e-3
  losses[stop + 1] = np.nan
  suggestion = coolopt.suggest_learning_rate(rates, losses, rule='minimum', smoothing=0.0)
  np.testing.assert_allclose(suggestion, 0.01)


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'losses': [3.0, 2.0]}, 'learning_rates and losses must have the same length, got 3 and 2'),
    ({'learning_rates': [1e-3, 1e-4, 1e-2]}, 'learning_rates must be positive and increasing'),
    ({'losses': [1.0, 5.0, 6.0]}, 'diverged at step 1 .* below 0.001'),
    ({'rule': 'valley'}, "rule must be one of 'steepest', 'minimum', got rule='valley'"),
  ],
)
def test_suggestion_invalid_arguments(kwargs, message):
  arguments = {'learning_rates': [1e-3, 1e-2, 1e-1], 'losses': [3.0, 2.0, 1.0], **kwargs}
  learning_rates, losses = arguments.pop('learning_rates'), arguments.pop('losses')
  with pytest.raises(ValueError, match=message):
    coolopt.suggest_learning_rate(learning_rates, losses, smoothing=0.0, **arguments)


@pytest.mark.parametrize('num_steps', [0, 1, 2])
def test_suggestion_of_fewer_than_three_steps_is_refused_with_the_values(num_steps):
  # Before: [] raised an IndexError, and 1 or 2 steps "diverged at step None".
  rates, losses = [1e-3, 1e-2][:num_steps], [2.0, 1.0][:num_steps]
  message = (
    f'learning_rates and losses must hold at least 3 steps of a range test, got {num_steps}: '
    f'learning_rates={rates!r}, losses={losses!r}'
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    coolopt.suggest_learning_rate(rates, losses)
