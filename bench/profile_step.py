"""Where a train step's time goes, kernel by kernel: a profiler trace, summarised.

  python bench/profile_step.py --config=configs/gpu.py            # trace 3 steps, summarise
  python bench/profile_step.py --trace=bench/results/profile_h100_gpu.json.gz --steps=3

Traces `--steps` steps of the same compiled step bench/train_step.py times
(`jax.profiler.trace`, Perfetto JSON) and sums the kernels of the step's module by
kind: matmul (cuBLAS, Triton GEMM fusions), attention (cuDNN), copies and memsets,
and the rest (XLA's elementwise, reduction and layout fusions). On an accelerator the
kernels are the device's; on CPU they are XLA's thunks on the host threads (which
overlap, so their sum can exceed the wall time; YNNPACK fusions hold the matmuls and
what XLA fused into them, so they are a kind of their own). `--trace` summarises a saved trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

KINDS = (  # first match wins: cuDNN's attention kernels also name their wgmma tiles
    ('attention', re.compile(r'fmha|sdpa|flash|cudnn', re.I)),
    ('matmul', re.compile(r'gemm|nvjet|xmma|cutlass|cublas|^dot\b|^dot[._]', re.I)),
    ('copy', re.compile(r'memcpy|memset|^copy', re.I)),
    ('ynnpack', re.compile(r'^ynn_fusion')),  # XLA:CPU: matmuls with their fused operations
)
CONTAINERS = re.compile(r'^(while|conditional|call)([._]\d+)?$')  # CPU: their ops are counted


def kind(name: str) -> str:
  for label, pattern in KINDS:
    if pattern.search(name):
      return label
  return 'other'


def kernels(trace: dict) -> list[dict]:
  """The step module's kernel events: a device's where the trace has one, else the
  host's XLA thunks (CPU)."""
  events = [e for e in trace['traceEvents'] if e.get('ph') == 'X']
  names = {e['pid']: e['args']['name'] for e in trace['traceEvents']
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = {pid for pid, name in names.items() if name.startswith('/device:')}
  if devices:
    return [e for e in events if e['pid'] in devices and 'hlo_module' in e.get('args', {})]
  return [e for e in events if 'hlo_op' in e.get('args', {}) and not CONTAINERS.match(e['name'])]


def summarize(trace: dict, steps: int, top: int = 15) -> dict:
  """Milliseconds per step by kind and for the `top` kernels (numbered copies merged)."""
  by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
  events = kernels(trace)
  if not events:
    raise SystemExit('the trace holds no kernel of a jitted step; trace a step first')
  for e in events:
    name = re.sub(r'[._]\d+$', '', e['name'])
    by_kind[kind(name)] += e['dur'] / 1e3 / steps
    by_name[name] += e['dur'] / 1e3 / steps
    count[name] += 1
  total = sum(by_kind.values())
  return {'kernel_ms_per_step': total,
          'kinds': [{'kind': k, 'ms_per_step': v, 'share': v / total}
                    for k, v in by_kind.most_common()],
          'top': [{'kernel': k[:90], 'kind': kind(k), 'ms_per_step': v, 'share': v / total,
                   'per_step': count[k] / steps} for k, v in by_name.most_common(top)]}


def trace_steps(config_spec: str, overrides: dict, steps: int, out: str) -> str:
  """Traces `steps` steps after a warm-up; returns the path of the saved Perfetto trace."""
  import harness  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  base = harness.load_config(config_spec) if config_spec else None
  config = harness.config_with(base, **{'mesh.data': -1, 'mesh.tower': 1, **overrides})
  bench = harness.StepBench(config, config.data.vocab_size)
  bench.run(2)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      bench.run(steps)
    (path,) = glob.glob(os.path.join(tmp, '**', 'perfetto_trace.json.gz'), recursive=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    shutil.copy(path, out)
  return out


def main() -> None:
  from train_step import parse_set  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', default='', help='config file (PATH or PATH:ARG); default: '
                 'base_config() with --set')
  p.add_argument('--set', action='append', default=[], help='KEY=VALUE config override')
  p.add_argument('--steps', type=int, default=3, help='steps traced (or in --trace)')
  p.add_argument('--trace', default='', help='summarise this saved trace instead')
  p.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'step_trace.json.gz'),
                 help='where the new trace is saved')
  p.add_argument('--top', type=int, default=15)
  args = p.parse_args()
  if not args.trace:
    args.trace = trace_steps(args.config, parse_set(args.set), args.steps, args.out)
    print(f'trace: {args.trace}')
  with gzip.open(args.trace) as f:
    summary = summarize(json.load(f), args.steps, args.top)
  import harness  # pylint: disable=g-import-not-at-top
  print(f"kernel time {summary['kernel_ms_per_step']:.1f} ms per step")
  harness.print_table(summary['kinds'], ('kind', 'ms_per_step', 'share'))
  print()
  harness.print_table(summary['top'], ('kernel', 'kind', 'per_step', 'ms_per_step', 'share'))


if __name__ == '__main__':
  sys.path.insert(0, HERE)
  main()
