r"""The thermostat against the exponential clock and plain SGD at lr/2, up to divergence.

For each data set, CoolMomentum with the paper's exponential clock
(`cooling='exponential'`), with the thermostat (`coolopt.scale_by_thermostat`) and
with rho_0 = 0 (plain SGD at rate lr/2, the overdamped end both can reach) train the
same models from the same initialisations on the same batches, at learning rates in
steps of sqrt(10) from the data set's base rate to 1000 times it, where SGD at lr/2
itself diverges, three seeds each. One jit-compiled step, with the learning rate as
an argument, serves all the runs of an optimizer.

- digits: the digits config (examples/configs/digits.py): its CNN (with BatchNorm),
  scikit-learn's 8x8 digits with the trainer's 1,437/360 split, batch 32, 10 epochs,
  rho_0 0.99. A direct optax loop with batches shuffled by numpy, not the trainer.
- breast_cancer: scikit-learn's Wisconsin breast cancer data (569 samples, 30
  standardised features, two classes), a stratified 75/25 split, an MLP with one
  hidden layer of 64, batch 16, 20 epochs, rho_0 0.99.

Printed, per data set, learning rate and method: the final training loss (over the
whole training split, in inference mode) and the test accuracy, mean and range over
the seeds, or how many seeds diverged (final training loss not finite or above half
that of predicting the class frequencies); for the thermostat the share of steps
after T_0 is fixed whose smoothed measured temperature lies within a factor 2 of the
target (in brackets: off by more, with rho at a bound) and the smallest and largest
ratio; then, per method, the largest rate at which every seed converges and the first
at which one diverges. Figures and the raw traces go to --out.

From the repository root:

  python -m benchmarks.thermostat --out /tmp/thermostat
  python -m benchmarks.thermostat --datasets digits --max-step 0.05 --out /tmp/t
  python -m benchmarks.thermostat --load /tmp/thermostat  # the table again
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import coolopt
from benchmarks.machine import machine

SEEDS = (0, 1, 2)
# Learning rates in steps of sqrt(10) from each data set's base rate up to
# 1000 times it, where plain SGD at lr/2 diverges on both data sets.
LR_FACTORS = tuple(10.0 ** (k / 2) for k in range(7))
# 'sgd': CoolMomentum with rho_0 = 0, plain SGD at rate lr/2, the overdamped end.
METHODS = ('exponential', 'thermostat', 'sgd')


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  model: nn.Module
  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  batch_size: int
  epochs: int
  rho_0: float
  base_learning_rate: float

  @property
  def steps_per_epoch(self) -> int:
    return len(self.train[1]) // self.batch_size

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch


class MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)


def digits_task() -> Task:
  from examples import models
  from examples.configs import digits

  config = digits.get_config()
  # The trainer's split (examples/input_pipeline.py), without TensorFlow.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  train_x, test_x, train_y, test_y = train_test_split(
    images, labels, test_size=360, stratify=labels, random_state=0
  )
  return Task(
    name='digits',
    model=models.get_model(config.model, config.num_classes),
    train=(train_x, train_y),
    test=(test_x, test_y),
    batch_size=config.batch_size,
    epochs=config.num_epochs,
    rho_0=config.rho_0,
    base_learning_rate=config.learning_rate,
  )


def breast_cancer_task() -> Task:
  from sklearn.datasets import load_breast_cancer
  from sklearn.model_selection import train_test_split

  data = load_breast_cancer()
  train_x, test_x, train_y, test_y = train_test_split(
    data.data, data.target, test_size=0.25, stratify=data.target, random_state=0
  )
  mean, std = train_x.mean(0), train_x.std(0)
  return Task(
    name='breast_cancer',
    model=MLP(num_classes=2),
    train=(((train_x - mean) / std).astype(np.float32), train_y.astype(np.int32)),
    test=(((test_x - mean) / std).astype(np.float32), test_y.astype(np.int32)),
    batch_size=16,
    epochs=20,
    rho_0=0.99,
    base_learning_rate=0.01,
  )


TASKS: dict[str, Callable[[], Task]] = {'digits': digits_task, 'breast_cancer': breast_cancer_task}


def batch_orders(task: Task, seed: int) -> np.ndarray:
  """(total_steps, batch_size) training indices: a fresh permutation every epoch."""
  rng = np.random.default_rng(seed)
  n, b = len(task.train[1]), task.batch_size
  epochs = [rng.permutation(n)[: task.steps_per_epoch * b] for _ in range(task.epochs)]
  return np.concatenate(epochs).reshape(task.total_steps, b)


def make_optimizer(task: Task, method: str, learning_rate: Any, options: dict[str, Any]):
  if method == 'thermostat':
    langevin = coolopt.scale_by_thermostat(learning_rate, task.rho_0, task.total_steps, **options)
  elif method == 'sgd':
    langevin = coolopt.coolmomentum(learning_rate, 0.0, task.total_steps)
  else:
    langevin = coolopt.coolmomentum(learning_rate, task.rho_0, task.total_steps, cooling=method)
  return optax.chain(langevin, coolopt.track_kinetic_temperature())


def diverged(train_loss: np.ndarray, task: Task) -> np.ndarray:
  """Runs whose final training loss is not finite or above half that of chance.

  Chance: predicting the class frequencies of the training split, a loss equal to
  their entropy; a network whose ReLUs all died ends there.
  """
  frequencies = np.bincount(task.train[1]) / len(task.train[1])
  frequencies = frequencies[frequencies > 0]
  chance = -np.sum(frequencies * np.log(frequencies))
  return ~np.isfinite(train_loss) | (train_loss > 0.5 * chance)


def run_grid(task: Task, method: str, options: dict[str, Any]) -> dict[str, np.ndarray]:
  """All learning rates x seeds of one optimizer, run after run."""
  learning_rates = np.asarray(
    [task.base_learning_rate * f for f in LR_FACTORS for _ in SEEDS], np.float32
  )
  seeds = [s for _ in LR_FACTORS for s in SEEDS]
  keys = [jax.random.PRNGKey(s) for s in seeds]
  orders = np.stack([batch_orders(task, s) for s in seeds])
  train_x, train_y = map(jnp.asarray, task.train)
  test_x, test_y = map(jnp.asarray, task.test)
  model = task.model

  def apply(params, batch_stats, x, train):
    variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
    if train and batch_stats:
      logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
      return logits, updates['batch_stats']
    return model.apply(variables, x, train=train), batch_stats

  def loss_fn(params, batch_stats, x, y, train):
    logits, batch_stats = apply(params, batch_stats, x, train)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, batch_stats)

  def init(key):
    variables = model.init(key, train_x[:1], train=False)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    return params, batch_stats, make_optimizer(task, method, 1.0, options).init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, state, indices, learning_rate):
    # The learning rate is an argument: one compilation serves every run.
    opt = make_optimizer(task, method, learning_rate, options)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (_, batch_stats)), grads = grad_fn(
      params, batch_stats, train_x[indices], train_y[indices], True
    )
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trace = {'loss': loss, 'raw_temperature': coolopt.kinetic_temperature(state)}
    if method == 'thermostat':
      thermostat = coolopt.thermostat_state(state)
      trace.update(
        temperature=thermostat.kinetic_temperature,
        target=thermostat.target_temperature,
        rho=thermostat.rho,
      )
    return params, batch_stats, state, trace

  @jax.jit
  def evaluate(params, batch_stats):
    train_loss, _ = loss_fn(params, batch_stats, train_x, train_y, False)
    _, (logits, _) = loss_fn(params, batch_stats, test_x, test_y, False)
    return {'train_loss': train_loss, 'test_accuracy': jnp.mean(jnp.argmax(logits, -1) == test_y)}

  # Run after run and step after step, each step one jitted call: a scan over steps
  # (and vmap over runs, which makes grouped convolutions) ran several times slower
  # on a CPU.
  runs = []
  for learning_rate, key, order in zip(learning_rates, keys, orders, strict=True):
    params, batch_stats, state = jax.jit(init)(key)
    steps = []
    for n, indices in enumerate(order):
      params, batch_stats, state, trace = step(params, batch_stats, state, indices, learning_rate)
      steps.append(trace)
      if n % 20 == 19 and not np.isfinite(trace['loss']):
        break  # Diverged: the rest of the run is not finite either.
    steps += [jax.tree.map(lambda x: np.full_like(x, np.nan), trace)] * (len(order) - len(steps))
    run = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(steps))
    run.update(jax.device_get(evaluate(params, batch_stats)))
    runs.append(run)
  result = jax.tree.map(lambda *xs: np.stack(xs), *runs)
  result = {k: np.asarray(v) for k, v in result.items()}
  if method != 'thermostat':
    # The same moving average as the thermostat's, for comparable temperature paths.
    result['temperature'] = smoothed(result['raw_temperature'], options['smoothing'])
  result['learning_rate'] = learning_rates
  return result


def smoothed(raw: np.ndarray, beta: float) -> np.ndarray:
  out = np.empty_like(raw)
  out[:, 0] = raw[:, 0]
  for n in range(1, raw.shape[1]):
    out[:, n] = beta * out[:, n - 1] + (1.0 - beta) * raw[:, n]
  return out


def hot_steps(task: Task, options: dict[str, Any]) -> int:
  if options.get('hot_steps') is not None:
    return int(options['hot_steps'])
  return int(np.ceil(coolopt.thermostat.DEFAULT_HOT_FRACTION * task.total_steps))


def summarise(task: Task, results: dict[str, dict[str, np.ndarray]], options) -> None:
  k = hot_steps(task, options)
  steps = task.total_steps
  print(
    f'\n{task.name}: {len(task.train[1])} train / {len(task.test[1])} test, batch '
    f'{task.batch_size}, {task.epochs} epochs = {steps} steps, rho_0 {task.rho_0}, T_0 measured '
    f'over {k} steps'
  )
  print(
    '| lr | method | final train loss, mean (min-max) | test accuracy %, mean (min-max) '
    '| steps within 2x of target (off, rho at a bound) | measured/target, min-max |'
  )
  print('|---|---|---|---|---|---|')
  seeds = len(SEEDS)
  learning_rates = [task.base_learning_rate * f for f in LR_FACTORS]
  for i, lr in enumerate(learning_rates):
    runs = slice(i * seeds, (i + 1) * seeds)
    for method in METHODS:
      r = results[method]
      loss, accuracy = r['train_loss'][runs], 100 * r['test_accuracy'][runs]
      failed = diverged(loss, task)
      within = span = ''
      if method == 'thermostat' and not failed.any():
        ratio = r['temperature'][runs, k:] / r['target'][runs, k:]
        rho = r['rho'][runs, k:]
        within = f'{100 * np.mean((ratio >= 0.5) & (ratio <= 2.0)):.0f}%'
        # Off by more than 2x with rho at a bound: no rho could have done better.
        clipped = ((ratio < 0.5) & (rho >= np.float32(task.rho_0))) | ((ratio > 2.0) & (rho == 0))
        within += f' ({100 * np.mean(clipped):.0f}%)'
        span = f'{np.nanmin(ratio):.2f}-{np.nanmax(ratio):.2f}'

      def cell(x, fmt, failed=failed):
        if failed.any():
          return f'diverged ({failed.sum()}/{seeds})'
        return f'{x.mean():{fmt}} ({x.min():{fmt}}-{x.max():{fmt}})'

      print(
        f'| {lr:.3g} | {method} | {cell(loss, ".4f")} | {cell(accuracy, ".1f")} | {within} '
        f'| {span} |'
      )
  for method in METHODS:
    failed = diverged(results[method]['train_loss'], task).reshape(-1, seeds)
    stable = [lr for lr, f in zip(learning_rates, failed, strict=True) if not f.any()]
    first = next((lr for lr, f in zip(learning_rates, failed, strict=True) if f.any()), None)
    print(
      f'{method}: every seed converges up to lr {max(stable, default=float("nan")):.3g}; '
      + ('no seed diverges on the grid' if first is None else f'first divergence at lr {first:.3g}')
    )


def plot(task: Task, results: dict[str, dict[str, np.ndarray]], options, out: str) -> None:
  from matplotlib.figure import Figure

  seeds = len(SEEDS)
  figure = Figure(figsize=(13, 3.8))
  figure.subplots_adjust(left=0.06, right=0.99, bottom=0.14, top=0.84, wspace=0.28)
  axes = figure.subplots(1, 3)
  learning_rates = [task.base_learning_rate * f for f in LR_FACTORS]
  for method, marker in zip(METHODS, ('o', 's', '^'), strict=True):
    r = results[method]
    failed = diverged(r['train_loss'], task).reshape(len(LR_FACTORS), seeds)
    for ax, key, scale in ((axes[0], 'train_loss', 1.0), (axes[1], 'test_accuracy', 100.0)):
      values = scale * r[key].reshape(len(LR_FACTORS), seeds)
      values = np.where(failed.any(1, keepdims=True), np.nan, values)  # diverged: not drawn
      mean = np.nanmean(values, 1)
      spread = [
        np.maximum(0, mean - np.nanmin(values, 1)),
        np.maximum(0, np.nanmax(values, 1) - mean),
      ]
      ax.errorbar(learning_rates, mean, yerr=spread, marker=marker, capsize=3, label=method)
  axes[0].set_yscale('log')
  axes[0].set_title('final training loss (diverged: not drawn)')
  axes[1].set_title('test accuracy (%)')
  for ax in axes[:2]:
    ax.set_xscale('log')
    ax.minorticks_off()
    ax.set_xticks(learning_rates, [f'{lr:.2g}' for lr in learning_rates], fontsize=8)
    ax.set_xlabel('learning rate')
    ax.grid(True, alpha=0.3)
  axes[0].legend()
  ax = axes[2]
  steps = np.arange(task.total_steps)
  colors = [f'C{i}' for i in range(len(LR_FACTORS))]
  thermostat_failed = diverged(results['thermostat']['train_loss'], task).reshape(-1, seeds)
  for i, color in enumerate(colors):
    if thermostat_failed[i].any():
      continue  # Only the rates at which the thermostat converges.
    run = i * seeds  # seed 0
    lr = learning_rates[i]
    r = results['thermostat']
    ax.plot(steps, r['temperature'][run], color=color, label=f'lr {lr:.3g}')
    ax.plot(steps, r['target'][run], color=color, linestyle=':')
    if not diverged(results['exponential']['train_loss'][run], task):
      ax.plot(steps, results['exponential']['temperature'][run], color=color, alpha=0.35)
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_title('temperature, seed 0: thermostat, its target (dotted), clock (faint)', fontsize=8)
  ax.legend(fontsize=7, loc='lower left')
  ax.grid(True, alpha=0.3)
  figure.suptitle(
    f'{task.name}: exponential clock, thermostat and SGD at lr/2, 3 seeds per learning rate'
  )
  figure.savefig(os.path.join(out, f'thermostat_{task.name}.png'), dpi=90)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--datasets', nargs='+', default=list(TASKS), choices=list(TASKS))
  parser.add_argument('--gain', type=float, default=coolopt.thermostat.DEFAULT_GAIN)
  parser.add_argument('--smoothing', type=float, default=coolopt.thermostat.DEFAULT_SMOOTHING)
  parser.add_argument('--hot-steps', type=int, default=None)
  parser.add_argument('--max-step', type=float, default=coolopt.thermostat.DEFAULT_MAX_STEP)
  parser.add_argument('--target-path', default='exponential')
  parser.add_argument('--out', default=None, help='folder for the figures and traces')
  parser.add_argument(
    '--load', default=None, help='summarise and plot the traces saved in this folder instead'
  )
  args = parser.parse_args()
  options = {
    'gain': args.gain,
    'smoothing': args.smoothing,
    'hot_steps': args.hot_steps,
    'max_step': args.max_step,
    'target_path': args.target_path,
  }
  print(machine())
  print(f'thermostat options: {options}')
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  for name in args.datasets:
    task = TASKS[name]()
    results = {}
    if args.load:
      with np.load(os.path.join(args.load, f'{name}.npz')) as saved:
        for key in saved.files:
          method, field = key.split('/')
          results.setdefault(method, {})[field] = saved[key]
    for method in METHODS if not args.load else ():
      start = time.perf_counter()
      results[method] = run_grid(task, method, options)
      runs = len(LR_FACTORS) * len(SEEDS)
      print(f'{name} {method}: {time.perf_counter() - start:.0f} s for {runs} runs', flush=True)
    summarise(task, results, options)
    if args.out:
      plot(task, results, options, args.out)
      if not args.load:
        np.savez_compressed(
          os.path.join(args.out, f'{name}.npz'),
          **{f'{m}/{k}': v for m, r in results.items() for k, v in r.items()},
        )


if __name__ == '__main__':
  main()
