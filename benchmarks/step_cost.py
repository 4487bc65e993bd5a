r"""Cost of one optimizer step: CoolMomentum, and CoolMomentum + temperature, against momentum SGD.

Every variant is a jit-compiled step, update + `optax.apply_updates`, with the
parameters and the optimizer state donated and the gradients a fixed input. The
variants run in interleaved rounds (A, B, C, then B, C, A, then C, A, B, ...) so
that a disturbance of the machine hits all of them alike; each round times a few
steps of each, and the figures are medians over the rounds. The baseline runs
twice, with buffers of its own: ratios are to the mean of its two copies, and the
two copies' own ratios show the noise floor.

For a memory-bound step the cost is the number of passes over parameter-sized
arrays: the script prints, for each variant, the bytes the compiled step moves
(XLA's cost analysis) in units of one parameter tree, and its fusions.

From the repository root:

  python -m benchmarks.step_cost
  python -m benchmarks.step_cost --size 25_000_000 --leaves 50 --rounds 40 --steps 10 --every 10
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import optax

import coolopt
from benchmarks.machine import machine
from benchmarks.timing import (
  add_round_arguments,
  jax_carry_step,
  optimizer_step,
  quartiles,
  ratios,
  time_rounds,
)

LEARNING_RATE = 0.01
BASELINE = 'sgd(momentum=0.9)'


def optimizers(total_steps: int, every: list[int]) -> dict[str, optax.GradientTransformation]:
  """The variants, baseline first."""
  variants = {
    BASELINE: optax.sgd(LEARNING_RATE, momentum=0.9),
    'coolmomentum': coolopt.coolmomentum(LEARNING_RATE, rho_0=0.9, total_steps=total_steps),
    'coolmomentum + kinetic temperature': optax.chain(
      coolopt.coolmomentum(LEARNING_RATE, rho_0=0.9, total_steps=total_steps),
      coolopt.track_kinetic_temperature(),
    ),
  }
  for k in every:
    if k > 1:
      variants[f'coolmomentum + kinetic temperature(every={k})'] = optax.chain(
        coolopt.coolmomentum(LEARNING_RATE, rho_0=0.9, total_steps=total_steps),
        coolopt.track_kinetic_temperature(every=k),
      )
  # The baseline once more, with buffers of its own: the two copies differ by the
  # noise floor of the ratios.
  variants[f'{BASELINE}, second copy'] = optax.sgd(LEARNING_RATE, momentum=0.9)
  return variants


def hlo_summary(compiled, tree_bytes: int) -> str:
  """Bytes moved per step in parameter trees, and the fusions of the entry computation."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  passes = cost.get('bytes accessed', float('nan')) / tree_bytes
  text = compiled.as_text()
  entry = text[text.index('\nENTRY') :]
  kinds = collections.Counter(
    m.group(1) if m.group(1) != 'kCustom' else 'custom(reduce)'
    for m in re.finditer(r'= \S+ fusion\(.*?kind=(\w+)', entry)
  )
  conditionals = entry.count(' conditional(')
  fusions = ', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))
  extra = f', {conditionals} conditional (its branches counted in full)' if conditionals else ''
  return f'{passes:.2f} tree passes; fusions: {fusions}{extra}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=25_000_000, help='number of parameters')
  parser.add_argument('--leaves', type=int, default=50, help='number of parameter arrays')
  add_round_arguments(parser, rounds=40, steps=10, warmup=3)
  parser.add_argument(
    '--every',
    type=int,
    nargs='*',
    default=[10],
    help='track_kinetic_temperature(every=k) variants; make --steps a multiple of every k, so '
    'that each round holds the same number of computed temperatures',
  )
  parser.add_argument(
    '--reallocate',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='copy the parameters and state to fresh buffers before each round: '
    'averages over where in memory they lie, which moves a step by a few percent',
  )
  parser.add_argument('--hlo', action='store_true', help='print the entry computation HLO too')
  args = parser.parse_args()

  leaf = args.size // args.leaves
  key = jax.random.PRNGKey(0)
  keys = jax.random.split(key, 2 * args.leaves)
  grads = {
    f'layer{i:02d}': 1e-2 * jax.random.normal(keys[i], (leaf,), jnp.float32)
    for i in range(args.leaves)
  }
  tree_bytes = 4 * leaf * args.leaves
  print(machine())
  print(
    f'{args.leaves} leaves x {leaf:,} float32 = {leaf * args.leaves:,} parameters '
    f'({tree_bytes / 2**20:.0f} MiB per tree); {args.rounds} rounds x {args.steps} steps'
  )

  variants = optimizers(total_steps=10_000, every=args.every)
  timed = {}
  for name, tx in variants.items():
    params = {
      k: jax.random.normal(keys[args.leaves + i], (leaf,), jnp.float32) for i, k in enumerate(grads)
    }
    opt_state = tx.init(params)
    step = optimizer_step(tx)
    compiled = step.lower(params, opt_state, grads).compile()
    print(f'  {name:40s} {hlo_summary(compiled, tree_bytes)}')
    if args.hlo:
      text = compiled.as_text()
      print(text[text.index('\nENTRY') :])
    timed[name], _ = jax_carry_step(step, (params, opt_state), grads, reallocate=args.reallocate)

  times = time_rounds(timed, rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup)

  # Ratios are taken round by round, to the mean of the two copies of the baseline
  # in the same round: both sides of a ratio saw the same machine.
  copies = zip(times[BASELINE], times[f'{BASELINE}, second copy'], strict=True)
  baseline = [(a + b) / 2 for a, b in copies]
  print(f'\n{"variant":40s} {"median ms":>9s} {"IQR ms":>13s} {"ratio":>6s} {"ratio IQR":>11s}')
  for name, ts in times.items():
    q_t, q_r = quartiles(ts), quartiles(ratios(ts, baseline))
    print(
      f'{name:40s} {1e3 * q_t[1]:9.2f} {1e3 * q_t[0]:6.2f}-{1e3 * q_t[2]:<6.2f} '
      f'{q_r[1]:6.3f} {q_r[0]:5.3f}-{q_r[2]:<5.3f}'
    )
  print(
    f'\nratio: to the mean of the two copies of {BASELINE} in the same round. '
    'Targets: coolmomentum <= 1.03, coolmomentum + temperature <= 1.15.'
  )


if __name__ == '__main__':
  main()
