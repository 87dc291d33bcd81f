"""TPU pod slice preset: two large causal towers in bf16 with FSDP.

Expected hardware: a v4-32 slice (16 chips on 4 hosts, 32 GiB HBM each); runs on any
slice whose chip count is a multiple of 8 (mesh.data takes the rest). Launch:

  ACCELERATOR_TYPE=v4-32 WORKDIR=gs://BUCKET/runs/pod bash launch/tpu_vm.sh create
  ... setup, then train (see docs/SCALING.md)

Data: lm1b prepared for TFDS in array_record format in data.tfds_data_dir (e.g.
`tfds build lm1b --file_format=array_record --data_dir=...`), or override
--config.data.source=text --config.data.text_glob=... .
Mesh (16 chips): data 2 x fsdp 4 x tower 2: each tower lives on 8 chips and its
parameters and Adam moments are split four ways; the batch is split 8 ways.
"""

from twotower_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = 'tfds'
  c.data.tfds_name = 'lm1b'
  c.data.seq_len = 512
  c.data.vocab_size = 32000
  c.model.n_layers = 24  # the paper's "large" depth, wider: 2 x ~300M parameters
  c.model.d_model = 1024
  c.model.n_heads = 16
  c.model.d_mlp = 4096
  c.model.max_len = 512
  c.model.dropout = 0.0
  c.model.dtype = 'bfloat16'
  c.model.remat = True
  c.train.steps = 50_000
  c.train.batch_size = 256  # global: 131k tokens per step
  c.train.loss_chunk = 0  # all logits at once: the fused loss is timed on CPU only so far
  c.train.log_every = 100
  c.train.eval_every = 2_000
  c.train.eval_batches = 16
  c.train.checkpoint_every = 2_000
  c.optimizer.lr = 3e-4
  c.optimizer.warmup_steps = 2_000
  c.mesh.data = -1
  c.mesh.fsdp = 4
  c.mesh.tower = 2
  return c
