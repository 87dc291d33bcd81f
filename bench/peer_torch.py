"""The project's train step written in PyTorch eager: the peer the CPU step is timed against.

  python bench/peer_torch.py --check                    # same losses as the project's step
  python bench/peer_torch.py --check --config=configs/tiny.py
  python bench/train_step.py --peer=torch --rounds=5    # both timed, alternating (ratio)

The default job's architecture as a PyTorch user writes it (nn.Linear, nn.LayerNorm,
F.scaled_dot_product_attention, F.cross_entropy, torch.optim.AdamW with its defaults):
a shared token table read by N causal towers of pre-LN blocks with a final LayerNorm,
the concat gate's head LN(GELU(Dense(LN([h_1; ...; h_N])))) and the tied output layer
z E^T + b. The update is the project's: mean cross-entropy over the non-PAD targets,
global-norm clipping, AdamW (b1, b2, eps 1e-8, weight decay on matrices and tables
only) on the warm-up then linear-decay schedule. Equal work: the loss, gradients and
update are the same (`--check` runs both from the same weights and compares the
losses); the project's step also computes metrics (gradient norms, non-finite flags)
that this one leaves out. Dropout is not modelled: the peer needs model.dropout=0.

Needs torch (`pip install -e .[bench]`, pinned in setup.py); never imported by the
package. The timing point (`--point`, run by train_step.py) imports no JAX.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twotower_jax import config as config_lib  # pylint: disable=wrong-import-position
from twotower_jax import hostmem  # pylint: disable=wrong-import-position

PAD_ID = 0  # twotower_jax.data.tokenizer.PAD_ID (its module imports JAX)


def unsupported(config) -> str | None:
  """Why the peer cannot run `config` (the field and the value it needs), or None."""
  m = config.model
  needs = {'model.tower_type': (m.tower_type, 'causal'), 'model.gate': (m.gate, 'concat'),
           'model.embedding.mode': (m.embedding.mode, 'shared'),
           'model.embedding.tied': (m.embedding.tied, True),
           'model.embedding.positions': (m.embedding.positions, True),
           'model.embedding.input_grad_scale': (m.embedding.input_grad_scale, 1.0),
           'model.pondering.steps': (m.pondering.steps, 0), 'model.dropout': (m.dropout, 0.0),
           'model.attention_dropout': (m.attention_dropout, 0.0),
           'model.head.gelu': (m.head.gelu, 'tanh'), 'model.head.width': (m.head.width, 'model'),
           'model.head.joint_ln_dropout': (m.head.joint_ln_dropout, False),
           'model.ln_final': (m.ln_final, True), 'model.dtype': (m.dtype, 'float32'),
           'model.remat': (m.remat, False),
           'model.released.pad_target': (m.released.pad_target, False),
           'model.released.mask_pad_keys': (m.released.mask_pad_keys, False),
           'train.grad_accum_steps': (config.train.grad_accum_steps, 1),
           'train.trainable': (config.train.trainable, '')}
  for field, (value, want) in needs.items():
    if value != want:
      return f'{field}={value!r} (the peer models {field}={want!r}; set it so)'
  return None


class Block(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, d: int, heads: int, mlp: int):
    super().__init__()
    self.heads = heads
    self.ln_attn, self.ln_mlp = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
    self.qkv, self.attn_out = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.mlp_in, self.mlp_out = nn.Linear(d, mlp), nn.Linear(mlp, d)

  def forward(self, x_BxLxH: torch.Tensor) -> torch.Tensor:
    b, l, h = x_BxLxH.shape
    qkv = self.qkv(self.ln_attn(x_BxLxH)).view(b, l, 3, self.heads, h // self.heads)
    q_BxNxLxD, k_BxNxLxD, v_BxNxLxD = qkv.permute(2, 0, 3, 1, 4)
    y_BxNxLxD = F.scaled_dot_product_attention(q_BxNxLxD, k_BxNxLxD, v_BxNxLxD, is_causal=True)
    x_BxLxH = x_BxLxH + self.attn_out(y_BxNxLxD.transpose(1, 2).reshape(b, l, h))
    y_BxLxH = self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x_BxLxH)), approximate='tanh'))
    return x_BxLxH + y_BxLxH


class Tower(nn.Module):
  def __init__(self, layers: int, d: int, heads: int, mlp: int):
    super().__init__()
    self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(layers))
    self.ln_final = nn.LayerNorm(d, eps=1e-5)

  def forward(self, x_BxLxH: torch.Tensor) -> torch.Tensor:
    for block in self.blocks:
      x_BxLxH = block(x_BxLxH)
    return self.ln_final(x_BxLxH)


class TwoTowerGPT(nn.Module):
  """Token and position tables -> N towers -> concat head -> tied output layer."""

  def __init__(self, m, vocab: int):
    super().__init__()
    d, eps = m.d_model, m.head.ln_eps
    self.token = nn.Parameter(torch.randn(vocab, d) * 0.02)
    self.position = nn.Parameter(torch.randn(m.max_len, d) * 0.02)
    self.towers = nn.ModuleList(Tower(m.n_layers, d, m.n_heads, m.d_mlp)
                                for _ in range(m.n_towers))
    self.ln_in = nn.LayerNorm(m.n_towers * d, eps=eps)
    self.dense = nn.Linear(m.n_towers * d, d)
    self.ln_out = nn.LayerNorm(d, eps=eps)
    self.output_bias = nn.Parameter(torch.zeros(vocab))

  def forward(self, tokens_BxL: torch.Tensor) -> torch.Tensor:
    x_BxLxH = self.token[tokens_BxL] + self.position[:tokens_BxL.shape[1]]
    h_BxLxC = torch.cat([tower(x_BxLxH) for tower in self.towers], dim=-1)
    z_BxLxH = self.ln_out(F.gelu(self.dense(self.ln_in(h_BxLxC)), approximate='tanh'))
    return z_BxLxH @ self.token.T + self.output_bias


def loss_fn(model: TwoTowerGPT, window_BxL1: torch.Tensor) -> torch.Tensor:
  """Mean next-token cross-entropy over the non-PAD targets (the project's loss)."""
  logits_BxLxV = model(window_BxL1[:, :-1])
  return F.cross_entropy(logits_BxLxV.flatten(0, 1), window_BxL1[:, 1:].flatten(),
                         ignore_index=PAD_ID)


def lr_at(config, step: int) -> float:
  """train/optimizer.py's schedule: linear warm-up from 0, then linear decay to 0."""
  opt, steps = config.optimizer, config.train.steps
  warmup = min(opt.warmup_steps, steps)
  if step < warmup:
    return opt.lr * step / max(warmup, 1)
  return opt.lr * max(0.0, 1.0 - (step - warmup) / max(steps - warmup, 1))


def make_optimizer(model: TwoTowerGPT, config) -> torch.optim.AdamW:
  """AdamW with the project's settings (train/optimizer.py): weight decay on the Linear
  weights and the token and position tables, none on biases and LayerNorms."""
  opt = config.optimizer
  norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
  decay, rest = [], []
  for name, p in model.named_parameters():
    (rest if id(p) in norms or name.endswith('bias') else decay).append(p)
  return torch.optim.AdamW([{'params': decay, 'weight_decay': opt.weight_decay},
                            {'params': rest, 'weight_decay': 0.0}],
                           lr=lr_at(config, 0), betas=(opt.b1, opt.b2), eps=1e-8)


def train_step(model: TwoTowerGPT, optimizer: torch.optim.Optimizer, config,
               window_BxL1: torch.Tensor, step: int) -> torch.Tensor:
  """One update: loss, backward, global-norm clip, AdamW at the schedule's rate."""
  for group in optimizer.param_groups:
    group['lr'] = lr_at(config, step)
  loss = loss_fn(model, window_BxL1)
  loss.backward()
  with torch.profiler.record_function('optimizer'):  # a no-op unless profiled
    nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  return loss.detach()


def load_flax_params(model: TwoTowerGPT, params) -> None:
  """Copies the project's parameters (a tree of arrays, towers stacked on axis 0) in."""
  np_ = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))
  embed, gate, towers = params['embed'], params['gate'], params['towers']
  with torch.no_grad():
    model.token.copy_(np_(embed['token']))
    model.position.copy_(np_(embed['position']))
    model.output_bias.copy_(np_(embed['output_bias']))
    for mod, name in ((model.ln_in, 'ln_in'), (model.ln_out, 'ln_out')):
      mod.weight.copy_(np_(gate[name]['scale']))
      mod.bias.copy_(np_(gate[name]['bias']))
    model.dense.weight.copy_(np_(gate['dense']['kernel']).T)
    model.dense.bias.copy_(np_(gate['dense']['bias']))
    for k, tower in enumerate(model.towers):
      tower.ln_final.weight.copy_(np_(towers['ln_final']['scale'][k]))
      tower.ln_final.bias.copy_(np_(towers['ln_final']['bias'][k]))
      for i, block in enumerate(tower.blocks):
        # Unrolled layers are block_i; scanned ones are `blocks`, stacked (tower, layer, ...).
        p = (towers[f'block_{i}'] if 'blocks' not in towers else
             jax_to_numpy(towers['blocks'], lambda x, i=i: np.asarray(x)[:, i]))
        for ln in ('ln_attn', 'ln_mlp'):
          getattr(block, ln).weight.copy_(np_(p[ln]['scale'][k]))
          getattr(block, ln).bias.copy_(np_(p[ln]['bias'][k]))
        for dense in ('qkv', 'attn_out', 'mlp_in', 'mlp_out'):
          kernel, bias = np_(p[dense]['kernel'][k]), np_(p[dense]['bias'][k])
          linear = getattr(block, dense)
          linear.weight.copy_(kernel.reshape(-1, linear.weight.shape[0]).T)
          linear.bias.copy_(bias.reshape(-1))


def config_of(raw: dict):
  """The run config from its plain-dict form (what train_step.py passes a point)."""
  return config_lib.from_dict(raw)


def check(config, steps: int = 4) -> dict:
  """Both steps from the same weights on the same random batch: the losses of `steps`
  successive updates (the first is the forward pass alone; later ones follow updates).
  Imports JAX: the project's step as bench/train_step.py times it."""
  sys.path.insert(0, HERE)
  import harness  # pylint: disable=g-import-not-at-top
  problem = unsupported(config)
  if problem:
    raise SystemExit(f'the peer cannot run this config: {problem}')
  bench = harness.StepBench(config, config.data.vocab_size)
  params = jax_to_numpy(bench.state.params)
  model = TwoTowerGPT(config.model, config.data.vocab_size)
  load_flax_params(model, params)
  optimizer = make_optimizer(model, config)
  window = torch.from_numpy(np.asarray(bench.batch).astype(np.int64))
  ours, peer = [], []
  for step in range(steps):
    ours.append(float(bench.step()))
    peer.append(float(train_step(model, optimizer, config, window, step)))
  return {'ours': ours, 'peer': peer,
          'max_abs_diff': max(abs(a - b) for a, b in zip(ours, peer))}


def jax_to_numpy(tree, fn=np.array):
  """`fn` (default: a NumPy copy) on every leaf of a nested dict of arrays."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: jax_to_numpy(v, fn) for k, v in tree.items()}
  return fn(tree)


# The part of the step an op belongs to (the names profile_step.py gives XLA's thunks),
# by the outermost op it runs under (a forward op, an autograd node or the optimizer) and,
# for matmuls and adds, whether the vocabulary is one of its dimensions.
PARTS = (
    ('optimizer update (clip, AdamW)', r'^optimizer$'),
    ('attention', r'scaled_dot_product|ScaledDotProduct'),
    ('LayerNorm and GELU', r'layer_norm|LayerNorm|gelu|Gelu'),
    ('softmax and cross-entropy (with the output bias)', r'cross_entropy|log_softmax|LogSoftmax|'
     r'nll_loss|NllLoss|VOCAB.*(aten::add|AddBackward)'),
    ('embedding lookup and its gradient', r'aten::index$|IndexBackward'),
    ('output layer matmuls', r'VOCAB.*(linear|addmm|aten::mm|matmul|AddmmBackward|MmBackward)'),
    ('tower and gate matmuls', r'linear|addmm|aten::mm|matmul|AddmmBackward|MmBackward'),
    ('copies and transposes', r'permute|transpose|reshape|view|contiguous|clone|copy|aten::cat|'
     r'Cat|Permute|Transpose|View|Clone|Unsafe|Slice|Select|Unbind|Stack|aten::slice'),
    ('other model elementwise (residual adds)', r''),
)


def profile(config, steps: int = 3) -> list[dict]:
  """Milliseconds per step of the peer's ops by part (PARTS; self CPU time of each op on
  the calling thread, which waits for the intra-op threads: the parts sum to the step)."""
  import re  # pylint: disable=g-import-not-at-top
  model, optimizer, window = _setup(config)
  for step in range(2):
    train_step(model, optimizer, config, window, step)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              record_shapes=True) as prof:
    for step in range(steps):
      train_step(model, optimizer, config, window, 2 + step)
  vocab = str(config.data.vocab_size)
  ms, count = {}, {}
  for e in prof.events():
    if e.self_cpu_time_total <= 0:
      continue
    root = e
    while root.cpu_parent is not None:
      root = root.cpu_parent
    shapes = f'{e.input_shapes} {root.input_shapes}'
    key = ('VOCAB ' if re.search(rf'\b{vocab}\b', shapes) else '') + root.name
    label = next(label for label, pattern in PARTS if re.search(pattern, key))
    ms[label] = ms.get(label, 0.0) + e.self_cpu_time_total / 1e3 / steps
    count[label] = count.get(label, 0) + 1
  total = sum(ms.values())
  return [{'part': k, 'ms_per_step': v, 'share': v / total, 'per_step': count[k] / steps}
          for k, v in sorted(ms.items(), key=lambda kv: -kv[1])]


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an f32 n^3 matmul in this process (torch's BLAS), best of `repeats`."""
  a = torch.randn(n, n)
  torch.mm(a, a)
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    torch.mm(a, a)
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def _setup(config):
  """(model, optimizer, random window) of `config`, with as many threads as this process
  may use: the same count XLA:CPU's thread pool takes."""
  problem = unsupported(config)
  if problem:
    raise SystemExit(f'the peer cannot run this config: {problem}')
  torch.manual_seed(config.train.seed)
  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                        else os.cpu_count())
  model = TwoTowerGPT(config.model, config.data.vocab_size)
  b, l, v = config.train.batch_size, config.data.seq_len, config.data.vocab_size
  window = torch.randint(4, v, (b, l + 1), generator=torch.Generator().manual_seed(0))
  return model, make_optimizer(model, config), window


def measure(config, steps: int, repeats: int) -> dict:
  """One timing row (run in the point process): as train_step.measure, on the peer."""
  model, optimizer, window = _setup(config)
  threads = torch.get_num_threads()
  b, l = config.train.batch_size, config.data.seq_len
  step = 0

  def run(n: int) -> float:
    nonlocal step
    t0 = time.perf_counter()
    for _ in range(n):
      train_step(model, optimizer, config, window, step)
      step += 1
    return time.perf_counter() - t0

  run(2)  # warm-up: first executions allocate
  times, peaks = [], []
  for _ in range(repeats):
    peaks.append(matmul_peak())
    times.append(run(steps) / steps)
  t = statistics.median(times)
  return {'side': 'torch', 'torch': torch.__version__, 'threads': torch.get_num_threads(),
          'tokens_per_s': b * l / t, 'ms_per_step': 1e3 * t, 'step_times_s': times,
          'peak_gflops': max(peaks) / 1e9, 'peaks_gflops': [x / 1e9 for x in peaks],
          'peak_how': f'measured f32 2048^3 torch.mm, this process ({threads} threads)',
          'steps': steps, 'repeats': repeats, 'loadavg': os.getloadavg()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--check', action='store_true', help='compare the losses of both steps')
  p.add_argument('--profile', action='store_true',
                 help='time the peer\'s ops by part of the step (torch.profiler)')
  p.add_argument('--config', default='', help='config file (PATH or PATH:ARG) for --check; '
                 'default: bench/train_step.py\'s target')
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--point', help=argparse.SUPPRESS)  # a JSON config: one timing row
  args = p.parse_args()
  if args.point is not None:
    print(json.dumps(measure(config_of(json.loads(args.point)), args.steps, args.repeats)))
    return
  if not (args.check or args.profile):
    p.error('give --check or --profile (timing: bench/train_step.py --peer=torch)')
  sys.path.insert(0, HERE)
  import train_step as bench_train_step  # pylint: disable=g-import-not-at-top
  overrides = {**({} if args.config else bench_train_step.TARGET), 'model.dropout': 0.0}
  config = bench_train_step.point_config(overrides, os.path.abspath(args.config) if args.config
                                         else '')
  if args.profile:
    import harness  # pylint: disable=g-import-not-at-top
    parts = profile(config, args.steps)
    print(f"op time {sum(r['ms_per_step'] for r in parts):.1f} ms per step")
    harness.print_table(parts, ('part', 'per_step', 'ms_per_step', 'share'))
    return
  result = check(config, args.steps)
  for i, (a, b) in enumerate(zip(result['ours'], result['peer'])):
    print(f'step {i}: ours {a:.6f}  peer {b:.6f}  diff {a - b:+.2e}')
  print(f"max |diff| {result['max_abs_diff']:.2e}")


if __name__ == '__main__':
  hostmem.restart()  # the host settings launch/env.sh gives (twotower_jax/hostmem.py)
  main()
