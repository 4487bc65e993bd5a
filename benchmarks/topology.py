"""The same run on 1 process of 8 devices, 2 of 4 and 8 of 1: per-epoch losses side by side.

  python -m benchmarks.topology [--config examples/configs/digits.py] \
    [--epochs 2] [--steps 6]

Each topology trains the config into its own workdir with `python -m examples.main`
(processes on this machine talking over gloo, CPU devices). The global batches are a
function of (seed, epoch) alone, so the losses agree up to the order of float sums;
the last column is the largest relative difference to the 1x8 run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

TOPOLOGIES = ((1, 8), (2, 4), (8, 1))
KEYS = ('train_loss', 'test_loss')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run(config: str, workdir: str, processes: int, devices: int, overrides: list[str]) -> list:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', TF_CPP_MIN_LOG_LEVEL='3'
  )
  address = f'127.0.0.1:{_free_port()}'
  commands = []
  for index in range(processes):
    flags = []
    if processes > 1:
      flags = [f'--coordinator_address={address}', f'--num_processes={processes}']
      flags.append(f'--process_id={index}')
    commands.append(
      [
        sys.executable,
        '-m',
        'examples.main',
        f'--config={config}',
        f'--workdir={workdir}',
        *overrides,
        *flags,
      ]
    )
  started = [
    subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for c in commands
  ]
  for process in started:
    _, stderr = process.communicate()
    if process.returncode:
      raise RuntimeError(stderr[-3000:])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='examples/configs/digits.py')
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--steps', type=int, default=6, help='steps per epoch')
  args = parser.parse_args()
  overrides = [
    f'--config.num_epochs={args.epochs}',
    f'--config.steps_per_epoch={args.steps}',
    '--config.progress_bar=False',
  ]
  with tempfile.TemporaryDirectory() as root:
    results = {
      (p, d): run(args.config, os.path.join(root, f'{p}x{d}'), p, d, overrides)
      for p, d in TOPOLOGIES
    }
  reference = results[TOPOLOGIES[0]]
  print('| processes x devices | epoch | ' + ' | '.join(KEYS) + ' | max rel. diff to 1x8 |')
  print('|---|---:|' + '---:|' * (len(KEYS) + 1))
  for (p, d), rows in results.items():
    for row, ref in zip(rows, reference, strict=True):
      diff = max(abs(row[k] - ref[k]) / abs(ref[k]) for k in KEYS)
      values = ' | '.join(f'{row[k]:.6f}' for k in KEYS)
      print(f'| {p}x{d} | {row["epoch"]} | {values} | {diff:.1e} |')


if __name__ == '__main__':
  main()
