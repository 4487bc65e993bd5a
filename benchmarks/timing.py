"""Interleaved timing rounds, and the optimizer step, shared by every benchmark.

A variant is a `Timed`: a zero-argument `step` that runs one step and returns what
to wait for, `sync` that waits for it, and an optional untimed `before_round`.
`jax_carry_step` makes one from a jitted step that donates its carry.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass
class Timed:
  """One variant of a benchmark.

  Attributes:
    step: runs one step; returns what `sync` waits for.
    sync: blocks until a value returned by `step` is computed.
    before_round: called (untimed) before each round, e.g. to move buffers.
  """

  step: Callable[[], Any]
  sync: Callable[[Any], Any] = jax.block_until_ready
  before_round: Callable[[], None] | None = None


def jax_carry_step(
  step: Callable, carry: tuple, *inputs: Any, reallocate: bool = False
) -> tuple[Timed, dict]:
  """A `Timed` for `step(*carry, *inputs) -> (*carry, *rest)` that donates its carry.

  Returns the variant and a dict whose 'carry' entry holds the current carry. With
  `reallocate`, the carry is copied to fresh buffers before each round: where the
  buffers lie in memory moves a memory-bound step by a few percent, and this
  averages over it.
  """
  box = {'carry': carry}

  def run():
    box['carry'] = tuple(step(*box['carry'], *inputs)[: len(carry)])
    return box['carry']

  def refresh():
    box['carry'] = jax.block_until_ready(jax.tree.map(jnp.copy, box['carry']))

  return Timed(run, before_round=refresh if reallocate else None), box


def optimizer_step(tx: optax.GradientTransformation) -> Callable:
  """`(params, opt_state, grads) -> (params, opt_state)`: `tx.update` + `optax.apply_updates`.

  Jit-compiled, the parameters and the optimizer state donated.
  """

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


def time_rounds(
  variants: Mapping[str, Timed], *, rounds: int, steps_per_round: int, warmup: int = 0
) -> dict[str, list[float]]:
  """Seconds per step of every variant, one figure per round.

  Every round times `steps_per_round` steps of each variant in turn, and starts one
  variant further on than the last, so that none always runs first or always after
  the same other one. `warmup` untimed steps of each variant run first.
  """
  names = list(variants)
  for name in names:
    timed = variants[name]
    for _ in range(warmup):
      timed.sync(timed.step())
  times = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      timed = variants[name]
      if timed.before_round is not None:
        timed.before_round()
      start = time.perf_counter()
      for _ in range(steps_per_round):
        out = timed.step()
      timed.sync(out)
      times[name].append((time.perf_counter() - start) / steps_per_round)
  return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
  """(first quartile, median, third quartile)."""
  q = statistics.quantiles(values, n=4)
  return q[0], statistics.median(values), q[2]


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
  """Round-by-round ratios: both sides of each saw the same machine."""
  return [a / b for a, b in zip(numerator, denominator, strict=True)]


def add_round_arguments(parser: argparse.ArgumentParser, *, rounds: int, steps: int, warmup: int):
  """--rounds, --steps (per variant and round) and --warmup, with these defaults."""
  parser.add_argument('--rounds', type=int, default=rounds, help='interleaved rounds')
  parser.add_argument('--steps', type=int, default=steps, help='steps per variant and round')
  parser.add_argument('--warmup', type=int, default=warmup, help='untimed steps per variant')


def add_xla_flags_argument(parser: argparse.ArgumentParser) -> None:
  """--xla-flags / --no-xla-flags: whether `set_trainer_xla_flags` sets anything."""
  parser.add_argument(
    '--xla-flags',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='set the XLA flags that examples.main sets (examples.main.CPU_XLA_FLAGS)',
  )


def set_trainer_xla_flags(args: argparse.Namespace) -> None:
  """With `args.xla_flags`, sets the XLA flags of `examples.main`; before JAX starts."""
  if args.xla_flags:
    from examples import main as trainer_main

    trainer_main.set_xla_flags()
