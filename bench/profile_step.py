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
sys.path.insert(0, os.path.dirname(HERE))

from twotower_jax import hostmem  # pylint: disable=wrong-import-position

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


# CPU: the part of the step each XLA thunk belongs to, read from its HLO instruction's
# name stack and Python source frames (the compiled module's metadata); first match wins.
PARTS = (
    ('copies and transposes', lambda i: re.match(r'(copy|transpose)', i['name'])),
    ('output layer matmuls', lambda i: i['dot'] and 'embed.decode' in i['op_name']),
    ('attention', lambda i: 'attention.py' in i['files']),
    ('tower and gate matmuls', lambda i: i['dot'] and 'TwoTowerLM' in i['op_name']),
    ('LayerNorm and GELU', lambda i: 'normalization.py' in i['files'] or
     'layers.py:gelu' in i['functions']),
    ('softmax and cross-entropy (with the output bias)', lambda i: 'embed.decode' in
     i['op_name'] or 'step.py:cross_entropy' in i['functions']),
    ('embedding lookup and its gradient', lambda i: 'embed.encode' in i['op_name'] or
     'embeddings.py:lookup_table_grad' in i['functions']),
    ('other model elementwise (residual adds)', lambda i: 'TwoTowerLM' in i['op_name']),
    ('gradient norms and finite flags', lambda i: 'nonfinite.py' in i['files'] or
     'step.py:train_step' in i['functions'] and 'optax/' not in i['files']),
    ('optimizer update (clip, AdamW)', lambda i: True),
)


def _hlo_table(hlo: str, name: str) -> list[str]:
  return hlo.split(f'\n{name}\n', 1)[1].split('\n\n', 1)[0].splitlines() if (
      f'\n{name}\n' in hlo) else []


def _short_path(path: str) -> str:
  """'optax/_src/transform.py', 'twotower_jax/model/attention.py': from the package on."""
  parts = path.split('/')
  for anchor in ('site-packages', 'dist-packages'):
    if anchor in parts:
      return '/'.join(parts[parts.index(anchor) + 1:])
  return '/'.join(parts[-3:])


def hlo_instructions(hlo: str) -> dict[str, dict]:
  """{instruction name: its op_name, whether it is or fuses a dot, and the files and
  'file:function' names of its source frames} for a compiled module's text."""
  files = {int(i): _short_path(f.strip('"')) for i, f in
           (l.split(' ', 1) for l in _hlo_table(hlo, 'FileNames'))}
  functions = {int(i): f.strip('"') for i, f in
               (l.split(' ', 1) for l in _hlo_table(hlo, 'FunctionNames'))}
  locations = {int(m[1]): (files[int(m[2])], functions[int(m[3])]) for m in (
      re.match(r'(\d+) \{file_name_id=(\d+) function_name_id=(\d+)', l)
      for l in _hlo_table(hlo, 'FileLocations'))}
  frames = {int(m[1]): (int(m[2]), int(m[3]) - 1) for m in (  # parents are printed 1-based
      re.match(r'(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)', l)
      for l in _hlo_table(hlo, 'StackFrames'))}
  dots, current = set(), None
  for line in hlo.splitlines():
    if line and not line.startswith(' '):
      current = line.split(' ', 1)[0].lstrip('%')
    elif current and re.search(r' (dot|convolution)\(', line):
      dots.add(current)
  out = {}
  for m in re.finditer(r'^\s+(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)$', hlo, re.M):
    name, op, rest = m.groups()
    calls = re.search(r'calls=%([\w.\-]+)', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    frame = re.search(r'stack_frame_id=(\d+)', rest)
    chain, f = [], int(frame[1]) if frame else 0
    while f in frames and len(chain) < 64:
      chain.append(locations[frames[f][0]])
      f = frames[f][1]
    out[name] = {'name': name, 'op_name': op_name[1] if op_name else '',
                 'dot': op in ('dot', 'convolution') or bool(calls and calls[1] in dots),
                 'files': ' '.join(f for f, _ in chain),
                 'functions': ' '.join(f'{f.rsplit("/", 1)[-1]}:{fn}' for f, fn in chain)}
  return out


def part(info: dict) -> str:
  return next(label for label, match in PARTS if match(info))


def summarize_parts(trace: dict, hlo: str, steps: int) -> list[dict]:
  """CPU: milliseconds per step of the step's thunks by part (PARTS), with their count."""
  index = hlo_instructions(hlo)
  ms, count = collections.Counter(), collections.Counter()
  for e in kernels(trace):
    info = index.get(e['name'], {'name': e['name'], 'op_name': '', 'dot': False, 'files': '',
                                 'functions': ''})
    label = part(info)
    ms[label] += e['dur'] / 1e3 / steps
    count[label] += 1
  total = sum(ms.values())
  return [{'part': k, 'ms_per_step': v, 'share': v / total, 'per_step': count[k] / steps}
          for k, v in ms.most_common()]


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
  """Traces `steps` steps after a warm-up; returns the path of the saved Perfetto trace.
  The compiled step's HLO text is saved beside it (OUT.hlo.txt: the CPU parts' source)."""
  import harness  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  base = harness.load_config(config_spec) if config_spec else None
  config = harness.config_with(base, **{'mesh.data': -1, 'mesh.tower': 1, **overrides})
  bench = harness.StepBench(config, config.data.vocab_size)
  bench.run(2)
  with open(hlo_path(out), 'w') as f:
    f.write(bench.compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      bench.run(steps)
    (path,) = glob.glob(os.path.join(tmp, '**', 'perfetto_trace.json.gz'), recursive=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    shutil.copy(path, out)
  return out


def hlo_path(trace_path: str) -> str:
  return re.sub(r'\.json(\.gz)?$', '', trace_path) + '.hlo.txt'


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
  if os.path.exists(hlo_path(args.trace)):  # a CPU trace taken here: thunks by part of the step
    with gzip.open(args.trace) as f, open(hlo_path(args.trace)) as h:
      parts = summarize_parts(json.load(f), h.read(), args.steps)
    print()
    harness.print_table(parts, ('part', 'per_step', 'ms_per_step', 'share'))


if __name__ == '__main__':
  hostmem.restart()  # the host settings launch/env.sh gives (twotower_jax/hostmem.py)
  sys.path.insert(0, HERE)
  main()
