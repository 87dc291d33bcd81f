"""Generation throughput: new tokens/s with the KV cache against re-running the full forward.

python bench/generate.py [--max_len=128,512] [--prompts=1,16] [--prompt_len=8] [--repeats=3]
                         [--full_tokens_long=16] [--set model.KEY=VALUE ...]

The model of configs/default.py (2 causal towers x 4 layers, d=256, vocab 8000),
randomly initialised, at each model.max_len: every prompt (`--prompt_len` random
tokens) is continued greedily, without stopping at EOS, until the window is full
(max_len - prompt_len new tokens). Both paths are model/decode.py's `generate`, one
jitted loop each: `cached` (prefill, then one cached decode step per token) and
`full` (the model's forward over the whole max_len buffer for every new token, the
fixed shape a jitted loop needs). They must write the same tokens (checked and
printed). Windows over 128 time `full` on its first `--full_tokens_long` tokens only:
each of its steps costs the same whatever the position, so tokens/s is unchanged
(the cached step also reads all max_len cache rows). Both are compiled first and timed
in alternation, median of `--repeats`. Appends to bench/results/generate.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # pylint: disable=wrong-import-position
import harness  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from twotower_jax import config as config_lib  # pylint: disable=wrong-import-position
from twotower_jax.model import decode  # pylint: disable=wrong-import-position
from twotower_jax.model import lm as model_lib  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'bench', 'results', 'generate.jsonl')
COLUMNS = ('max_len', 'prompts', 'new_tokens', 'cached_tok_s', 'full_tokens', 'full_tok_s',
           'speedup', 'same_tokens', 'compile_cached_s', 'compile_full_s')


def default_config():
  """get_config() of configs/default.py."""
  spec = importlib.util.spec_from_file_location('default', os.path.join(ROOT, 'configs',
                                                                         'default.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class Arm:
  """One compiled generation loop (cached or full) of a model on fixed prompts."""

  def __init__(self, model, params, prompt_BxP, new_tokens: int, cached: bool):
    b, p = prompt_BxP.shape
    sampling = decode.Sampling(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False,
                               cached=cached)
    self.args = (params, prompt_BxP, jnp.full((b,), p, jnp.int32),
                 jax.vmap(jax.random.PRNGKey)(jnp.arange(b)))
    fn = jax.jit(functools.partial(decode.generate, model=model, sampling=sampling))
    t0 = time.perf_counter()
    self.compiled = fn.lower(*self.args).compile()
    self.compile_s = time.perf_counter() - t0
    self.tokens = b * new_tokens

  def run(self) -> tuple[float, np.ndarray]:
    """(seconds, token_BxM) of one generation."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.compiled(*self.args))
    return time.perf_counter() - t0, np.asarray(out['token_BxM'])


def point(config, n_prompts: int, prompt_len: int, full_tokens: int, repeats: int) -> dict:
  """Cached against full recomputation at one window and batch; same tokens asserted."""
  vocab = config.data.vocab_size
  model = model_lib.build(config, vocab)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros(
      (1, config.model.max_len), jnp.int32))['params'])
  prompt_BxP = jnp.asarray(np.random.default_rng(1).integers(
      5, vocab, (n_prompts, prompt_len), dtype=np.int32))
  new_tokens = config.model.max_len - prompt_len
  full_tokens = min(full_tokens or new_tokens, new_tokens)
  cached = Arm(model, params, prompt_BxP, new_tokens, cached=True)
  full = Arm(model, params, prompt_BxP, full_tokens, cached=False)
  cached.run(), full.run()  # warm-up: first executions allocate
  times = {'cached': [], 'full': []}
  outputs = {}
  for _ in range(repeats):  # alternated, so a slow patch of a shared machine hits both
    for name, arm in (('cached', cached), ('full', full)):
      seconds, outputs[name] = arm.run()
      times[name].append(seconds)
  same = bool(np.array_equal(outputs['cached'][:, :full_tokens], outputs['full']))
  cached_tok_s = cached.tokens / statistics.median(times['cached'])
  full_tok_s = full.tokens / statistics.median(times['full'])
  return {'max_len': config.model.max_len, 'prompts': n_prompts, 'prompt_len': prompt_len,
          'new_tokens': new_tokens, 'cached_tok_s': cached_tok_s, 'full_tokens': full_tokens,
          'full_tok_s': full_tok_s, 'speedup': cached_tok_s / full_tok_s, 'same_tokens': same,
          'compile_cached_s': cached.compile_s, 'compile_full_s': full.compile_s,
          'times_cached_s': times['cached'], 'times_full_s': times['full']}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--max_len', default='128,512', help='comma list of model.max_len')
  ap.add_argument('--prompts', default='1,16', help='comma list of batch sizes (prompts)')
  ap.add_argument('--prompt_len', type=int, default=8)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--full_tokens_long', type=int, default=16,
                  help='tokens the full-recomputation arm generates at windows over 128')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='a config override, e.g. --set model.dtype=bfloat16')
  args = ap.parse_args()
  rows = []
  for max_len in (int(x) for x in args.max_len.split(',')):
    config = default_config()
    config.model.max_len = max_len
    config.data.seq_len = min(config.data.seq_len, max_len)
    config_lib.set_fields(config, train_step.parse_set(args.set))
    for n in (int(x) for x in args.prompts.split(',')):
      row = point(config, n, args.prompt_len, args.full_tokens_long if max_len > 128 else 0,
                  args.repeats)
      rows.append(row)
      harness.print_table([row], COLUMNS)
  env = {**harness.machine(), 'dtype': config.model.dtype,
         'model': {k: config.model[k] for k in ('n_towers', 'gate', 'n_layers', 'd_model')},
         'vocab': config.data.vocab_size, 'time': time.strftime('%Y-%m-%dT%H:%M:%S')}
  print()
  harness.print_table(rows, COLUMNS)
  harness.write_jsonl(RESULTS, [dict(env, **r) for r in rows])
  if not all(r['same_tokens'] for r in rows):
    sys.exit('cached and full recomputation wrote different tokens')


if __name__ == '__main__':
  harness.hostmem.restart()  # the host settings launch/env.sh gives (twotower_jax/hostmem.py)
  main()
