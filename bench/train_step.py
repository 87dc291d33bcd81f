"""Train-step benchmark: tokens/s, FLOP/s, MFU, compile time and peak memory.

  python bench/train_step.py                       # the target config (2x4 layers, d=256)
  python bench/train_step.py --sweep=seq,vocab,towers
  python bench/train_step.py --set model.n_layers=24 --set model.d_model=1024 --dtype=bfloat16
  python bench/train_step.py --xla_flags= --xla_flags=--xla_cpu_use_xnnpack=false --rounds=3
  python bench/train_step.py --huge_pages=on --huge_pages=off --rounds=3
  python bench/train_step.py --config=configs/gpu.py --sweep=attention   # a preset; cuDNN vs XLA
  python bench/train_step.py --peer=torch --rounds=5         # against PyTorch eager (ratio)
  python bench/train_step.py --sweep=loss_chunk --huge_pages=on --huge_pages=off --rounds=3

Each point runs in its own process, so compile time and peak memory are its own.
MFU = analytic model FLOP/s / device peak; on CPU the peak is a large f32 matmul
measured in the same process. Results are appended to --out as JSON lines.
--peer=torch times bench/peer_torch.py's step (the same model in PyTorch eager, dropout
off on both sides) in its own process after each point, the order alternating by round,
with the point's huge-page setting and as many threads; each round prints the ratio of
the two tokens/s, and the end the median ratio.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twotower_jax import hostmem  # pylint: disable=wrong-import-position

# The CPU target: 2 towers x 4 layers, d=256, 4 heads, window 128, batch 16, vocab 8000.
TARGET = {'model.n_towers': 2, 'model.n_layers': 4, 'model.d_model': 256, 'model.n_heads': 4,
          'model.d_mlp': 1024, 'data.seq_len': 128, 'model.max_len': 128,
          'train.batch_size': 16, 'data.vocab_size': 8000,
          'model.scan_layers': False}  # as configs/default.py

SWEEPS = {
    'seq': [{'data.seq_len': n, 'model.max_len': n, 'train.batch_size': 16 * 128 // n}
            for n in (64, 128, 256, 512)],
    'vocab': [{'data.vocab_size': v} for v in (2000, 8000, 32000)],
    'towers': [{'model.n_towers': n} for n in (1, 2, 4)],
    'attention': [{'model.attention': a} for a in ('auto', 'xla')],  # cuDNN on GPU vs XLA
    'loss_chunk': [{'train.loss_chunk': 512}],  # the fused output layer + loss against the default
    # The towers split over 2 devices instead of the batch (CPU: with --xla_flags=
    # --xla_force_host_platform_device_count=2, as a chosen mesh keeps the device count).
    'mesh': [{'mesh.data': 1, 'mesh.tower': 2}],
    # The layer stack as one loop, a loop with every layer in its body, and unrolled modules.
    'scan': [{'model.scan_layers': True, 'model.scan_unroll': 1},
             {'model.scan_layers': True, 'model.scan_unroll': 64}, {'model.scan_layers': False}],
}

COLUMNS = ('label', 'attention', 'tokens_per_s', 'ms_per_step', 'gflop_per_token',
           'achieved_gflops', 'peak_gflops', 'mfu', 'mfu_median_peak', 'compile_s',
           'peak_mem_mb')


def measure(overrides: dict, steps: int, repeats: int, preset: str = '') -> dict:
  """Runs in the child process: one config, one row.

  On CPU the matmul peak is measured before every timed repeat, interleaved with the
  steps, so a slow patch of a shared machine moves both. MFU is against the best
  peak seen (conservative); `mfu_median_peak` is against the median peak. `preset`:
  a config file (PATH or PATH:ARG) the overrides apply to, else base_config().
  """
  import harness  # pylint: disable=g-import-not-at-top
  from twotower_jax.model import attention  # pylint: disable=g-import-not-at-top
  config = point_config(overrides, preset)
  dtype = config.model.dtype  # the peak of the compute dtype (a preset sets it too)
  bench = harness.StepBench(config, config.data.vocab_size)
  bench.run(2)  # warm-up: first executions allocate
  times, peaks = [], []
  for _ in range(repeats):
    peak, peak_how = harness.device_peak(dtype)
    peaks.append(peak)
    times.append(bench.run(steps) / steps)
  t = harness.summarize(times)['median_s']
  achieved = bench.flops_per_step / t
  return {**harness.machine(), 'preset': preset, 'overrides': overrides, 'steps': steps,
          'repeats': repeats, 'attention': attention.implementation(bench.model.cfg),
          'tokens_per_s': bench.tokens_per_step / t, 'ms_per_step': 1e3 * t,
          'step_times_s': times, 'flops_per_step': bench.flops_per_step,
          'gflop_per_token': bench.flops_per_step / bench.tokens_per_step / 1e9,
          'achieved_gflops': achieved / 1e9, 'peak_gflops': max(peaks) / 1e9,
          'peaks_gflops': [x / 1e9 for x in peaks], 'peak_how': peak_how,
          'mfu': achieved / max(peaks), 'mfu_median_peak': achieved / statistics.median(peaks),
          'compile_s': bench.compile_s, 'peak_mem_mb': harness.peak_memory_mb(),
          'loadavg': os.getloadavg()}


def point_config(overrides: dict, preset: str = ''):
  """The config of a point: `preset` (a config file, PATH or PATH:ARG) or base_config(),
  the batch over every device (on CPU one per core: twotower_jax/cpu_devices.py), with the
  overrides on top."""
  import harness  # pylint: disable=g-import-not-at-top
  base = harness.load_config(preset) if preset else None
  return harness.config_with(base, **{'mesh.data': -1, 'mesh.tower': 1, **overrides})


def point_env(xla_flags: str | None, huge_pages: str | None) -> dict:
  """The environment of a point process: this one's, with the A/B arm's settings."""
  env = dict(os.environ)
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  if huge_pages == 'off':
    env = hostmem.without_tunable(env)
  elif huge_pages == 'on':
    env = hostmem.with_tunable(env)
    env.pop(hostmem.OPT_OUT, None)
  return env


def run_point(overrides: dict, steps: int, repeats: int, xla_flags: str | None = None,
              huge_pages: str | None = None, preset: str = '') -> dict:
  out = subprocess.run([sys.executable, __file__, '--point', json.dumps(overrides),
                        f'--steps={steps}', f'--repeats={repeats}', f'--config={preset}'],
                       capture_output=True, text=True, check=False,
                       env=point_env(xla_flags, huge_pages))
  if out.returncode:
    raise SystemExit(f'benchmark point {overrides} failed:\n{out.stderr[-2000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_peer_point(overrides: dict, steps: int, repeats: int, huge_pages: str | None = None,
                   preset: str = '') -> dict:
  """bench/peer_torch.py's row for the same config, timed in its own process (no JAX
  there); its MFU is against the torch.mm peak that process measured."""
  import harness  # pylint: disable=g-import-not-at-top
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.model import lm as model_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  config = point_config(overrides, preset)
  env = point_env(None, huge_pages)
  out = subprocess.run([sys.executable, os.path.join(HERE, 'peer_torch.py'), '--point',
                        json.dumps(config_lib.to_dict(config)), f'--steps={steps}',
                        f'--repeats={repeats}'],
                       capture_output=True, text=True, check=False, env=env)
  if out.returncode:
    raise SystemExit(f'peer point {overrides} failed:\n{out.stderr[-2000:]}')
  row = json.loads(out.stdout.strip().splitlines()[-1])
  b, l = config.train.batch_size, config.data.seq_len
  flops = flops_lib.train_flops_per_step(model_lib.build(config, config.data.vocab_size), b, l)
  achieved = flops / (row['ms_per_step'] / 1e3)
  machine = {k: v for k, v in harness.machine().items() if k not in ('jax', 'device')}
  return {**machine, **row, 'huge_pages': hostmem.active(env), 'overrides': overrides,
          'preset': preset, 'attention': 'torch sdpa', 'flops_per_step': flops,
          'gflop_per_token': flops / (b * l) / 1e9, 'achieved_gflops': achieved / 1e9,
          'mfu': achieved / (row['peak_gflops'] * 1e9),
          'mfu_median_peak': achieved / (statistics.median(row['peaks_gflops']) * 1e9)}


def parse_set(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, _, value = item.partition('=')
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', default='', help='start from this config file (PATH or '
                 'PATH:ARG, e.g. configs/gpu.py) instead of the CPU target')
  p.add_argument('--sweep', default='', help='comma list of: ' + ', '.join(SWEEPS))
  p.add_argument('--set', action='append', default=[], help='KEY=VALUE config override')
  p.add_argument('--dtype', default='', help='model compute dtype, e.g. bfloat16')
  p.add_argument('--steps', type=int, default=10, help='steps per timed repeat')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--xla_flags', action='append', default=None,
                 help='XLA_FLAGS value for the point processes; give several to A/B them')
  p.add_argument('--huge_pages', action='append', choices=('on', 'off'), default=None,
                 help='host buffers on transparent huge pages (twotower_jax/hostmem.py) in '
                      'the point processes; give both to A/B them (default: as the entry '
                      'points decide)')
  p.add_argument('--rounds', type=int, default=1,
                 help='repeat every point this many times, alternating the A/B arms')
  p.add_argument('--peer', choices=('torch',), default=None,
                 help='also time the same step in PyTorch eager (bench/peer_torch.py) after '
                      'each point, alternating, and print the ratio; sets model.dropout=0')
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'train_step.jsonl'))
  p.add_argument('--point', help=argparse.SUPPRESS)
  args = p.parse_args()
  if 'on' in (args.huge_pages or []) and hostmem.unsupported():
    p.error(f'--huge_pages=on does not apply on this machine: {hostmem.unsupported()}; '
            'run without it')
  if args.point is not None:
    sys.path.insert(0, HERE)
    print(json.dumps(measure(json.loads(args.point), args.steps, args.repeats, args.config)))
    return
  if args.config:  # the point processes get an absolute path
    path, sep, arg = args.config.partition(':')
    args.config = os.path.abspath(path) + sep + arg
  base = {**({} if args.config else TARGET), **parse_set(args.set)}
  if args.dtype:
    base['model.dtype'] = args.dtype
  if args.peer:
    if importlib.util.find_spec('torch') is None:
      p.error('--peer=torch needs PyTorch: pip install -e .[bench] (torch==2.13.0)')
    base.setdefault('model.dropout', 0.0)  # the peer has none; a --set value it refuses
  points = [(os.path.basename(args.config) or 'target', base)]
  for name in filter(None, args.sweep.split(',')):
    if name not in SWEEPS:
      raise SystemExit(f'unknown sweep {name!r}; choose from {sorted(SWEEPS)}')
    for change in SWEEPS[name]:
      label = f'{name}:' + ','.join(f'{k.split(".")[-1]}={v}' for k, v in change.items()
                                    if k not in ('model.max_len', 'train.batch_size'))
      points.append((label, {**base, **change}))
  rows = []
  sys.path.insert(0, HERE)
  import harness  # pylint: disable=g-import-not-at-top
  if args.peer:  # before anything runs: every point must be one the peer models
    import peer_torch  # pylint: disable=g-import-not-at-top
    for label, overrides in points:
      problem = peer_torch.unsupported(point_config(overrides, args.config))
      if problem:
        p.error(f'--peer=torch cannot run point {label}: {problem}')
  arms = [(flags, pages) for flags in args.xla_flags or [None]
          for pages in args.huge_pages or [None]]
  columns = (('side',) if args.peer else ()) + (
      ('xla_flags',) if args.xla_flags is not None else ()) + (
      ('huge_pages',) if args.huge_pages is not None else ()) + COLUMNS
  ratios = {}
  for round_i in range(args.rounds):
    for label, overrides in points:
      for flags, pages in arms:  # alternated, so a slow patch hits every arm
        sides = ['jax', args.peer] if args.peer else ['jax']
        got = {}
        for side in sides[::-1] if round_i % 2 else sides:  # who goes first alternates too
          if side == 'jax':
            point = run_point(overrides, args.steps, args.repeats, flags, pages, args.config)
          else:
            point = run_peer_point(overrides, args.steps, args.repeats, pages, args.config)
          row = got[side] = {'label': label, 'bench': 'train_step', **point}
          if args.peer:
            row['side'] = side
          if flags is not None:
            row['xla_flags'] = flags
          rows.append(row)
          harness.print_table([row], columns)
        if args.peer:
          ratio = got['jax']['tokens_per_s'] / got[args.peer]['tokens_per_s']
          got['jax']['peer_ratio'] = ratio
          ratios.setdefault((label, flags, pages), []).append(ratio)
          print(f'round {round_i + 1}: {label}: jax / {args.peer} tokens/s = {ratio:.3f}')
  print()
  harness.print_table(rows, columns)
  for (label, flags, pages), values in ratios.items():
    arm = ''.join(f', {k}={v}' for k, v in (('xla_flags', flags), ('huge_pages', pages))
                  if v is not None)
    print(f'{label}{arm}: jax / {args.peer} tokens/s, median of {len(values)} rounds: '
          f'{statistics.median(values):.3f} (rounds: {", ".join(f"{r:.3f}" for r in values)})')
  harness.write_jsonl(args.out, rows)
  print(f'\nwrote {len(rows)} rows to {args.out}')


if __name__ == '__main__':
  hostmem.restart()  # the host settings launch/env.sh gives (twotower_jax/hostmem.py)
  main()
