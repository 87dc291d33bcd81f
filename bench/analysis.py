"""Analysis speed on the default model: the tower pass, each estimator on cached states, and
a probe step (towers re-run inside the step, as before the cache, vs on cached states), and
the probe heads' output-layer matmuls alone, the part of a step no cache removes.

python bench/analysis.py [--workdir=DIR] [--windows=64] [--repeats=3] [--n_control=100,999]
Without --workdir: configs/default.py's model, randomly initialised (speed does not depend on
the weights), on random token windows. Each estimator is scored at every --n_control value
(shuffled-tower draws), the values alternating within each repeat; with --workdir also the
statistics of each estimator (summary.json's block: the class tests' permutations and
bootstraps). Prints a table and appends to bench/results/analysis.jsonl. Run it after
`source launch/env.sh` (host tuning).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import harness  # pylint: disable=wrong-import-position
from twotower_jax import config as config_lib  # pylint: disable=wrong-import-position
from twotower_jax import run as run_lib  # pylint: disable=wrong-import-position
from twotower_jax.analysis import estimators as est_lib  # pylint: disable=wrong-import-position
from twotower_jax.analysis import runner  # pylint: disable=wrong-import-position
from twotower_jax.analysis import summary as summary_lib  # pylint: disable=wrong-import-position
from twotower_jax.analysis.estimators import probe  # pylint: disable=wrong-import-position
from twotower_jax.model import lm  # pylint: disable=wrong-import-position
from twotower_jax.model import towers  # pylint: disable=wrong-import-position
from twotower_jax.train import state as state_lib  # pylint: disable=wrong-import-position
from twotower_jax.train import optimizer as optimizer_lib  # pylint: disable=wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'analysis.jsonl')
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def default_context(n_windows: int, out_dir: str) -> est_lib.Context:
  """configs/default.py's model, random weights, random held-out and training windows."""
  sys.path.insert(0, CONFIGS)
  import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  vocab = config.data.vocab_size
  model = lm.build(config, vocab)
  params = state_lib.init(model, optimizer_lib.make(config), 0).params
  rng = np.random.default_rng(0)
  windows = rng.integers(5, vocab, size=(max(n_windows, 2 * config.analysis.probe_windows),
                                         config.data.seq_len + 1)).astype(np.int32)
  return est_lib.Context(config=config, model=model, params=params,
                         eval_batches=est_lib.base.eval_batches(windows, n_windows,
                                                                config.train.batch_size),
                         train_windows=windows, analysis_dir=out_dir, step=0)


def workdir_context(workdir: str, n_windows: int, out_dir: str):
  """(the run's analysis Context, its tokenizer)."""
  config = runner.load_config(workdir, config_lib.base_config().analysis)
  restored = run_lib.restore(config, workdir)
  return est_lib.Context(config=config, model=restored.model, params=restored.params,
                         eval_batches=est_lib.base.eval_batches(
                             restored.setup.splits.val_windows, n_windows,
                             config.train.batch_size),
                         train_windows=restored.setup.splits.train_windows, analysis_dir=out_dir,
                         step=restored.step), restored.setup.tokenizer


def probe_steps(ctx: est_lib.Context, batch_windows: int, repeats: int) -> list[dict]:
  """Seconds per probe step at `batch_windows` windows: towers re-run in the step vs cached."""
  cfg = ctx.model.cfg
  p = probe.probe_init(jax.random.PRNGKey(0), probe.probe_towers(ctx.config), cfg.d_model,
                       cfg.vocab_size)
  tx = optax.adamw(1e-3)
  opt = tx.init(p)
  make_example = towers.get(cfg.tower_type).make_example
  windows = jnp.asarray(ctx.train_windows[:batch_windows])

  def update(p, opt, h, ex):
    def loss_fn(p):
      ce_N, w = probe._ce_sums(p, h, ex['targets'], ex['weights'])  # pylint: disable=protected-access
      return jnp.sum(ce_N) / jnp.maximum(w, 1.0)
    g = jax.grad(loss_fn)(p)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt

  @jax.jit
  def rerun_step(p, opt, params, window_BxL1, key):
    ex = make_example(window_BxL1, key, cfg)
    h = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)[
        'tower_states_NxBxLxH']
    return update(p, opt, probe.split_units(ctx.config, jax.lax.stop_gradient(h)), ex)

  ex = make_example(windows, jax.random.PRNGKey(0), cfg)
  h = probe.split_units(ctx.config, ctx.model.apply({'params': ctx.params}, ex['inputs'],
                                                    deterministic=True)['tower_states_NxBxLxH'])
  cached_step = jax.jit(update)
  # The floor no cache removes: the heads' output layer, forward (z W^T) and its two
  # gradients (dz, dW), one (B*L x H) x (H x V) matmul each per head.
  n, rows = h.shape[0], h.shape[1] * h.shape[2]  # heads, B*L
  z_NxBLxH = jnp.ones((n, rows, cfg.d_model))
  g_NxBLxV = jnp.ones((n, rows, cfg.vocab_size))

  @jax.jit
  def output_layer(z_NxBLxH, g_NxBLxV, w_NxVxH):
    return (jnp.einsum('nxh,nvh->nxv', z_NxBLxH, w_NxVxH),
            jnp.einsum('nxv,nvh->nxh', g_NxBLxV, w_NxVxH),
            jnp.einsum('nxv,nxh->nvh', g_NxBLxV, z_NxBLxH))

  rows = []
  for what, fn in (('probe step, towers re-run', lambda: rerun_step(
      p, opt, ctx.params, windows, jax.random.PRNGKey(1))),
                   ('probe step, cached states', lambda: cached_step(p, opt, h, ex)),
                   ('probe output layer matmuls alone (fwd, dz, dW)',
                    lambda: output_layer(z_NxBLxH, g_NxBLxV, p['out_NxVxH']))):
    jax.block_until_ready(fn())
    seconds = min(harness.timed(fn, repeats))
    positions = int(np.asarray(ex['weights']).sum())
    rows.append({'what': what, 'batch_windows': batch_windows, 'seconds': seconds,
                 'tokens_per_s': positions / seconds})
  return rows


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--workdir', default='')
  ap.add_argument('--windows', type=int, default=64, help='held-out windows scored')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--n_control', default='999', help='shuffled-tower draws, a comma list')
  args = ap.parse_args()
  n_controls = [int(x) for x in args.n_control.split(',')]
  out_dir = tempfile.mkdtemp(prefix='bench_analysis_')
  ctx, sp = (workdir_context(args.workdir, args.windows, out_dir) if args.workdir else
             (default_context(args.windows, out_dir), None))
  rows = []
  passes = [est_lib.base.tower_pass(ctx) for _ in range(args.repeats)]
  best = max(passes, key=lambda r: r['tokens_per_s'])
  rows.append({'what': 'tower pass (model forward, states cached)', 'seconds': best['seconds'],
               'tokens_per_s': best['tokens_per_s']})
  ctx.config.analysis.probe_steps = 1  # prepare: the cache and one step; the bench times steps
  for name in runner.estimator_names(ctx.config)[0]:
    runs = {n: [] for n in n_controls}
    for _ in range(args.repeats):
      for n in n_controls:  # alternating, so load changes hit every value alike
        ctx.config.analysis.n_control = n
        runs[n].append(est_lib.base.score(ctx, name))
    for n in n_controls:
      res = max(runs[n], key=lambda r: r['tokens_per_s'])
      rows.append({'what': f'{name} (on cached states, n_control={n})', 'seconds': res['seconds'],
                   'tokens_per_s': res['tokens_per_s']})
    if sp is not None:
      classes, alt = runner.word_classes(ctx.config.analysis, sp)
      pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
      seconds = min(harness.timed(lambda: summary_lib.estimator_summary(
          res, pieces, classes, ctx.model.cfg.n_towers, ctx.config, ctx.item_loss, None, alt),
          args.repeats))
      rows.append({'what': f'{name} statistics (n_control={n_controls[-1]}, n_perm='
                           f'{ctx.config.analysis.n_perm}, n_boot={ctx.config.analysis.n_boot})',
                   'seconds': seconds})
  batch = int(ctx.config.analysis.probe_batch_size)
  rows += probe_steps(ctx, 16, args.repeats)  # 16 windows: the batch before the cache
  if batch != 16:
    rows += probe_steps(ctx, batch, args.repeats)
  cfg = ctx.model.cfg
  env = {**harness.machine(), 'model': {k: cfg[k] for k in ('n_towers', 'gate', 'n_layers',
                                                              'd_model')},
         'vocab': cfg.vocab_size, 'seq_len': ctx.config.data.seq_len,
         'positions': best['n_positions'], 'workdir': args.workdir or 'random init',
         'time': time.strftime('%Y-%m-%dT%H:%M:%S')}
  harness.print_table(rows, ('what', 'batch_windows', 'seconds', 'tokens_per_s'))
  harness.write_jsonl(RESULTS, [dict(env, **r) for r in rows])


if __name__ == '__main__':
  harness.hostmem.restart()  # the host settings launch/env.sh gives (twotower_jax/hostmem.py)
  main()
