"""EfficientNet-B0 on ImageNet-2012: the recipe of the CoolMomentum paper (Table 3).

Paper result with lr 0.6 and rho_0 0.99: 76.99% top-1. ImageNet must be prepared
by hand in `config.data_dir` (see examples/input_pipeline.py). The RMSProp baseline
is the one of the EfficientNet TPU reference.
"""

import ml_collections

from examples.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'efficientnet_b0'
  config.dataset = 'imagenet2012'
  config.num_classes = 1000
  config.image_size = 224
  config.num_channels = 3
  config.batch_size = 2048
  config.num_epochs = 350
  config.label_smoothing = 0.1
  # The reference's weight_decay * l2_loss over every variable but BatchNorm's.
  config.weight_decay = 1e-5
  # The reference's evaluation with the moving average of the weights.
  config.ema_decay = 0.9999
  # The reference on a v2-8 TPU normalises each core's 2048 / 8 = 256 examples apart.
  config.batch_norm_group_size = 256
  # The reference's default precision; --config.half_precision=True for bfloat16.
  config.half_precision = False

  config.optimizer = 'coolmomentum'
  config.learning_rate = 0.6
  config.rho_0 = 0.99
  # The authors' momentum warm-up: rho = 0 for the first 5 epochs.
  config.warmup_epochs = 5.0

  # EfficientNet TPU reference: lr 0.016 per 256 images, x0.97 every 2.4 epochs counted
  # from step 0, a linear ramp from 0 over the first 5 epochs; decay 0.9, momentum 0.9,
  # epsilon 1e-3.
  config.optimizers.rmsprop = ml_collections.ConfigDict(
    {
      'learning_rate': 0.016 * config.get_ref('batch_size') / 256,
      'momentum': 0.9,
      'rmsprop_decay': 0.9,
      'rmsprop_eps': 1e-3,
      'lr_schedule': 'exponential',
      'lr_warmup_epochs': 5.0,
      'lr_decay_epochs': 2.4,
      'lr_decay_rate': 0.97,
    }
  )
  return config
