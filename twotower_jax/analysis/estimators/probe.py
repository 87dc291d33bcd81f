"""The `probe` estimator (the paper's phases 2 and 3): a fresh head per frozen tower.

Each tower k gets its own untied head (Dense -> GELU -> LN -> own output matrix and
bias) trained with the phase-1 objective on tower k's final states alone; per
position the value is log p_k(target) under that head. A one-tower run gets two
probes on two random halves of its units (the split-single-tower control).

Training reads cached states: the frozen towers run once over `analysis.probe_windows`
training windows (masks fixed per window for mlm), a `probe_heldout` share of them is
held out, and the heads train with AdamW (linear warm-up, weight decay on matrices)
until the held-out loss stops improving by `probe_min_delta` nats for `probe_patience`
checks (`probe_steps` is the cap); the best held-out heads are kept. The curve, the
final held-out loss per head and the model's own loss on the same positions go into
summary.json. Heads are saved under DIR/analysis/probe/ and reused for the same
checkpoint and settings.

What a head reads (docs/FIDELITY.md A4): `analysis.probe_input` 'tower' (tower k's own
final state) or 'joint_ln' (slice k of the concat head's first LayerNorm over
[h_1; ...; h_N], the original's); `analysis.probe_dropout` caches the training states
with the towers' dropout on (and the head's after its joint LN with
model.head.joint_ln_dropout; one draw per cached window, fixed for the whole probe
training); `analysis.probe_seed_per_tower` gives head k its own seed analysis.seed + k
for its init, its batch order and its dropout draw. Scoring always reads the towers
with dropout off.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators.base import Context, Estimator
from twotower_jax.model import gates
from twotower_jax.model import towers

log = logging.getLogger('twotower_jax')


def probe_init(key: jax.Array, n: int, h: int, vocab: int) -> dict[str, jax.Array]:
  """N untied heads: Dense -> GELU -> LN -> own output matrix and bias (DESIGN.md section 2)."""
  k1, k2 = jax.random.split(key)
  return {'dense_NxHxH': 0.02 * jax.random.normal(k1, (n, h, h)), 'dense_b_NxH': jnp.zeros((n, h)),
          'ln_scale_NxH': jnp.ones((n, h)), 'ln_bias_NxH': jnp.zeros((n, h)),
          'out_NxVxH': 0.02 * jax.random.normal(k2, (n, vocab, h)),
          'out_b_NxV': jnp.zeros((n, vocab))}


def probe_logits(p: dict[str, jax.Array], h_NxBxLxH: jax.Array) -> jax.Array:
  """logits_NxBxLxV of each tower's probe on its own states."""
  z = jnp.einsum('nblh,nhk->nblk', h_NxBxLxH.astype(jnp.float32), p['dense_NxHxH'])
  z = jax.nn.gelu(z + p['dense_b_NxH'][:, None, None], approximate=False)
  mu = z.mean(-1, keepdims=True)
  z = (z - mu) * jax.lax.rsqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
  z = z * p['ln_scale_NxH'][:, None, None] + p['ln_bias_NxH'][:, None, None]
  n, b, l, h = z.shape  # one (B*L x H) @ (H x V) per head: 6-9% faster on CPU than 'nblh'
  logits_NxBLxV = jnp.einsum('nxh,nvh->nxv', z.reshape(n, b * l, h), p['out_NxVxH'])
  return logits_NxBLxV.reshape(n, b, l, -1) + p['out_b_NxV'][:, None, None]


def probe_towers(config) -> int:
  """Probe heads: one per tower, or two (random halves of the units) for a one-tower run."""
  return max(config.model.n_towers, 2)


def split_units(config, h_NxBxLxH: jax.Array) -> jax.Array:
  """The states each probe reads: a one-tower run's units split into two random halves."""
  if config.model.n_towers != 1:
    return h_NxBxLxH
  d = h_NxBxLxH.shape[-1]
  perm = np.random.default_rng(int(config.analysis.seed)).permutation(d)
  half = np.zeros(d, np.float32)
  half[perm[:d // 2]] = 1.0
  return jnp.stack([h_NxBxLxH[0] * half, h_NxBxLxH[0] * (1.0 - half)])


TRAIN_COUNTS = 'train_counts_V'  # per item: targets in the heads' training positions
_NOT_HEADS = ('meta', TRAIN_COUNTS)
DROPOUT_STREAM = 1  # fold_in tag of the probes' dropout keys (apart from the mlm mask keys)
INPUT_DEFAULTS = {'probe_input': 'tower', 'probe_dropout': False, 'probe_seed_per_tower': False}


def probe_inputs(config, model, params, h_NxBxLxH: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
  """The states the probes read, from the towers' final states h_NxBxLxH: each tower's own
  (analysis.probe_input='tower') or slice k of the concat head's first LayerNorm over
  [h_1; ...; h_N] with the model's parameters ('joint_ln', dropped after the norm from
  `dropout_key` where the head does that in training); then `split_units`."""
  if config.analysis.probe_input == 'joint_ln':
    h_NxBxLxH = gates.head_joint_ln(model.cfg, params['gate'], h_NxBxLxH, dropout_key)
  return split_units(config, h_NxBxLxH)


def probe_seeds(config) -> list[int]:
  """Each head's seed: analysis.seed, or analysis.seed + k for head k with
  analysis.probe_seed_per_tower (the original trains each probe in its own seeded run)."""
  seed = int(config.analysis.seed)
  return [seed + k if config.analysis.probe_seed_per_tower else seed
          for k in range(probe_towers(config))]


def _probe_meta(ctx: Context) -> dict[str, Any]:
  a = ctx.config.analysis
  fields = ('probe_steps', 'probe_lr', 'probe_batch_size', 'probe_windows', 'probe_heldout',
            'probe_warmup', 'probe_weight_decay', 'probe_eval_every', 'probe_patience',
            'probe_min_delta', 'seed')
  # The input options only where they differ from the default, so heads saved before they
  # existed (always the default input) are still reused.
  inputs = {f: a[f] for f, default in INPUT_DEFAULTS.items() if a[f] != default}
  # 'heldout_split': heads trained when the held-out windows were the last ones in corpus
  # order (before it existed) are not reused.
  return {'checkpoint_step': int(ctx.step), 'n_probes': probe_towers(ctx.config),
          'heldout_split': 'random', **{f: a[f] for f in fields}, **inputs}


def probe_path(analysis_dir: str, step: int) -> str:
  return os.path.join(analysis_dir, workdir_lib.PROBE_DIR, f'probe_step{step}.npz')


def _ce_sums(p, h_NxBxLxH, targets_BxL, weights_BxL):
  """(summed CE per head N, summed weight) of the heads on cached states."""
  logits = probe_logits(p, h_NxBxLxH)
  ce_NxBxL = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.broadcast_to(targets_BxL, logits.shape[:-1]))
  return jnp.einsum('nbl,bl->n', ce_NxBxL, weights_BxL), jnp.sum(weights_BxL)


def _ce_sums_per_head(p, h_NxBxLxH, targets_NxBxL, weights_NxBxL):
  """(summed CE per head N, summed weight per head N): each head on its own windows."""
  ce_NxBxL = optax.softmax_cross_entropy_with_integer_labels(probe_logits(p, h_NxBxLxH),
                                                             targets_NxBxL)
  return jnp.einsum('nbl,nbl->n', ce_NxBxL, weights_NxBxL), jnp.sum(weights_NxBxL, (1, 2))


def dropout_keys(config, start: int) -> list[jax.Array] | None:
  """The dropout keys of the cached batch starting at window `start`: None (dropout off),
  one key (shared seed) or one per head (analysis.probe_seed_per_tower)."""
  a = config.analysis
  if not a.probe_dropout:
    return None
  seeds = probe_seeds(config) if a.probe_seed_per_tower else [int(a.seed)]
  return [jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), start), DROPOUT_STREAM)
          for s in seeds]


def training_states_fn(ctx: Context) -> Callable:
  """The jitted pass caching the probe's training states: (params, window_BxL1, key,
  dropout keys or None) -> (states h_NxBxLxH each probe reads, targets_BxL, weights_BxL, the
  model's CE per window). The model's CE is always with dropout off; with dropout keys the
  states are drawn with the towers' dropout on, head k's from key k (one key: all heads)."""
  cfg = ctx.model.cfg
  make_example = towers.get(cfg.tower_type).make_example
  n = probe_towers(ctx.config)

  @jax.jit
  def forward(params, window_BxL1, key, dropout_keys_D=None):
    ex = make_example(window_BxL1, key, cfg)  # mlm masks drawn once per window, then fixed
    out = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)
    ce_B = -jnp.sum(base.target_log_probs(out['logits_BxLxV'], ex['targets']) * ex['weights'], 1)
    if dropout_keys_D is None:
      h_NxBxLxH = probe_inputs(ctx.config, ctx.model, params, out['tower_states_NxBxLxH'])
    else:
      draws = [probe_inputs(ctx.config, ctx.model, params, ctx.model.apply(
          {'params': params}, ex['inputs'], weights_BxL=ex['weights'], deterministic=False,
          rngs={'dropout': k})['tower_states_NxBxLxH'], jax.random.fold_in(k, DROPOUT_STREAM))
               for k in dropout_keys_D]
      h_NxBxLxH = jnp.stack([draws[k if len(draws) > 1 else 0][k] for k in range(n)])
    return h_NxBxLxH, ex['targets'], ex['weights'], ce_B
  return forward


def probe_step_fn(tx: optax.GradientTransformation) -> Callable:
  """One jitted AdamW step of the heads on cached states: (heads, opt_state, h_NxWxLxH,
  targets_WxL, weights_WxL, idx) -> (heads, opt_state, CE per head); idx picks the windows:
  idx_B the same for every head, idx_NxB head k's own (analysis.probe_seed_per_tower)."""
  @jax.jit
  def step(p, opt, h_NxWxLxH, t_WxL, w_WxL, idx):
    def loss_fn(p):
      if idx.ndim == 2:
        h_NxBxLxH = jax.vmap(lambda h_WxLxH, i_B: h_WxLxH[i_B])(h_NxWxLxH, idx)
        ce_N, w_N = _ce_sums_per_head(p, h_NxBxLxH, t_WxL[idx], w_WxL[idx])
        mean_N = ce_N / jnp.maximum(w_N, 1.0)
        return jnp.sum(mean_N), mean_N
      ce_N, w = _ce_sums(p, h_NxWxLxH[:, idx], t_WxL[idx], w_WxL[idx])
      return jnp.sum(ce_N) / jnp.maximum(w, 1.0), ce_N / jnp.maximum(w, 1.0)
    (_, ce_N), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, ce_N
  return step


def heldout_windows(n_rows: int, share: float, rng: np.random.Generator) -> np.ndarray:
  """bool[n_rows]: the probes' stopping set, a random `share` of the cached windows (at least
  one, never all): a random sample, not the last windows (the corpora are in date order)."""
  n_held = min(max(1, int(round(n_rows * share))), n_rows - 1)
  held = np.zeros(n_rows, bool)
  held[rng.choice(n_rows, n_held, replace=False)] = True
  return held


def cache_training_states(ctx: Context) -> dict[str, Any]:
  """The frozen towers' states on the probe's training windows, split by window into
  `train` and `heldout` (each h_NxWxLxH, targets_WxL, weights_WxL), and the model's own
  mean CE on the held-out positions (same masks)."""
  a = ctx.config.analysis
  rng = np.random.default_rng(int(a.seed))
  n_windows = min(int(a.probe_windows), len(ctx.train_windows))
  rows = ctx.train_windows[np.sort(rng.choice(len(ctx.train_windows), n_windows, replace=False))]
  batch = int(ctx.config.train.batch_size)
  forward = training_states_fn(ctx)
  parts = [forward(ctx.params, jnp.asarray(rows[i:i + batch]),
                   jax.random.fold_in(jax.random.PRNGKey(int(a.seed)), i),
                   dropout_keys(ctx.config, i))
           for i in range(0, len(rows), batch)]
  h, targets, weights, ce_W = (jnp.concatenate([q[j] for q in parts], axis=1 if j == 0 else 0)
                               for j in range(4))
  held = heldout_windows(len(rows), float(a.probe_heldout), rng)
  tr, he = jnp.asarray(np.flatnonzero(~held)), jnp.asarray(np.flatnonzero(held))
  model_loss = float(jnp.sum(ce_W[he]) / jnp.maximum(jnp.sum(weights[he]), 1.0))
  train_counts = np.bincount(np.asarray(targets[tr]).reshape(-1),
                             weights=np.asarray(weights[tr]).reshape(-1),
                             minlength=ctx.model.cfg.vocab_size)
  return {'train': (h[:, tr], targets[tr], weights[tr]),
          'heldout': (h[:, he], targets[he], weights[he]),
          'model_heldout_loss': model_loss, 'train_counts_V': train_counts}


def init_heads(config, h: int, vocab: int) -> dict[str, jax.Array]:
  """The untrained heads: all from analysis.seed, or head k from its own seed
  (analysis.probe_seed_per_tower)."""
  n = probe_towers(config)
  if not config.analysis.probe_seed_per_tower:
    return probe_init(jax.random.PRNGKey(int(config.analysis.seed)), n, h, vocab)
  heads = [probe_init(jax.random.PRNGKey(s), 1, h, vocab) for s in probe_seeds(config)]
  return {k: jnp.concatenate([q[k] for q in heads]) for k in heads[0]}


def _decay_mask(p):
  return {k: k in ('dense_NxHxH', 'out_NxVxH') for k in p}


def train_probes(ctx: Context) -> tuple[dict[str, jax.Array], dict[str, Any], np.ndarray]:
  """Trains every tower's head on cached states until its held-out loss plateaus.

  Returns the best heads (lowest mean held-out loss), the training record (the curve, the
  final held-out loss per head next to the model's own, whether it converged) and how often
  each item is a target in the heads' training positions.
  """
  a, cfg = ctx.config.analysis, ctx.model.cfg
  cache = cache_training_states(ctx)
  h_train, t_train, w_train = cache['train']
  h_held, t_held, w_held = cache['heldout']
  seeds = probe_seeds(ctx.config)
  p = init_heads(ctx.config, h_train.shape[-1], cfg.vocab_size)
  schedule = optax.linear_schedule(0.0, float(a.probe_lr), max(int(a.probe_warmup), 1))
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=float(a.probe_weight_decay),
                   mask=_decay_mask)
  opt = tx.init(p)
  step = probe_step_fn(tx)

  @jax.jit
  def heldout_sums(p, h_NxWxLxH, t_WxL, w_WxL):
    return _ce_sums(p, h_NxWxLxH, t_WxL, w_WxL)

  def heldout_loss(p):
    sums = [heldout_sums(p, h_held[:, i:i + 16], t_held[i:i + 16], w_held[i:i + 16])
            for i in range(0, h_held.shape[1], 16)]
    return sum(c for c, _ in sums) / jnp.maximum(sum(w for _, w in sums), 1.0)

  rng = np.random.default_rng(int(a.seed) + 1)
  head_rngs = [np.random.default_rng(s + 1) for s in seeds]  # probe_seed_per_tower: own order
  every, patience = int(a.probe_eval_every), int(a.probe_patience)
  best, best_p, since, curve, converged = np.inf, p, 0, [], False
  train_losses = []
  for i in range(1, int(a.probe_steps) + 1):
    if a.probe_seed_per_tower:
      idx = jnp.asarray(np.stack([r.integers(0, h_train.shape[1], size=int(a.probe_batch_size))
                                  for r in head_rngs]))
    else:
      idx = jnp.asarray(rng.integers(0, h_train.shape[1], size=int(a.probe_batch_size)))
    p, opt, ce_N = step(p, opt, h_train, t_train, w_train, idx)
    train_losses.append(ce_N)
    if i % every and i != int(a.probe_steps):
      continue
    held_N = np.asarray(heldout_loss(p), np.float64)
    curve.append({'step': i, 'train': np.mean(jax.device_get(train_losses), axis=0).tolist(),
                  'heldout': held_N.tolist()})
    train_losses = []
    if held_N.mean() < best - float(a.probe_min_delta):
      best, best_p, since = float(held_N.mean()), p, 0
    else:
      since += 1
      if since >= patience:
        converged = True
        break
  final = curve[-1]['heldout'] if curve else []
  best_held = min(curve, key=lambda c: np.mean(c['heldout']))['heldout'] if curve else []
  record = {'steps': curve[-1]['step'] if curve else 0, 'converged': converged,
            'heldout_loss': best_held, 'last_heldout_loss': final,
            'model_heldout_loss': cache['model_heldout_loss'],
            'n_train_positions': int(jnp.sum(w_train)), 'n_heldout_positions': int(jnp.sum(w_held)),
            'curve': curve}
  return best_p, record, cache['train_counts_V']


def _probe_prepare(ctx: Context) -> dict[str, Any]:
  """Loads the probe heads saved for this checkpoint and settings, or trains and saves them."""
  path = probe_path(ctx.analysis_dir, ctx.step)
  meta = _probe_meta(ctx)
  if os.path.exists(path):
    with np.load(path) as f:
      saved = json.loads(str(f['meta']))
      if saved.get('settings') == meta:
        log.info('probe: reusing heads from %s', path)
        return {'params': {k: jnp.asarray(f[k]) for k in f.files if k not in _NOT_HEADS},
                'record': saved['record'], TRAIN_COUNTS: np.asarray(f[TRAIN_COUNTS])}
    log.info('probe: %s was trained with other settings; retraining', path)
  t = time.perf_counter()
  p, record, train_counts_V = train_probes(ctx)
  record['seconds'] = time.perf_counter() - t
  log.info('probe: trained %d heads for %d steps in %.1fs (%s); held-out loss per head %s, '
           'the model %.3f', meta['n_probes'], record['steps'], record['seconds'],
           'converged' if record['converged'] else 'NOT converged: hit analysis.probe_steps',
           ' '.join(f'{x:.3f}' for x in record['heldout_loss']), record['model_heldout_loss'])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, meta=json.dumps(workdir_lib.clean({'settings': meta, 'record': record})),
           **{TRAIN_COUNTS: train_counts_V}, **{k: np.asarray(v) for k, v in p.items()})
  os.replace(tmp, path)
  return {'params': p, 'record': record, TRAIN_COUNTS: train_counts_V}


def _probe_values(ctx: Context):
  def fn(params, prepared, ex, h_NxBxLxH, key):
    del key
    logits = probe_logits(prepared['params'], probe_inputs(ctx.config, ctx.model, params,
                                                           h_NxBxLxH))
    return base.target_log_probs(logits, jnp.broadcast_to(ex['targets'], logits.shape[:-1])), {}
  return fn


base.register('probe', Estimator(
    prepare=_probe_prepare, values=_probe_values,
    description='mean log-likelihood of the item under a probe head trained on one tower alone',
    summary=lambda prepared: {'training': dict(prepared['record'])}))
