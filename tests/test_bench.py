"""The bench scripts' own logic: matmul_share.py's reading of the HLO dots, the
environment train_step.py gives each A/B arm's point process, profile_step.py's
summary of a profiler trace."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
sys.path.insert(0, BENCH)
import matmul_share  # pylint: disable=wrong-import-position
import profile_step  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position

from twotower_jax import hostmem  # pylint: disable=wrong-import-position


def _compiled_hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def test_hlo_dots_reads_shapes_dimension_numbers_and_flops():
  x = jnp.ones((64, 32))
  w1 = jnp.ones((32, 48))
  w2 = jnp.ones((16, 48))  # used transposed: contracts on its minor dimension
  hlo = _compiled_hlo(lambda x, w1, w2: jnp.tanh(x @ w1) @ w2.T, x, w1, w2)
  dots = matmul_share.hlo_dots(hlo)
  assert sorted(matmul_share.dot_flops(d) for d in dots) == [2 * 64 * 48 * 16, 2 * 64 * 32 * 48]
  second = next(d for d in dots if d['out'] == (64, 16))
  assert second['lhs'] == (64, 48) and second['rhs'] == (16, 48)
  assert second['contract'] == ((1,), (1,))


def test_hlo_dots_reads_batched_dots_and_times_them():
  a = jnp.ones((2, 8, 16, 4))
  b = jnp.ones((2, 8, 16, 4))
  hlo = _compiled_hlo(lambda a, b: jnp.einsum('tbqd,tbkd->tbqk', a, b).sum(), a, b)
  (dot,) = matmul_share.hlo_dots(hlo)
  assert dot['batch'][0] and len(dot['batch'][0]) == len(dot['batch'][1])
  assert matmul_share.dot_flops(dot) == 2 * 2 * 8 * 16 * 16 * 4
  assert matmul_share.time_dot(dot, repeats=2) > 0


def test_hlo_dots_names_a_line_it_cannot_read():
  bad = '%c (p: f32[2,2]) -> f32[2,2] {\n  ROOT %d = f32[2,2]{1,0} dot(%p, %missing), ' \
        'lhs_contracting_dims={1}, rhs_contracting_dims={0}\n}\n'
  with pytest.raises(SystemExit, match='cannot read the operand shapes'):
    matmul_share.hlo_dots(bad)


def test_point_env_sets_each_arm(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', f'glibc.malloc.arena_max=2:{hostmem.TUNABLE}')
  off = train_step.point_env('--xla_cpu_use_xnnpack=false', 'off')
  assert off['XLA_FLAGS'] == '--xla_cpu_use_xnnpack=false'
  assert off['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'
  assert off[hostmem.OPT_OUT] == '0'
  inherit = train_step.point_env(None, None)
  assert inherit['GLIBC_TUNABLES'] == os.environ['GLIBC_TUNABLES']
  monkeypatch.setenv(hostmem.OPT_OUT, '0')
  monkeypatch.delenv('GLIBC_TUNABLES')
  on = train_step.point_env(None, 'on')
  assert hostmem.active(on) and hostmem.OPT_OUT not in on


def test_huge_pages_on_is_refused_where_it_cannot_apply(monkeypatch, capsys):
  monkeypatch.setattr(hostmem, 'unsupported', lambda: "kernel THP mode is 'never': no huge pages")
  monkeypatch.setattr(sys, 'argv', ['train_step.py', '--huge_pages=on', '--huge_pages=off'])
  with pytest.raises(SystemExit) as exit_info:
    train_step.main()
  assert exit_info.value.code == 2
  assert "does not apply on this machine: kernel THP mode is 'never'" in capsys.readouterr().err


def test_generate_bench_times_both_arms_on_the_same_tokens():
  """bench/generate.py's point: cached and full recomputation write the same greedy tokens."""
  import generate as generate_bench  # pylint: disable=g-import-not-at-top
  config = generate_bench.default_config()
  config.data.vocab_size = 64
  config.model.n_layers, config.model.d_model, config.model.d_mlp = 1, 32, 64
  config.model.max_len = 16
  row = generate_bench.point(config, n_prompts=2, prompt_len=4, full_tokens=5, repeats=1)
  assert row['same_tokens'] and row['new_tokens'] == 12 and row['full_tokens'] == 5
  assert row['cached_tok_s'] > 0 and row['full_tok_s'] > 0


def test_profile_summary_of_the_h100_trace():
  """The committed H100 trace of configs/gpu.py (3 steps): the device's kernels, by kind,
  as docs/PERFORMANCE.md quotes them."""
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  with gzip.open(os.path.join(BENCH, 'results', 'profile_h100_gpu.json.gz')) as f:
    summary = profile_step.summarize(json.load(f), steps=3)
  kinds = {row['kind']: row['ms_per_step'] for row in summary['kinds']}
  assert summary['kernel_ms_per_step'] == pytest.approx(214.9, abs=0.1)
  assert kinds == pytest.approx({'other': 98.8, 'matmul': 82.4, 'attention': 29.2, 'copy': 4.5},
                                abs=0.1)
  top = summary['top'][0]
  assert (top['kernel'], top['kind'], top['per_step']) == ('gemm_fusion_dot', 'matmul', 96)


def test_profile_reads_a_cpu_trace_of_a_jitted_function(tmp_path):
  """On CPU the kernels are XLA's thunks on the host threads; loops are not counted twice."""
  x = jnp.ones((256, 256))
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ x), x))
  jax.block_until_ready(f(x))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    jax.block_until_ready(f(x))
  (path,) = list(tmp_path.glob('**/perfetto_trace.json.gz'))
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  with gzip.open(path) as fh:
    summary = profile_step.summarize(json.load(fh), steps=1)
  names = {row['kernel'] for row in summary['top']}
  assert names and not any(profile_step.CONTAINERS.match(n) for n in names)
  assert summary['kernel_ms_per_step'] > 0
  assert {row['kind'] for row in summary['kinds']} <= {'matmul', 'ynnpack', 'copy', 'other'}


def test_profile_parts_of_a_cpu_train_step():
  """profile_step.py's CPU table: every thunk of the compiled train step (configs/tiny.py)
  gets a part from its HLO name stack and source frames; the step's matmuls, attention,
  norms, loss and optimizer each land in their own part."""
  import harness  # pylint: disable=g-import-not-at-top
  config = train_step.point_config({'model.n_layers': 1}, os.path.join(
      os.path.dirname(BENCH), 'configs', 'tiny.py'))
  hlo = harness.StepBench(config, config.data.vocab_size).compiled.as_text()
  index = profile_step.hlo_instructions(hlo)
  by_part = {}
  for info in index.values():
    by_part.setdefault(profile_step.part(info), []).append(info)
  dots = lambda label: [i for i in by_part.get(label, []) if i['dot']]
  assert len(dots('output layer matmuls')) >= 3  # logits, and both gradients
  assert {'qkv', 'attn_out', 'mlp_in', 'mlp_out'} <= {
      name for i in dots('tower and gate matmuls') for name in i['op_name'].split('/')}
  assert dots('attention') and by_part['LayerNorm and GELU']
  assert any('optax/' in i['files'] for i in by_part['optimizer update (clip, AdamW)'])
  assert any('nonfinite.py' in i['files'] for i in by_part['gradient norms and finite flags'])
  trace = {'traceEvents': [{'ph': 'X', 'name': name, 'dur': 1000.0, 'args': {'hlo_op': name}}
                           for name in index]}
  rows = profile_step.summarize_parts(trace, hlo, steps=1)
  assert sum(r['per_step'] for r in rows) == len(index)
  assert sum(r['ms_per_step'] for r in rows) == pytest.approx(len(index))
