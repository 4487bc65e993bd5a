"""The trainer as separate processes: several JAX processes over gloo (and one process
resuming their run), kill -9 inside an epoch and resume, and a non-finite batch in the
middle of a real epoch.

The command-line runs go through `python -m examples.main` in subprocesses, each with a
timeout and killed with its whole process group if anything fails, so that a hung
collective cannot hang the test session. They share a persistent compilation cache.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from examples import checkpoints, input_pipeline, train
from tests.helpers import REPO_ROOT, TIMING, read_rows, short_digits

TIMEOUT = 300  # Seconds for any one subprocess.
# Fields that measure time, not training.

# The CIFAR-10 recipe with the small CNN (BatchNorm included) on a synthetic training set
# of four global batches: the global batches are a function of (seed, epoch) alone, so
# one process and two must train alike up to the order of the float sums.
_CONFIG = """
from examples.configs import cifar10_resnet20


def get_config():
  config = cifar10_resnet20.get_config()
  config.model = 'cnn'
  config.dataset = 'synthetic'
  config.image_size = 8
  config.batch_size = 16
  config.num_epochs = 2
  config.steps_per_eval = 1
  config.progress_bar = False
  config.eval_train = False
  config.synthetic_train_size = 64
  config.synthetic_test_size = 16
  return config
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(num_devices: int, *xla_flags: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(
    XLA_FLAGS=' '.join((f'--xla_force_host_platform_device_count={num_devices}', *xla_flags)),
    TF_CPP_MIN_LOG_LEVEL='3',
  )
  return env


def _main(config: str, workdir, *flags: str) -> list[str]:
  return [
    sys.executable,
    '-m',
    'examples.main',
    f'--config={config}',
    f'--workdir={workdir}',
    # absl's INFO logs, which the tests read (the processes, the resume).
    '--verbosity=0',
    *flags,
  ]


@contextlib.contextmanager
def _processes():
  """Starts processes with `start(args, env, log)`; kills what is left on the way out."""
  started = []

  def start(args, env, log):
    process = subprocess.Popen(
      args,
      cwd=REPO_ROOT,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    started.append(process)
    return process

  try:
    yield start
  finally:
    for process in started:
      if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait(process, log_path, deadline: float) -> None:
  try:
    returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pytest.fail(f'{process.args} ran past {TIMEOUT} s:\n{_tail(log_path)}')
  assert returncode == 0, f'{process.args} exited with {returncode}:\n{_tail(log_path)}'


def _log(path) -> str:
  with open(path) as f:
    return f.read()


def _tail(path) -> str:
  return _log(path)[-3000:]


def _run(start, args, env, log_path) -> None:
  with open(log_path, 'w') as log:
    process = start(args, env, log)
  _wait(process, log_path, time.monotonic() + TIMEOUT)


def test_two_processes_train_as_one_and_one_resumes_them(tmp_path):
  config = tmp_path / 'cnn_synthetic.py'
  config.write_text(_CONFIG)
  shared, single = tmp_path / 'two_processes', tmp_path / 'one_process'
  # Compiling dominates; less LLVM optimisation saves a fifth of it, and both runs
  # compile alike.
  fast_compile = '--xla_backend_optimization_level=0'
  address = f'--coordinator_address=127.0.0.1:{_free_port()}'
  with _processes() as start:
    # Both processes write to the same workdir, as hosts on shared storage would.
    processes = []
    for index in range(2):
      log_path = tmp_path / f'process{index}.log'
      with open(log_path, 'w') as log:
        flags = (address, '--num_processes=2', f'--process_id={index}')
        processes.append(
          (
            start(_main(str(config), shared, *flags), _env(4, fast_compile), log),
            log_path,
          )
        )
    deadline = time.monotonic() + TIMEOUT
    for process, log_path in processes:
      _wait(process, log_path, deadline)
    _run(start, _main(str(config), single), _env(8, fast_compile), tmp_path / 'single.log')
    # The two processes' run, as a crash after its first epoch would have left it,
    # resumed by one process.
    resumed = tmp_path / 'resumed'
    shutil.copytree(shared, resumed)
    shutil.rmtree(resumed / checkpoints.CHECKPOINT_DIR / '8')
    _run(
      start,
      _main(str(config), resumed),
      _env(8, fast_compile),
      tmp_path / 'resumed.log',
    )

  assert 'Process 1 of 2, 4 local devices of 8' in _log(tmp_path / 'process1.log')
  shared_rows, single_rows = read_rows(shared), read_rows(single)
  assert [row['epoch'] for row in shared_rows] == [1, 2]
  assert [row['epoch'] for row in single_rows] == [1, 2]
  assert [row['step'] for row in single_rows] == [4, 8]
  for shared_row, single_row in zip(shared_rows, single_rows, strict=True):
    assert shared_row['step'] == single_row['step']
    for key in ('train_loss', 'test_loss'):
      np.testing.assert_allclose(shared_row[key], single_row[key], rtol=1e-4, err_msg=key)
  assert 'Resuming from the checkpoint after epoch 1' in _log(tmp_path / 'resumed.log')
  resumed_rows = read_rows(resumed)
  assert resumed_rows[0] == shared_rows[0]
  for key in ('train_loss', 'test_loss', 'kinetic_temperature'):
    np.testing.assert_allclose(resumed_rows[1][key], shared_rows[1][key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(resumed_rows[1][key], single_rows[1][key], rtol=1e-4, err_msg=key)
  # Process 1 wrote no metrics of its own: one file, one row per epoch, one event file
  # (named by its time, host and process), and no stray temporary files beside them.
  assert _listing(shared) == _listing(single)
  assert _listing(shared).count(EVENT_FILE) == 1
  assert (shared / checkpoints.CHECKPOINT_DIR / '8').exists()


EVENT_FILE = 'events.out.tfevents.*'


def _listing(workdir) -> list[str]:
  """The files of `workdir`, TensorBoard's event files named `EVENT_FILE`."""
  return sorted(
    EVENT_FILE if name.startswith(EVENT_FILE[:-1]) else name for name in os.listdir(workdir)
  )


def _checkpoint_steps(workdir) -> list[int]:
  """The steps of the finished checkpoints in `workdir` (orbax renames them when done)."""
  directory = workdir / checkpoints.CHECKPOINT_DIR
  if not directory.exists():
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _checkpoint(workdir, step: int) -> dict:
  return ocp.StandardCheckpointer().restore(
    (workdir / checkpoints.CHECKPOINT_DIR / str(step) / 'default').absolute()
  )


def test_kill_9_mid_epoch_and_rerun_ends_bitwise_as_an_uninterrupted_run(tmp_path):
  config = 'examples/configs/digits.py'
  steps_per_epoch, num_epochs = 12, 3
  overrides = (
    f'--config.num_epochs={num_epochs}',
    f'--config.steps_per_epoch={steps_per_epoch}',
    '--config.steps_per_eval=2',
    '--config.progress_bar=False',
    '--config.checkpoint_every_steps=5',
    '--config.optimizer=metropolis_coolmomentum',
  )
  env = _env(8)
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  # Killed once a checkpoint at or past a random step is on disk: mostly inside an epoch.
  kill_after = int(np.random.default_rng().integers(1, (num_epochs - 1) * steps_per_epoch))
  with _processes() as start:
    _run(start, _main(config, straight, *overrides), env, tmp_path / 'straight.log')

    with open(tmp_path / 'killed.log', 'w') as log:
      process = start(_main(config, killed, *overrides), env, log)
    deadline = time.monotonic() + TIMEOUT
    while not any(step >= kill_after for step in _checkpoint_steps(killed)):
      assert process.poll() is None, _tail(tmp_path / 'killed.log')
      assert time.monotonic() < deadline, f'no checkpoint past step {kill_after}'
      time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=TIMEOUT) == -signal.SIGKILL
    # The metrics never run ahead of the checkpoints.
    rows_at_kill = read_rows(killed)
    last_step = _checkpoint_steps(killed)[-1]
    assert all(row['step'] <= last_step for row in rows_at_kill), (rows_at_kill, last_step)
    assert last_step < num_epochs * steps_per_epoch, 'the run ended before it was killed'

    _run(start, _main(config, killed, *overrides), env, tmp_path / 'rerun.log')

  rerun_log = _log(tmp_path / 'rerun.log')
  assert 'Resuming from the checkpoint after epoch' in rerun_log, (kill_after, rerun_log[-2000:])
  killed_rows, straight_rows = read_rows(killed), read_rows(straight)
  assert [row['epoch'] for row in killed_rows] == list(range(1, num_epochs + 1))
  for killed_row, straight_row in zip(killed_rows, straight_rows, strict=True):
    assert {k: v for k, v in killed_row.items() if k not in TIMING} == {
      k: v for k, v in straight_row.items() if k not in TIMING
    }, kill_after
  # The final checkpoints hold bitwise the same state and position; only the training
  # time they record differs, and so the checksum over it.
  final = num_epochs * steps_per_epoch
  killed_state, straight_state = _checkpoint(killed, final), _checkpoint(straight, final)
  assert killed_state.pop('wall_time') > 0 and straight_state.pop('wall_time') > 0
  for state in (killed_state, straight_state):
    assert state.pop('checksum').shape == (32,)
  # The record of the metrics rows holds their timings too: equal but for those.
  records = [json.loads(bytes(state.pop('record'))) for state in (killed_state, straight_state)]
  for record in records:
    record['rows'] = [{k: v for k, v in row.items() if k not in TIMING} for row in record['rows']]
  assert records[0] == records[1]
  assert jax.tree.structure(killed_state) == jax.tree.structure(straight_state)
  for a, b in zip(jax.tree.leaves(killed_state), jax.tree.leaves(straight_state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_nan_batch_mid_epoch_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
  # One NaN pixel in the second step of the first epoch, through the whole trainer:
  # that step is skipped and counted, and the run goes on with finite values.
  create_input_iter = input_pipeline.create_input_iter

  def poisoned(*, split, epoch=0, **kwargs):
    for i, batch in enumerate(create_input_iter(split=split, epoch=epoch, **kwargs)):
      if split == 'train' and epoch == 0 and i == 1:
        batch = {**batch, 'image': batch['image'].copy()}
        batch['image'][0, 0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(input_pipeline, 'create_input_iter', poisoned)
  state = train.train_and_evaluate(short_digits(num_epochs=2), str(tmp_path))
  rows = read_rows(tmp_path)
  assert [row['skipped_steps'] for row in rows] == [1, 0]
  assert [row['step'] for row in rows] == [3, 6]
  for row in rows:
    for key in ('train_loss', 'test_loss', 'kinetic_temperature'):
      assert np.isfinite(row[key]), (key, row)
  assert rows[1]['train_loss'] < rows[0]['train_loss']
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))
