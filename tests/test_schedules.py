"""The cooling schedules against the formulas of the paper and of the authors' optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.library_helpers import COOLINGS, reference_rho


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize('cooling', COOLINGS)
@pytest.mark.parametrize('rho_0', [0.0, 0.5, 0.9, 0.99, 0.9999])
@pytest.mark.parametrize('warmup_steps', [0, 7])
def test_values_match_formulas_in_float64(x64, cooling, rho_0, warmup_steps):
  S, W = 100, warmup_steps
  schedule = COOLINGS[cooling](rho_0, S, warmup_steps=W)
  steps = sorted({0, max(W - 1, 0), W, S - 1, S, S + 1, 2 * S, 10 * S})
  values = np.asarray(schedule(jnp.asarray(steps)))
  assert values.dtype == np.float64
  expected = [reference_rho(cooling, n, rho_0, S, W) for n in steps]
  np.testing.assert_allclose(values, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('cooling', COOLINGS)
@pytest.mark.parametrize('rho_0', [0.9, 0.99])
def test_float32_values_are_accurate_for_long_runs(cooling, rho_0):
  # Written as powers of 1 - n/S: a float32 alpha = (1 - rho_0)**(1/S) raised to the
  # n-th power would be off by about n ulp(alpha), 5% of rho at n = S = 10**6.
  S = 10**6
  steps = np.array([0, 1, 1000, S // 4, S // 2, 3 * S // 4, S - 1000, S - 1, S])
  values = np.asarray(COOLINGS[cooling](rho_0, S)(jnp.asarray(steps)))
  assert values.dtype == np.float32
  expected = [reference_rho(cooling, n, rho_0, S) for n in steps]
  np.testing.assert_allclose(values, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('cooling', COOLINGS)
@pytest.mark.parametrize('rho_0', [0.0, 0.5, 0.99, 0.9999])
@pytest.mark.parametrize('enable_x64', [False, True])
def test_zero_from_total_steps_on_and_never_negative(cooling, rho_0, enable_x64):
  S = 50
  with jax.enable_x64(enable_x64):
    values = np.asarray(COOLINGS[cooling](rho_0, S)(jnp.arange(30 * S + 1)))
  assert values[S] == 0.0  # Exactly: the last step of the cooling is plain SGD.
  # Also far past S, where the friction schedule's c**(1 - n/S) would overflow.
  np.testing.assert_array_equal(values[S:], 0.0)
  assert np.all(values >= 0.0)
  assert np.all(np.diff(values) <= 0.0), 'rho must never rise while cooling'
  if rho_0 > 0:
    assert np.all(values[:S] > 0.0)


@pytest.mark.parametrize('cooling', COOLINGS)
def test_no_cooling_keeps_rho_0(cooling):
  rho_0, W = 0.9, 3
  values = np.asarray(COOLINGS[cooling](rho_0, None, warmup_steps=W)(jnp.arange(1000)))
  np.testing.assert_array_equal(values[:W], 0.0)
  np.testing.assert_array_equal(values[W:], np.float32(rho_0))


@pytest.mark.parametrize('cooling', COOLINGS)
def test_warmup_zeroes_rho_and_does_not_shift_the_schedule(cooling):
  S, W = 40, 10
  steps = jnp.arange(2 * S)
  with_warmup = np.asarray(COOLINGS[cooling](0.99, S, warmup_steps=W)(steps))
  without = np.asarray(COOLINGS[cooling](0.99, S)(steps))
  np.testing.assert_array_equal(with_warmup[:W], 0.0)
  np.testing.assert_array_equal(with_warmup[W:], without[W:])


@pytest.mark.parametrize('cooling', COOLINGS)
def test_rho_0_at_step_0(cooling):
  # rho_0 itself at n = 0, computed in float32 from the float32 rho_0.
  value = COOLINGS[cooling](0.99, 100)(0)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, 0.99, rtol=1e-7)


@pytest.mark.parametrize('cooling', COOLINGS)
def test_computed_in_float32_whatever_the_hyperparameter_dtype(cooling):
  schedule = COOLINGS[cooling](jnp.asarray(0.5, jnp.bfloat16), jnp.asarray(64, jnp.int32))
  assert schedule(jnp.asarray(3, jnp.int32)).dtype == jnp.float32
  np.testing.assert_allclose(schedule(3), reference_rho(cooling, 3, 0.5, 64), rtol=1e-6)


@pytest.mark.parametrize('cooling', COOLINGS)
def test_traced_hyperparameters_match_concrete_ones(cooling):
  S, W = 30, 4
  steps = jnp.arange(2 * S)

  @jax.jit
  def traced(rho_0, total_steps, warmup_steps):
    return COOLINGS[cooling](rho_0, total_steps, warmup_steps)(steps)

  # A few ulp, not bitwise: XLA folds the constant hyperparameters on the host with
  # other rounding than its compiled power and division.
  np.testing.assert_allclose(
    traced(0.95, S, W), COOLINGS[cooling](0.95, S, warmup_steps=W)(steps), rtol=1e-6
  )


@pytest.mark.parametrize('cooling', COOLINGS)
@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'rho_0': 1.0}, 'rho_0=1.0'),
    ({'rho_0': -0.1}, 'rho_0=-0.1'),
    ({'total_steps': 0}, 'total_steps=0'),
    ({'total_steps': -5}, 'total_steps=-5'),
    ({'warmup_steps': -1}, 'warmup_steps=-1'),
    ({'rho_0': float('nan')}, 'rho_0=nan'),
  ],
)
def test_invalid_hyperparameters_are_named(cooling, kwargs, message):
  arguments = {'rho_0': 0.9, 'total_steps': 100} | kwargs
  with pytest.raises(ValueError, match=message):
    COOLINGS[cooling](**arguments)
