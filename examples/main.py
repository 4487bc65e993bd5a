"""Trains one config: parses flags, sets up (multi-process) JAX and calls the trainer.

  python -m examples.main --config examples/configs/digits.py --workdir /tmp/digits
  python -m examples.main --config examples/configs/cifar10_resnet20.py \
    --config.num_epochs=1 --workdir /tmp/cifar10

Several processes (hosts, or processes on one machine talking over loopback):

  python -m examples.main ... --coordinator_address=localhost:1234 \
    --num_processes=2 --process_id=0   # and --process_id=1 in a second shell

Without these flags JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, ...)
sets them where it applies; otherwise the run is a single process. Each process says
whom it waits for while the others start, and gives up after
`--initialization_timeout` seconds (300) with a message and exit status 1.

A top-level field given on the command line is used for the optimizer trained, even
where its recipe in `config.optimizers` sets another value (`--config.optimizer=adam
--config.learning_rate=0.05` trains Adam at 0.05; see `examples.schema.prefer_given`).
A run that diverges (`config.divergence_steps`) or meets a workdir held by another run
exits with status 1 and a message.

Output: on a terminal, a progress bar per epoch; one line per epoch (train loss, test
accuracy or perplexity, rho, kinetic temperature, seconds) from process 0. The
libraries' logs (orbax's checkpointing, JAX's backends, absl) show from WARNING on;
absl's verbosity flag shows more: `-v 0` (`--verbosity=0`) their INFO logs and every
epoch's whole metrics row, `-v 1` DEBUG. The workdir holds TensorBoard event
files beside metrics.jsonl: `tensorboard --logdir WORKDIR`.
"""

import os
import sys
import threading
from collections.abc import Callable, MutableMapping

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from examples import divergence, schema, train, workdir

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and curves.')
config_flags.DEFINE_config_file(
  'config', None, 'A config file, e.g. examples/configs/digits.py.', lock_config=True
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'Index of this process, from 0.')
flags.DEFINE_integer(
  'initialization_timeout',
  300,
  'Seconds a process of a multi-process run waits for the others to start before it gives up.',
)
flags.mark_flags_as_required(['config', 'workdir'])

# XLA's CPU backend hands the kernel gradient of a convolution (itself a convolution whose
# window is the whole image) to YNNPACK, which runs it 10-20 times slower than the Eigen
# convolution XLA uses otherwise: most of a ResNet-20 train step. Without YNNPACK for
# convolutions the kernel gradients are summed in another order: they differ by rounding.
# Other backends ignore xla_cpu flags.
CPU_XLA_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'}


def set_xla_flags(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds `CPU_XLA_FLAGS` to `XLA_FLAGS`, but not a flag that `XLA_FLAGS` sets already.

  XLA reads `XLA_FLAGS` when JAX starts its backends: call this before anything
  touches the devices.
  """
  given = environ.get('XLA_FLAGS', '')
  added = [
    f'--{name}={value}' for name, value in CPU_XLA_FLAGS.items() if f'--{name}=' not in given
  ]
  environ['XLA_FLAGS'] = ' '.join([given, *added]).strip()


def _give_up(message: str) -> None:
  # JAX's own timeout aborts the process (SIGABRT) without a word: say why and exit.
  print(message, file=sys.stderr, flush=True)
  os._exit(1)


def initialize_distributed(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  timeout: float = 300,
  give_up: Callable[[str], None] = _give_up,
) -> None:
  """Starts multi-process JAX when flags or a detected cluster ask for it.

  Must run before anything touches the devices. With the flags given, prints whom this
  process waits for, and calls `give_up(message)` (which exits) if the others have not
  all started within `timeout` seconds.
  """
  # CPU processes exchange collectives over gloo (TCP), so that several processes on
  # one machine, or CPU-only hosts, can train together; other backends ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  given = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in given):
    if process_id == 0 and num_processes and num_processes > 1:
      others = ', '.join(map(str, range(1, num_processes)))
      waiting = f'processes {others} of {num_processes}'
    else:
      waiting = f'process 0 (the coordinator) at {coordinator_address}'
    print(
      f'Process {process_id}: waiting up to {timeout:g} s for {waiting} to start '
      '(--initialization_timeout).',
      file=sys.stderr,
      flush=True,
    )
    timer = threading.Timer(
      timeout,
      give_up,
      [
        f'Process {process_id}: {waiting} did not start within --initialization_timeout='
        f'{timeout:g} s; giving up. Start every process with the same --coordinator_address='
        f'{coordinator_address} and --num_processes={num_processes}, each with its own '
        '--process_id.'
      ],
    )
    timer.daemon = True
    timer.start()
    try:
      # JAX's timeout is left longer: its expiry aborts the process without a message.
      jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=int(timeout) + 60,
      )
    finally:
      timer.cancel()
    return
  try:
    # With nothing given, JAX looks for a cluster it knows and fails if none is found.
    jax.distributed.initialize()
  except ValueError as error:
    logging.info('No cluster detected (%s); running as a single process.', error)


def set_log_levels(verbosity_given: bool) -> None:
  """Library logs from WARNING on, unless absl's `--verbosity` was given.

  absl's own default verbosity is INFO, at which orbax logs every step of every
  checkpoint.
  """
  if not verbosity_given:
    logging.set_verbosity(logging.WARNING)


def setup(flag_values: flags.FlagValues = FLAGS) -> None:
  """What each entry point (main, compare, lr_find) does before it touches a device.

  Sets `CPU_XLA_FLAGS` (`set_xla_flags`); sets the log levels
  (`set_log_levels`); starts multi-process JAX (`initialize_distributed`) from the
  flags `coordinator_address`, `num_processes` and `process_id`.
  """
  set_xla_flags()
  set_log_levels(flag_values['verbosity'].present > 0)
  initialize_distributed(
    flag_values.coordinator_address,
    flag_values.num_processes,
    flag_values.process_id,
    timeout=flag_values.initialization_timeout,
  )
  logging.info(
    'Process %d of %d, %d local devices of %d: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )


def given_fields(flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """The config fields given on the command line (`--config.<field>=...`)."""
  return list(config_flags.get_override_values(flag_values['config']))


def exit_on_run_errors(run: Callable[[], None]) -> None:
  """Runs `run()`; a diverged run or a held workdir exits with status 1 and its message
  (no traceback: neither is a bug)."""
  try:
    run()
  except (divergence.DivergedError, workdir.WorkdirLockedError) as error:
    sys.exit(f'{type(error).__name__}: {error}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  setup()
  schema.prefer_given(FLAGS.config, given_fields(), (FLAGS.config.optimizer,))
  exit_on_run_errors(lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir))


if __name__ == '__main__':
  app.run(main)
