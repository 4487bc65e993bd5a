"""What the trainer is asked to learn: the task, chosen once from the config.

A task holds everything that differs between learning to classify images and
learning to model language: the model and the inputs it is initialised on, the loss of
a train step and the sums of an eval step, the pipeline it reads (every call into
examples/input_pipeline.py or examples/text_pipeline.py is here), the evaluation that
fills an epoch's row, and the row fields a reader compares runs by. examples/train.py
asks `create_task(config)` once and never which task it has; adding a task means
writing one more class with these members and naming it in `TASKS`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from examples import input_pipeline, language_model, models, rows, text_pipeline
from examples.checks import check_choice, check_number, invalid_field
from examples.configs import default

Batch = dict[str, Any]


class Score(NamedTuple):
  """A row field that says how well a run does, as the epoch line, the comparison table
  and the curves show it.

  Attributes:
    key: the row field, e.g. 'test_accuracy'.
    label: its name for a reader, e.g. 'test accuracy'.
    spec: its format, e.g. '.2%'.
    best: `max` or `min`: which of two values is better.
    scale: 'linear' or 'log', for its panel of the curves.
  """

  key: str
  label: str
  spec: str
  best: Any
  scale: str


def cross_entropy_loss(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _dtype(config: ml_collections.ConfigDict) -> Any:
  return jnp.bfloat16 if config.half_precision else jnp.float32


def _sum_over_batches(parallel: Any, sums: list[Any]) -> dict[str, float]:
  return jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get_metrics(sums))


def check_default(field: str, value: Any, reason: str, allowed: tuple[Any, ...] = ()) -> None:
  """Refuses `config.<field>` = `value` where it is not read (`reason` says why), unless
  it is its default of examples/configs/default.py or one of `allowed`: a value set
  there would be ignored, and the run stored as if it were used.

  Raises:
    ValueError: naming the field, its value, the reason and what is allowed.
  """
  defaults = (default.get_config()[field], *allowed)
  if value in defaults:
    return
  allowed = ' or '.join(map(repr, dict.fromkeys(defaults)))
  raise ValueError(f'config.{field}={value!r} would be ignored: {reason}. Leave it at {allowed}.')


class _Task:
  """What the tasks share: the config and how the training batches are read (with the
  `data_options` of the task)."""

  # The module that reads the data: examples/input_pipeline.py or text_pipeline.py.
  pipeline: Any
  # The fields of `TASK_FIELDS` that the task reads: a run refuses the others where set.
  fields: frozenset[str]

  @classmethod
  def check_unread_fields(cls, config: ml_collections.ConfigDict) -> None:
    """Refuses the fields of another task (`TASK_FIELDS`) set to anything but their
    default (see `check_default`)."""
    for field in sorted(TASK_FIELDS - cls.fields):
      check_default(field, config[field], f'config.model={config.model!r} does not read it')

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """This process's rows of the global batches of `epoch` from its step `start_step`
    on, which do not depend on the processes or devices."""
    return self.pipeline.create_input_iter(
      options=self.data_options(),
      split='train',
      epoch=epoch,
      global_batch_size=self.config.batch_size,
      num_steps=self.config.steps_per_epoch,
      start_step=start_step,
    )


class ImageClassification(_Task):
  """`config.model` of examples/models.py on the images of examples/input_pipeline.py."""

  pipeline = input_pipeline
  fields = frozenset(
    {
      'num_classes',
      'label_smoothing',
      'eval_train',
      'batch_norm_group_size',
      'image_size',
      'num_channels',
      'synthetic_train_size',
      'synthetic_test_size',
    }
  )
  # The values of `config.model` that this task trains.
  model_names = models.MODELS
  # What a row reports of the speed, per second of training.
  throughput_key = 'images_per_sec'
  # The scores of the epoch line, the first the one the comparison and curves follow.
  scores = (Score('test_accuracy', 'test accuracy', '.2%', max, 'linear'),)

  # ------------------------------------------------------------------------------------
  # Data

  @staticmethod
  def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks the fields only this task reads (see `examples.schema.validate_config`):
    the image data set and the part of its training split held out."""
    check_choice(config, 'dataset', input_pipeline.KNOWN_DATASETS)
    check_number(config, 'validation_fraction', lower=0, upper=1)

  def data_options(self) -> input_pipeline.DatasetOptions:
    """The config's fields that the image pipeline reads, besides the split, the batch
    size and the steps: every field of `input_pipeline.DatasetOptions`."""
    fields = dataclasses.fields(input_pipeline.DatasetOptions)
    return input_pipeline.DatasetOptions(
      **{field.name: self.config[field.name] for field in fields}
    )

  @functools.cached_property
  def _info(self) -> input_pipeline.DatasetInfo:
    return input_pipeline.dataset_info(self.data_options())

  def steps_per_epoch(self) -> int:
    """The steps of an epoch of the (resolved) config, from its data set.

    Raises:
      ValueError: if `config.num_classes` is not the data set's.
    """
    info = self._info
    if info.num_classes != self.config.num_classes:
      raise invalid_field(
        'num_classes', self.config.num_classes, f'{info.num_classes} for {self.config.dataset}'
      )
    self._check_unread_options(info)
    return input_pipeline.steps_per_epoch(info, self.config.batch_size, self.config.steps_per_epoch)

  def _check_unread_options(self, info: input_pipeline.DatasetInfo) -> None:
    """Refuses the options the data set does not read (`DatasetSpec.reads`) where set
    to anything but their default, or, for the image's size and channels, its own."""
    dataset = self.config.dataset
    own = {'image_size': info.image_shape[0], 'num_channels': info.image_shape[-1]}
    for field in input_pipeline.OPTIONAL_OPTIONS:
      if field not in input_pipeline.get_dataset(dataset).reads:
        check_default(
          field,
          self.config[field],
          f'the data set {dataset!r} does not read it (its images are '
          f'{"x".join(map(str, info.image_shape))})',
          (own[field],) if field in own else (),
        )

  def _eval_batches(self, split: str) -> Iterator[Batch]:
    return input_pipeline.create_input_iter(
      options=self.data_options(),
      split=split,
      global_batch_size=self.config.batch_size,
      num_steps=self.config.steps_per_eval,
      evaluation=True,
    )

  def abstract_batch(self) -> Batch:
    """The shapes and dtypes of a global training batch."""
    size = self.config.batch_size
    image_shape = self._info.image_shape
    return {
      'image': jax.ShapeDtypeStruct((size, *image_shape), jnp.float32),
      'label': jax.ShapeDtypeStruct((size,), jnp.int32),
    }

  # ------------------------------------------------------------------------------------
  # Model

  def create_model(self, *, axis_name: str | None = None) -> nn.Module:
    """`config.model`, computing in bfloat16 when `config.half_precision`, with BatchNorm
    statistics over groups of `config.batch_norm_group_size` examples (0: the whole
    batch), averaged over `axis_name`."""
    return models.get_model(
      self.config.model,
      self.config.num_classes,
      _dtype(self.config),
      axis_name=axis_name,
      batch_norm_group_size=self.config.batch_norm_group_size or None,
    )

  def init_inputs(self, model: nn.Module) -> tuple[jax.Array, ...]:
    """The arguments of `model.init` besides the keys."""
    del model
    return (jnp.zeros((1, *self._info.image_shape), jnp.float32),)

  def initial_carry(self, model: nn.Module) -> None:
    """The state carried from step to step besides the variables: none."""
    del model

  # ------------------------------------------------------------------------------------
  # Steps

  def loss(
    self, model: nn.Module, params: Any, state: Any, batch: Batch, rng: jax.Array, axis_name
  ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    """The mean (smoothed) cross-entropy of `batch` in train mode, with its metrics (the
    accuracy) and the new BatchNorm statistics."""
    del axis_name
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    loss = jnp.mean(cross_entropy_loss(logits, batch['label'], self.config.label_smoothing))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, ({'accuracy': accuracy}, {'batch_stats': updates['batch_stats']})

  @staticmethod
  def share(forward_state: dict[str, Any], axis_name: str | None) -> dict[str, Any]:
    """The new BatchNorm statistics averaged over the replicas."""
    if axis_name is None:
      return forward_state
    return jax.lax.pmean(forward_state, axis_name)

  @staticmethod
  def eval_step(state: Any, batch: Batch, *, model: nn.Module, axis_name: str | None = None):
    """Sums of loss, correct predictions and real examples (mask 1) over an evaluation
    batch, with `state.eval_variables()`."""
    logits = model.apply(state.eval_variables(), batch['image'], train=False)
    mask = batch['mask']
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    sums = {
      'loss': jnp.sum(cross_entropy_loss(logits, batch['label']) * mask),
      'correct': jnp.sum(correct * mask),
      'count': jnp.sum(mask),
    }
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  # ------------------------------------------------------------------------------------
  # Rows

  def evaluate(self, parallel: Any, state: Any, split: str = 'test') -> dict[str, float]:
    """Mean loss and accuracy in inference mode over the test or validation split (or
    its first `config.steps_per_eval` batches), or over the whole training split, without
    augmentation, for `split='train'`."""
    sums = [parallel.eval_step(state, parallel.put_batch(b)) for b in self._eval_batches(split)]
    totals = _sum_over_batches(parallel, sums)
    count = max(totals['count'], 1.0)
    return {'loss': totals['loss'] / count, 'accuracy': totals['correct'] / count}

  def eval_row(self, parallel: Any, state: Any, penalty: float) -> dict[str, float]:
    """An epoch's evaluation fields: the test loss and accuracy, those of the
    validation split with `config.validation_fraction` and, with `config.eval_train`,
    the paper's training loss (its Fig. 1): the objective over the whole training set in
    inference mode, `penalty` (that of the evaluated weights) included."""
    test = self.evaluate(parallel, state)
    row = {'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
    if self.config.validation_fraction:
      validation = self.evaluate(parallel, state, 'validation')
      row.update(validation_loss=validation['loss'], validation_accuracy=validation['accuracy'])
    if self.config.eval_train:
      train = self.evaluate(parallel, state, 'train')
      row.update(eval_train_loss=train['loss'] + penalty, eval_train_accuracy=train['accuracy'])
    return row

  def train_row(self, step_metrics: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """The epoch's training fields of this task, from its per-step metrics."""
    return {'train_accuracy': rows.finite_mean(step_metrics['accuracy'])}

  def items_per_step(self) -> int:
    """What `throughput_key` counts, per step: images."""
    return self.config.batch_size


class LanguageModel(_Task):
  """examples/language_model.py's AWD-LSTM on the BPTT windows of examples/text_pipeline.py.

  The train state carries the LSTM state of all the `batch_size` streams from window to
  window (zero where a window's 'reset' is 1); evaluation carries that of its
  `eval_batch_size` streams.
  """

  pipeline = text_pipeline
  fields = frozenset(
    {
      'embedding_size',
      'hidden_size',
      'num_layers',
      'output_dropout',
      'hidden_dropout',
      'input_dropout',
      'embedding_dropout',
      'weight_dropout',
      'bptt',
      'eval_batch_size',
      'activation_regularization',
      'temporal_activation_regularization',
    }
  )
  model_names = ('awd_lstm',)
  throughput_key = 'tokens_per_sec'
  scores = (
    Score('valid_perplexity', 'valid perplexity', '.2f', min, 'log'),
    Score('test_perplexity', 'test perplexity', '.2f', min, 'log'),
  )

  # ------------------------------------------------------------------------------------
  # Data

  @staticmethod
  def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks the fields only this task reads (see `examples.schema.validate_config`):
    the corpus, the model's sizes and dropouts, its activation penalties and the
    evaluation streams."""
    check_choice(config, 'dataset', text_pipeline.TEXT_DATASETS)
    if config.validation_fraction:
      raise invalid_field(
        'validation_fraction',
        config.validation_fraction,
        "0 for a language model: its corpus has its own 'validation' split",
      )
    for field in ('embedding_size', 'hidden_size', 'num_layers', 'bptt', 'eval_batch_size'):
      check_number(config, field, lower=1, integer=True)
    for field in (
      'output_dropout',
      'hidden_dropout',
      'input_dropout',
      'embedding_dropout',
      'weight_dropout',
    ):
      check_number(config, field, lower=0, upper=1)
    for field in ('activation_regularization', 'temporal_activation_regularization'):
      check_number(config, field, lower=0)
    if config.eval_batch_size % jax.device_count():
      raise invalid_field(
        'eval_batch_size',
        config.eval_batch_size,
        f'a multiple of the device count {jax.device_count()}',
      )

  def data_options(self) -> text_pipeline.CorpusOptions:
    """The config's fields that the text pipeline reads, besides the split, the batch
    size and the steps: every field of `text_pipeline.CorpusOptions`."""
    fields = dataclasses.fields(text_pipeline.CorpusOptions)
    return text_pipeline.CorpusOptions(**{field.name: self.config[field.name] for field in fields})

  def steps_per_epoch(self) -> int:
    """The steps of an epoch of the (resolved) config: its windows."""
    return text_pipeline.steps_per_epoch(
      self.data_options(), batch_size=self.config.batch_size, steps=self.config.steps_per_epoch
    )

  def _eval_batches(self, split: str) -> Iterator[Batch]:
    return text_pipeline.create_input_iter(
      options=self.data_options(),
      split=split,
      global_batch_size=self.config.eval_batch_size,
      num_steps=self.config.steps_per_eval,
    )

  def abstract_batch(self) -> Batch:
    """The shapes and dtypes of a global training window."""
    window = (self.config.batch_size, self.config.bptt)
    return {
      'inputs': jax.ShapeDtypeStruct(window, jnp.int32),
      'targets': jax.ShapeDtypeStruct(window, jnp.int32),
      'mask': jax.ShapeDtypeStruct(window, jnp.float32),
      'reset': jax.ShapeDtypeStruct(window[:1], jnp.float32),
    }

  # ------------------------------------------------------------------------------------
  # Model

  def create_model(self, *, axis_name: str | None = None) -> nn.Module:
    """The AWD-LSTM of the config, computing in bfloat16 when `config.half_precision`."""
    del axis_name  # No statistics to average.
    config = self.config
    corpus = text_pipeline.load_corpus(config.dataset, config.data_dir)
    return language_model.AWDLSTM(
      corpus.vocab_size,
      embedding_size=config.embedding_size,
      hidden_size=config.hidden_size,
      num_layers=config.num_layers,
      output_dropout=config.output_dropout,
      hidden_dropout=config.hidden_dropout,
      input_dropout=config.input_dropout,
      embedding_dropout=config.embedding_dropout,
      weight_dropout=config.weight_dropout,
      dtype=_dtype(config),
    )

  def init_inputs(self, model: nn.Module) -> tuple[jax.Array, ...]:
    return (jnp.zeros((1, 2), jnp.int32), language_model.initial_carry(model, 1))

  def initial_carry(self, model: nn.Module) -> Any:
    """A zero LSTM state for the `batch_size` training streams."""
    return language_model.initial_carry(model, self.config.batch_size)

  # ------------------------------------------------------------------------------------
  # Steps

  def loss(
    self, model: nn.Module, params: Any, state: Any, batch: Batch, rng: jax.Array, axis_name
  ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    """The mean cross-entropy per token of a BPTT window plus the AR and TAR terms, from
    the carried LSTM state; its 'loss' metric is the cross-entropy alone, and the state
    after the window is carried to the next step."""
    objective, (token_loss, _, carry) = language_model.window_loss(
      model,
      params,
      _window_carry(state, batch, axis_name),
      batch,
      train=True,
      rng=rng,
      alpha=self.config.activation_regularization,
      beta=self.config.temporal_activation_regularization,
    )
    # Every stream ends a window at the same position, so each replica counts alike.
    return objective, ({'loss': token_loss}, {'carry': carry})

  @staticmethod
  def share(forward_state: dict[str, Any], axis_name: str | None) -> dict[str, Any]:
    """The carried state of every replica's streams, in replica order."""
    return _all_rows(forward_state, axis_name)

  @staticmethod
  def eval_step(state: Any, batch: Batch, *, model: nn.Module, axis_name: str | None = None):
    """Sums of the cross-entropy and the real tokens of a window of the evaluation
    streams, from the state `state.carry`, and the state after the window as 'carry'."""
    _, (token_loss, count, carry) = language_model.window_loss(
      model,
      state.eval_variables()['params'],
      _window_carry(state, batch, axis_name),
      batch,
      train=False,
    )
    sums = {'loss': token_loss * count, 'count': count}
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return {**sums, 'carry': _all_rows(carry, axis_name)}

  # ------------------------------------------------------------------------------------
  # Rows

  def evaluate(self, parallel: Any, state: Any, split: str) -> dict[str, float]:
    """The loss per token and the perplexity over `split` ('valid' or 'test') in
    `config.eval_batch_size` streams, the LSTM state carried from window to window."""
    # Zero states for the evaluation streams, placed on the devices as the train state.
    streams = self.config.eval_batch_size
    carry = parallel.put_state(
      jax.tree.map(lambda x: np.zeros((streams, x.shape[-1]), x.dtype), state.carry)
    )
    sums = []
    for batch in self._eval_batches(split):
      window = parallel.eval_step(state.replace(carry=carry), parallel.put_batch(batch))
      carry = window.pop('carry')
      sums.append(window)
    totals = _sum_over_batches(parallel, sums)
    loss = totals['loss'] / max(totals['count'], 1.0)
    return {'loss': loss, 'perplexity': math.exp(loss)}

  def eval_row(self, parallel: Any, state: Any, penalty: float) -> dict[str, float]:
    """An epoch's evaluation fields: the loss and perplexity of 'valid' and 'test'."""
    del penalty  # The perplexity is of the cross-entropy alone.
    row = {}
    for split in ('valid', 'test'):
      result = self.evaluate(parallel, state, split)
      row.update({f'{split}_loss': result['loss'], f'{split}_perplexity': result['perplexity']})
    return row

  def train_row(self, step_metrics: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    del step_metrics
    return {'train_accuracy': None}

  def items_per_step(self) -> int:
    """What `throughput_key` counts, per step: tokens."""
    return self.config.batch_size * self.config.bptt


def _replica_rows(tree: Any, rows: int, axis_name: str | None) -> Any:
  """This replica's `rows` rows of arrays that hold all the streams; all of them under jit."""
  if axis_name is None:
    return tree
  first = jax.lax.axis_index(axis_name) * rows
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, first, rows), tree)


def _all_rows(tree: Any, axis_name: str | None) -> Any:
  """The rows of every replica, in replica order: the inverse of `_replica_rows`."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), tree)


def _window_carry(state: Any, batch: Batch, axis_name: str | None) -> Any:
  """The LSTM state entering the window: the carried one, zero where 'reset' is 1."""
  carry = _replica_rows(state.carry, batch['inputs'].shape[0], axis_name)
  keep = (1.0 - batch['reset'])[:, None]
  return jax.tree.map(lambda x: x * keep.astype(x.dtype), carry)


Task = ImageClassification | LanguageModel

# The task of each model of `config.model`.
TASKS: dict[str, type[Task]] = {
  model: task for task in (ImageClassification, LanguageModel) for model in task.model_names
}
# The fields that only some tasks read (`fields` of each).
TASK_FIELDS = frozenset().union(*(task.fields for task in (ImageClassification, LanguageModel)))


def create_task(config: ml_collections.ConfigDict) -> Task:
  """The task of `config.model` for the (resolved) `config`."""
  if config.model not in TASKS:
    raise invalid_field('model', config.model, f'one of {", ".join(map(repr, TASKS))}')
  return TASKS[config.model](config)
