"""Two-tower overhead: t(2 towers) / (2 * t(1 tower)) of the same tower shape, side by side.

  python bench/overhead.py [--set model.n_layers=4 ...] [--repeats=7]

Both models are compiled in one process and timed in alternation (A B A B ...), so a
slow patch of the machine hits both. The single tower has the same tower shape,
embedding, output layer and gate type; only n_towers differs. A ratio below 1 means
the shared parts (embedding, output layer) are paid once for two towers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # pylint: disable=wrong-import-position
from train_step import TARGET, parse_set  # pylint: disable=wrong-import-position


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--set', action='append', default=[], help='KEY=VALUE config override')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'overhead.jsonl'))
  args = p.parse_args()
  base = {**TARGET, **parse_set(args.set), 'mesh.data': -1, 'mesh.tower': 1}
  benches = {n: harness.StepBench(harness.config_with(**{**base, 'model.n_towers': n}),
                                  base['data.vocab_size']) for n in (1, 2)}
  for b in benches.values():
    b.run(2)
  times = {1: [], 2: []}
  for _ in range(args.repeats):
    for n in (2, 1):
      times[n].append(benches[n].run(args.steps) / args.steps)
  t1, t2 = statistics.median(times[1]), statistics.median(times[2])
  # Ratio per adjacent pair, to show the spread caused by machine noise.
  pair_ratios = [a / (2 * b) for a, b in zip(times[2], times[1])]
  row = {'bench': 'overhead', **harness.machine(), 'overrides': base,
         'ms_per_step_1_tower': 1e3 * t1, 'ms_per_step_2_towers': 1e3 * t2,
         'ratio': t2 / (2 * t1), 'pair_ratio_min': min(pair_ratios),
         'pair_ratio_max': max(pair_ratios), 'times_1_tower_s': times[1],
         'times_2_towers_s': times[2]}
  harness.print_table([row], ('ms_per_step_1_tower', 'ms_per_step_2_towers', 'ratio',
                              'pair_ratio_min', 'pair_ratio_max'))
  harness.write_jsonl(args.out, [row])
  print(f'wrote {args.out}')


if __name__ == '__main__':
  harness.hostmem.restart()  # the host settings launch/env.sh gives (twotower_jax/hostmem.py)
  main()
