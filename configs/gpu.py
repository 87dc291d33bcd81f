"""Single-GPU preset: 2 x (24 layers, d=1024, seq 1024) causal towers in bf16.

Expected hardware: one 80 GB GPU (H100/H200/A100-80GB), the shape of the speed
target (>= 45% MFU on an H100). Run: bash launch/gpu.sh runs/gpu
Memory and speed: the batch of 16 x 1024 tokens in one pass would need about 127 GiB
(the layer scan saves 64 GiB of activations for the backward pass), so the blocks are
rematerialised keeping their matmul outputs (model.remat_policy='matmuls'): 31 GiB
peak and 213 ms a step (33% MFU) measured on an H100, against 343 ms (21%) for the same
batch as 4 micro-batches without remat (docs/PERFORMANCE.md, "GPU and TPU"). On a
24 GB GPU: --config.model.remat_policy=full --config.train.grad_accum_steps=4.
Data: the embedded State of the Union corpus (a throughput and debugging run).
"""

from twotower_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.seq_len = 1024
  c.model.n_layers = 24
  c.model.d_model = 1024
  c.model.n_heads = 16
  c.model.d_mlp = 4096
  c.model.max_len = 1024
  c.model.dropout = 0.0
  c.model.dtype = 'bfloat16'
  c.train.steps = 2_000
  c.train.batch_size = 16  # 16k tokens per step
  c.model.remat = True  # the batch in one pass: keep the matmul outputs, recompute the rest
  c.model.remat_policy = 'matmuls'
  c.train.loss_chunk = 0  # all logits at once: the fused loss is timed on CPU only so far
  c.train.log_every = 20
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.optimizer.lr = 3e-4
  c.optimizer.warmup_steps = 200
  c.mesh.data = -1
  return c
