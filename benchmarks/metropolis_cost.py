r"""Cost of the Metropolis test: a small CNN's train step with and without it.

Three jit-compiled train steps, with the parameters and the optimizer state
donated and one fixed batch of 32x32x3 images:

  (a) plain: `value_and_grad` of the loss, `optax.sgd(0.1, momentum=0.9)` update,
      `optax.apply_updates`;
  (b) plain + one more forward pass of the loss at the updated parameters: the
      irreducible cost of a Metropolis test;
  (c) `coolopt.metropolis(optax.sgd(0.1, momentum=0.9), temperature=1e-2)`, called
      with `value` and `value_fn=lambda p: loss(p, batch)`.

They run in interleaved rounds (a, b, c, then b, c, a, then c, a, b, ...); the
figures are medians over the rounds, and ratios are taken round by round.

From the repository root:

  python -m benchmarks.metropolis_cost
  python -m benchmarks.metropolis_cost --batch 128 --rounds 30 --steps 3
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import coolopt
from benchmarks.machine import machine
from benchmarks.timing import add_round_arguments, jax_carry_step, quartiles, ratios, time_rounds


class CNN(nn.Module):
  """Two 3x3 convolutions with average pooling, then a hidden dense layer."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


def make_steps(model: nn.Module) -> dict[str, tuple[Callable, optax.GradientTransformation]]:
  """The three train steps and their optimizers.

  Each step maps `(params, opt_state, batch)` to `(params, opt_state, loss)`.
  """

  def loss(params, batch):
    logits = model.apply({'params': params}, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  sgd = optax.sgd(0.1, momentum=0.9)
  annealed = coolopt.metropolis(optax.sgd(0.1, momentum=0.9), temperature=1e-2)

  def plain(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  def plain_and_forward(params, opt_state, batch):
    params, opt_state, value = plain(params, opt_state, batch)
    # Returned, so that the forward pass is not removed as dead code.
    return params, opt_state, (value, loss(params, batch))

  def metropolis(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = annealed.update(
      grads, opt_state, params, value=value, value_fn=lambda p: loss(p, batch)
    )
    return optax.apply_updates(params, updates), opt_state, value

  return {
    '(a) plain step': (plain, sgd),
    '(b) plain + forward pass': (plain_and_forward, sgd),
    '(c) metropolis': (metropolis, annealed),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128, help='batch size')
  add_round_arguments(parser, rounds=30, steps=3, warmup=3)
  args = parser.parse_args()

  model = CNN()
  image_key, label_key, init_key = jax.random.split(jax.random.PRNGKey(0), 3)
  batch = {
    'image': jax.random.normal(image_key, (args.batch, 32, 32, 3), jnp.float32),
    'label': jax.random.randint(label_key, (args.batch,), 0, 10),
  }
  print(machine())
  variables = model.init(init_key, batch['image'][:1])
  num_params = sum(x.size for x in jax.tree.leaves(variables['params']))
  print(
    f'CNN, {num_params:,} parameters, batch {args.batch} of 32x32x3; '
    f'{args.rounds} rounds x {args.steps} steps'
  )

  timed, carries = {}, {}
  for name, (step, tx) in make_steps(model).items():
    params = jax.tree.map(jnp.copy, variables['params'])
    step = jax.jit(step, donate_argnums=(0, 1))
    timed[name], carries[name] = jax_carry_step(step, (params, tx.init(params)), batch)

  times = time_rounds(timed, rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup)

  print(f'\n{"variant":28s} {"median ms":>10s} {"IQR ms":>15s}')
  for name, ts in times.items():
    q = quartiles(ts)
    print(f'{name:28s} {1e3 * q[1]:10.2f} {1e3 * q[0]:7.2f}-{1e3 * q[2]:<7.2f}')
  a, b, c = times.values()
  print()
  for label, num, den, target in [
    ('(c) / (b)', c, b, ' (target <= 1.05)'),
    ('(c) / (a)', c, a, ''),
    ('(b) / (a)', b, a, ''),
  ]:
    q = quartiles(ratios(num, den))
    print(f'{label}: {q[1]:.3f}  IQR {q[0]:.3f}-{q[2]:.3f}{target}')
  state = carries['(c) metropolis']['carry'][1]
  print(f'acceptance rate of (c): {float(coolopt.acceptance_rate(state)):.2f}')


if __name__ == '__main__':
  main()
