"""Tests for the AWD-LSTM language model: sizes, tied weights, dropouts, carried state, loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from examples import language_model as lm
from examples import text_pipeline as tp

NO_DROPOUT = dict(output_dropout=0.0, hidden_dropout=0.0, input_dropout=0.0, embedding_dropout=0.0)


def _tiny(**fields):
  return lm.AWDLSTM(vocab_size=23, embedding_size=6, hidden_size=10, num_layers=3, **fields)


def _tokens(batch=3, time=7, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 23, (batch, time)), jnp.int32)


def _init(model):
  """The tiny models' parameters, which do not depend on the dropout rates: initialised once
  (compiling the initialisers of three layers costs more than all the applies)."""
  assert (model.vocab_size, model.embedding_size, model.hidden_size) == (23, 6, 10)
  return _tiny_variables()


@functools.cache
def _tiny_variables():
  model = _tiny()
  return _jit_init(model, _tokens(1, 2), lm.initial_carry(model, 1))


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(model, tokens, carry):
  return model.init(jax.random.key(0), tokens, carry, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _eval(model, variables, tokens, carry):
  return model.apply(variables, tokens, carry, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _train(model, variables, tokens, carry, key):
  return model.apply(variables, tokens, carry, train=True, rngs={'dropout': key})


def _apply(model, variables, tokens, carry, key=None):
  if key is None:
    return _eval(model, variables, tokens, carry)
  return _train(model, variables, tokens, carry, jax.random.key(key))


def test_parameter_count_is_the_reference_configuration_less_one_bias_per_gate():
  # The reference's PTB model: 10,000 words, emsize 400, nhid 1150, 3 layers. Its main.py
  # prints 24,221,600 parameters; PyTorch's LSTM has two biases per gate where Flax's
  # cell has one, 4 * (1150 + 1150 + 400) = 10,800 fewer.
  reference = lm.reference_parameter_count(10_000, 400, 1150, 3)
  assert reference == 24_221_600
  model = lm.AWDLSTM(vocab_size=10_000)
  variables = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32), lm.initial_carry(model, 1), train=False
    )
  )
  count = sum(x.size for x in jax.tree.leaves(variables))
  assert count == reference - 4 * (1150 + 1150 + 400)
  assert set(variables) == {'params'}
  # The last layer is as wide as the embedding, and no decoder matrix exists besides it.
  assert variables['params']['lstm_2']['cell']['hi']['kernel'].shape == (400, 400)
  assert set(variables['params']) == {'embedding', 'decoder_bias', 'lstm_0', 'lstm_1', 'lstm_2'}


def test_initialisation_is_the_references():
  params = _init(_tiny())['params']
  embedding = np.asarray(params['embedding']['embedding'])
  assert 0.09 < np.abs(embedding).max() <= 0.1
  assert np.all(np.asarray(params['decoder_bias']) == 0)
  for layer, size in (('lstm_0', 10), ('lstm_1', 10), ('lstm_2', 6)):
    values = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params[layer])])
    # PyTorch's LSTM default, biases included (the forget gate's is not set to 1).
    assert 0.95 / np.sqrt(size) < np.abs(values).max() <= 1 / np.sqrt(size)
    assert abs(np.mean(values)) < 0.1 / np.sqrt(size)


def test_output_embedding_is_the_input_embedding():
  model = _tiny(**NO_DROPOUT, weight_dropout=0.0)
  variables = _init(model)
  tokens, carry = _tokens(), lm.initial_carry(model, 3)
  logits, _, activations = _apply(model, variables, tokens, carry)
  embedding = variables['params']['embedding']['embedding']
  expected = activations['dropped'] @ embedding.T + variables['params']['decoder_bias']
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  # A change of one word's embedding changes its logit: the decoder reads the same matrix.
  bumped = jax.tree.map(lambda x: x, variables)
  bumped['params']['embedding']['embedding'] = embedding.at[5].add(1.0)
  bumped_logits, _, _ = _apply(model, bumped, tokens, carry)
  assert not np.allclose(bumped_logits[..., 5], logits[..., 5])


def test_dropouts_are_off_in_eval_and_on_in_training():
  model = _tiny()
  variables = _init(model)
  tokens, carry = _tokens(), lm.initial_carry(model, 3)
  evaluated, _, _ = _apply(model, variables, tokens, carry)
  # Eval ignores any key: deterministic, and equal to a model without dropouts.
  again, _, _ = jax.jit(
    lambda v: model.apply(v, tokens, carry, train=False, rngs={'dropout': jax.random.key(9)})
  )(variables)
  np.testing.assert_array_equal(evaluated, again)
  plain, _, _ = _apply(_tiny(**NO_DROPOUT, weight_dropout=0.0), variables, tokens, carry)
  np.testing.assert_array_equal(evaluated, plain)
  first, _, _ = _apply(model, variables, tokens, carry, key=1)
  second, _, _ = _apply(model, variables, tokens, carry, key=2)
  assert not np.allclose(first, evaluated)
  assert not np.allclose(first, second)


@pytest.mark.parametrize('name', ['input_dropout', 'hidden_dropout', 'output_dropout'])
def test_locked_dropout_masks_are_shared_by_all_time_steps(name):
  model = _tiny(**{**NO_DROPOUT, name: 0.5}, weight_dropout=0.0)
  variables = _init(model)
  tokens, carry = _tokens(4, 9), lm.initial_carry(model, 4)
  _, _, activations = _apply(model, variables, tokens, carry, key=3)
  if name == 'output_dropout':
    raw, dropped = np.asarray(activations['raw']), np.asarray(activations['dropped'])
    zero = dropped == 0
    # A feature of a sequence is dropped at every step or at none.
    assert np.all(zero == zero[:, :1])
    assert 0 < zero[:, 0].mean() < 1
    np.testing.assert_allclose(dropped[~zero], 2 * raw[~zero], rtol=1e-6)
  else:
    # The masks are not visible from outside; they must change the result.
    plain, _, _ = _apply(model, variables, tokens, carry)
    dropped, _, _ = _apply(model, variables, tokens, carry, key=3)
    assert not np.allclose(plain, dropped)


def test_embedding_dropout_drops_whole_words():
  model = _tiny(**{**NO_DROPOUT, 'embedding_dropout': 0.5}, weight_dropout=0.0)
  carry = lm.initial_carry(model, 1)
  variables = _init(model)
  (_, _, _), intermediates = jax.jit(
    lambda v: model.apply(
      v,
      _tokens(1, 5),
      carry,
      train=True,
      rngs={'dropout': jax.random.key(4)},
      capture_intermediates=lambda module, _: isinstance(module, nn.Dropout),
      mutable=['intermediates'],
    )
  )(variables)
  # The first dropout is the one over word ids: one factor per word, 0 or 1 / (1 - 0.5).
  word_mask = np.asarray(intermediates['intermediates']['Dropout_0']['__call__'][0])
  assert word_mask.shape == (23, 1)
  assert set(np.unique(word_mask)) == {0.0, 2.0}
  dropped = np.flatnonzero(word_mask[:, 0] == 0)
  kept = np.flatnonzero(word_mask[:, 0] == 2)

  def run(word):
    tokens = jnp.full((1, 5), word, jnp.int32)
    return _apply(model, variables, tokens, carry, key=4)[0]

  # Every occurrence of a dropped word enters as zeros: two dropped words read alike.
  np.testing.assert_allclose(run(dropped[0]), run(dropped[1]), rtol=1e-6)
  assert not np.allclose(run(kept[0]), run(dropped[0]))


def test_weight_dropout_leaves_the_first_step_alone():
  # The reference's own check: with a zero initial state the first step does not read the
  # hidden-to-hidden weights, so DropConnect cannot change it; later steps differ.
  model = _tiny(**NO_DROPOUT, weight_dropout=0.9)
  variables = _init(model)
  tokens, carry = _tokens(), lm.initial_carry(model, 3)
  first, _, _ = _apply(model, variables, tokens, carry, key=1)
  second, _, _ = _apply(model, variables, tokens, carry, key=2)
  np.testing.assert_allclose(first[:, 0], second[:, 0], rtol=1e-6)
  assert not np.allclose(first[:, 1:], second[:, 1:])


def test_drop_recurrent_kernels_masks_only_hidden_to_hidden_kernels():
  model = _tiny()
  variables = {'params': _init(model)['params']['lstm_0']}
  dropped = lm._drop_recurrent_kernels(variables, rate=0.5, key=jax.random.key(0))
  for name, dense in variables['params']['cell'].items():
    new = dropped['params']['cell'][name]
    if name.startswith('h'):
      kernel, result = np.asarray(dense['kernel']), np.asarray(new['kernel'])
      kept = result != 0
      assert 0.3 < kept.mean() < 0.7
      np.testing.assert_allclose(result[kept], 2 * kernel[kept], rtol=1e-6)
      np.testing.assert_array_equal(new['bias'], dense['bias'])
    else:
      np.testing.assert_array_equal(new['kernel'], dense['kernel'])


def test_carried_state_continues_the_sequence():
  # Two windows with the state carried between them compute what one long window does.
  model = _tiny(**NO_DROPOUT, weight_dropout=0.0)
  variables = _init(model)
  tokens, carry = _tokens(3, 10), lm.initial_carry(model, 3)
  whole, whole_carry, _ = _apply(model, variables, tokens, carry)
  head, head_carry, _ = _apply(model, variables, tokens[:, :4], carry)
  tail, tail_carry, _ = _apply(model, variables, tokens[:, 4:], head_carry)
  np.testing.assert_allclose(jnp.concatenate([head, tail], 1), whole, rtol=1e-5, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), tail_carry, whole_carry
  )
  # And a fresh state gives another continuation.
  fresh, _, _ = _apply(model, variables, tokens[:, 4:], carry)
  assert not np.allclose(fresh, tail)


def test_carry_of_the_wrong_depth_is_refused():
  model = _tiny()
  with pytest.raises(ValueError, match='one \\(cell, hidden\\) pair per layer \\(3\\), got 2'):
    model.init(jax.random.key(0), _tokens(), lm.initial_carry(model, 3)[:2], train=False)


def test_loss_counts_real_tokens_only():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
  targets = jnp.asarray([[0, 1, 2], [3, 4, 0]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1], [1, 0, 0]], jnp.float32)
  loss, count = lm.language_model_loss(logits, targets, mask)
  log_probs = jax.nn.log_softmax(logits)
  expected = -np.mean(
    [log_probs[0, 0, 0], log_probs[0, 1, 1], log_probs[0, 2, 2], log_probs[1, 0, 3]]
  )
  assert count == 4
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_activation_regularization_is_the_references_on_real_tokens():
  rng = np.random.default_rng(0)
  raw = rng.normal(size=(2, 4, 3)).astype(np.float32)
  dropped = rng.normal(size=(2, 4, 3)).astype(np.float32)
  mask = np.ones((2, 4), np.float32)
  activations = {'raw': jnp.asarray(raw), 'dropped': jnp.asarray(dropped)}
  value = lm.activation_regularization(activations, jnp.asarray(mask), 2.0, 1.0)
  expected = 2.0 * np.mean(dropped**2) + 1.0 * np.mean((raw[:, 1:] - raw[:, :-1]) ** 2)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # Padding (mask 0) at the end of the second sequence is left out of both terms.
  mask[1, 2:] = 0
  value = lm.activation_regularization(activations, jnp.asarray(mask), 2.0, 1.0)
  ar = np.sum(dropped**2 * mask[..., None]) / (6 * 3)
  pairs = mask[:, 1:] * mask[:, :-1]
  tar = np.sum((raw[:, 1:] - raw[:, :-1]) ** 2 * pairs[..., None]) / (4 * 3)
  np.testing.assert_allclose(value, 2.0 * ar + tar, rtol=1e-6)


def test_window_loss_blocks_gradients_into_the_carry_and_learns():
  model = _tiny(**NO_DROPOUT, weight_dropout=0.0)
  variables = _init(model)
  batch = {
    'inputs': _tokens(),
    'targets': _tokens(seed=1),
    'mask': jnp.ones((3, 7), jnp.float32),
  }
  carry = lm.initial_carry(model, 3)
  carry_grads = jax.jit(
    jax.grad(lambda c: lm.window_loss(model, variables['params'], c, batch, train=False)[0])
  )(carry)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(carry_grads))
  (objective, (token_loss, count, new_carry)), grads = jax.jit(
    jax.value_and_grad(
      lambda p: lm.window_loss(
        model, p, carry, batch, train=True, rng=jax.random.key(0), alpha=2.0
      ),
      has_aux=True,
    )
  )(variables['params'])
  assert count == 21
  assert objective > token_loss
  assert len(new_carry) == 3
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_a_short_run_on_the_default_corpus_learns():
  # Fifty SGD steps of the reference's recipe (clip 0.25, lr 30), a tiny model, carried
  # state: the validation perplexity ends far below the vocabulary size, where a
  # uniform guess would be.
  corpus = tp.load_corpus('python_docs')
  model = lm.AWDLSTM(corpus.vocab_size, 16, 32, 2, input_dropout=0.1, hidden_dropout=0.1)
  train_streams = tp.batchify(corpus.train, 20)
  valid_streams = tp.batchify(corpus.valid, 10)
  tx = optax.chain(optax.clip_by_global_norm(0.25), optax.sgd(30.0))
  params = _jit_init(model, train_streams[:1, :2], lm.initial_carry(model, 1))['params']
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, carry, batch, key):
    grads, (_, _, carry) = jax.grad(lm.window_loss, argnums=1, has_aux=True)(
      model, params, carry, batch, train=True, rng=key, alpha=2.0, beta=1.0
    )
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, carry

  @jax.jit
  def evaluate(params, carry, batch):
    _, (loss, count, carry) = lm.window_loss(model, params, carry, batch, train=False)
    return loss * count, count, carry

  def valid_perplexity(params):
    carry, total, count = lm.initial_carry(model, 10), 0.0, 0.0
    for batch in tp.bptt_windows(valid_streams, 35):
      loss_sum, n, carry = evaluate(params, carry, batch)
      total, count = total + float(loss_sum), count + float(n)
    assert count == valid_streams.shape[0] * (valid_streams.shape[1] - 1)
    return np.exp(total / count)

  before = valid_perplexity(params)
  carry = lm.initial_carry(model, 20)
  for i, batch in enumerate(tp.bptt_windows(train_streams, 35, stop=50)):
    params, opt_state, carry = step(params, opt_state, carry, batch, jax.random.key(i))
  after = valid_perplexity(params)
  assert before > 0.8 * corpus.vocab_size
  assert after < corpus.vocab_size / 5, (before, after)
