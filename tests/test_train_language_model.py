"""The trainer on the AWD-LSTM language model: metrics, exact resume inside an epoch,
pmap against jit, the recipe and examples.compare."""

import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import optax
import pytest

from examples import (
  checkpoints,
  compare,
  language_model,
  optimizers,
  schema,
  tasks,
  text_pipeline,
  train,
  train_state,
  workdir,
)
from examples.configs import lstm_lm
from tests.helpers import assert_same_rows, read_rows, tiny_language_model

NO_DROPOUT = (
  'output_dropout',
  'hidden_dropout',
  'input_dropout',
  'embedding_dropout',
  'weight_dropout',
)
LM_ROW_KEYS = {
  'train_loss',
  'valid_loss',
  'valid_perplexity',
  'test_loss',
  'test_perplexity',
  'kinetic_temperature',
  'rho',
  'learning_rate',
  'tokens_per_sec',
}


def _recipe(**fields) -> ml_collections.ConfigDict:
  # Batches of 8 streams: the tests' 8 devices divide neither 20 nor 10.
  config = lstm_lm.get_config()
  config.update({'batch_size': 8, 'eval_batch_size': 8, **fields})
  return config


def test_recipe_is_the_authors_command():
  config = schema.resolve_config(lstm_lm.get_config())
  assert (config.batch_size, config.num_epochs, config.seed) == (20, 500, 141)
  assert (config.input_dropout, config.hidden_dropout) == (0.4, 0.25)
  assert (config.embedding_size, config.hidden_size, config.num_layers) == (400, 1150, 3)
  assert (config.learning_rate, config.rho_0, config.weight_decay) == (0.1, 0.99, 1.2e-6)
  assert config.gradient_clip == 0.25
  for optimizer in ('coolmomentum', 'sgd'):
    schema.validate_config(_recipe(optimizer=optimizer))
  assert schema.resolve_config(_recipe(optimizer='sgd')).learning_rate == 30.0
  schema.validate_config(_recipe(dataset='ptb'))
  with pytest.raises(ValueError, match=r"config\.dataset must be one of 'python_docs', 'ptb'"):
    schema.validate_config(_recipe(dataset='cifar10'))
  with pytest.raises(ValueError, match=r'config\.weight_dropout must be a number in \[0, 1\)'):
    schema.validate_config(_recipe(weight_dropout=1.0))
  with pytest.raises(ValueError, match=r'config\.eval_batch_size must be a multiple of the device'):
    schema.validate_config(_recipe(eval_batch_size=10))


def test_trains_and_resumes_exactly_inside_an_epoch(tmp_path):
  # Checkpoints every 2 steps of 4-step epochs: the run loses its last one (step 8) and
  # the row of epoch 2, and resumes at step 6, inside epoch 2, with the LSTM state that
  # the checkpoint carried; it must end as an uninterrupted run.
  resumed, straight = tmp_path / 'resumed', tmp_path / 'straight'
  config = tiny_language_model(optimizer='sgd', checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(resumed))
  shutil.rmtree(resumed / checkpoints.CHECKPOINT_DIR / '8')
  assert os.path.isdir(resumed / checkpoints.CHECKPOINT_DIR / '6')
  resumed_state = train.train_and_evaluate(config, str(resumed))
  straight_state = train.train_and_evaluate(config, str(straight))

  rows = read_rows(straight)
  assert [row['epoch'] for row in rows] == [1, 2]
  vocab_size = text_pipeline.load_corpus('python_docs').vocab_size
  for row in rows:
    assert row.keys() >= LM_ROW_KEYS
    assert all(row[key] is not None for key in LM_ROW_KEYS - {'rho'}), row
    assert row['rho'] is None  # SGD has no rho
    np.testing.assert_allclose(row['valid_perplexity'], math.exp(row['valid_loss']), rtol=1e-9)
  # SGD at lr 30 learns from the first windows: below a uniform guess, and lower again.
  assert rows[1]['valid_perplexity'] < rows[0]['valid_perplexity'] < vocab_size
  assert_same_rows(read_rows(resumed), rows)
  jax.tree.map(np.testing.assert_array_equal, resumed_state.params, straight_state.params)
  jax.tree.map(np.testing.assert_array_equal, resumed_state.carry, straight_state.carry)
  assert resumed_state.carry[0][0].shape == (8, 16)
  assert os.path.exists(straight / workdir.CURVES_FILE)
  with open(straight / workdir.CONFIG_FILE) as f:
    assert json.load(f)['model'] == 'awd_lstm'


def test_pmap_and_jit_train_alike(tmp_path):
  # Without dropout both compute the same steps: under pmap each replica takes its row of
  # the carried state and gathers the new rows of all.
  no_dropout = {name: 0.0 for name in NO_DROPOUT}
  fields = dict(num_epochs=1, steps_per_epoch=3, **no_dropout)
  pmap = train.train_and_evaluate(
    tiny_language_model(parallelism='pmap', **fields), str(tmp_path / 'pmap')
  )
  jit = train.train_and_evaluate(
    tiny_language_model(parallelism='jit', **fields), str(tmp_path / 'jit')
  )
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)  # noqa: E731
  jax.tree.map(close, pmap.params, jit.params)
  jax.tree.map(close, pmap.carry, jit.carry)
  (pmap_row,), (jit_row,) = read_rows(tmp_path / 'pmap'), read_rows(tmp_path / 'jit')
  for key in ('train_loss', 'valid_perplexity', 'test_perplexity', 'kinetic_temperature'):
    np.testing.assert_allclose(pmap_row[key], jit_row[key], rtol=2e-4, err_msg=key)


def test_weight_decay_is_added_to_the_clipped_gradient(tmp_path):
  # The reference clips the objective's gradient, then its SGD adds the decay: one step
  # of SGD at lr 30 is w - 30 * (clip(g) + wd * w), not w - 30 * clip(g + wd * w).
  fields = {name: 0.0 for name in NO_DROPOUT}
  config = tiny_language_model(
    optimizer='sgd', num_epochs=1, steps_per_epoch=1, weight_decay=0.01, **fields
  )
  resolved = schema.resolve_config(config)
  resolved.steps_per_epoch = 1
  task = tasks.create_task(resolved)
  model = task.create_model()
  tx, _ = optimizers.create_optimizer(resolved, 1)
  initial = train_state.create_train_state(
    jax.random.PRNGKey(resolved.seed),
    model,
    task.init_inputs(model),
    tx,
    carry=task.initial_carry(model),
  )
  batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), next(iter(task.train_batches(0))))
  grads = jax.grad(
    lambda p: language_model.window_loss(
      model,
      p,
      initial.carry,
      batch,
      train=True,
      rng=jax.random.PRNGKey(0),
      alpha=resolved.activation_regularization,
      beta=resolved.temporal_activation_regularization,
    )[0]
  )(initial.params)
  norm = optax.tree.norm(grads)
  assert norm > resolved.gradient_clip  # The clipping acts.
  expected = jax.tree.map(
    lambda w, g: w - 30.0 * (g * resolved.gradient_clip / norm + 0.01 * w), initial.params, grads
  )
  final = train.train_and_evaluate(config, str(tmp_path))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
  jax.tree.map(close, final.params, expected)


def test_compare_reports_perplexities(tmp_path):
  results = compare.compare(
    tiny_language_model(num_epochs=1, steps_per_epoch=2), str(tmp_path), ['coolmomentum', 'sgd']
  )
  assert set(results) == {'coolmomentum', 'sgd'}
  for result in results.values():
    assert result['valid_perplexity'] == result['best_valid_perplexity'] > 1
    assert result['test_perplexity'] > 1
  table = (tmp_path / 'comparison.md').read_text()
  assert 'best valid perplexity' in table and '| sgd |' in table
  assert (tmp_path / 'comparison.png').exists()
  rows = read_rows(tmp_path / 'coolmomentum')
  assert rows[0]['rho'] is not None and rows[0]['learning_rate'] == 0.1
