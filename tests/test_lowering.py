"""Every step lowered for TPU and for CUDA on this CPU-only machine (jax.export), on the 8
fake devices' meshes: the train step (f32, bf16, accumulation, remat, FSDP, a tower axis
of 2; causal, mlm and bilstm towers), the eval step, the analysis passes and the KV-cached
decode step.

A step that calls back to the host or uses an op with no lowering for the platform
fails here (jax.export refuses both; `lowering.check` refuses host custom calls). Each
case records the lowered module's matmul FLOPs beside flops.py's count of the same
step (`record_property`; `pytest --junitxml` keeps them), and the train steps must agree
with it within 5% (remat: above it, by at most one more forward pass; remat_policy
'matmuls': by at most the attention scores).

A new step is one entry in STEPS: a function of the platform that returns a `Case`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import tiny_config
from twotower_jax.analysis import structural_probe
from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators import probe
from twotower_jax.model import attention
from twotower_jax.model import decode
from twotower_jax.model import lm as model_lib
from twotower_jax.model import partitioning
from twotower_jax.model import towers
from twotower_jax.train import flops as flops_lib
from twotower_jax.train import loop
from twotower_jax.train import lowering
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib

PLATFORMS = ('tpu', 'cuda')
VOCAB = 256
CUDNN_FWD, CUDNN_BWD = lowering.KERNEL_CALLS['cuda']


@dataclasses.dataclass
class Case:
  """A jitted step, abstract arguments, and what its lowering must show."""
  fn: Callable
  args: tuple
  devices: int
  model: Any
  analytic_flops: float | None = None  # flops.py's count of the same step
  remat: str = ''  # model.remat_policy when model.remat is on
  runs_towers: bool = True  # False: it reads cached tower states (no attention in it)


def _config(tower_type='causal', **overrides):
  c = tiny_config('unused', **{'mesh.tower': 1, 'train.batch_size': 16,
                               'model.tower_type': tower_type,
                               'model.embedding.mode': towers.get(tower_type).paper_embedding_mode,
                               **overrides})
  model_lib.check_config(c)
  return c


def _windows(config, sharding=None):
  return jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len + 1), jnp.int32,
                              sharding=sharding)


def _sharded(config, platform):
  model = model_lib.build(config, VOCAB, platform=platform)
  mesh = sharding_lib.make_mesh(config)
  rules = sharding_lib.rules(config)
  tx = optimizer_lib.make(config)
  return model, mesh, tx, state_lib.shardings(model, tx, mesh, rules), sharding_lib.batch_sharding(
      mesh, rules)


def train(tower_type='causal', **overrides):
  """The loop's jitted train step (explicit shardings, donated state) on the config's mesh."""
  def case(platform):
    config = _config(tower_type, **overrides)
    model, mesh, tx, state_sh, batch_sh = _sharded(config, platform)
    fn = loop.jit_train_step(config, model, tx, mesh, state_sh, batch_sh)
    args = (state_lib.abstract(model, tx, state_sh), _windows(config, batch_sh))
    return Case(fn, args, mesh.size, model, flops_lib.train_flops_per_step(
        model, config.train.batch_size, config.data.seq_len),
        config.model.remat_policy if config.model.remat else '')
  return case


def evaluate(**overrides):
  """The loop's jitted eval step: one forward pass, a third of the train step's FLOPs."""
  def case(platform):
    config = _config(**overrides)
    model, mesh, tx, state_sh, batch_sh = _sharded(config, platform)
    fn = loop.jit_eval_step(config, model, mesh, state_sh.params, batch_sh)
    args = (state_lib.abstract(model, tx, state_sh).params, _windows(config, batch_sh), _INDEX)
    flops = flops_lib.train_flops_per_step(model, config.train.batch_size, config.data.seq_len)
    return Case(fn, args, mesh.size, model, flops / 3)
  return case


def _context(platform):
  """An analysis Context of a latent-gate bf16 run (every estimator applies), abstract."""
  config = _config(**{'model.gate': 'latent', 'model.dtype': 'bfloat16'})
  model = model_lib.build(config, VOCAB, platform=platform)
  return base.Context(config, model, flops_lib.param_shapes(model), [], None, '', 0)


def analysis(make_fn: Callable, *extra: Callable):
  """An analysis pass, single device as the analysis runs: make_fn(ctx) is the jitted
  pass; its arguments are the params, then extra(ctx) ..., then the window batch and its
  index (the batch's own example key)."""
  def case(platform):
    ctx = _context(platform)
    args = (ctx.params, *(e(ctx) for e in extra), _windows(ctx.config), _INDEX)
    return Case(make_fn(ctx), args, 1, ctx.model)
  return case


def _probe_heads(ctx):
  n, cfg = probe.probe_towers(ctx.config), ctx.model.cfg
  return jax.eval_shape(lambda: probe.probe_init(jax.random.PRNGKey(0), n, cfg.d_model,
                                                 cfg.vocab_size))


_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)
_INDEX = jax.ShapeDtypeStruct((), jnp.int32)  # an eval batch's index
_MEAN_STATES = lambda ctx: jax.ShapeDtypeStruct((ctx.model.cfg.n_towers, ctx.model.cfg.d_model),
                                                jnp.float32)


def _states(ctx, batch=None):
  """Abstract cached final tower states h_NxBxLxH (what the tower pass keeps)."""
  cfg = ctx.model.cfg
  return jax.ShapeDtypeStruct((cfg.n_towers, batch or ctx.config.train.batch_size,
                               ctx.config.data.seq_len, cfg.d_model), jnp.float32)


def _scored(name, state):
  """base.score's per-batch pass of estimator `name` (params, state, window, its index,
  states, key)."""
  def case(platform):
    ctx = _context(platform)
    return Case(base.batch_sums_fn(ctx, name), (ctx.params, state(ctx), _windows(ctx.config),
                                                _INDEX, _states(ctx), _KEY), 1, ctx.model,
                runs_towers=False)
  return case


def _probe_training(platform):
  """One probe step on cached training states (heads, opt, h, targets, weights, windows)."""
  ctx = _context(platform)
  tx = optax.adamw(1e-3)
  heads = _probe_heads(ctx)
  w = 12  # cached windows
  tokens = jax.ShapeDtypeStruct((w, ctx.config.data.seq_len), jnp.int32)
  weights = jax.ShapeDtypeStruct((w, ctx.config.data.seq_len), jnp.float32)
  idx = jax.ShapeDtypeStruct((4,), jnp.int32)
  return Case(probe.probe_step_fn(tx), (heads, jax.eval_shape(tx.init, heads), _states(ctx, w),
                                        tokens, weights, idx), 1, ctx.model, runs_towers=False)


def _probe_states(platform):
  """The pass caching the probe's training states (params, window, key)."""
  ctx = _context(platform)
  return Case(probe.training_states_fn(ctx), (ctx.params, _windows(ctx.config), _KEY), 1,
              ctx.model)


_POOL = lambda ctx: jax.ShapeDtypeStruct((ctx.model.cfg.n_towers, 64, ctx.model.cfg.d_model),
                                         jnp.float32)


def _layer_states(platform):
  ctx = _context(platform)
  fn = jax.jit(functools.partial(structural_probe.layer_states, ctx.model))
  tokens = jax.ShapeDtypeStruct((ctx.config.train.batch_size, ctx.config.data.seq_len), jnp.int32)
  return Case(fn, (ctx.params, tokens), 1, ctx.model)


def decoding(**overrides):
  """The KV-cached decode step (decode.step: one new token per row against the full cache),
  latent gate, bf16, pondering, on a tower axis of 2 under the training rules. Its
  attention is the cached path's XLA arithmetic on every platform (no kernel call)."""
  def case(platform):
    config = _config(**{'model.gate': 'latent', 'model.dtype': 'bfloat16', 'mesh.tower': 2,
                        'model.pondering.steps': 1, **overrides})
    model, mesh, tx, state_sh, batch_sh = _sharded(config, platform)
    rules = sharding_lib.rules(config)
    b = config.train.batch_size
    dtype = jnp.dtype(config.model.dtype)
    cache = {p: {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.logical_shardings(
        jax.sharding.PartitionSpec(*axes), mesh, rules)) for name, (shape, axes) in spec.items()}
             for p, spec in model_lib.cache_spec(model.cfg, b).items()}
    column = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=batch_sh)
    fn = jax.jit(partitioning.with_rules(functools.partial(decode.step, model), mesh, rules))
    return Case(fn, (state_lib.abstract(model, tx, state_sh).params, cache, column, column),
                mesh.size, model, runs_towers=False)
  return case


STEPS = {
    'train_f32': train(),  # data parallel over 8 devices
    'train_bf16': train(**{'model.dtype': 'bfloat16'}),
    'train_accum': train(**{'train.grad_accum_steps': 2}),
    'train_remat': train(**{'model.remat': True, 'model.dtype': 'bfloat16'}),
    'train_remat_matmuls': train(**{'model.remat': True, 'model.remat_policy': 'matmuls',
                                    'model.dtype': 'bfloat16'}),
    'train_fsdp': train(**{'mesh.fsdp': 4}),
    'train_tower_axis': train(**{'mesh.tower': 2, 'mesh.fsdp': 2, 'model.dtype': 'bfloat16'}),
    'train_mlm': train('mlm', **{'mesh.tower': 2}),
    'train_bilstm': train('bilstm', **{'mesh.tower': 2}),
    # the fused output loss: its rows split over the tower axis too, so no FLOP twice
    'train_fused_tower_axis': train(**{'mesh.tower': 2, 'mesh.fsdp': 2, 'train.loss_chunk': 64}),
    'train_fused_mlm': train('mlm', **{'mesh.tower': 2, 'train.loss_chunk': 64}),
    'eval': evaluate(**{'mesh.tower': 2, 'model.dtype': 'bfloat16'}),
    'analysis_tower_pass': analysis(base.tower_pass_fn),
    'analysis_probe': _scored('probe', lambda ctx: {'params': _probe_heads(ctx)}),
    'analysis_ablation': _scored('ablation', _MEAN_STATES),
    'analysis_resample': _scored('resample', _POOL),
    'analysis_gate': _scored('gate', lambda ctx: None),
    'analysis_probe_states': _probe_states,
    'analysis_probe_training': _probe_training,
    'analysis_layer_states': _layer_states,
    'decode_step': decoding(),
}


def test_every_estimator_is_lowered():
  assert {f'analysis_{name}' for name in base.ESTIMATORS} <= set(STEPS)


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('name', list(STEPS))
def test_step_lowers_for_the_accelerator(name, platform, cudnn_lowering, record_property):
  case = STEPS[name](platform)
  exported = lowering.export(case.fn, platform, *case.args)
  assert exported.nr_devices == case.devices
  text = exported.mlir_module()
  calls = lowering.custom_calls(text)
  uses_cudnn = (case.runs_towers and attention.implementation(case.model.cfg, platform) == 'cudnn'
                and towers.get(case.model.cfg.tower_type).attention_layers(case.model.cfg) > 0)
  assert (CUDNN_FWD in calls) == uses_cudnn, calls
  if uses_cudnn and name.startswith('train'):
    assert CUDNN_BWD in calls
    # Full remat runs the attention forward again; 'matmuls' keeps the kernel's residuals.
    assert calls[CUDNN_FWD] == (2 if case.remat == 'full' else 1), calls
  flops = lowering.module_flops(text)
  assert flops.total > 0 and not flops.uncounted
  record_property('lowered_flops', flops.total)
  record_property('flops_py', case.analytic_flops)
  if case.analytic_flops is not None:
    ratio = flops.total / case.analytic_flops
    if case.remat == 'full':  # recomputation of the blocks' forward is not model FLOPs
      assert 1.0 < ratio <= 4 / 3 + 0.01, ratio
    elif case.remat == 'matmuls':  # outputs kept: XLA attention recomputes its scores only
      assert (abs(ratio - 1.0) < 1e-6) if uses_cudnn else (1.0 < ratio < 1.05), ratio
    else:
      assert abs(ratio - 1.0) < 0.05, ratio


def _score_dots(text: str, length: int) -> int:
  """dot_generals whose output ends in length x length: XLA's attention scores."""
  return sum(1 for line in text.splitlines()
             if 'stablehlo.dot_general' in line and f'x{length}x{length}x' in line.split('->')[-1])


@pytest.mark.parametrize('tower_type,dtype,choice,mask', [
    ('causal', 'bfloat16', 'auto', 'CAUSAL'),
    ('mlm', 'bfloat16', 'cudnn', 'NO_MASK'),
    ('causal', 'bfloat16', 'xla', None),  # forced XLA
    ('causal', 'float32', 'auto', None),  # cuDNN flash attention needs bf16
])
def test_gpu_train_step_calls_cudnn_flash_attention(tower_type, dtype, choice, mask,
                                                   cudnn_lowering):
  """bf16 on CUDA: the fused cuDNN flash-attention call forward and backward, no XLA score
  matrix; forced XLA and f32 keep XLA's attention."""
  length = 40  # no other array of the step is length x length
  case = train(tower_type, **{'model.dtype': dtype, 'model.attention': choice,
                              'data.seq_len': length, 'model.max_len': length})('cuda')
  text = lowering.export(case.fn, 'cuda', *case.args).mlir_module()
  calls = lowering.custom_calls(text)
  if mask is None:
    assert not set(calls) & {CUDNN_FWD, CUDNN_BWD}
    assert _score_dots(text, length) > 0
    return
  assert calls[CUDNN_FWD] >= 1 and calls[CUDNN_BWD] >= 1, calls
  config = text.replace('\\22', '"')
  assert '"is_flash_attention": true' in config and f'"mask_type": "{mask}"' in config
  assert _score_dots(text, length) == 0


def test_tpu_splash_attention_is_a_pallas_kernel_run_per_shard():
  """model.attention=splash on TPU: the Pallas kernel (tpu_custom_call) on each device's
  block, i.e. a quarter of the batch (data 2 x fsdp 2) and one of the two towers."""
  overrides = {'model.attention': 'splash', 'model.dtype': 'bfloat16', 'data.seq_len': 128,
               'model.max_len': 128, 'mesh.tower': 2, 'mesh.fsdp': 2}
  case = train(**overrides)('tpu')
  text = lowering.export(case.fn, 'tpu', *case.args).mlir_module()
  assert lowering.custom_calls(text)['tpu_custom_call'] >= 2  # forward and backward kernels
  assert _score_dots(text, 128) == 0
  per_device = 'tensor<4x2x128x16xbf16>'  # batch 16 / 4, 2 heads, 128 positions, head dim 16
  kernel_lines = [l for l in text.splitlines() if 'custom_call @tpu_custom_call' in l]
  assert all(per_device in l for l in kernel_lines)
  assert lowering.module_flops(text).uncounted['tpu_custom_call'] > 0
  cuda = train(**overrides)('cuda')  # off TPU, 'splash' is XLA's attention
  assert 'tpu_custom_call' not in lowering.custom_calls(
      lowering.export(cuda.fn, 'cuda', *cuda.args).mlir_module())


def _callback(x):
  jax.debug.callback(lambda v: None, x)
  return x * 2


@pytest.mark.parametrize('fn', [
    _callback,
    lambda x: jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(x.shape, x.dtype), x),
    lambda x: jnp.linalg.eig(x)[0].real,  # LAPACK on CPU only (CUDA: a custom call
                                          # without a compatibility guarantee)
], ids=['debug_callback', 'pure_callback', 'cpu_only_eig'])
@pytest.mark.parametrize('platform', PLATFORMS)
def test_export_refuses_host_callbacks_and_cpu_only_ops(fn, platform):
  with pytest.raises((ValueError, NotImplementedError)):
    lowering.export(jax.jit(fn), platform, jax.ShapeDtypeStruct((4, 4), jnp.float32))


def test_check_refuses_a_host_custom_call():
  module = types.SimpleNamespace(platforms=('tpu',), mlir_module=lambda: (
      '%0 = stablehlo.custom_call @xla_ffi_python_cpu_callback(%arg0)'))
  with pytest.raises(lowering.LoweringError, match='calls host code'):
    lowering.check(module, 'tpu')
  with pytest.raises(lowering.LoweringError, match='not'):
    lowering.check(module, 'cuda')


def test_module_flops_counts_loops_by_trip_count():
  def f(x_8x16, w_5x16x16):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_8x16, w_5x16x16)[0]
  text = lowering.export(jax.jit(f), 'tpu', jax.ShapeDtypeStruct((8, 16), jnp.float32),
                         jax.ShapeDtypeStruct((5, 16, 16), jnp.float32)).mlir_module()
  assert lowering.module_flops(text).dots == 5 * 2 * 8 * 16 * 16
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)))
  text = lowering.export(grad, 'tpu', jax.ShapeDtypeStruct((8, 16), jnp.float32),
                         jax.ShapeDtypeStruct((5, 16, 16), jnp.float32)).mlir_module()
  assert lowering.module_flops(text).dots == 3 * 5 * 2 * 8 * 16 * 16  # forward, dx, dw
  loop_fn = jax.jit(lambda x: jax.lax.while_loop(lambda c: jnp.sum(c) < 100.0,
                                                 lambda c: c @ jnp.ones((4, 4)), x))
  text = lowering.export(loop_fn, 'tpu', jax.ShapeDtypeStruct((4, 4), jnp.float32)).mlir_module()
  with pytest.raises(ValueError, match='trip count'):
    lowering.module_flops(text)
