"""The train state of examples/train.py: what a run carries from step to step, as
arrays, and the moving averages that evaluation may use.

`TrainState` is what orbax saves (see examples/checkpoints.py); `create_train_state`
makes the first one from a model and an optimizer, and `update_ema` moves the
averages after a step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct


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
  inputs: tuple[Any, ...],
  tx: optax.GradientTransformation,
  *,
  ema: bool = False,
  carry: Any = None,
) -> TrainState:
  """A freshly initialised train state, on the host (numpy arrays), the variables from
  `model.init(keys, *inputs)`; with `ema`, moving averages that start at the initial
  weights and statistics; `carry` is the state carried from step to step, if any."""
  params_rng, dropout_rng = jax.random.split(rng)
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
