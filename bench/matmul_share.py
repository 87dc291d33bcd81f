"""What limits MFU: the step's matmuls timed alone, against the whole step.

  python bench/matmul_share.py                 # the CPU target config
  python bench/matmul_share.py --set model.n_towers=1

Reads every dot of the compiled train step out of its optimized HLO (shapes and
dimension numbers), times each one alone as a jitted `lax.dot_general` on random
inputs, and compares with the step and with the 2048^3 matmul peak, all in one
process. Two numbers say where a step's time goes:

- matmul efficiency = matmul FLOPs / (summed matmul time x peak): how fast the
  step's own matmul shapes can run on this device;
- MFU ceiling = model FLOPs / (summed matmul time x peak): the MFU the step would
  reach if everything that is not a matmul (norms, softmax, dropout, optimizer,
  copies) took no time.

The gap between the ceiling and the measured MFU is the non-matmul work.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # pylint: disable=wrong-import-position
from train_step import TARGET, parse_set  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position,g-import-not-at-top
import numpy as np  # pylint: disable=wrong-import-position

_SHAPE = r'([a-z0-9]+)\[([0-9,]*)\]'
_DOT = re.compile(r'= ' + _SHAPE + r'\S* dot\(([^)]*)\), (.*?)(?:, metadata=|, frontend|$)')
_PARAM = re.compile(r'([\w.\-]+): ' + _SHAPE)
_DIMS = re.compile(r'(lhs|rhs)_(batch|contracting)_dims=\{([0-9,]*)\}')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(',') if d]


def hlo_dots(hlo: str) -> list[dict]:
  """Every dot in an optimized HLO module: operand shapes, dtype and dimension numbers."""
  shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
  dots = []
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and '(' in line and '{' in line:  # computation header
      shapes = {n: (t, tuple(_dims(s))) for n, t, s in _PARAM.findall(line.split('->')[0])}
      continue
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ' + _SHAPE, line)
    if m:
      shapes[m.group(1)] = (m.group(2), tuple(_dims(m.group(3))))
    d = _DOT.search(line)
    if not d:
      continue
    operands = [o.strip().split(' ')[-1].lstrip('%') for o in d.group(3).split(',')][:2]
    if not all(o in shapes for o in operands):
      raise SystemExit(f'cannot read the operand shapes of: {line.strip()[:200]}')
    nums = {f'{side}_{kind}': _dims(v) for side, kind, v in _DIMS.findall(d.group(4))}
    (dtype, lhs), (_, rhs) = shapes[operands[0]], shapes[operands[1]]
    dots.append({'dtype': dtype, 'lhs': lhs, 'rhs': rhs, 'out': tuple(_dims(d.group(2))),
                 'contract': (tuple(nums.get('lhs_contracting', [])),
                              tuple(nums.get('rhs_contracting', []))),
                 'batch': (tuple(nums.get('lhs_batch', [])), tuple(nums.get('rhs_batch', [])))})
  return dots


def dot_flops(d: dict) -> int:
  k = int(np.prod([d['lhs'][i] for i in d['contract'][0]]))
  return 2 * int(np.prod(d['out'])) * k


def time_dot(d: dict, repeats: int) -> float:
  """Median seconds of one jitted dot_general of these shapes on random inputs."""
  dtype = {'f32': np.float32, 'bf16': jax.numpy.bfloat16, 'f16': np.float16}[d['dtype']]
  key = jax.random.PRNGKey(0)
  lhs = jax.random.normal(key, d['lhs'], dtype)
  rhs = jax.random.normal(key, d['rhs'], dtype)
  f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (d['contract'], d['batch'])))
  jax.block_until_ready(f(lhs, rhs))
  return statistics.median(harness.timed(lambda: f(lhs, rhs), repeats))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--set', action='append', default=[], help='KEY=VALUE config override')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'matmul_share.jsonl'))
  args = p.parse_args()
  overrides = {**TARGET, **parse_set(args.set), 'mesh.data': -1, 'mesh.tower': 1}
  bench = harness.StepBench(harness.config_with(**overrides), overrides['data.vocab_size'])
  dots = hlo_dots(bench.compiled.as_text())
  if not dots:
    raise SystemExit('no dot found in the compiled step; nothing to measure')
  key = lambda d: (d['dtype'], d['lhs'], d['rhs'], d['contract'], d['batch'])
  counts = collections.Counter(map(key, dots))
  first = {}  # one representative dot per distinct shape
  for d in dots:
    first.setdefault(key(d), d)
  step_s = statistics.median(bench.seconds_per_step(args.steps, args.repeats))
  peak, _ = harness.device_peak(overrides.get('model.dtype', 'float32'))
  rows, dot_s, dot_flops_total = [], 0.0, 0
  for k, count in counts.most_common():
    d = first[k]
    t = time_dot(d, args.repeats)
    fl = dot_flops(d)
    dot_s += count * t
    dot_flops_total += count * fl
    rows.append({'shape': f'{"x".join(map(str, d["lhs"]))} . {"x".join(map(str, d["rhs"]))} '
                          f'c{list(d["contract"][0])}{list(d["contract"][1])}',
                 'count': count, 'gflop': fl / 1e9, 'ms_each': 1e3 * t,
                 'share_of_step': count * t / step_s, 'efficiency': fl / t / peak})
  harness.print_table(rows, ('shape', 'count', 'gflop', 'ms_each', 'share_of_step', 'efficiency'))
  summary = {'bench': 'matmul_share', **harness.machine(), 'overrides': overrides,
             'ms_per_step': 1e3 * step_s, 'matmul_ms': 1e3 * dot_s,
             'matmul_share': dot_s / step_s, 'n_dots': len(dots),
             'matmul_efficiency': dot_flops_total / dot_s / peak,
             'mfu': bench.flops_per_step / step_s / peak,
             'mfu_ceiling': bench.flops_per_step / dot_s / peak,
             'peak_gflops': peak / 1e9, 'dots': rows}
  print()
  harness.print_table([summary], ('ms_per_step', 'matmul_ms', 'matmul_share', 'n_dots',
                                  'matmul_efficiency', 'mfu', 'mfu_ceiling', 'peak_gflops'))
  harness.write_jsonl(args.out, [summary])
  print(f'wrote {args.out}')


if __name__ == '__main__':
  harness.hostmem.restart()  # the host settings launch/env.sh gives (twotower_jax/hostmem.py)
  main()
