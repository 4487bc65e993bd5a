"""Flax Linen models for the reference trainers.

All models share one calling convention so that a single trainer can drive any of them::

  model = get_model('resnet20', num_classes=10)
  variables = model.init(rng, x, train=False)
  logits, updates = model.apply(
    variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng}
  )
  logits = model.apply(variables, x, train=False)

Inputs are NHWC. ``dtype`` is the computation dtype; parameters are always float32 and
the logits are returned in float32, so the loss is computed at full precision. ``axis_name``
is handed to every ``nn.BatchNorm``, so that under ``jax.pmap(..., axis_name=...)`` the batch
statistics are averaged over all replicas. Models without dropout ignore the ``'dropout'`` rng.

Which parameters a penalty applies to
-------------------------------------
The masks go by what a parameter is, never by a module's name, so that a new model cannot
lose its penalty by naming its layers differently. The Keras ResNet reference regularises the
convolution kernels with ``l2(1e-4)`` (a loss term ``1e-4 * sum(w**2)`` per kernel) and leaves
the Dense layer, the biases and the BatchNorm parameters alone: :func:`conv_kernel_mask` selects
the parameters of rank 3 or more, which in Flax are exactly the convolution kernels (a Dense
kernel or an embedding is a matrix, a bias or a scale a vector). The EfficientNet reference
decays every parameter but BatchNorm's: :func:`weight_decay_mask` selects all but the
parameters of the normalisation layers, the modules that hold a ``scale`` (Flax's
``BatchNorm``, ``LayerNorm``, ``GroupNorm`` and :class:`BatchNorm` here name their parameters
``scale`` and ``bias``; ``Conv``, ``Dense`` and ``Embed`` name theirs ``kernel``, ``bias`` and
``embedding``)::

  mask = conv_kernel_mask(variables['params'])
  l2 = sum(jnp.sum(w**2) for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  # or, as decoupled decay: optax.add_decayed_weights(weight_decay, mask=conv_kernel_mask)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = [
  'MODELS',
  'BatchNorm',
  'DepthwiseConv',
  'DigitsCNN',
  'EfficientNetB0',
  'ResNet20',
  'batch_norm_mask',
  'conv_kernel_mask',
  'get_model',
  'weight_decay_mask',
]

ModuleDef = Any

# Keras' BatchNormalization defaults; Flax's momentum has the same meaning (weight of the old
# running average), but Flax's default epsilon is 1e-5.
_BN_MOMENTUM = 0.99
_BN_EPSILON = 1e-3


class BatchNorm(nn.Module):
  """Batch normalisation whose statistics are taken over groups of `group_size` examples.

  The EfficientNet reference trained on a v2-8 TPU normalises each core's 256 examples
  apart (its cross-replica groups start above 8 cores), not the global batch of 2048;
  `group_size=256` does the same on any number of devices. Under `jit` the model sees
  the global batch and the groups are its consecutive slices; under `pmap` (with
  `axis_name`) a group smaller than a device's batch is normalised on the device, and a
  larger one across consecutive replicas. `group_size=None` normalises the whole batch
  (all replicas under `pmap`), as `flax.linen.BatchNorm`. The running statistics move
  towards the mean of the groups' statistics; parameter and statistics names are those
  of `flax.linen.BatchNorm` ('scale', 'bias'; 'mean', 'var').

  Attributes:
    use_running_average: normalise with the running statistics (inference).
    momentum: weight of the old running average.
    epsilon: added to the variance.
    dtype: the output dtype; statistics are computed in float32.
    axis_name: the `pmap` axis, or None.
    group_size: examples per group of statistics, or None for the whole batch.
  """

  use_running_average: bool
  momentum: float = _BN_MOMENTUM
  epsilon: float = _BN_EPSILON
  dtype: Any = jnp.float32
  axis_name: str | None = None
  group_size: int | None = None

  def _groups(self, batch: int) -> tuple[int, Any]:
    """(examples per local group, the replica groups to average over, or False for none)."""
    if self.is_initializing():
      # `init` runs outside `pmap` on a single example.
      return batch, False
    if self.axis_name is None:
      return self.group_size or batch, False
    replicas = jax.lax.axis_size(self.axis_name)
    if not self.group_size or self.group_size >= batch * replicas:
      return batch, None
    if self.group_size <= batch:
      return self.group_size, False
    if self.group_size % batch:
      raise ValueError(
        f'group_size={self.group_size} must divide, or be a multiple of, the {batch} '
        'examples on each replica.'
      )
    k = self.group_size // batch
    return batch, [list(range(i, i + k)) for i in range(0, replicas, k)]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
      y = (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
      return y.astype(self.dtype)

    group, replica_groups = self._groups(x.shape[0])
    if x.shape[0] % group:
      raise ValueError(f'group_size={group} must divide the batch of {x.shape[0]} examples.')
    grouped = x.astype(jnp.float32).reshape(x.shape[0] // group, group, *x.shape[1:])
    axes = tuple(range(1, grouped.ndim - 1))
    mean = jnp.mean(grouped, axes, keepdims=True)
    mean_of_square = jnp.mean(jnp.square(grouped), axes, keepdims=True)
    if replica_groups is not False:
      mean, mean_of_square = jax.lax.pmean(
        (mean, mean_of_square), self.axis_name, axis_index_groups=replica_groups
      )
    var = jnp.maximum(mean_of_square - jnp.square(mean), 0.0)
    if not self.is_initializing():
      m = self.momentum
      group_axes = tuple(range(grouped.ndim - 1))
      running_mean.value = m * running_mean.value + (1 - m) * jnp.mean(mean, group_axes)
      running_var.value = m * running_var.value + (1 - m) * jnp.mean(var, group_axes)
    y = (grouped - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


def _batch_norm(
  train: bool,
  dtype: Any,
  axis_name: str | None,
  group_size: int | None = None,
  momentum: float = _BN_MOMENTUM,
) -> ModuleDef:
  return functools.partial(
    BatchNorm,
    use_running_average=not train,
    momentum=momentum,
    epsilon=_BN_EPSILON,
    dtype=dtype,
    axis_name=axis_name,
    group_size=group_size,
  )


# --------------------------------------------------------------------------------------------
# ResNet-20 (ResNet v1 for CIFAR-10, as in the Keras example cifar10_resnet.py)
# --------------------------------------------------------------------------------------------


class ResNetBlock(nn.Module):
  """Basic residual block of ResNet v1: two 3x3 convolutions and a projection when needed."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (3, 3), self.strides, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    residual = x
    if residual.shape != y.shape:
      # The Keras reference projects with a bare strided 1x1 convolution: no BatchNorm, no ReLU.
      residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(x)
    return nn.relu(residual + y)


class ResNet20(nn.Module):
  """ResNet v1 for 32x32 images (He et al. 2016), depth ``6 * num_blocks + 2``.

  With the default ``num_blocks=3`` this is ResNet-20: 273,066 parameters and 1,376 BatchNorm
  statistics for 10 classes. Every convolution has a bias, as in the Keras reference.
  """

  num_classes: int
  dtype: Any = jnp.float32
  axis_name: str | None = None
  batch_norm_group_size: int | None = None
  num_blocks: int = 3
  stage_filters: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(
      nn.Conv, padding='SAME', kernel_init=nn.initializers.he_normal(), dtype=self.dtype
    )
    norm = _batch_norm(train, self.dtype, self.axis_name, self.batch_norm_group_size)

    x = conv(self.stage_filters[0], (3, 3), name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    for i, filters in enumerate(self.stage_filters):
      for j in range(self.num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = ResNetBlock(
          filters, conv=conv, norm=norm, strides=strides, name=f'stage{i + 1}_block{j + 1}'
        )(x)
    # Keras pools with AveragePooling2D(8) on the final 8x8 map: the same as a global mean.
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name='head'
    )(x)
    return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------------------------
# EfficientNet-B0 (Tan & Le 2019, as keras.applications.EfficientNetB0)
# --------------------------------------------------------------------------------------------

# Keras' initialisers for EfficientNet. Keras computes a depthwise kernel's fan-out as k*k (its
# kernel is (k, k, channels, 1)); Flax's depthwise kernel is (k, k, 1, channels), where k*k is
# the fan-in, hence the separate initialiser.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
_DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
_DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')

# (expand_ratio, kernel_size, strides, filters_in, filters_out, repeats) for B0.
EFFICIENTNET_B0_BLOCKS = (
  (1, 3, 1, 32, 16, 1),
  (6, 3, 2, 16, 24, 2),
  (6, 5, 2, 24, 40, 2),
  (6, 3, 2, 40, 80, 3),
  (6, 5, 1, 80, 112, 3),
  (6, 5, 2, 112, 192, 4),
  (6, 3, 1, 192, 320, 1),
)


def _correct_pad(size: Sequence[int], kernel_size: int) -> list[tuple[int, int]]:
  """Padding before a strided 'valid' convolution, as Keras' ``correct_pad``.

  ``k // 2`` on each side, one less at the start along an even dimension. For stride 2 this is
  exactly TensorFlow's (and Flax's) 'SAME' padding; it is spelled out to mirror the reference.
  """
  return [(kernel_size // 2 - (1 - n % 2), kernel_size // 2) for n in size]


DEPTHWISE_IMPLEMENTATIONS = ('shifted', 'convolution')


class DepthwiseConv(nn.Module):
  """A depthwise convolution: `nn.Conv(features, (k, k), feature_group_count=features,
  use_bias=False)`, with the same parameter ('kernel', shaped (k, k, 1, features)).

  `implementation` 'shifted' computes it as the sum over the k*k kernel taps of shifted
  (strided) views of the padded input, each times its tap's per-channel weights;
  'convolution' as XLA's grouped convolution; None (the default) picks 'shifted' on CPU,
  where XLA runs a convolution of one channel per group tens of times slower than
  these fused elementwise sums (docs/benchmarks.md), and 'convolution' elsewhere. The
  two differ by float rounding only.
  """

  kernel_size: int
  strides: int = 1
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  kernel_init: Callable[..., jax.Array] = _DEPTHWISE_INIT
  dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, features = self.kernel_size, self.strides, x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    implementation = self.implementation
    if implementation is None:
      implementation = 'shifted' if jax.default_backend() == 'cpu' else 'convolution'
    if implementation not in DEPTHWISE_IMPLEMENTATIONS:
      raise ValueError(
        f'implementation must be None or one of {DEPTHWISE_IMPLEMENTATIONS}, '
        f'got implementation={implementation!r}.'
      )
    if implementation == 'convolution':
      return jax.lax.conv_general_dilated(
        x,
        kernel,
        (s, s),
        self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=features,
      )
    if isinstance(self.padding, str):
      pads = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), self.padding)
    else:
      pads = self.padding
    dtype = x.dtype
    # Summed in float32 at least, as the convolution accumulates.
    accumulate = jnp.promote_types(dtype, jnp.float32)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0))).astype(accumulate)
    kernel = kernel.astype(accumulate)
    height, width = ((n - k) // s + 1 for n in x.shape[1:3])
    y = None
    for i in range(k):
      for j in range(k):
        view = jax.lax.slice(
          x,
          (0, i, j, 0),
          (x.shape[0], i + (height - 1) * s + 1, j + (width - 1) * s + 1, features),
          (1, s, s, 1),
        )
        y = view * kernel[i, j, 0] if y is None else y + view * kernel[i, j, 0]
    return y.astype(dtype)


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck with squeeze-and-excitation and stochastic depth."""

  filters_in: int
  filters_out: int
  kernel_size: int
  strides: int
  expand_ratio: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  se_ratio: float = 0.25
  drop_rate: float = 0.0
  depthwise_implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype)
    inputs = x
    filters = self.filters_in * self.expand_ratio
    if self.expand_ratio != 1:
      x = conv(filters, (1, 1), name='expand_conv')(x)
      x = nn.swish(self.norm(name='expand_bn')(x))

    k = self.kernel_size
    padding = _correct_pad(x.shape[1:3], k) if self.strides == 2 else 'SAME'
    x = DepthwiseConv(
      k,
      self.strides,
      padding,
      dtype=self.dtype,
      implementation=self.depthwise_implementation,
      name='dwconv',
    )(x)
    x = nn.swish(self.norm(name='bn')(x))

    if 0 < self.se_ratio <= 1:
      # The squeeze width follows the block's input filters, not the expanded ones.
      filters_se = max(1, int(self.filters_in * self.se_ratio))
      se = jnp.mean(x, axis=(1, 2), keepdims=True)
      se_conv = functools.partial(
        nn.Conv, kernel_size=(1, 1), kernel_init=_CONV_INIT, dtype=self.dtype
      )
      se = nn.swish(se_conv(filters_se, name='se_reduce_conv')(se))
      se = nn.sigmoid(se_conv(filters, name='se_expand_conv')(se))
      x = x * se

    x = conv(self.filters_out, (1, 1), name='project_conv')(x)
    x = self.norm(name='project_bn')(x)

    if self.strides == 1 and self.filters_in == self.filters_out:
      # Stochastic depth: drop the whole residual branch per example (the mask is broadcast over
      # H, W and C) and scale the survivors by 1 / keep.
      if self.drop_rate > 0:
        x = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3))(x, deterministic=not train)
      x = x + inputs
    return x


class EfficientNetB0(nn.Module):
  """EfficientNet-B0 without the input rescaling/normalisation layers of the Keras version.

  5,288,548 parameters and 42,016 BatchNorm statistics for 1000 classes, at any input size.
  """

  num_classes: int
  dtype: Any = jnp.float32
  axis_name: str | None = None
  batch_norm_group_size: int | None = None
  blocks: Sequence[tuple[int, int, int, int, int, int]] = EFFICIENTNET_B0_BLOCKS
  drop_connect_rate: float = 0.2
  dropout_rate: float = 0.2
  # How the depthwise convolutions are computed (see `DepthwiseConv`).
  depthwise_implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype)
    norm = _batch_norm(train, self.dtype, self.axis_name, self.batch_norm_group_size)

    x = conv(32, (3, 3), 2, padding=_correct_pad(x.shape[1:3], 3), name='stem_conv')(x)
    x = nn.swish(norm(name='stem_bn')(x))

    total_blocks = sum(repeats for *_, repeats in self.blocks)
    b = 0
    for i, (expand_ratio, kernel_size, strides, filters_in, filters_out, repeats) in enumerate(
      self.blocks
    ):
      for j in range(repeats):
        # Only the first block of a group changes resolution and width.
        x = MBConvBlock(
          filters_in=filters_in if j == 0 else filters_out,
          filters_out=filters_out,
          kernel_size=kernel_size,
          strides=strides if j == 0 else 1,
          expand_ratio=expand_ratio,
          norm=norm,
          dtype=self.dtype,
          drop_rate=self.drop_connect_rate * b / total_blocks,
          depthwise_implementation=self.depthwise_implementation,
          name=f'block{i + 1}{chr(ord("a") + j)}',
        )(x, train=train)
        b += 1

    x = conv(1280, (1, 1), name='top_conv')(x)
    x = nn.swish(norm(name='top_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = nn.Dense(self.num_classes, kernel_init=_DENSE_INIT, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------------------------
# A small CNN for the 8x8 scikit-learn digits
# --------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a small MLP head, for 8x8x1 images (~85k params)."""

  num_classes: int
  dtype: Any = jnp.float32
  axis_name: str | None = None
  batch_norm_group_size: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    # The BatchNorm right after each convolution makes a convolution bias redundant.
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False, dtype=self.dtype)
    # A faster running average than Keras' 0.99: a few epochs of digits are only ~100 steps.
    norm = _batch_norm(train, self.dtype, self.axis_name, self.batch_norm_group_size, momentum=0.9)
    x = nn.relu(norm(name='bn1')(conv(32, name='conv1')(x)))
    x = nn.relu(norm(name='bn2')(conv(64, name='conv2')(x)))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64, dtype=self.dtype, name='hidden')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


MODELS: dict[str, Callable[..., nn.Module]] = {
  'resnet20': ResNet20,
  'efficientnet_b0': EfficientNetB0,
  'cnn': DigitsCNN,
}


def get_model(
  name: str,
  num_classes: int,
  dtype: Any = jnp.float32,
  *,
  axis_name: str | None = None,
  batch_norm_group_size: int | None = None,
) -> nn.Module:
  """Returns the model called ``name`` (one of :data:`MODELS`).

  Args:
    name: model name, a key of :data:`MODELS`.
    num_classes: number of output logits.
    dtype: computation dtype, e.g. ``jnp.bfloat16``; parameters stay float32 and the logits
      are returned in float32.
    axis_name: the ``pmap``/``shard_map`` axis over which BatchNorm averages batch statistics;
      ``None`` keeps them per device.
    batch_norm_group_size: examples per group of BatchNorm statistics (see
      :class:`BatchNorm`); ``None`` for the whole batch.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model name={name!r}; known names: {sorted(MODELS)}.')
  return MODELS[name](
    num_classes=num_classes,
    dtype=dtype,
    axis_name=axis_name,
    batch_norm_group_size=batch_norm_group_size,
  )


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def conv_kernel_mask(params: Any) -> Any:
  """A pytree of bools like ``params``: True exactly for the convolution kernels, the
  parameters of rank 3 or more. Works on ``variables['params']`` or on the whole
  ``variables`` dict (the statistics are vectors)."""
  return jax.tree.map(lambda x: len(x.shape) >= 3, params)


def batch_norm_mask(params: Any) -> Any:
  """A pytree of bools like ``params``: True exactly for the parameters of the
  normalisation layers, the modules that hold a ``scale``."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  normalisation = {_names(path)[:-1] for path, _ in leaves if _names(path)[-1] == 'scale'}
  return jax.tree_util.tree_map_with_path(
    lambda path, _: _names(path)[:-1] in normalisation, params
  )


def weight_decay_mask(params: Any) -> Any:
  """A pytree of bools like ``params``: True for every parameter but those of the
  normalisation layers, the parameters that weight decay applies to."""
  return jax.tree.map(lambda normalisation: not normalisation, batch_norm_mask(params))
