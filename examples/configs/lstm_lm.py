"""The AWD-LSTM word-level language model: the CoolMomentum authors' third experiment.

The authors trained the salesforce/awd-lstm-lm model on Penn Treebank with

  python main.py --batch_size 20 --data data/penn --dropouti 0.4 --dropouth 0.25 \
    --seed 141 --epoch 500

without its switch to ASGD, once with its SGD (lr 30) and once with CoolMomentum (lr 0.1,
momentum 0.99, the code's weight decay 1.2e-6, cooled over the run). As it stands this config
trains on the offline `python_docs` corpus (see examples/text_pipeline.py);
`--config.dataset=ptb --config.data_dir=DIR`, DIR holding ptb.train.txt, ptb.valid.txt and
ptb.test.txt, is the authors' run.
"""

import ml_collections

from examples.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'awd_lstm'
  config.dataset = 'python_docs'  # or 'ptb' with config.data_dir
  config.batch_size = 20
  config.num_epochs = 500
  config.seed = 141

  # The reference's model: main.py's defaults (those of default.py) with the command's
  # dropouti and dropouth. AR and TAR are main.py's defaults too.
  config.input_dropout = 0.4
  config.hidden_dropout = 0.25
  # Its clipping of the gradient's global norm.
  config.gradient_clip = 0.25
  # The reference's weight decay, on every parameter.
  config.weight_decay = 1.2e-6

  config.optimizer = 'coolmomentum'
  config.learning_rate = 0.1
  config.rho_0 = 0.99
  # The reference's SGD, without its switch to ASGD.
  config.optimizers.sgd = ml_collections.ConfigDict({'learning_rate': 30.0})
  return config
