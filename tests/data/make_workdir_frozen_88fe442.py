"""Writes a tiny train.trainable workdir with the code of 88fe442, whose optimizer froze
parameters with a hand-written gradient mask (before optax.multi_transform), for the
restore test in tests/test_transfer.py. Run from a checkout of 88fe442:
  python tests/data/make_workdir_frozen_88fe442.py tests/data/workdir_frozen_88fe442
"""
import os
import shutil
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'  # as in the tests
from twotower_jax import config as config_lib  # pylint: disable=wrong-import-position
from twotower_jax.data import planted  # pylint: disable=wrong-import-position
from twotower_jax.train import loop  # pylint: disable=wrong-import-position

c = config_lib.base_config()
c.data.source = 'planted'
c.data.tokenizer_type = 'word'
c.data.planted_docs = 60
c.data.planted_topics = 3
c.data.planted_topic_words = 10
c.data.val_fraction = 0.2
c.data.vocab_size = planted.required_vocab_size(c.data)
c.data.seq_len = 16
c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_mlp = 1, 16, 2, 32
c.model.max_len = 16
c.model.gate = 'latent'
c.train.trainable = '^gate/(ln_in|gate)/'  # the known-answer validation's frozen towers
c.train.steps = 4
c.train.batch_size = 4
c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 2
c.train.eval_batches = 2
c.train.keep_checkpoints = 2
c.optimizer.warmup_steps = 1
c.mesh.data, c.mesh.tower = 4, 2
c.optimizer.lr = 0.05  # large, so a wrongly restored optimizer state shows in the params
wd = sys.argv[1]
shutil.rmtree(wd, ignore_errors=True)
print(loop.train_and_evaluate(c, wd))
