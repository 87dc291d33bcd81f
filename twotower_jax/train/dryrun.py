"""Pre-flight dry run on this machine's CPU for a named accelerator target.

`python -m twotower_jax.main --config=... --dry_run=v5e-8` (also v4-32, v5p-8, v6e-8,
H100, H100x8, H200, A100) prints, without the hardware and without writing anything:
- the train step lowered for the target's platform (jax.export: no host calls, the
  attention kernel it gets) and that lowering's matmul FLOPs beside flops.py's count;
- per-device memory: an ESTIMATE, XLA:CPU's buffer assignment of the same sharded step
  compiled for as many CPU devices as the target has, on the config's mesh. Arguments
  (parameters, optimizer state, batch: exact per-device shards) carry over, and so do
  the activations a scan saves for the backward pass (JAX decides those, not XLA); the
  other temporaries depend on the compiler. Where the target runs a flash kernel (cuDNN,
  splash) the CPU program uses XLA attention that saves no score matrix
  (`attention.flash_stand_in`), so only one layer's scores are counted, transiently;
- the expected step time and tokens/s at a stated MFU against the target's dense peak;
- the run's size and time: tokens per optimizer step (batch x window), train.steps, total
  tokens, and the expected wall time of the whole run at that step time (training steps
  only: no eval, checkpoints or input pipeline).
The CPU devices must be set before JAX starts its backend: `use_cpu_devices` first.
"""

from __future__ import annotations

import dataclasses
import re
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from twotower_jax import errors
from twotower_jax.model import attention
from twotower_jax.model import lm as model_lib
from twotower_jax.model import towers
from twotower_jax.train import flops as flops_lib
from twotower_jax.train import loop
from twotower_jax.train import lowering
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import preflight
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Target:
  """An accelerator slice: one JAX device per chip (TPU) or GPU."""
  name: str
  platform: str  # 'tpu' | 'cuda'
  devices: int
  device_kind: str  # as jax.Device.device_kind reports it (flops.PEAK_FLOPS keys)
  hbm_gib: float  # memory per device

  def peak_flops(self, dtype: str) -> float:
    """Dense peak FLOP/s of one device for the compute dtype (flops.PEAK_FLOPS)."""
    return flops_lib.device_peak(types.SimpleNamespace(device_kind=self.device_kind), dtype)


# TPU generation: (device_kind, HBM GiB per chip, TensorCores per chip in the slice name).
# v4 and v5p names count TensorCores (v4-32 = 16 chips); v5e and v6e names count chips.
_TPUS = {'v4': ('TPU v4', 32, 2), 'v5p': ('TPU v5p', 95, 2), 'v5e': ('TPU v5 lite', 16, 1),
         'v5litepod': ('TPU v5 lite', 16, 1), 'v6e': ('TPU v6 lite', 32, 1)}
_GPUS = {'H100': ('NVIDIA H100 80GB HBM3', 80), 'H200': ('NVIDIA H200', 141),
         'A100': ('NVIDIA A100-SXM4-80GB', 80)}
EXAMPLES = 'v5e-8, v4-32, v5p-8, v6e-8, H100, H100x8, H200, A100'


def target(name: str) -> Target:
  """The target named like a TPU accelerator type (v5e-8, v4-32) or a GPU (H100, H100x8)."""
  tpu = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
  if tpu:
    kind, hbm, cores = _TPUS[tpu.group(1)]
    size = int(tpu.group(2))
    if size < cores or size % cores:
      raise errors.UserError(f'--dry_run={name}: a {tpu.group(1)} slice has a multiple of '
                             f'{cores} TensorCores (e.g. {tpu.group(1)}-{4 * cores})')
    return Target(name, 'tpu', size // cores, kind, hbm)
  gpu = re.fullmatch(r'(H100|H200|A100)(?:x(\d+))?', name)
  if gpu and int(gpu.group(2) or 1) >= 1:
    kind, hbm = _GPUS[gpu.group(1)]
    return Target(name, 'cuda', int(gpu.group(2) or 1), kind, hbm)
  raise errors.UserError(f'--dry_run={name!r} is not a known target; use one of {EXAMPLES}')


def use_cpu_devices(n: int) -> None:
  """Makes JAX start with `n` CPU devices only; JAX refuses once its backend has started."""
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)


def cudnn_traceable() -> bool:
  """Whether cuDNN attention can be traced here (needs the CUDA plugin's cuDNN)."""
  s = jax.ShapeDtypeStruct((1, 8, 1, 8), jnp.bfloat16)
  try:
    jax.eval_shape(lambda q: jax.nn.dot_product_attention(q, q, q, implementation='cudnn'), s)
  except RuntimeError:
    return False
  return True


def _step(config, model, mesh):
  """The loop's jitted train step and its abstract arguments on `mesh`."""
  rules = sharding_lib.rules(config)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(model, tx, mesh, rules)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  batch = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len + 1), jnp.int32,
                               sharding=batch_sh)
  fn = loop.jit_train_step(config, model, tx, mesh, state_sh, batch_sh)
  return fn, (state_lib.abstract(model, tx, state_sh), batch)


def run(config: ml_collections.ConfigDict, tgt: Target, mfu: float) -> dict[str, Any]:
  """Lowers and compiles the train step for `tgt` on CPU devices; returns the report."""
  if not 0.0 < mfu <= 1.0:
    raise errors.UserError(f'--dry_run_mfu={mfu} must be in (0, 1]')
  setup_lib.check_config(config)
  if jax.device_count() != tgt.devices:
    raise RuntimeError(f'{jax.device_count()} CPU devices, the target has {tgt.devices}')
  mesh = sharding_lib.make_mesh(config)
  vocab, tc = config.data.vocab_size, config.train
  model = model_lib.build(config, vocab, platform=tgt.platform)
  impl = attention.implementation(model.cfg)
  note = ''
  if not towers.get(model.cfg.tower_type).attention_layers(model.cfg):
    impl = 'none (no attention layers)'
  elif impl == 'cudnn' and not cudnn_traceable():
    note = ' (lowered here with xla: no CUDA plugin on this machine to trace cuDNN)'
    lowered_config = config.copy_and_resolve_references()
    lowered_config.model.attention = 'xla'
    model = model_lib.build(lowered_config, vocab, platform=tgt.platform)
  fn, args = _step(config, model, mesh)
  exported = lowering.export(fn, tgt.platform, *args)
  lowered = lowering.module_flops(exported.mlir_module())

  t0 = time.perf_counter()
  with attention.flash_stand_in():  # the target's flash kernel: no saved score matrix
    fn, args = _step(config, model_lib.build(config, vocab, platform=tgt.platform), mesh)
    memory = preflight.memory_stats(fn.lower(*args).compile())
  compile_s = time.perf_counter() - t0

  analytic = flops_lib.train_flops_per_step(model, tc.batch_size, config.data.seq_len)
  peak = tgt.peak_flops(config.model.dtype)
  step_s = analytic / (mfu * peak * tgt.devices)
  total = (memory.get('argument_size_in_bytes', 0) + memory.get('output_size_in_bytes', 0) -
           memory.get('alias_size_in_bytes', 0) + memory.get('temp_size_in_bytes', 0))
  return {'target': tgt.name, 'platform': tgt.platform, 'devices': tgt.devices,
          'mesh': dict(mesh.shape), 'dtype': config.model.dtype, 'attention': impl + note,
          'kernel_calls': dict(lowering.custom_calls(exported.mlir_module())),
          'flops_per_step': analytic, 'lowered_flops_per_step': lowered.total,
          'uncounted_kernels': dict(lowered.uncounted), 'memory_per_device': memory,
          'memory_total_per_device': total, 'hbm_per_device': tgt.hbm_gib * GIB,
          'cpu_compile_s': compile_s, 'mfu': mfu, 'peak_flops_per_device': peak,
          'step_s': step_s, 'tokens_per_s': tc.batch_size * config.data.seq_len / step_s,
          **schedule_summary(config, step_s)}


def schedule_summary(config: ml_collections.ConfigDict, step_s: float) -> dict[str, Any]:
  """Tokens per step, steps, total tokens and the run's wall time at `step_s` per step."""
  tokens_per_step = config.train.batch_size * config.data.seq_len
  return {'tokens_per_step': tokens_per_step, 'steps': config.train.steps,
          'total_tokens': tokens_per_step * config.train.steps,
          'wall_s': step_s * config.train.steps}


def format_report(r: dict[str, Any], config: ml_collections.ConfigDict) -> str:
  """The report as the dry run prints it."""
  m, tc = config.model, config.train
  mib = lambda key: r['memory_per_device'].get(key, 0) / 2 ** 20
  plural = lambda n, word: f'{n} {word}' + ('s' if n > 1 else '')
  kernels = ', '.join(f'{k} x{v}' for k, v in sorted(r['kernel_calls'].items())) or 'none'
  ratio = r['lowered_flops_per_step'] / r['flops_per_step']
  uncounted = ', Pallas kernels not counted' if r['uncounted_kernels'] else ''
  lines = [
      f"dry run for {r['target']} ({plural(r['devices'], r['platform'] + ' device')}) on "
      "this machine's CPU; nothing is written",
      f'  model: {m.n_towers} x {m.tower_type} towers, {m.n_layers} layers, d={m.d_model}, '
      f'{m.dtype}, remat={m.remat} | batch {tc.batch_size} x {config.data.seq_len} tokens, '
      f"accumulation {tc.grad_accum_steps} | mesh {r['mesh']}",
      f"  lowered for {r['platform']} (jax.export): ok, no host calls | attention: "
      f"{r['attention']} | kernel calls: {kernels}",
      f"  FLOPs/step: {r['flops_per_step']:.4g} model (flops.py); the lowered module's "
      f"matmuls {r['lowered_flops_per_step']:.4g} ({ratio:.3f}x{uncounted})",
      f'  memory/device, ESTIMATE (XLA:CPU buffer assignment of the same sharded step on '
      f"{plural(r['devices'], 'CPU device')}): arguments {mib('argument_size_in_bytes'):,.0f} "
      f"MiB, outputs {mib('output_size_in_bytes'):,.0f} MiB (aliased "
      f"{mib('alias_size_in_bytes'):,.0f}), temporaries {mib('temp_size_in_bytes'):,.0f} MiB; "
      f"total {r['memory_total_per_device'] / GIB:.2f} GiB of {r['hbm_per_device'] / GIB:.0f} "
      'GiB',
      f"  expected step time at MFU {r['mfu']:.2f}: {r['step_s'] * 1e3:,.1f} ms "
      f"({r['tokens_per_s']:,.0f} tokens/s; dense peak {r['peak_flops_per_device'] / 1e12:,.0f} "
      f"TFLOP/s {m.dtype} per device x {r['devices']})",
      f"  run: {r['tokens_per_step']:,} tokens/step ({tc.batch_size} x {config.data.seq_len}) x "
      f"{r['steps']:,} steps = {r['total_tokens']:,} tokens; expected wall time "
      f"{r['wall_s'] / 3600:,.2f} h ({r['wall_s']:,.0f} s) at the step time above, "
      'training steps only',
  ]
  if r['memory_total_per_device'] > r['hbm_per_device']:
    lines.append('  warning: the estimate exceeds the device memory; consider model.remat=True, '
                 'train.grad_accum_steps or mesh.fsdp')
  return '\n'.join(lines)
