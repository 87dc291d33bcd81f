"""Writes a tiny workdir with the pre-redesign code (aff3a11), for the restore test."""
import os, sys, shutil
os.environ['JAX_PLATFORMS'] = 'cpu'
from twotower_jax import config as config_lib, planted, train
c = config_lib.base_config()
c.data.source = 'planted'
c.data.tokenizer_type = 'word'
c.data.planted_docs = 60
c.data.planted_topics = 3
c.data.planted_topic_words = 10
c.data.val_fraction = 0.2
c.data.vocab_size = planted.required_vocab_size(c.data)
c.data.seq_len = 16
c.model.n_layers = 1
c.model.d_model = 16
c.model.n_heads = 2
c.model.d_mlp = 32
c.model.max_len = 16
c.model.gate = 'latent'
c.train.steps = 4
c.train.batch_size = 4
c.train.log_every = 2
c.train.eval_every = 2
c.train.eval_batches = 2
c.train.checkpoint_every = 2
c.train.keep_checkpoints = 1
c.optimizer.warmup_steps = 1
wd = sys.argv[1]
shutil.rmtree(wd, ignore_errors=True)
r = train.train_and_evaluate(c, wd)
print(r)
