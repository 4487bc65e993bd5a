"""Tests for the example models: sizes, dtypes, train/eval behaviour and the L2 mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from examples import models
from examples.optimizers import regularization


def _abstract_variables(name, num_classes, shape, dtype=jnp.float32):
  """Shapes and dtypes of the variables, without running the initialisers."""
  model = models.get_model(name, num_classes, dtype)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _variables(name, shape, seed=0):
  """Variables with He-scaled random kernels, drawn in NumPy.

  Compiling Flax's initialisers for EfficientNet takes longer on CPU than all the other tests
  together; the initialisers themselves are Flax's, so here only the shapes come from `init`.
  """
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if path[-1].key == 'kernel':
      fan_in = int(np.prod(x.shape[:-1]))
      return jnp.asarray(rng.normal(size=x.shape) * np.sqrt(2.0 / fan_in), x.dtype)
    if path[-1].key in ('scale', 'var'):
      return jnp.ones(x.shape, x.dtype)
    return jnp.zeros(x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(name, 10, shape))


@pytest.mark.parametrize(
  'name, num_classes, shape, num_params, num_stats',
  [
    ('resnet20', 10, (1, 32, 32, 3), 273_066, 1_376),
    ('efficientnet_b0', 1000, (1, 224, 224, 3), 5_288_548, 42_016),
    ('efficientnet_b0', 1000, (1, 32, 32, 3), 5_288_548, 42_016),
    ('efficientnet_b0', 1000, (1, 33, 47, 3), 5_288_548, 42_016),
    ('cnn', 10, (1, 8, 8, 1), 85_162, 192),
  ],
)
def test_parameter_and_statistic_counts(name, num_classes, shape, num_params, num_stats):
  variables = _abstract_variables(name, num_classes, shape)
  assert set(variables) == {'params', 'batch_stats'}
  assert _size(variables['params']) == num_params
  assert _size(variables['batch_stats']) == num_stats


def test_cnn_is_small():
  assert _size(_abstract_variables('cnn', 10, (1, 8, 8, 1))['params']) < 100_000


@pytest.mark.parametrize(
  'name, shape',
  [('resnet20', (2, 32, 32, 3)), ('efficientnet_b0', (2, 32, 32, 3)), ('cnn', (2, 8, 8, 1))],
)
def test_output_shape_and_dtype(name, shape):
  model = models.get_model(name, 10)
  variables = _variables(name, shape)
  x = jax.random.normal(jax.random.key(1), shape)
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
  'name, shape',
  [('resnet20', (2, 32, 32, 3)), ('efficientnet_b0', (2, 32, 32, 3)), ('cnn', (2, 8, 8, 1))],
)
def test_bfloat16_compute_keeps_float32_params_and_logits(name, shape):
  model = models.get_model(name, 10, jnp.bfloat16)
  variables = _abstract_variables(name, 10, shape, jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  rngs = {'dropout': jax.random.key(0)}
  for train in (False, True):
    logits, updates = jax.eval_shape(
      functools.partial(model.apply, train=train, mutable=['batch_stats'], rngs=rngs),
      variables,
      jnp.zeros(shape),
    )
    assert logits.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_cnn_runs_close_to_float32():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = _variables('cnn', x.shape)
  full = jax.jit(functools.partial(models.get_model('cnn', 10).apply, train=False))(variables, x)
  half_model = models.get_model('cnn', 10, jnp.bfloat16)
  half = jax.jit(functools.partial(half_model.apply, train=False))(variables, x)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.1, rtol=0.1)


def test_efficientnet_train_mode_updates_stats_and_uses_dropout():
  model = models.get_model('efficientnet_b0', 10)
  variables = _variables('efficientnet_b0', (2, 32, 32, 3))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  @jax.jit
  def train_apply(key):
    return model.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key})

  logits_a, updates = train_apply(jax.random.key(2))
  logits_b, _ = train_apply(jax.random.key(3))
  eval_logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)

  old = traverse_util.flatten_dict(variables['batch_stats'])
  new = traverse_util.flatten_dict(updates['batch_stats'])
  assert old.keys() == new.keys()
  assert len(old) == 98  # (mean, var) for each of the 49 BatchNorms.
  # Every running variance moves. Some running means rightly stay at zero: a bias-free 1x1
  # expansion fed by a train-mode BatchNorm (whose offset is zero at init) has zero batch mean.
  assert all(not np.allclose(old[k], new[k]) for k in old if k[-1] == 'var')
  assert not np.allclose(logits_a, eval_logits)
  assert not np.allclose(logits_a, logits_b)  # Dropout and stochastic depth draw from the rng.


def test_stochastic_depth_drops_whole_examples():
  block = models.MBConvBlock(
    filters_in=8,
    filters_out=8,
    kernel_size=3,
    strides=1,
    expand_ratio=2,
    norm=functools.partial(nn.BatchNorm, use_running_average=False),
    drop_rate=0.5,
  )
  x = jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
  variables = jax.jit(functools.partial(block.init, train=False))(jax.random.key(1), x)
  apply = jax.jit(functools.partial(block.apply, mutable=['batch_stats']), static_argnames='train')
  y, _ = apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  # A dropped example passes through unchanged; a kept one gets its branch added.
  dropped = np.all(np.asarray(y == x), axis=(1, 2, 3))
  changed = np.all(np.asarray(y != x), axis=(1, 2, 3))
  assert np.all(dropped | changed)
  assert 16 < dropped.sum() < 48
  # At inference the block is deterministic and keeps the branch.
  y_eval, _ = apply(variables, x, train=False)
  assert not np.any(np.all(np.asarray(y_eval == x), axis=(1, 2, 3)))


def test_resnet20_conv_kernel_mask():
  params = _abstract_variables('resnet20', 10, (1, 32, 32, 3))['params']
  mask = models.conv_kernel_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)

  flat = {
    jax.tree_util.keystr(p): (m, x)
    for (p, m), x in zip(
      jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params), strict=True
    )
  }
  selected = [x.shape for m, x in flat.values() if m]
  assert len(selected) == 21
  assert sum(s[:2] == (3, 3) for s in selected) == 19
  assert sum(s[:2] == (1, 1) for s in selected) == 2
  assert all(len(s) == 4 for s in selected)
  # Not selected: the Dense kernel, every bias and every BatchNorm scale/bias.
  assert not flat["['head']['kernel']"][0]
  for path, (m, _) in flat.items():
    if not path.endswith("['kernel']"):
      assert not m, path


def test_conv_kernel_mask_selects_exactly_the_4d_kernels():
  for name, shape in [('efficientnet_b0', (1, 32, 32, 3)), ('cnn', (1, 8, 8, 1))]:
    variables = _abstract_variables(name, 10, shape)
    mask = models.conv_kernel_mask(variables)  # Also works on the whole variables dict.
    for m, x in zip(
      jax.tree.leaves(mask['params']), jax.tree.leaves(variables['params']), strict=True
    ):
      assert m == (x.ndim == 4)
    assert not any(jax.tree.leaves(mask['batch_stats']))


def test_conv_kernel_mask_with_optax():
  params = _variables('cnn', (1, 8, 8, 1))['params']
  tx = optax.add_decayed_weights(1.0, mask=models.conv_kernel_mask)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  np.testing.assert_array_equal(updates['conv1']['kernel'], params['conv1']['kernel'])
  np.testing.assert_array_equal(updates['head']['kernel'], 0.0)


def test_batch_norm_axis_name_averages_across_devices():
  # vmap with an axis name stands in for pmap: BatchNorm must use the statistics of all shards.
  # The shards differ in scale, so per-shard statistics would give different results.
  scales = np.arange(1.0, 5.0).reshape(4, 1, 1, 1, 1)
  x = np.random.default_rng(1).normal(size=(4, 8, 8, 8, 1)).astype(np.float32) * scales
  variables = _variables('cnn', (1, 8, 8, 1))
  sharded = models.get_model('cnn', 10, axis_name='batch')
  apply = functools.partial(sharded.apply, train=True, mutable=['batch_stats'])
  logits, updates = jax.jit(jax.vmap(apply, in_axes=(None, 0), axis_name='batch'))(variables, x)
  full_apply = functools.partial(
    models.get_model('cnn', 10).apply, train=True, mutable=['batch_stats']
  )
  full_logits, full_updates = jax.jit(full_apply)(variables, x.reshape(32, 8, 8, 1))
  np.testing.assert_allclose(logits.reshape(32, 10), full_logits, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(full_updates), strict=True):
    np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6)


def test_cnn_learns_digits():
  datasets = pytest.importorskip('sklearn.datasets')
  images, labels = datasets.load_digits(return_X_y=True)
  images = (images / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(images))
  test, train = perm[:360], perm[360:]

  model = models.get_model('cnn', 10)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(variables['params'])

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(variables['params'])
    deltas, opt_state = tx.update(grads, opt_state, variables['params'])
    params = optax.apply_updates(variables['params'], deltas)
    return {'params': params, **updates}, opt_state

  rng = np.random.default_rng(1)
  for _ in range(5):
    order = rng.permutation(train)
    for i in range(0, len(order) - 63, 64):
      batch = order[i : i + 64]
      variables, opt_state = step(variables, opt_state, images[batch], labels[batch])
  logits = model.apply(variables, images[test], train=False)
  assert np.mean(np.argmax(logits, -1) == labels[test]) > 0.95


def test_unknown_model_name():
  with pytest.raises(ValueError, match='resnet21') as info:
    models.get_model('resnet21', 10)
  for known in ('name', 'resnet20', 'efficientnet_b0', 'cnn'):
    assert known in str(info.value)


def _batch_norm(x, **kwargs):
  """Train-mode output and updated statistics of a fresh `models.BatchNorm` on `x`."""
  module = models.BatchNorm(use_running_average=False, **kwargs)
  variables = module.init(jax.random.key(0), x[:1])
  y, updates = module.apply(variables, x, mutable=['batch_stats'])
  return y, updates['batch_stats']


def _groups_apart(x, group_size):
  """Each group normalised by a whole-batch BatchNorm of its own, and the mean statistics."""
  outputs, stats = zip(
    *(_batch_norm(x[i : i + group_size]) for i in range(0, len(x), group_size)), strict=True
  )
  return np.concatenate(outputs), jax.tree.map(lambda *s: np.mean(s, axis=0), *stats)


def _scaled_groups(num_examples, scale_every):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(num_examples, 4, 4, 3)).astype(np.float32)
  # Groups of different scale and offset, so that any other grouping changes the result.
  scales = np.repeat(np.arange(1.0, 1.0 + num_examples // scale_every), scale_every)
  return x * scales[:, None, None, None] + scales[:, None, None, None]


def test_batch_norm_whole_batch_is_flax_batch_norm():
  x = _scaled_groups(8, 2)
  y, stats = _batch_norm(x)
  flax_norm = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3)
  flax_y, flax_updates = flax_norm.apply(
    flax_norm.init(jax.random.key(0), x), x, mutable=['batch_stats']
  )
  np.testing.assert_allclose(y, flax_y, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5), stats, flax_updates['batch_stats']
  )


def test_batch_norm_groups_normalise_each_group_apart():
  x = _scaled_groups(8, 2)
  y, stats = _batch_norm(x, group_size=2)
  expected_y, expected_stats = _groups_apart(x, 2)
  np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5), stats, expected_stats)
  # The running statistics move 1 - 0.99 of the way to the groups' mean statistics.
  group_means = x.reshape(4, -1, 3).mean(axis=1)
  group_vars = x.reshape(4, -1, 3).var(axis=1)
  np.testing.assert_allclose(stats['mean'], 0.01 * group_means.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['var'], 0.99 + 0.01 * group_vars.mean(0), rtol=1e-5)
  # Not the statistics of the whole batch.
  assert not np.allclose(y, _batch_norm(x)[0], atol=1e-2)


@pytest.mark.parametrize(('per_device', 'group_size'), [(2, 4), (4, 2)])
def test_batch_norm_groups_under_pmap_are_the_global_batch_groups(per_device, group_size):
  # Groups larger than a device's batch span consecutive replicas; smaller ones stay local.
  x = _scaled_groups(8 * per_device, group_size)
  module = models.BatchNorm(use_running_average=False, axis_name='batch', group_size=group_size)
  variables = module.init(jax.random.key(0), x[:1])
  apply = functools.partial(module.apply, mutable=['batch_stats'])
  y, updates = jax.pmap(apply, axis_name='batch', in_axes=(None, 0))(
    variables, x.reshape(8, per_device, *x.shape[1:])
  )
  expected_y, expected_stats = _groups_apart(x, group_size)
  np.testing.assert_allclose(y.reshape(x.shape), expected_y, rtol=1e-5, atol=1e-5)
  # Each replica's statistics are its groups'; their mean (the trainer's pmean) is all groups'.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.mean(a, axis=0), b, rtol=1e-5),
    updates['batch_stats'],
    expected_stats,
  )


def test_batch_norm_mask_selects_exactly_the_batch_norm_parameters():
  variables = _abstract_variables('efficientnet_b0', 1000, (1, 32, 32, 3))
  params, batch_stats = variables['params'], variables['batch_stats']
  mask = traverse_util.flatten_dict(models.batch_norm_mask(params))
  # BatchNorm modules are exactly those with running statistics.
  bn_modules = {path[:-1] for path in traverse_util.flatten_dict(batch_stats)}
  assert {path for path, m in mask.items() if m} == {
    (*module, name) for module in bn_modules for name in ('scale', 'bias')
  }
  flat = traverse_util.flatten_dict(params)
  # 5,288,548 parameters, of which 42,016 are BatchNorm's.
  assert sum(int(np.prod(flat[p].shape)) for p, m in mask.items() if not m) == 5_288_548 - 42_016


@pytest.mark.parametrize(
  'kernel_size, strides, size',
  [(3, 1, 9), (5, 1, 6), (3, 2, 9), (5, 2, 10), (5, 2, 7)],
)
def test_depthwise_conv_shifted_is_the_grouped_convolution(kernel_size, strides, size):
  # EfficientNet's padding: 'SAME' at stride 1, Keras' correct_pad before stride 2.
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  padding = models._correct_pad(x.shape[1:3], kernel_size) if strides == 2 else 'SAME'
  reference = nn.Conv(
    6,
    (kernel_size, kernel_size),
    strides,
    padding=padding,
    feature_group_count=6,
    use_bias=False,
    kernel_init=models._DEPTHWISE_INIT,
  )
  variables = reference.init(jax.random.key(1), x)

  def value_and_grad(module):
    # Compiled whole: op by op, the shifted convolution dispatches a slice per tap.
    def objective(variables, x):
      return jnp.sum(jnp.sin(module.apply(variables, x)))

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(variables, x)

  expected, expected_grads = value_and_grad(reference)
  expected_outputs = jax.jit(reference.apply)(variables, x)
  for implementation in models.DEPTHWISE_IMPLEMENTATIONS:
    layer = models.DepthwiseConv(kernel_size, strides, padding, implementation=implementation)
    # The same parameter, initialised alike: checkpoints and parameter counts are unchanged.
    own = layer.init(jax.random.key(1), x)
    assert jax.tree.structure(own) == jax.tree.structure(variables)
    np.testing.assert_array_equal(own['params']['kernel'], variables['params']['kernel'])
    np.testing.assert_allclose(
      jax.jit(layer.apply)(variables, x), expected_outputs, rtol=1e-5, atol=1e-5
    )
    value, grads = value_and_grad(layer)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected_grads
    )


def test_depthwise_conv_on_cpu_is_shifted_and_checks_its_implementation():
  x = jnp.ones((1, 4, 4, 3))
  layer = models.DepthwiseConv(3)
  variables = layer.init(jax.random.key(0), x)
  # On CPU the default is the shifted sums: no convolution in the program.
  assert 'convolution' not in jax.jit(layer.apply).lower(variables, x).as_text()
  convolution = models.DepthwiseConv(3, implementation='convolution')
  assert 'convolution' in jax.jit(convolution.apply).lower(variables, x).as_text()
  with pytest.raises(ValueError, match=r'implementation=.im2col.'):
    models.DepthwiseConv(3, implementation='im2col').init(jax.random.key(0), x)


class _Unconventional(nn.Module):
  """Layers whose names say nothing of what they are."""

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), name='alpha')(x)
    x = models.BatchNorm(use_running_average=not train, name='beta')(x)
    x = nn.LayerNorm(name='gamma')(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3, name='delta')(x)


def test_masks_go_by_what_a_parameter_is_not_by_its_name():
  variables = jax.eval_shape(
    lambda: _Unconventional().init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)), train=False)
  )
  params = variables['params']
  flat = traverse_util.flatten_dict(models.conv_kernel_mask(params))
  assert {path for path, m in flat.items() if m} == {('alpha', 'kernel')}
  flat = traverse_util.flatten_dict(models.weight_decay_mask(params))
  decayed = {('alpha', 'kernel'), ('alpha', 'bias'), ('delta', 'kernel'), ('delta', 'bias')}
  assert {path for path, m in flat.items() if m} == decayed
  # The trainer's penalty follows the masks: l2 on the convolution kernel, weight decay
  # on all but the normalisation layers.
  ones = jax.tree.map(lambda x: np.ones(x.shape, np.float32), params)
  sizes = {path: int(np.prod(x.shape)) for path, x in traverse_util.flatten_dict(params).items()}
  np.testing.assert_allclose(
    regularization(ones, l2_regularization=0.5, weight_decay=0.1),
    0.5 * sizes['alpha', 'kernel'] + 0.1 / 2 * sum(sizes[path] for path in decayed),
    rtol=1e-6,
  )
