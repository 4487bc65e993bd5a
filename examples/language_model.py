"""A word-level LSTM language model after AWD-LSTM, and its loss.

Merity, Keskar and Socher, "Regularizing and Optimizing LSTM Language Models" (ICLR 2018),
and the salesforce/awd-lstm-lm code that the CoolMomentum authors trained on Penn Treebank:

* an embedding of `embedding_size`, whose whole rows (words) are dropped with rate
  `embedding_dropout` ("dropoute"), the kept rows scaled by 1 / (1 - rate);
* variational ("locked") dropout: one mask per sequence, shared by all time steps, on the
  embedded input (`input_dropout`, "dropouti"), between LSTM layers (`hidden_dropout`,
  "dropouth") and on the last layer's output (`output_dropout`, "dropout");
* `num_layers` LSTM layers of `hidden_size`, the last one of `embedding_size` so that the
  decoder can reuse the embedding matrix (tied weights, Press & Wolf 2017; Inan et al. 2017);
* DropConnect on the hidden-to-hidden kernels (`weight_dropout`, "wdrop"): one mask per
  forward pass (per BPTT window), shared by all time steps and sequences;
* the initialisation of the reference: embedding uniform in [-0.1, 0.1], decoder bias 0,
  LSTM weights and biases uniform in [-1/sqrt(hidden), 1/sqrt(hidden)] (PyTorch's default).

The layers are Flax's `nn.RNN` over `nn.OptimizedLSTMCell`, batch first. The DropConnect is
`nn.map_variables` on the recurrent kernels of the cell, applied outside the time scan, so one
mask serves the whole window. Flax's cell has one bias per gate where PyTorch's LSTM has two
(`bias_ih` and `bias_hh`, which only ever act as their sum): the model has `4 * hidden` fewer
parameters per layer than the reference, and computes the same functions.

The model maps `(tokens [batch, time], carry)` to `(logits [batch, time, vocab], carry,
activations)`. The carry is the LSTM state of every layer after the window; the trainer hands
it to the next window (truncated back-propagation through time) and starts every epoch from
`initial_carry`. `activations` holds the last layer's output before and after its dropout,
for the reference's activation regularisation (AR) and temporal activation regularisation
(TAR).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

__all__ = [
  'AWDLSTM',
  'Carry',
  'activation_regularization',
  'initial_carry',
  'language_model_loss',
  'reference_parameter_count',
  'token_cross_entropy',
  'window_loss',
]

# One (cell, hidden) pair per layer, each [batch, size of that layer].
Carry = tuple[tuple[jax.Array, jax.Array], ...]

# The recurrent kernels of nn.OptimizedLSTMCell: one Dense 'h<gate>' per gate.
_RECURRENT_KERNELS = ('hi', 'hf', 'hg', 'ho')


def _symmetric_uniform(limit: float) -> nn.initializers.Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def _drop_recurrent_kernels(
  variables: Mapping[str, Any], *, rate: float, key: jax.Array | None
) -> Mapping[str, Any]:
  """DropConnect on the cell's hidden-to-hidden kernels: elementwise, scaled by 1/(1-rate)."""
  if key is None or rate == 0.0:
    return variables
  params = dict(variables['params'])
  cell = dict(params['cell'])
  for name, subkey in zip(_RECURRENT_KERNELS, jax.random.split(key, 4), strict=True):
    kernel = cell[name]['kernel']
    keep = jax.random.bernoulli(subkey, 1.0 - rate, kernel.shape)
    dropped = jnp.where(keep, kernel / (1.0 - rate), jnp.zeros_like(kernel))
    cell[name] = {**cell[name], 'kernel': dropped}
  params['cell'] = cell
  return {**variables, 'params': params}


class _LSTMLayer(nn.Module):
  """One LSTM layer over a window: `nn.RNN` of an `nn.OptimizedLSTMCell` named 'cell'."""

  size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, carry: tuple[jax.Array, jax.Array]
  ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    # PyTorch's LSTM initialisation, which the reference keeps.
    limit = 1.0 / math.sqrt(self.size)
    cell = nn.OptimizedLSTMCell(
      self.size,
      kernel_init=_symmetric_uniform(limit),
      recurrent_kernel_init=_symmetric_uniform(limit),
      bias_init=_symmetric_uniform(limit),
      dtype=self.dtype,
      name='cell',
    )
    return nn.RNN(cell, return_carry=True)(x, initial_carry=carry)


class AWDLSTM(nn.Module):
  """The AWD-LSTM language model (the reference's defaults; dropout rates as its main.py).

  Attributes:
    vocab_size: number of words, `<eos>` and `<unk>` included.
    embedding_size: width of the (tied) embedding and of the last LSTM layer ("emsize").
    hidden_size: width of the other LSTM layers ("nhid").
    num_layers: LSTM layers ("nlayers").
    output_dropout: locked dropout on the last layer's output ("dropout").
    hidden_dropout: locked dropout between LSTM layers ("dropouth").
    input_dropout: locked dropout on the embedded words ("dropouti").
    embedding_dropout: rate at which whole words of the embedding are dropped ("dropoute").
    weight_dropout: DropConnect on the hidden-to-hidden kernels ("wdrop").
    dtype: computation dtype; parameters stay float32 and the logits are float32.
  """

  vocab_size: int
  embedding_size: int = 400
  hidden_size: int = 1150
  num_layers: int = 3
  output_dropout: float = 0.4
  hidden_dropout: float = 0.3
  input_dropout: float = 0.65
  embedding_dropout: float = 0.1
  weight_dropout: float = 0.5
  dtype: Any = jnp.float32

  def layer_sizes(self) -> tuple[int, ...]:
    """The width of each LSTM layer; the last one matches the embedding (tied weights)."""
    return (self.hidden_size,) * (self.num_layers - 1) + (self.embedding_size,)

  @nn.compact
  def __call__(
    self, tokens: jax.Array, carry: Carry, *, train: bool
  ) -> tuple[jax.Array, Carry, dict[str, jax.Array]]:
    """Runs one window.

    Args:
      tokens: int32 [batch, time] word ids.
      carry: the LSTM state entering the window (see `initial_carry`).
      train: apply the dropouts (they draw from the 'dropout' rng).

    Returns:
      `(logits, carry, activations)`: float32 logits [batch, time, vocab], the state
      after the window, and `{'raw': ..., 'dropped': ...}`, the last layer's output
      [batch, time, embedding_size] before and after its dropout.
    """
    if len(carry) != self.num_layers:
      raise ValueError(
        f'carry must hold one (cell, hidden) pair per layer ({self.num_layers}), got {len(carry)}.'
      )
    embedding = nn.Embed(
      self.vocab_size,
      self.embedding_size,
      embedding_init=_symmetric_uniform(0.1),
      name='embedding',
    )
    x = embedding(tokens)
    if train and self.embedding_dropout > 0:
      # Dropping rows of the matrix before the look-up drops every occurrence of a word
      # alike; a mask per word id gathered with the tokens is the same and costs less.
      word_mask = nn.Dropout(self.embedding_dropout, deterministic=False)(
        jnp.ones((self.vocab_size, 1), x.dtype)
      )
      x = x * word_mask[tokens]
    x = x.astype(self.dtype)

    def locked_dropout(y: jax.Array, rate: float) -> jax.Array:
      # One mask per sequence and feature, shared by every time step (axis 1).
      return nn.Dropout(rate, broadcast_dims=(1,), deterministic=not train)(y)

    x = locked_dropout(x, self.input_dropout)
    new_carry = []
    for layer, size in enumerate(self.layer_sizes()):
      key = self.make_rng('dropout') if train and self.weight_dropout > 0 else None
      layer_module = nn.map_variables(
        _LSTMLayer,
        'params',
        trans_in_fn=functools.partial(_drop_recurrent_kernels, rate=self.weight_dropout, key=key),
        init=self.is_initializing(),
      )(size, dtype=self.dtype, name=f'lstm_{layer}')
      layer_carry, x = layer_module(x, carry[layer])
      new_carry.append(layer_carry)
      if layer < self.num_layers - 1:
        x = locked_dropout(x, self.hidden_dropout)
    raw = x
    dropped = locked_dropout(raw, self.output_dropout)
    bias = self.param('decoder_bias', nn.initializers.zeros_init(), (self.vocab_size,))
    logits = embedding.attend(dropped.astype(jnp.float32)) + bias
    return logits, tuple(new_carry), {'raw': raw, 'dropped': dropped}


def initial_carry(model: AWDLSTM, batch_size: int, dtype: Any = jnp.float32) -> Carry:
  """Zero LSTM states for `batch_size` sequences, as the reference's `init_hidden`.

  The pair is (cell, hidden), the order of `nn.OptimizedLSTMCell`.
  """
  return tuple(
    (jnp.zeros((batch_size, size), dtype), jnp.zeros((batch_size, size), dtype))
    for size in model.layer_sizes()
  )


def reference_parameter_count(
  vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int
) -> int:
  """Parameters of the reference's tied LSTM model, as its main.py prints them.

  The embedding (shared with the decoder, so counted once), the decoder bias, and per
  PyTorch LSTM layer `4h x (input + h)` weights and two biases of `4h`.
  """
  sizes = (hidden_size,) * (num_layers - 1) + (embedding_size,)
  inputs = (embedding_size, *sizes[:-1])
  lstm = sum(4 * h * (i + h) + 2 * 4 * h for i, h in zip(inputs, sizes, strict=True))
  return vocab_size * embedding_size + vocab_size + lstm


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token softmax cross-entropy (nats), [batch, time]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def activation_regularization(
  activations: Mapping[str, jax.Array], mask: jax.Array, alpha: float, beta: float
) -> jax.Array:
  """The reference's AR and TAR terms, over the real tokens (mask 1).

  `alpha * mean(dropped ** 2)` on the last layer's dropped output, plus
  `beta * mean((raw[:, t + 1] - raw[:, t]) ** 2)` on its raw output, the means taken
  over features and real positions (pairs of real positions for TAR).
  """
  total = jnp.zeros([], jnp.float32)
  width = activations['raw'].shape[-1]
  if alpha:
    dropped = activations['dropped'].astype(jnp.float32)
    squares = jnp.sum(jnp.square(dropped), -1)
    total += alpha * jnp.sum(squares * mask) / jnp.maximum(jnp.sum(mask) * width, 1.0)
  if beta:
    raw = activations['raw'].astype(jnp.float32)
    squares = jnp.sum(jnp.square(raw[:, 1:] - raw[:, :-1]), -1)
    pairs = mask[:, 1:] * mask[:, :-1]
    total += beta * jnp.sum(squares * pairs) / jnp.maximum(jnp.sum(pairs) * width, 1.0)
  return total


def window_loss(
  model: AWDLSTM,
  params: Any,
  carry: Carry,
  batch: Mapping[str, jax.Array],
  *,
  train: bool,
  rng: jax.Array | None = None,
  alpha: float = 0.0,
  beta: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Carry]]:
  """The objective of one BPTT window and what the trainer reports of it.

  Args:
    model: the language model.
    params: its parameters.
    carry: the LSTM state entering the window; no gradient flows into it (truncated BPTT).
    batch: 'inputs', 'targets' and 'mask', [batch, bptt] (see `text_pipeline.bptt_windows`).
    train: dropouts on, drawing from `rng`.
    rng: the dropout key of the step.
    alpha: the AR factor; 0 for none.
    beta: the TAR factor; 0 for none.

  Returns:
    `(objective, (token_loss, count, carry))`: the mean cross-entropy per real token plus
    AR and TAR (the value to differentiate), the cross-entropy alone, the number of real
    tokens, and the LSTM state after the window.
  """
  logits, new_carry, activations = model.apply(
    {'params': params},
    batch['inputs'],
    jax.lax.stop_gradient(carry),
    train=train,
    rngs={'dropout': rng} if train else None,
  )
  token_loss, count = language_model_loss(logits, batch['targets'], batch['mask'])
  objective = token_loss + activation_regularization(activations, batch['mask'], alpha, beta)
  return objective, (token_loss, count, new_carry)


def language_model_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy per real token (mask 1) and the count of real tokens.

  The perplexity is `exp` of the mean; the padding after the end of a stream (mask 0)
  counts for nothing.
  """
  losses = token_cross_entropy(logits, targets)
  count = jnp.sum(mask)
  return jnp.sum(losses * mask) / jnp.maximum(count, 1.0), count
