"""The AWD-LSTM language model on the offline `python_docs` corpus: CoolMomentum against SGD.

Trains `examples.language_model.AWDLSTM` (a small configuration by default, so that a CPU
finishes in minutes) with the reference's recipe around the optimizer: gradients clipped to
a global norm of 0.25, coupled weight decay 1.2e-6 on every parameter, AR 2 and TAR 1,
batch 20 in BPTT windows of 70 with the LSTM state carried from window to window and reset
at every epoch. The optimizers are the authors' CoolMomentum (lr 0.1, rho_0 0.99, cooled to
0 over the run) and the reference's SGD (lr 30, without its switch to ASGD). Validation
perplexity is measured after every epoch with the state carried over the split in 10
streams, as the reference evaluates.

It prints one row per epoch and optimizer, the train-step throughput in tokens per second,
and the optimizer's share of a step (`tx.update` + `optax.apply_updates` alone, timed on the
same parameters, over the whole step); with `--out DIR` it writes `lstm_lm.json` and
`lstm_lm.png` (validation perplexity and kinetic temperature per epoch) there.

From the repository root (with `PYTHONPATH=.` unless coolopt is installed):

  python -m benchmarks.lstm_lm --epochs 10 --embedding 96 --hidden 192 --out docs/_static
  python -m benchmarks.lstm_lm --epochs 10 --embedding 96 --hidden 192 --cooling-epochs 500 \
    --optimizers coolmomentum   # the first 10 epochs of the authors' 500-epoch cooling
  python -m benchmarks.lstm_lm --embedding 400 --hidden 1150 --epochs 1   # the reference's size
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coolopt
from benchmarks.machine import machine
from examples import language_model as lm
from examples import text_pipeline as tp

BATCH_SIZE = 20
EVAL_BATCH_SIZE = 10
BPTT = 70
CLIP = 0.25
WEIGHT_DECAY = 1.2e-6
ALPHA, BETA = 2.0, 1.0


def make_optimizer(name: str, total_steps: int) -> optax.GradientTransformation:
  if name == 'coolmomentum':
    optimizer = coolopt.coolmomentum(0.1, 0.99, total_steps)
  else:
    optimizer = optax.sgd(30.0)
  # The reference clips the gradient, then its SGD adds the decay and steps.
  return optax.chain(
    optax.clip_by_global_norm(CLIP),
    optax.add_decayed_weights(WEIGHT_DECAY),
    optimizer,
    coolopt.track_kinetic_temperature(),
  )


def make_steps(model: lm.AWDLSTM, tx: optax.GradientTransformation):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, carry, batch, key):
    (_, (loss, _, carry)), grads = jax.value_and_grad(lm.window_loss, argnums=1, has_aux=True)(
      model, params, carry, batch, train=True, rng=key, alpha=ALPHA, beta=BETA
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, carry, loss, coolopt.kinetic_temperature(opt_state)

  @jax.jit
  def eval_step(params, carry, batch):
    _, (loss, count, carry) = lm.window_loss(model, params, carry, batch, train=False)
    return loss * count, count, carry

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def optimizer_step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return train_step, eval_step, optimizer_step


def perplexity(eval_step, model, params, streams) -> float:
  carry = lm.initial_carry(model, streams.shape[0])
  total, count = 0.0, 0.0
  for batch in tp.bptt_windows(streams, BPTT):
    loss_sum, n, carry = eval_step(params, carry, batch)
    total += float(loss_sum)
    count += float(n)
  return math.exp(total / count)


def run(name: str, args, corpus: tp.Corpus) -> dict:
  model = lm.AWDLSTM(
    corpus.vocab_size,
    embedding_size=args.embedding,
    hidden_size=args.hidden,
    num_layers=args.layers,
    input_dropout=0.4,
    hidden_dropout=0.25,
  )
  train = tp.batchify(corpus.train, BATCH_SIZE)
  valid = tp.batchify(corpus.valid, EVAL_BATCH_SIZE)
  steps_per_epoch = tp.num_windows(train, BPTT)
  tx = make_optimizer(name, (args.cooling_epochs or args.epochs) * steps_per_epoch)
  train_step, eval_step, optimizer_step = make_steps(model, tx)
  init_key, dropout_key = jax.random.split(jax.random.key(args.seed))
  params = jax.jit(
    lambda: model.init(init_key, train[:1, :2], lm.initial_carry(model, 1), train=False)
  )()['params']
  opt_state = tx.init(params)
  rows, step_seconds = [], []
  step = 0
  start = time.perf_counter()
  for epoch in range(args.epochs):
    carry = lm.initial_carry(model, BATCH_SIZE)  # the reference resets the state every epoch
    losses, temperatures = [], []
    for batch in tp.bptt_windows(train, BPTT):
      tick = time.perf_counter()
      params, opt_state, carry, loss, temperature = train_step(
        params, opt_state, carry, batch, jax.random.fold_in(dropout_key, step)
      )
      loss = float(loss)
      if step > 0:  # the first step compiles
        step_seconds.append(time.perf_counter() - tick)
      losses.append(loss)
      temperatures.append(float(temperature))
      step += 1
    row = {
      'epoch': epoch + 1,
      'train_loss': float(np.mean(losses)),
      'valid_perplexity': perplexity(eval_step, model, params, valid),
      'kinetic_temperature': float(np.mean(temperatures)),
      'seconds': time.perf_counter() - start,
    }
    rows.append(row)
    print(
      f'{name:>12} epoch {row["epoch"]:3d}: train loss {row["train_loss"]:.3f}, '
      f'valid perplexity {row["valid_perplexity"]:8.2f}, '
      f'kinetic temperature {row["kinetic_temperature"]:.3e}, {row["seconds"]:.0f} s',
      flush=True,
    )
  # The optimizer alone, on gradients shaped like the parameters.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  params, opt_state = jax.block_until_ready(optimizer_step(params, opt_state, grads))
  optimizer_seconds = []
  for _ in range(20):
    tick = time.perf_counter()
    params, opt_state = jax.block_until_ready(optimizer_step(params, opt_state, grads))
    optimizer_seconds.append(time.perf_counter() - tick)
  step_median = statistics.median(step_seconds)
  return {
    'rows': rows,
    'steps_per_epoch': steps_per_epoch,
    'tokens_per_sec': BATCH_SIZE * BPTT / step_median,
    'step_ms': 1e3 * step_median,
    'optimizer_ms': 1e3 * statistics.median(optimizer_seconds),
    'parameters': sum(x.size for x in jax.tree.leaves(params)),
  }


def plot(results: dict, path: str) -> None:
  from matplotlib.figure import Figure

  figure = Figure(figsize=(10, 3.8))
  figure.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
  axes = figure.subplots(1, 2)
  for name, result in results.items():
    epochs = [row['epoch'] for row in result['rows']]
    axes[0].plot(epochs, [row['valid_perplexity'] for row in result['rows']], '.-', label=name)
    axes[1].plot(epochs, [row['kinetic_temperature'] for row in result['rows']], '.-', label=name)
  axes[0].set_title('validation perplexity')
  axes[1].set_title('kinetic temperature (mean dx²)')
  for ax in axes:
    ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.grid(True, alpha=0.3)
  axes[1].legend(loc='lower left', fontsize='small')
  figure.savefig(path, dpi=100)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--embedding', type=int, default=128)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--layers', type=int, default=3)
  parser.add_argument('--seed', type=int, default=141)
  parser.add_argument(
    '--cooling-epochs',
    type=int,
    default=None,
    help="CoolMomentum's cooling length in epochs (default --epochs); 500 is the authors' run",
  )
  parser.add_argument('--optimizers', nargs='+', default=['coolmomentum', 'sgd'])
  parser.add_argument('--out', default=None, help='directory for NAME.json and NAME.png')
  parser.add_argument('--name', default='lstm_lm', help="the files' name in --out")
  args = parser.parse_args()
  print(machine())
  corpus = tp.load_corpus('python_docs')
  print(
    f'python_docs: {corpus.vocab_size} words, {len(corpus.train)} training tokens; '
    f'model {args.embedding}/{args.hidden}x{args.layers}, batch {BATCH_SIZE}, bptt {BPTT}'
  )
  results = {name: run(name, args, corpus) for name in args.optimizers}
  print('| optimizer | parameters | final valid perplexity | best | tokens/s | optimizer share |')
  print('|---|---:|---:|---:|---:|---:|')
  for name, result in results.items():
    finals = [row['valid_perplexity'] for row in result['rows']]
    print(
      f'| {name} | {result["parameters"]:,} | {finals[-1]:.1f} | {min(finals):.1f} '
      f'| {result["tokens_per_sec"]:,.0f} | {result["optimizer_ms"] / result["step_ms"]:.1%} |'
    )
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f'{args.name}.json'), 'w') as f:
      json.dump({'machine': machine(), 'args': vars(args), 'results': results}, f, indent=2)
    plot(results, os.path.join(args.out, f'{args.name}.png'))


if __name__ == '__main__':
  main()
