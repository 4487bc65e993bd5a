"""Every field of a trainer config, with its default: the config schema.

`examples/schema.py` checks them (`validate_config`) before a run builds anything.

The recipe configs (`digits.py`, `cifar10_resnet20.py`, `imagenet_efficientnet_b0.py`)
start from `get_config()` here and set what their recipe needs. Top-level optimizer
fields are the recipe of `config.optimizer`; `config.optimizers.<name>` overrides them
whenever `<name>` is the optimizer trained (by `--config.optimizer=<name>` or by
`examples.compare`), so each baseline keeps its own recipe.
"""

import ml_collections

import coolopt


def get_config() -> ml_collections.ConfigDict:
  """The shared fields; see the comments for their meaning."""
  config = ml_collections.ConfigDict()

  # Model and data.
  # The model decides the task (examples/tasks.py): 'cnn', 'resnet20' or 'efficientnet_b0'
  # classify images; 'awd_lstm' is a language model.
  config.model = 'cnn'
  # Images: 'digits', 'cifar10', 'imagenet2012' or 'synthetic'; text (for 'awd_lstm'):
  # 'python_docs' or 'ptb'.
  config.dataset = 'digits'
  # TFDS data_dir (the PTB files' directory for 'ptb'); None: TFDS' default.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  # Keep the splits in memory across epochs; None: the dataset's default (all but ImageNet).
  config.cache = ml_collections.config_dict.placeholder(bool)
  config.num_classes = 10
  config.image_size = 8
  config.num_channels = 1  # Synthetic images only.
  config.synthetic_train_size = 1024  # Synthetic data only: examples in the train split.
  config.synthetic_test_size = 256  # Synthetic data only: examples in the test split.
  config.label_smoothing = 0.0  # In [0, 1); image classification only.
  # In [0, 1); image data sets only: the last this fraction of the training split is held
  # out as the 'validation' split (evaluated every epoch beside the test split), for
  # choosing hyperparameters without the test split (examples.sweep does); 0: none.
  config.validation_fraction = 0.0

  # Length of a run. steps_per_epoch / steps_per_eval = -1: derived from the dataset.
  config.batch_size = 32  # Global, over all processes and devices.
  config.num_epochs = 10
  config.steps_per_epoch = -1
  config.steps_per_eval = -1
  config.seed = 0  # In [0, 2**32 - 1]: the random streams take it modulo 2**32.

  # Optimizer: 'coolmomentum', 'momentum', 'adam', 'rmsprop', 'sgd_sa' or
  # 'metropolis_coolmomentum'.
  config.optimizer = 'coolmomentum'
  config.learning_rate = 0.01
  # CoolMomentum: rho cools from rho_0 to 0 over num_epochs x steps_per_epoch steps,
  # after warmup_epochs epochs of rho = 0. cooling = 'thermostat' sets rho by feedback
  # so that the measured temperature follows an exponential path (no warm-up).
  config.rho_0 = 0.99
  config.cooling = 'exponential'  # 'exponential', 'linear', 'friction' or 'thermostat'.
  config.warmup_epochs = 0.0
  # Momentum of the 'momentum' and 'rmsprop' baselines.
  config.momentum = 0.9
  # Learning-rate schedule of the baselines: 'constant'; 'piecewise' (x lr_scales[i] in
  # the epochs whose 0-based index exceeds lr_boundaries[i], as Keras' lr_schedule
  # counts); 'exponential' (x lr_decay_rate every lr_decay_epochs from step 0, staircase,
  # with a linear ramp from 0 in its place during the first lr_warmup_epochs).
  config.lr_schedule = 'constant'
  config.lr_boundaries = ()
  config.lr_scales = ()
  config.lr_warmup_epochs = 0.0
  config.lr_decay_epochs = 2.4
  config.lr_decay_rate = 0.97
  # Adam's moment decays and the epsilon added to the root of the second moment (optax's).
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  # RMSProp: mean-square decay and the epsilon added inside the square root.
  config.rmsprop_decay = 0.9
  config.rmsprop_eps = 1e-3
  # weight_decay * sum(w**2) / 2 over every parameter but the normalisation layers' (the
  # modules holding a 'scale'), in the loss (the EfficientNet reference's; its gradient
  # is the coupled decay weight_decay * w).
  config.weight_decay = 0.0
  # Keras-style l2_regularization * sum(w**2) of every convolution kernel (every parameter
  # of rank 3 or more), in the loss.
  config.l2_regularization = 0.0
  # Clip the gradient's global norm to this before the optimizer; 0: no clipping.
  config.gradient_clip = 0.0
  # Metropolis optimizers: temperature T_0, multiplied by metropolis_cooling after
  # every epoch, and the set of step multipliers drawn uniformly.
  config.metropolis_temperature = 1.0
  config.metropolis_cooling = 0.8
  config.metropolis_multipliers = (1.0,)
  # Per-optimizer overrides of the fields above. SGD-SA is plain SGD whose learning
  # rate is drawn from H at every step, so its base rate is 1.
  config.optimizers = ml_collections.ConfigDict()
  config.optimizers.sgd_sa = ml_collections.ConfigDict(
    {
      'learning_rate': 1.0,
      'lr_schedule': 'constant',
      # Its learning-rate set H (Fischetti & Stringher).
      'metropolis_multipliers': coolopt.SGD_SA_LEARNING_RATES,
    }
  )

  # Language models (model 'awd_lstm'; examples/language_model.py), with the defaults of
  # the AWD-LSTM reference's main.py: embedding and hidden sizes, LSTM layers, the
  # dropouts (output, between layers, input, embedding, DropConnect of the hidden-to-
  # hidden weights), truncated back-propagation through windows of bptt tokens, the
  # streams of validation and test, and the activation (AR, alpha) and temporal
  # activation (TAR, beta) regularisation of the last layer's output.
  config.embedding_size = 400
  config.hidden_size = 1150
  config.num_layers = 3
  config.output_dropout = 0.4
  config.hidden_dropout = 0.3
  config.input_dropout = 0.65
  config.embedding_dropout = 0.1
  config.weight_dropout = 0.5
  config.bptt = 70
  config.eval_batch_size = 10
  config.activation_regularization = 2.0
  config.temporal_activation_regularization = 1.0

  # BatchNorm statistics over groups of this many examples of the global batch; 0: the
  # whole batch.
  config.batch_norm_group_size = 0
  # Evaluate with an exponential moving average of the weights and BatchNorm statistics
  # of this decay (TensorFlow's, with num_updates); 0: with the weights themselves.
  config.ema_decay = 0.0
  # Also log the loss over the whole training set in inference mode at every epoch's
  # end (eval_train_loss, eval_train_accuracy), as the paper's Fig. 1: True or False;
  # image classification only.
  config.eval_train = False

  # Execution.
  config.half_precision = False  # True: bfloat16 computation; parameters stay float32.
  config.parallelism = 'jit'  # 'jit' (a sharded jit over a 1-D mesh) or 'pmap'.
  config.checkpoint_max_to_keep = 3
  # Also checkpoint every this many steps of the run inside epochs (0: at epoch ends only).
  config.checkpoint_every_steps = 0
  config.progress_bar = True  # True: a bar per epoch on a terminal (process 0); False: none.
  # TensorBoard points every this many steps of the run (0: at epoch ends only).
  config.log_every_steps = 100
  # Stop the run once this many consecutive steps were skipped as non-finite (checked at
  # epoch ends): it has diverged. -1: one epoch; 0: never.
  config.divergence_steps = -1
  # Stop the run once an epoch's mean training loss exceeds this many times the loss of
  # its first step (checked at epoch ends): it has diverged to finite values. 0: never.
  config.divergence_loss_ratio = 100.0
  return config
