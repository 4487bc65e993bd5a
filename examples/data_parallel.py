"""Data parallelism for the trainer: one step body under a sharded `jit` or a `pmap`.

Under 'jit' (the default) the train state is replicated and each batch is one global
array split over a 1-D mesh of all devices; the step sees the global batch and no axis
name. Under 'pmap' each device runs the step on its rows with `axis_name=AXIS_NAME`,
over which the step averages gradients, losses and statistics itself.

Either way a batch from the input pipelines is `[local devices, per device, ...]`:
this process's rows, split among its devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PARALLELISMS = ('jit', 'pmap')
AXIS_NAME = 'batch'


@dataclasses.dataclass(frozen=True)
class Parallel:
  """The compiled steps, and how state, batches and metrics move to and from devices.

  Attributes:
    train_step: `(device state, device batch) -> (device state, metrics)`.
    eval_step: `(device state, device batch) -> sums`.
    put_state: host state -> device state.
    get_state: device state -> host state (numpy).
    put_batch: a pipeline batch `[local devices, per device, ...]` -> device batch.
    get_metrics: device metrics (any pytree) -> numpy.
  """

  train_step: Callable[[Any, Any], tuple[Any, Any]]
  eval_step: Callable[[Any, Any], Any]
  put_state: Callable[[Any], Any]
  get_state: Callable[[Any], Any]
  put_batch: Callable[[Any], Any]
  get_metrics: Callable[[Any], Any]


def _replicate(state: Any) -> Any:
  # Through a pmap, so that the copies are laid out as the train step's outputs are
  # and the second step does not compile again.
  return jax.pmap(lambda x: x, axis_name=AXIS_NAME)(jax_utils.replicate(state))


def _pmap_steps(train_step: Callable[..., Any], eval_step: Callable[..., Any]) -> Parallel:
  return Parallel(
    train_step=jax.pmap(
      functools.partial(train_step, axis_name=AXIS_NAME), axis_name=AXIS_NAME, donate_argnums=(0,)
    ),
    eval_step=jax.pmap(functools.partial(eval_step, axis_name=AXIS_NAME), axis_name=AXIS_NAME),
    put_state=_replicate,
    get_state=lambda state: jax.device_get(jax_utils.unreplicate(state)),
    # pmap splits the leading (local device) axis of numpy arrays itself.
    put_batch=lambda batch: batch,
    # Every replica holds the same averaged values; read the first.
    get_metrics=lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(tree)),
  )


def _jit_steps(train_step: Callable[..., Any], eval_step: Callable[..., Any]) -> Parallel:
  mesh = Mesh(np.asarray(jax.devices()), (AXIS_NAME,))
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(AXIS_NAME))

  def put_state(state):
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), state
    )

  def put_batch(batch):
    # One global array per field: this process's devices hold its rows.
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharded, x.reshape(-1, *x.shape[2:])),
      batch,
    )

  return Parallel(
    train_step=jax.jit(
      train_step, in_shardings=(replicated, sharded), out_shardings=replicated, donate_argnums=(0,)
    ),
    eval_step=jax.jit(eval_step, in_shardings=(replicated, sharded), out_shardings=replicated),
    put_state=put_state,
    get_state=jax.device_get,
    put_batch=put_batch,
    get_metrics=jax.device_get,
  )


def compile_steps(
  parallelism: str, train_step: Callable[..., Any], eval_step: Callable[..., Any]
) -> Parallel:
  """`train_step(state, batch, *, axis_name)` and `eval_step(state, batch, *, axis_name)`
  compiled for `parallelism`, 'jit' or 'pmap', with the transfers that go with them.

  The state given to the steps is replicated (donated to the train step); the batch is
  split over the devices. Under 'pmap' the steps are called with `axis_name=AXIS_NAME`,
  under 'jit' with their default (None).
  """
  if parallelism == 'pmap':
    return _pmap_steps(train_step, eval_step)
  if parallelism == 'jit':
    return _jit_steps(train_step, eval_step)
  raise ValueError(
    f'parallelism must be one of {", ".join(map(repr, PARALLELISMS))}, got {parallelism!r}.'
  )
