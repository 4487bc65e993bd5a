r"""A tuned comparison: each optimizer at its best setting on a validation split, over seeds.

  python -m examples.sweep --config examples/configs/digits.py --workdir /tmp/sweep \
    [--optimizers coolmomentum,momentum,adam,sgd_sa] [--seeds 3] [--num_rates 5] \
    [--rate_span 30] [--rho_0s 0.9,0.99,0.999] [--validation_fraction 0.15] \
    [--center recipe|lr_find] [--memory_limit_gib 0] [--runs_per_vmap 0]

For each optimizer of `--optimizers` (its recipe from `config.optimizers`, as
examples.compare trains it), a grid of settings: `--num_rates` learning rates spaced
geometrically over `--rate_span` times around the recipe's rate, or with
`--center=lr_find` around the suggestion of examples.lr_find (which takes its own flags:
--num_steps, --lr_min, --lr_max, --rule, --smoothing, --divergence_threshold), for
'sgd_sa', which has no rate, a scale of its multipliers around 1; times `--rho_0s` for
the CoolMomentum optimizers, times `--seeds` seeds. All the runs of one optimizer train
together in one compiled program: the train state carries a leading run axis, the step is
`jax.vmap`ped over it, and the run axis is sharded over the devices (`jax.jit` of a
`shard_map`), so that 8 devices train 8 times the runs. Each run has its own
hyperparameters (traced values inside the one program), its own initialisation, dropout
and Metropolis keys (from its seed, as the trainer derives them) and its own batch order
(that of its seed).

Selection is honest: the last `--validation_fraction` of the training split (a fixed
function of the data set, not of the seed; `config.validation_fraction`, see
examples/input_pipeline.py) is held out; the runs train on the rest, and each
optimizer's setting is the one of best mean validation accuracy over seeds among the
settings none of whose runs diverged (a non-finite loss in the last epoch). The test split
is only reported, at the chosen setting: mean and standard deviation over seeds.

Before anything compiles, the step's memory on one device is estimated from its traced
program (`peak_bytes`), and a grid whose estimate exceeds 80% of the device's memory
(or of `--memory_limit_gib`) is refused with the estimate and the largest grid that fits.

A sweep is resumable as the trainer is: the workdir is locked while it runs, and each
optimizer's runs keep their config.json and a checkpoint at every epoch's end in
<optimizer>/ (all runs' states and records, checksummed). A killed sweep reruns to the
same numbers; a rerun with another config or grid is refused with the fields named.

The workdir receives sweep.json (per optimizer: `selected`, `test_accuracy_mean`,
`test_accuracy_std`, `num_seeds`, `train_loss_mean`, `grid` with every setting's
numbers), sweep.md (the table), heatmap.png (CoolMomentum's learning rate x rho_0, mean
validation and test accuracy, diverged cells marked 'div') and curves.png (each
optimizer's chosen setting, mean over seeds with a band of one standard deviation), and
TensorBoard event files per run in <optimizer>/<run_name>/ (`tensorboard --logdir WORKDIR`).

Image classifiers are swept (any of examples/input_pipeline.py's data sets); a language
model is refused."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from jax.extend import core as jaxpr_core
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from examples import (
  budget,
  checkpoints,
  compare,
  logs,
  lr_find,
  optimizers,
  schema,
  search,
  tasks,
  train,
)
from examples import main as trainer_main
from examples import workdir as workdir_files

FLAGS = flags.FLAGS

SEARCHES = ('grid', 'random')

flags.DEFINE_integer('seeds', 3, 'Seeds per setting (config.seed, config.seed + 1, ...).')
flags.DEFINE_integer('num_rates', 5, 'Learning rates per optimizer.')
flags.DEFINE_float('rate_span', 30.0, 'Ratio of the largest to the smallest learning rate.')
flags.DEFINE_list('rho_0s', ['0.9', '0.99', '0.999'], "CoolMomentum's rho_0 values.")
flags.DEFINE_float(
  'validation_fraction', 0.15, 'Fraction of the training split held out for selection.'
)

flags.DEFINE_enum(
  'center',
  'recipe',
  ['recipe', 'lr_find'],
  "What the rates span around: the recipe's rate, or examples.lr_find's suggestion (the "
  "range test takes lr_find's flags: --num_steps, --lr_min, --lr_max, --rule, ...).",
)
flags.DEFINE_float(
  'memory_limit_gib',
  0.0,
  "GiB of memory of one device, 80% of which a grid's estimate must fit in (0: the device's "
  "own; on CPU the host's memory over the local devices).",
)
flags.DEFINE_enum(
  'search',
  'grid',
  list(SEARCHES),
  'grid: the rates around a centre (x rho_0s); random: --trials settings per optimizer drawn '
  'from its search space (examples/search.py).',
)
flags.DEFINE_integer('trials', 32, 'Settings per optimizer of a random search (N).')
flags.DEFINE_integer('search_seed', 0, "The seed of a random search's draws.")
flags.DEFINE_integer(
  'runs_per_vmap', 0, 'Runs a device steps at once, to hold fewer in memory (0: all in one vmap).'
)

RUN_AXIS = 'runs'
# The per-run values every sweep program takes; a random search adds the fields it samples.
RUN_FIELDS = ('learning_rate', 'rho_0', 'seed', 'seed_index')
CENTERS = ('recipe', 'lr_find')
DEFAULT_RHO_0S = (0.9, 0.99, 0.999)
SWEEP_JSON, SWEEP_MD, HEATMAP_PNG, CURVES_PNG = (
  'sweep.json',
  'sweep.md',
  'heatmap.png',
  'curves.png',
)


# --------------------------------------------------------------------------------------------
# The grid


@dataclasses.dataclass(frozen=True)
class Grid:
  """What a sweep tries, for every optimizer.

  Attributes:
    rate_factors: multipliers of each optimizer's recipe rate (of 'sgd_sa''s multipliers).
    rho_0s: the rho_0 values of the CoolMomentum optimizers.
    seeds: the seeds of every setting.
  """

  rate_factors: tuple[float, ...]
  rho_0s: tuple[float, ...] = DEFAULT_RHO_0S
  seeds: tuple[int, ...] = (0, 1, 2)

  def __post_init__(self):
    _check_positive_values('rate_factors', self.rate_factors)
    _check_positive_values('seeds', self.seeds, allow_zero=True, integer=True)
    if not self.rho_0s or not all(0.0 <= float(r) < 1.0 for r in self.rho_0s):
      raise ValueError(f'rho_0s must be a non-empty list of values in [0, 1), got {self.rho_0s!r}.')
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f'seeds must be distinct, got {self.seeds!r}.')


def _check_positive_values(name, values, *, allow_zero=False, integer=False) -> None:
  expected = 'non-negative integers' if integer else 'positive finite numbers'
  if not values:
    raise ValueError(f'{name} must be a non-empty list of {expected}, got {values!r}.')
  for value in values:
    bad = not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
    if bad or (integer and int(value) != value):
      raise ValueError(f'{name} must hold {expected}, got {name}={values!r}.')


def make_grid(
  *,
  num_rates: int = 5,
  rate_span: float = 30.0,
  rho_0s: Sequence[float] = DEFAULT_RHO_0S,
  num_seeds: int = 3,
  first_seed: int = 0,
) -> Grid:
  """`num_rates` rate factors spaced geometrically over `rate_span` around 1, and
  `num_seeds` seeds from `first_seed`.

  Raises:
    ValueError: naming the field, for a non-positive count or span, or an empty list.
  """
  if num_rates < 1:
    raise ValueError(f'num_rates must be a positive number of learning rates, got {num_rates}.')
  if not rate_span >= 1.0 or not math.isfinite(rate_span):
    raise ValueError(f'rate_span must be a finite ratio >= 1, got rate_span={rate_span}.')
  if num_seeds < 1:
    raise ValueError(f'seeds must be a positive number of seeds, got seeds={num_seeds}.')
  exponents = np.linspace(-0.5, 0.5, num_rates) if num_rates > 1 else np.zeros(1)
  factors = tuple(float(rate_span**e) for e in exponents)
  return Grid(
    factors, tuple(float(r) for r in rho_0s), tuple(range(first_seed, first_seed + num_seeds))
  )


@dataclasses.dataclass(frozen=True)
class Setting:
  """One point of an optimizer's grid or one trial of its random search: its learning
  rate (the multipliers' scale for 'sgd_sa'), rho_0 (None but for CoolMomentum) and the
  other config fields a random search samples (`others`, (field, value) pairs)."""

  learning_rate: float
  rho_0: float | None
  others: tuple[tuple[str, float], ...] = ()

  def fields(self) -> dict[str, float | None]:
    """`{'learning_rate', 'rho_0', **others}`."""
    return {'learning_rate': self.learning_rate, 'rho_0': self.rho_0, **dict(self.others)}

  @classmethod
  def from_fields(cls, fields: Mapping[str, float | None]) -> Setting:
    """The setting of `fields()`."""
    others = tuple((k, float(v)) for k, v in fields.items() if k not in ('learning_rate', 'rho_0'))
    return cls(float(fields['learning_rate']), fields.get('rho_0'), others)

  def label(self) -> str:
    rho = '' if self.rho_0 is None else f', rho_0 {self.rho_0:g}'
    others = ''.join(f', {k} {v:.4g}' for k, v in self.others)
    return f'lr {self.learning_rate:.3g}{rho}{others}'


def recipe_rate(config: ml_collections.ConfigDict) -> float:
  """The rate the grid spans around by default: the resolved recipe's learning rate, or 1
  for 'sgd_sa' (its multipliers are scaled instead)."""
  return 1.0 if config.optimizer == 'sgd_sa' else float(config.learning_rate)


def suggested_rate(config: ml_collections.ConfigDict, workdir: str, **lr_find_args: Any) -> float:
  """The rate the grid spans around with `center='lr_find'`: the suggestion of
  `examples.lr_find` on the (unresolved) `config`, whose `validation_fraction` keeps the
  range test off the held-out examples too; its lr_find.json and lr_find.png go to
  `workdir`. 'sgd_sa' has no rate to find: its grid stays around its multipliers (1)."""
  if config.optimizer == 'sgd_sa':
    return 1.0
  result = lr_find.lr_find(config, workdir, **lr_find_args)
  if result['warning']:
    print(f'Warning: {result["warning"]}', flush=True)
  return float(result['suggested_learning_rate'])


def settings_of(
  config: ml_collections.ConfigDict, grid: Grid, center: float | None = None
) -> list[Setting]:
  """The settings of the resolved `config`'s optimizer: `grid`'s rate factors times
  `center` (default: `recipe_rate(config)`), times its rho_0 values for CoolMomentum."""
  center = recipe_rate(config) if center is None else center
  if not (math.isfinite(center) and center > 0):
    raise ValueError(f'center must be a positive finite learning rate, got center={center}.')
  rhos = grid.rho_0s if config.optimizer in optimizers.COOLMOMENTUM_OPTIMIZERS else (None,)
  return [Setting(center * f, rho) for f in grid.rate_factors for rho in rhos]


# --------------------------------------------------------------------------------------------
# Many runs in one program


class _Overrides:
  """`config` as `optimizers.create_optimizer` reads it, some fields replaced by traced
  per-run values."""

  def __init__(self, config: ml_collections.ConfigDict, **fields: Any):
    self._config, self._fields = config, fields

  def __getattr__(self, name: str) -> Any:
    fields = self.__dict__['_fields']
    return fields[name] if name in fields else getattr(self.__dict__['_config'], name)

  def __getitem__(self, name: str) -> Any:
    return self.__getattr__(name)


def run_optimizer(config: ml_collections.ConfigDict, hparams: Mapping[str, jax.Array]):
  """The optimizer of the resolved `config` at one run's traced `hparams`
  (`learning_rate`, `rho_0`, `seed` and the config fields a random search samples),
  built as the trainer builds it."""
  fields = {'seed': hparams['seed']}
  fields.update({k: v for k, v in hparams.items() if k not in RUN_FIELDS})
  if config.optimizer == 'sgd_sa':
    tx, _ = optimizers.create_optimizer(_Overrides(config, **fields), config.steps_per_epoch)
    # sgd_sa steps by multiplier x gradient: scaling the gradient scales the multipliers.
    return optax.chain(optax.scale(hparams['learning_rate']), tx)
  fields['learning_rate'] = hparams['learning_rate']
  if config.optimizer in optimizers.COOLMOMENTUM_OPTIMIZERS:
    fields['rho_0'] = hparams['rho_0']
  tx, _ = optimizers.create_optimizer(_Overrides(config, **fields), config.steps_per_epoch)
  return tx


@dataclasses.dataclass
class Program:
  """The compiled, vmapped steps of one optimizer's runs.

  Attributes:
    init: `init(hparams) -> states`, the initial train states of all runs.
    train_step: `train_step(hparams, states, batches) -> (states, metrics)`; `batches`
      holds one batch per seed, each run reading that of `hparams['seed_index']`.
    eval_step: `eval_step(states, batch) -> sums` per run, of one evaluation batch.
  """

  init: Any
  train_step: Any
  eval_step: Any
  sharding: NamedSharding
  replicated: NamedSharding
  fields: tuple[str, ...] = ()


def build_program(
  config: ml_collections.ConfigDict,
  task: tasks.Task,
  model=None,
  *,
  runs_per_vmap: int | None = None,
  fields: Sequence[str] = (),
) -> Program:
  """The steps of `config`'s optimizer over a leading run axis, sharded over the devices.

  Every run's `learning_rate`, `rho_0` and seed are traced values, and so are the config
  `fields` a random search samples (e.g. 'momentum', 'adam_b1'): one value per run each,
  read by `optimizers.create_optimizer` in place of the config's.

  With `runs_per_vmap`, each device steps its runs that many at a time (`jax.lax.map`
  with that batch size: one vmapped group after another inside the one program), not all
  at once, which holds fewer runs' activations at once. It is no faster: on this CPU,
  one run at a time inside the program measured 0.17x the steady speed of all 16 runs in
  one vmap (see docs/benchmarks.md). None: all the device's runs in one vmap.

  Raises:
    ValueError: if the model cannot run under `jax.vmap`, naming the cause.
  """
  if runs_per_vmap is not None and runs_per_vmap < 1:
    raise ValueError(f'runs_per_vmap must be a positive number of runs, got {runs_per_vmap}.')
  model = model or task.create_model()
  inputs = task.init_inputs(model)
  step = functools.partial(
    train.train_step,
    task=task,
    model=model,
    l2_regularization=config.l2_regularization,
    weight_decay=config.weight_decay,
    decay_gradient=not optimizers.decays_after_clipping(config),
    ema_decay=config.ema_decay,
  )

  def init_one(hparams):
    # As train.create_train_state, with the run's seed traced.
    rng = jax.random.PRNGKey(hparams['seed'])
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({'params': params_rng}, *inputs, train=False)
    tx = run_optimizer(config, hparams)
    state = train.TrainState(
      step=jnp.zeros([], jnp.int32),
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(variables['params']),
      rng=dropout_rng,
      tx=None,
    )
    if config.ema_decay > 0:
      state = state.replace(ema={'params': state.params, 'batch_stats': state.batch_stats})
    return state

  def train_one(hparams, state, batches):
    batch = jax.tree.map(lambda x: x[hparams['seed_index']], batches)
    state, metrics = step(state.replace(tx=run_optimizer(config, hparams)), batch)
    return state.replace(tx=None), metrics

  def eval_one(state, batch):
    return task.eval_step(state, batch, model=model)

  mesh = Mesh(np.array(jax.devices()), (RUN_AXIS,))
  sharding = NamedSharding(mesh, PartitionSpec(RUN_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())

  def per_device(fn, in_specs):
    # Each device trains its own block of runs: the runs never exchange anything, and a
    # sharding left to propagation through the vmapped convolutions would gather them.
    runs, shared = PartitionSpec(RUN_AXIS), PartitionSpec()
    specs = tuple(runs if mapped else shared for mapped in in_specs)
    if runs_per_vmap is None:
      local = jax.vmap(fn, in_axes=tuple(0 if m else None for m in in_specs))
    else:

      def local(*args):
        mapped = tuple(a for a, m in zip(args, in_specs, strict=True) if m)

        def one(xs):
          it = iter(xs)
          return fn(*(next(it) if m else a for a, m in zip(args, in_specs, strict=True)))

        return jax.lax.map(one, mapped, batch_size=runs_per_vmap)

    return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=specs,
      out_specs=runs,
    )

  init = jax.jit(per_device(init_one, (True,)), out_shardings=sharding)
  train_step = jax.jit(
    per_device(train_one, (True, True, False)), out_shardings=sharding, donate_argnums=1
  )
  eval_step = jax.jit(per_device(eval_one, (True, False)), out_shardings=sharding)
  program = Program(init, train_step, eval_step, sharding, replicated, tuple(fields))
  trace_step(program, task, config, 1)  # A model that cannot run under vmap fails here.
  return program


def _abstract_hparams(num_runs: int, fields: Sequence[str] = ()) -> dict[str, jax.ShapeDtypeStruct]:
  hparams = {
    'learning_rate': jax.ShapeDtypeStruct((num_runs,), jnp.float32),
    'rho_0': jax.ShapeDtypeStruct((num_runs,), jnp.float32),
    'seed': jax.ShapeDtypeStruct((num_runs,), jnp.uint32),
    'seed_index': jax.ShapeDtypeStruct((num_runs,), jnp.int32),
  }
  hparams.update({field: jax.ShapeDtypeStruct((num_runs,), jnp.float32) for field in fields})
  return hparams


def _abstract_inputs(program: Program, task: tasks.Task, runs_per_device: int) -> tuple[Any, ...]:
  """The shapes of the train step's arguments (hyperparameters, states, batches of one
  seed) for `runs_per_device` runs on each device."""
  hparams = _abstract_hparams(runs_per_device * jax.device_count(), program.fields)
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), task.abstract_batch()
  )
  return hparams, jax.eval_shape(program.init, hparams), batch


def trace_step(
  program: Program, task: tasks.Task, config: ml_collections.ConfigDict, runs_per_device: int
) -> jaxpr_core.ClosedJaxpr:
  """The jaxpr of `program`'s train step for `runs_per_device` runs on each device,
  traced without compiling. A model that needs a named axis (a BatchNorm with an
  `axis_name`) fails here with the cause.

  Raises:
    ValueError: if the model cannot run under `jax.vmap` over the runs.
  """
  try:
    return jax.make_jaxpr(program.train_step)(*_abstract_inputs(program, task, runs_per_device))
  except NameError as error:
    raise ValueError(
      f'The model of config.model={config.model!r} cannot train under jax.vmap over the '
      f'runs: it reads a named axis that the sweep does not bind ({error}). A BatchNorm '
      "with an axis_name (the pmap trainer's) averages over devices; build the model "
      'without one (config.parallelism="jit").'
    ) from error


# --------------------------------------------------------------------------------------------
# Memory


def _nbytes(aval: Any) -> int:
  shape, dtype = getattr(aval, 'shape', None), getattr(aval, 'dtype', None)
  if shape is None or dtype is None:
    return 0
  # A PRNG key's extended dtype has no numpy itemsize; its raw data is two uint32s.
  itemsize = getattr(dtype, 'itemsize', None) or 8
  return math.prod(shape) * itemsize


def peak_bytes(jaxpr: Any) -> int:
  """The most bytes that `jaxpr`'s values hold at once, each value freed after its last
  use and an inner jaxpr (a call, a branch, a loop body) adding its own peak beyond its
  arguments while it runs. It counts every intermediate as materialised, as XLA does
  before fusing; fusion saves memory and buffer layout costs some, and for the digits
  model the two came to within 10% of XLA's allocation (docs/benchmarks.md)."""
  eqns = jaxpr.eqns
  last_use = {}
  for i, eqn in enumerate(eqns):
    for var in eqn.invars:
      if isinstance(var, jaxpr_core.Var):
        last_use[var] = i
  for var in jaxpr.outvars:
    if isinstance(var, jaxpr_core.Var):
      last_use[var] = len(eqns)
  live = {var: _nbytes(var.aval) for var in (*jaxpr.constvars, *jaxpr.invars)}
  current = peak = sum(live.values())
  for i, eqn in enumerate(eqns):
    inner = max(
      (
        peak_bytes(j) - sum(_nbytes(v.aval) for v in j.invars)
        for j in jaxpr_core.jaxprs_in_params(eqn.params)
      ),
      default=0,
    )
    produced = {var: _nbytes(var.aval) for var in eqn.outvars if var in last_use}
    peak = max(peak, current + max(inner, 0) + sum(_nbytes(v.aval) for v in eqn.outvars))
    live.update(produced)
    current += sum(produced.values())
    for var in eqn.invars:
      if isinstance(var, jaxpr_core.Var) and last_use.get(var) == i and var in live:
        current -= live.pop(var)
  return peak


def _device_step_jaxpr(closed: Any) -> Any:
  """The per-device body of the program's step: the jaxpr inside its shard_map, whose
  values have the shapes one device holds."""
  pending = [closed.jaxpr]
  while pending:
    jaxpr = pending.pop()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'shard_map':
        return eqn.params['jaxpr']
      pending.extend(jaxpr_core.jaxprs_in_params(eqn.params))
  raise ValueError('The sweep step holds no shard_map: the program was not built by build_program.')


def device_memory() -> int:
  """Bytes of memory of one local device: its allocator's limit on an accelerator, the
  host's physical memory shared by the local devices on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // jax.local_device_count()


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """A train step's memory on one device (`peak_bytes` of its per-device body).

  Attributes:
    runs_per_device: the runs a device trains.
    bytes: the estimate at `runs_per_device`.
    bytes_per_run: what one more run per device adds.
  """

  runs_per_device: int
  bytes: int
  bytes_per_run: int

  def largest_fitting(self, limit: int) -> int:
    """The most runs per device whose estimate is within `limit` bytes (0 if none)."""
    if self.bytes_per_run <= 0:
      return self.runs_per_device if self.bytes <= limit else 0
    return max(0, self.runs_per_device + math.floor((limit - self.bytes) / self.bytes_per_run))


def estimate_memory(
  program: Program, task: tasks.Task, config: ml_collections.ConfigDict, runs_per_device: int
) -> MemoryEstimate:
  """The per-device memory of `program`'s train step at `runs_per_device` runs, and what
  one more run adds, from the traced step alone (nothing is compiled)."""
  at = [
    peak_bytes(_device_step_jaxpr(trace_step(program, task, config, k)))
    for k in (runs_per_device, runs_per_device + 1)
  ]
  return MemoryEstimate(runs_per_device, at[0], at[1] - at[0])


def compiled_memory(program: Program, task: tasks.Task, runs_per_device: int) -> int:
  """What XLA allocates on one device for `program`'s compiled train step at
  `runs_per_device` runs: its arguments, outputs (less those aliased to the donated
  states) and temporaries. It compiles the step: for checking `estimate_memory`."""
  compiled = program.train_step.lower(*_abstract_inputs(program, task, runs_per_device))
  stats = compiled.compile().memory_analysis()
  return (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )


# The part of a device's memory a grid's estimate may take: the estimate was within 10% of
# XLA's allocation for 1 to 64 digits runs (docs/benchmarks.md), and the device also holds
# the evaluation step, the batches and the runtime.
MEMORY_FRACTION = 0.8


def check_memory(
  estimate: MemoryEstimate, num_runs: int, device_bytes: int, *, optimizer: str
) -> None:
  """Refuses a grid whose estimated per-device memory exceeds `MEMORY_FRACTION` of a
  device's `device_bytes`.

  Raises:
    ValueError: with the estimate, the memory and the largest grid that fits.
  """
  budget = math.floor(MEMORY_FRACTION * device_bytes)
  if estimate.bytes <= budget:
    return
  fits = estimate.largest_fitting(budget) * jax.device_count()
  mib = 2**20
  raise ValueError(
    f'The {num_runs} runs of {optimizer} need an estimated {estimate.bytes / mib:.1f} MiB '
    f'per device ({estimate.runs_per_device} runs per device, '
    f'{estimate.bytes_per_run / mib:.1f} MiB each), more than {MEMORY_FRACTION:.0%} of the '
    f'{device_bytes / mib:.1f} MiB of each of the {jax.device_count()} devices. The largest '
    f'grid that fits is {fits} runs: sweep fewer rates, rho_0 values or seeds, or step '
    'fewer runs at once (--runs_per_vmap).'
  )


# --------------------------------------------------------------------------------------------
# Training an optimizer's runs


@dataclasses.dataclass
class Runs:
  """The per-run results of one optimizer's sweep, arrays of leading size the runs.

  Attributes:
    settings: the setting of each run.
    seeds: the seed of each run.
    train_loss: [runs, epochs] mean training loss of each epoch (finite steps).
    skipped: [runs, epochs] steps skipped as non-finite.
    validation_accuracy, validation_loss, test_accuracy, test_loss: [runs, epochs].
    step_loss: [runs, steps] the loss of every step.
    seconds: the runs' wall time, compilation included, across resumptions (each rerun's
      set-up and compilation counted).
    images: images trained on, all runs together.
  """

  settings: list[Setting]
  seeds: list[int]
  train_loss: np.ndarray
  skipped: np.ndarray
  validation_accuracy: np.ndarray
  validation_loss: np.ndarray
  test_accuracy: np.ndarray
  test_loss: np.ndarray
  step_loss: np.ndarray
  seconds: float
  images: int


def _seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  seed_config = config.copy_and_resolve_references()
  seed_config.seed = int(seed)
  return seed_config


def _evaluate(program: Program, states: Any, task: tasks.Task, split: str) -> dict[str, np.ndarray]:
  totals = None
  for batch in task._eval_batches(split):
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    sums = program.eval_step(states, jax.device_put(batch, program.replicated))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = np.maximum(totals['count'], 1.0)
  return {'loss': totals['loss'] / count, 'accuracy': totals['correct'] / count}


# The per-run records of a sweep, [runs, epochs] ('step_loss': [runs, steps]).
EPOCH_FIELDS = (
  'train_loss',
  'skipped',
  'validation_accuracy',
  'validation_loss',
  'test_accuracy',
  'test_loss',
)


def _record_config(
  config: ml_collections.ConfigDict,
  settings: Sequence[Setting],
  seeds: Sequence[int],
  search: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """The resolved `config` with the runs it trains (`sweep_settings`, `sweep_seeds`) and,
  for a random search, its space, trials and sampler seed (`sweep_search`): what the
  optimizer's config.json and checkpoints hold, and a resumed sweep must agree with."""
  record = config.copy_and_resolve_references()
  with record.unlocked():
    record.sweep_settings = [
      [s.learning_rate, s.rho_0, *([dict(s.others)] if s.others else [])] for s in settings
    ]
    record.sweep_seeds = [int(seed) for seed in seeds]
    if search is not None:
      record.sweep_search = ml_collections.ConfigDict(dict(search))
  return record


def train_runs(
  config: ml_collections.ConfigDict,
  settings: Sequence[Setting],
  seeds: Sequence[int],
  *,
  workdir: str | None = None,
  model=None,
  verbose: bool = False,
  runs_per_vmap: int | None = None,
  memory_limit: int | None = None,
  search: Mapping[str, Any] | None = None,
  name: str | None = None,
) -> Runs:
  """Trains `settings x seeds` runs of the (unresolved) `config`'s optimizer together.

  The settings' `others` fields (a random search's) must be the same for all of them;
  `search` describes the random search they were drawn by, recorded for a resumed sweep
  to agree with. `name` labels the printed lines (default: the optimizer's).

  The runs train on the training split less its last `config.validation_fraction`, and
  are evaluated on that held-out part ('validation') and on the test split after every
  epoch; with `verbose`, a line is printed per epoch.

  With a `workdir`, the runs are resumable: it receives their config.json and, at every
  epoch's end, a checkpoint of all runs' states and records (examples/checkpoints.py:
  checksummed, with the trajectory fields); a rerun continues from the last one to the
  same numbers, and refuses a config or grid that would change them.

  Raises:
    ValueError: for an empty grid, a config that cannot be swept (not an image
      classifier, not `parallelism='jit'`, no validation split), a model that cannot run
      under vmap, a grid whose estimated memory exceeds `MEMORY_FRACTION` of
      `memory_limit` bytes per device (default: `device_memory()`), or a workdir of
      another sweep.
  """
  if jax.process_count() > 1:
    raise ValueError(
      f'The sweep runs in one process (its devices train their blocks of runs), got '
      f'{jax.process_count()} processes: run it on one host.'
    )
  if not settings:
    raise ValueError('settings must hold at least one setting to train, got none.')
  if not seeds:
    raise ValueError('seeds must hold at least one seed, got none.')
  start = time.perf_counter()
  resolved, task = train.prepare(_seed_config(config, seeds[0]))
  if not isinstance(task, tasks.ImageClassification):
    raise ValueError(
      f'config.model={config.model!r} is not an image classifier: the sweep trains image '
      'classifiers only.'
    )
  if resolved.parallelism != 'jit':
    raise ValueError(
      f'config.parallelism must be "jit" for a sweep (the runs are sharded with jit), got '
      f'{resolved.parallelism!r}.'
    )
  if not resolved.validation_fraction:
    raise ValueError(
      'config.validation_fraction must be positive: the sweep selects on a validation split '
      f'held out of the training split, got validation_fraction={resolved.validation_fraction}.'
    )
  fields = [k for k, _ in settings[0].others]
  if any([k for k, _ in s.others] != fields for s in settings):
    raise ValueError(
      f'The settings of one sweep must set the same fields, got {fields} and '
      f'{next([k for k, _ in s.others] for s in settings if [k for k, _ in s.others] != fields)}.'
    )
  fit = [tasks.create_task(_seed_config(resolved, s)) for s in seeds]
  program = build_program(resolved, task, model, runs_per_vmap=runs_per_vmap, fields=fields)

  runs = [(setting, i) for setting in settings for i in range(len(seeds))]
  num_devices = jax.device_count()
  padded = runs + [runs[-1]] * (-len(runs) % num_devices)
  estimate = estimate_memory(program, task, resolved, len(padded) // num_devices)
  check_memory(
    estimate,
    len(runs),
    device_memory() if memory_limit is None else memory_limit,
    optimizer=resolved.optimizer,
  )
  hparams = {
    'learning_rate': np.array([s.learning_rate for s, _ in padded], np.float32),
    'rho_0': np.array([s.rho_0 if s.rho_0 is not None else 0.0 for s, _ in padded], np.float32),
    'seed': np.array([seeds[i] for _, i in padded], np.uint32),
    'seed_index': np.array([i for _, i in padded], np.int32),
  }
  for field in fields:
    hparams[field] = np.array([dict(s.others)[field] for s, _ in padded], np.float32)
  hparams = jax.device_put(hparams, program.sharding)
  states = program.init(hparams)

  epochs, steps = resolved.num_epochs, resolved.steps_per_epoch
  history = {key: np.zeros((len(padded), epochs)) for key in EPOCH_FIELDS}
  history['step_loss'] = np.zeros((len(padded), epochs * steps))
  position = checkpoints.Position(0, 0, history, 0.0)
  manager, record = None, _record_config(resolved, settings, seeds, search)
  if workdir is not None:
    workdir_files.check_config(workdir, record)
    # Two: a damaged newest checkpoint falls back to the epoch before it.
    manager = checkpoints.checkpoint_manager(workdir, max_to_keep=2)
    host, position = checkpoints.restore_checkpoint(
      manager, jax.device_get(states), history, record
    )
    states = jax.device_put(host, program.sharding)
    history = {key: np.array(value) for key, value in position.step_metrics.items()}
  for epoch in range(position.epoch, epochs):
    iterators = [t.train_batches(epoch) for t in fit]
    pending = []
    for _ in range(steps):
      # The pipeline splits a batch over the local devices; the runs share each one whole.
      batches = jax.tree.map(
        lambda *xs: np.stack([x.reshape(-1, *x.shape[2:]) for x in xs]),
        *[next(it) for it in iterators],
      )
      states, metrics = program.train_step(
        hparams, states, jax.device_put(batches, program.replicated)
      )
      pending.append((metrics['loss'], metrics['skipped']))
    losses, skips = map(np.stack, zip(*jax.device_get(pending), strict=True))  # [steps, runs]
    history['step_loss'][:, epoch * steps : (epoch + 1) * steps] = losses.T
    with np.errstate(all='ignore'):
      finite = np.where((skips.T > 0) | ~np.isfinite(losses.T), np.nan, losses.T)
      history['train_loss'][:, epoch] = np.nanmean(finite, axis=1)
    history['skipped'][:, epoch] = skips.sum(axis=0)
    for split in ('validation', 'test'):
      scores = _evaluate(program, states, task, split)
      history[f'{split}_accuracy'][:, epoch] = scores['accuracy']
      history[f'{split}_loss'][:, epoch] = scores['loss']
    elapsed = position.wall_time + time.perf_counter() - start
    if manager is not None:
      if jax.process_index() == 0 and workdir_files.read_config(workdir) is None:
        workdir_files.write_config(workdir, record)
      checkpoints.save_checkpoint(
        manager,
        jax.device_get(states),
        checkpoints.Position(epoch + 1, 0, history, elapsed),
        record,
        step=(epoch + 1) * steps,
      )
    if verbose and jax.process_index() == 0:
      val = history['validation_accuracy'][: len(runs), epoch]
      print(
        f'{name or resolved.optimizer} epoch {epoch + 1}/{epochs}: {len(runs)} runs, validation '
        f'accuracy best {np.nanmax(val):.2%}, median {np.nanmedian(val):.2%}, {elapsed:.1f}s',
        flush=True,
      )
  jax.block_until_ready(states)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  n = len(runs)
  return Runs(
    settings=[s for s, _ in runs],
    seeds=[seeds[i] for _, i in runs],
    **{key: np.asarray(history[key])[:n] for key in (*EPOCH_FIELDS, 'step_loss')},
    seconds=position.wall_time + time.perf_counter() - start,
    images=n * epochs * steps * resolved.batch_size,
  )


# --------------------------------------------------------------------------------------------
# Selection and the report


def _finite_or_none(value: float) -> float | None:
  return float(value) if np.isfinite(value) else None


def diverged(runs: Runs) -> np.ndarray:
  """Per run: a step of its last epoch was skipped as non-finite, or its final
  validation loss is not finite."""
  return (runs.skipped[:, -1] > 0) | ~np.isfinite(runs.validation_loss[:, -1])


def summarize(runs: Runs) -> dict[str, Any]:
  """The sweep entry of one optimizer: every setting's numbers (means and standard
  deviations over seeds of the final epoch) and the setting chosen by mean validation
  accuracy (then validation loss) among those none of whose runs diverged. Only the
  validation numbers are read to choose."""
  div = diverged(runs)
  grid, settings = [], list(dict.fromkeys(runs.settings))
  for setting in settings:
    rows = [i for i, s in enumerate(runs.settings) if s == setting]

    def stats(values, rows=rows):
      values = values[rows, -1]
      return _finite_or_none(np.mean(values)), _finite_or_none(np.std(values))

    entry = setting.fields()
    entry['diverged'] = bool(div[rows].any())
    for key in ('validation_accuracy', 'validation_loss', 'test_accuracy', 'train_loss'):
      entry[f'{key}_mean'], entry[f'{key}_std'] = stats(getattr(runs, key))
    entry['num_seeds'] = len(rows)
    grid.append(entry)
  candidates = [
    i for i, e in enumerate(grid) if not e['diverged'] and e['validation_accuracy_mean'] is not None
  ]
  result: dict[str, Any] = {'selected': None, 'grid': grid, 'seconds': runs.seconds}
  if candidates:
    best = max(
      candidates,
      key=lambda i: (grid[i]['validation_accuracy_mean'], -(grid[i]['validation_loss_mean'] or 0)),
    )
    chosen = grid[best]
    result['selected'] = settings[best].fields()
    result['validation_accuracy_mean'] = chosen['validation_accuracy_mean']
    result['test_accuracy_mean'] = chosen['test_accuracy_mean']
    result['test_accuracy_std'] = chosen['test_accuracy_std']
    result['num_seeds'] = chosen['num_seeds']
    result['train_loss_mean'] = chosen['train_loss_mean']
  else:
    result.update(
      validation_accuracy_mean=None,
      test_accuracy_mean=None,
      test_accuracy_std=None,
      num_seeds=0,
      train_loss_mean=None,
    )
  return result


def _percent(mean, std=None) -> str:
  if mean is None:
    return '-'
  return f'{mean:.2%}' if std is None else f'{100 * mean:.2f} ± {100 * std:.2f}%'


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A row per optimizer: its chosen setting, validation and test accuracy, final
  training loss, seeds, settings tried (diverged ones) and seconds."""
  lines = [
    '| optimizer | selected | validation accuracy | test accuracy (mean ± std) | seeds '
    '| final train loss | settings (diverged) | seconds |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  for name, r in results.items():
    selected = r['selected']
    label = Setting.from_fields(selected).label() if selected else 'all diverged'
    loss = '-' if r['train_loss_mean'] is None else f'{r["train_loss_mean"]:.4f}'
    div = sum(e['diverged'] for e in r['grid'])
    lines.append(
      f'| {name} | {label} | {_percent(r["validation_accuracy_mean"])} '
      f'| {_percent(r["test_accuracy_mean"], r["test_accuracy_std"])} | {r["num_seeds"]} '
      f'| {loss} | {len(r["grid"])} ({div}) | {r["seconds"]:.1f} |'
    )
  return '\n'.join(lines) + '\n'


def plot_heatmap(result: Mapping[str, Any], path: str, title: str) -> None:
  """CoolMomentum's learning rate x rho_0 grid: mean validation and test accuracy, the
  diverged cells marked 'div' (as the paper's Table 2)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  grid = result['grid']
  rates = sorted({e['learning_rate'] for e in grid})
  rhos = sorted({e['rho_0'] for e in grid})
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.2 + 0.4 * len(rhos)))
  for ax, key, label in zip(
    axes, ('validation_accuracy_mean', 'test_accuracy_mean'), ('validation', 'test'), strict=True
  ):
    values = np.full((len(rhos), len(rates)), np.nan)
    for e in grid:
      i, j = rhos.index(e['rho_0']), rates.index(e['learning_rate'])
      if not e['diverged'] and e[key] is not None:
        values[i, j] = 100 * e[key]
    # The colours span the 10th percentile to the best: one collapsed setting would
    # otherwise paint all the others alike. The labels give every cell's value.
    finite = values[np.isfinite(values)]
    low = np.percentile(finite, 10) if finite.size else None
    image = ax.imshow(values, cmap='viridis', aspect='auto', origin='lower', vmin=low)
    low, high = image.get_clim()
    for e in grid:
      i, j = rhos.index(e['rho_0']), rates.index(e['learning_rate'])
      text = 'div' if e['diverged'] or e[key] is None else f'{100 * e[key]:.1f}'
      dark = text == 'div' or values[i, j] < (low + high) / 2
      ax.text(j, i, text, ha='center', va='center', color='w' if dark else 'k')
    ax.set_xticks(range(len(rates)), [f'{r:.3g}' for r in rates])
    ax.set_yticks(range(len(rhos)), [f'{r:g}' for r in rhos])
    ax.set_xlabel('learning rate')
    ax.set_ylabel('rho_0')
    ax.set_title(f'{title}: mean {label} accuracy (%)')
    fig.colorbar(image, ax=ax, extend='min')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_curves(curves: Mapping[str, Mapping[str, np.ndarray]], path: str) -> None:
  """Per optimizer at its chosen setting: training loss per step and validation and test
  accuracy per epoch, the mean over seeds with a band of one standard deviation."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = (
    ('step_loss', 'training loss (per step)', 'log'),
    ('validation_accuracy', 'validation accuracy', 'linear'),
    ('test_accuracy', 'test accuracy', 'linear'),
  )
  for ax, (key, label, scale) in zip(axes, panels, strict=True):
    for name, curve in curves.items():
      values = curve[key]
      x = np.arange(1, values.shape[1] + 1)
      mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
      (line,) = ax.plot(x, mean, label=name)
      ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.25)
    ax.set_yscale(scale)
    ax.set_xlabel('step' if key == 'step_loss' else 'epoch')
    ax.set_title(label)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run_name(setting: Setting, seed: int) -> str:
  """The directory of a run's TensorBoard event files, e.g. 'lr0.01_rho0.99_seed0' (a
  random search's fields after rho_0, e.g. '_momentum0.953')."""
  rho = '' if setting.rho_0 is None else f'_rho{setting.rho_0:g}'
  others = ''.join(f'_{k}{v:.4g}' for k, v in setting.others)
  return f'lr{setting.learning_rate:.3g}{rho}{others}_seed{seed}'


def write_tensorboard(directory: str, runs: Runs, steps_per_epoch: int) -> None:
  """Per run, into `directory/run_name(...)`: the loss of every step (`step/loss`) and
  an epoch row (`epoch/<field>`) as the trainer writes them."""
  for i, (setting, seed) in enumerate(zip(runs.settings, runs.seeds, strict=True)):
    run_directory = os.path.join(directory, run_name(setting, seed))
    # Written whole from the runs' records: a resumed sweep replaces what it wrote before.
    shutil.rmtree(run_directory, ignore_errors=True)
    writer = logs.create_writer(run_directory)
    for step, loss in enumerate(runs.step_loss[i], start=1):
      logs.write_step(writer, step, {'loss': _finite_or_none(loss)})
    for epoch in range(runs.train_loss.shape[1]):
      row = {'epoch': epoch + 1, 'step': (epoch + 1) * steps_per_epoch}
      for key in ('train_loss', 'validation_accuracy', 'validation_loss', 'test_accuracy'):
        value = _finite_or_none(getattr(runs, key)[i, epoch])
        if value is not None:
          row[key] = value
      logs.write_epoch(writer, row)
    writer.close()


def entry_config(
  config: ml_collections.ConfigDict, name: str, plan: Grid | search.RandomSearch
) -> ml_collections.ConfigDict:
  """The config that trains sweep entry `name`: optimizer `name` for a grid; for a random
  search, the optimizer of `name`'s search space, with the fields it fixes added to that
  optimizer's recipe."""
  if isinstance(plan, Grid):
    return compare.optimizer_config(config, name)
  space = search.get_space(name)
  name_config = compare.optimizer_config(config, space.optimizer)
  with name_config.unlocked():
    if space.optimizer not in name_config.optimizers:
      name_config.optimizers[space.optimizer] = ml_collections.ConfigDict()
    for field, value in space.fixed:
      name_config.optimizers[space.optimizer][field] = value
  return name_config


def _settings(
  name: str,
  name_config: ml_collections.ConfigDict,
  plan: Grid | search.RandomSearch,
  center: str,
  directory: str,
  lr_find_args: Mapping[str, Any] | None,
) -> list[Setting]:
  if isinstance(plan, search.RandomSearch):
    return [Setting.from_fields(t) for t in search.sample(name, plan.trials, plan.sampler_seed)]
  rate = None
  if center == 'lr_find':
    rate = suggested_rate(name_config, directory, **(lr_find_args or {}))
  return settings_of(schema.resolve_config(name_config), plan, rate)


@workdir_files.hold_lock
def sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  optimizer_names: Sequence[str],
  grid: Grid | search.RandomSearch,
  *,
  validation_fraction: float = 0.15,
  center: str = 'recipe',
  lr_find_args: Mapping[str, Any] | None = None,
  verbose: bool = False,
  runs_per_vmap: int | None = None,
  memory_limit: int | None = None,
) -> dict[str, dict[str, Any]]:
  """Sweeps each of `optimizer_names` over `grid` (or draws its trials by a random search)
  and writes the sweep's files.

  Each optimizer's runs keep their config.json and checkpoints in `workdir/<optimizer>/`
  (see `train_runs`): a killed sweep reruns to the same numbers, and a rerun with
  another config, grid, search space or number of trials is refused. The workdir is
  locked while the sweep runs.

  Args:
    optimizer_names: optimizers for a grid; entries of `search.SEARCH_SPACES` for a
      random search.
    grid: a `Grid`, or a `search.RandomSearch`, whose trials of each entry are drawn from
      its search space.
    center: what a grid's rates span around: 'recipe' (the recipe's learning rate) or
      'lr_find' (the suggestion of examples.lr_find on the training split less the
      validation split, with `lr_find_args`); a random search's ranges are its own.

  Returns:
    `{optimizer: summarize(its runs)}`; budget.json/md/png hold the expected best of k of
    its settings (`examples.budget`).
  """
  random = isinstance(grid, search.RandomSearch)
  if not optimizer_names:
    default = search.SEARCH_SPACES if random else compare.DEFAULT_OPTIMIZERS
    raise ValueError(
      'optimizers must name at least one optimizer to sweep, got none (--optimizers=); '
      f'e.g. --optimizers={",".join(default)}.'
    )
  if center not in CENTERS:
    raise ValueError(f'center must be one of {CENTERS}, got center={center!r}.')
  if random and center != 'recipe':
    raise ValueError(
      f'center={center!r} centres a grid: a random search draws from its own ranges '
      '(examples/search.py); leave --center unset.'
    )
  if config.validation_fraction not in (0.0, validation_fraction):
    raise ValueError(
      f"config.validation_fraction={config.validation_fraction} and the sweep's "
      f'validation_fraction={validation_fraction} (--validation_fraction) disagree: set the '
      "sweep's, and leave the config's at 0 or equal to it."
    )
  configs = {}
  for name in optimizer_names:
    name_config = entry_config(config, name, grid)
    name_config.validation_fraction = validation_fraction
    schema.validate_config(name_config)
    configs[name] = name_config
  results, curves = {}, {}
  for name, name_config in configs.items():
    directory = os.path.join(workdir, name)
    runs = train_runs(
      name_config,
      _settings(name, name_config, grid, center, directory, lr_find_args),
      grid.seeds,
      workdir=directory,
      verbose=verbose,
      runs_per_vmap=runs_per_vmap,
      memory_limit=memory_limit,
      search=grid.record(name) if random else None,
      name=name,
    )
    results[name] = summarize(runs)
    if jax.process_index() == 0:
      steps_per_epoch = runs.step_loss.shape[1] // runs.train_loss.shape[1]
      write_tensorboard(directory, runs, steps_per_epoch)
    results[name]['images_per_sec'] = runs.images / runs.seconds
    selected = results[name]['selected']
    if random:
      results[name]['search_space'] = search.get_space(name).describe()
      results[name]['trials'] = grid.trials
      if selected is not None:
        results[name]['selected_position'] = search.positions(name, selected)
    if selected is not None:
      rows = [i for i, s in enumerate(runs.settings) if s == Setting.from_fields(selected)]
      curves[name] = {
        key: getattr(runs, key)[rows]
        for key in ('step_loss', 'validation_accuracy', 'test_accuracy')
      }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, SWEEP_JSON), 'w') as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, SWEEP_MD), 'w') as f:
      f.write(markdown_table(results))
    cool = [n for n in results if n in optimizers.COOLMOMENTUM_OPTIMIZERS]
    if cool and not random:
      plot_heatmap(results[cool[0]], os.path.join(workdir, HEATMAP_PNG), cool[0])
    if curves:
      plot_curves(curves, os.path.join(workdir, CURVES_PNG))
    kind = f'random search, {grid.trials} trials' if random else 'grid'
    budget.write(workdir, results, title=f'Expected best of k settings ({kind})')
  return results


# The flags of one kind of search only: given with the other, they are refused.
GRID_FLAGS = ('num_rates', 'rate_span', 'rho_0s', 'center')
RANDOM_FLAGS = ('trials', 'search_seed')


def plan_from_flags() -> tuple[Grid | search.RandomSearch, list[str]]:
  """The grid or random search of the command line, and the entries it sweeps
  (`--optimizers`, or for a random search every entry of `search.SEARCH_SPACES`).

  Raises:
    app.UsageError: for a flag of the other kind of search.
  """
  random = FLAGS.search == 'random'
  foreign = [f for f in (GRID_FLAGS if random else RANDOM_FLAGS) if FLAGS[f].present]
  if foreign:
    raise app.UsageError(
      f'--{", --".join(foreign)} do not apply to --search={FLAGS.search}: the grid takes '
      f'--{", --".join(GRID_FLAGS)}, the random search --{", --".join(RANDOM_FLAGS)}.'
    )
  seeds = tuple(range(FLAGS.config.seed, FLAGS.config.seed + FLAGS.seeds))
  if not random:
    grid = make_grid(
      num_rates=FLAGS.num_rates,
      rate_span=FLAGS.rate_span,
      rho_0s=[float(r) for r in FLAGS.rho_0s],
      num_seeds=FLAGS.seeds,
      first_seed=FLAGS.config.seed,
    )
    return grid, list(FLAGS.optimizers)
  names = list(FLAGS.optimizers) if FLAGS['optimizers'].present else list(search.SEARCH_SPACES)
  for name in names:
    search.get_space(name)
  return search.RandomSearch(FLAGS.trials, seeds, FLAGS.search_seed), names


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  trainer_main.setup()
  plan, names = plan_from_flags()
  trained = names if isinstance(plan, Grid) else [search.get_space(n).optimizer for n in names]
  schema.prefer_given(FLAGS.config, trainer_main.given_fields(), list(dict.fromkeys(trained)))
  results = sweep(
    FLAGS.config,
    FLAGS.workdir,
    names,
    plan,
    validation_fraction=FLAGS.validation_fraction,
    center=FLAGS.center,
    lr_find_args=lr_find.flag_arguments(),
    verbose=True,
    runs_per_vmap=FLAGS.runs_per_vmap or None,
    memory_limit=round(FLAGS.memory_limit_gib * 2**30) if FLAGS.memory_limit_gib else None,
  )
  print(markdown_table(results))


if __name__ == '__main__':
  app.run(main)
