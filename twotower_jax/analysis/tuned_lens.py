"""Tuned lens per tower and layer (Belrose et al. 2023), with each layer's residual update.

For tower k and layer s ('input', 'block_1', ..., 'block_L': the stream before the
tower's final LayerNorm) an affine translator T(x) = x W + b, started at the least-squares
map onto the last layer's state (Din et al. 2023), maps the layer's state into it; the
model decodes it: tower k's own final LayerNorm (when the tower has one), then the gate
and output layer with the other towers at their final states. Trained on cached states
(the frozen towers run once over `analysis.lens_windows` training windows) to minimise
KL(model's final distribution || lens's) at the scored positions, with the probes'
held-out plateau rule. On the last layer the identity already gives the model's own
distribution, so the lens there is the model itself (KL 0, the model's loss) and its map
stays the identity.

Written to tuned_lens.json: per tower and layer the KL to the final distribution and the
lens's loss on the scored held-out positions, the held-out KL of the identity map (the
"logit lens"), of the least-squares start and after training, the relative size of each block's update of the residual stream
||x_s - x_{s-1}|| / ||x_{s-1}||, and per item (count >= min_count) the lens's mean loss
on it, from which the report shows at which depth each tower's preferred items become
predictable. Not for tower types whose layer states have read their target
(`layer_states_see_target`: bilstm) or for pondering runs (their last pass's layers are
not kept).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from twotower_jax import config as config_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import structural_probe
from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators import probe
from twotower_jax.model import layers as layers_lib
from twotower_jax.model import lm
from twotower_jax.model import towers

log = logging.getLogger('twotower_jax')


def check_config(config: ml_collections.ConfigDict) -> None:
  """analysis.lens needs per-layer states that have not read their target and one pass."""
  m = config.model
  if towers.get(m.tower_type).layer_states_see_target(m):
    raise config_lib.ConfigError(
        f'analysis.lens: the layer states of model.tower_type={m.tower_type} have read the '
        'token they predict (only the final states are shifted), so a lens on them would see '
        'the answer; set analysis.lens=False for this run')
  if m.pondering.steps:
    raise config_lib.ConfigError('analysis.lens reads one pass\'s layers, and a pondering run '
                                 'predicts from its last pass; set analysis.lens=False for '
                                 'runs with model.pondering.steps > 0')


def states_fn(model, params, seq_len: int):
  """(jitted (params, inputs_BxL) -> (x_NxSxBxLxH: each tower's state at every lens layer,
  h_NxBxLxH: the final states), the layer names S)."""
  shapes = jax.eval_shape(functools.partial(structural_probe.layer_states, model), params,
                          jax.ShapeDtypeStruct((1, seq_len), jnp.int32))
  names = [n for n in structural_probe.layer_order(shapes) if n != 'final']
  widths = {shapes[n].shape[-1] for n in names + ['final']}
  if len(widths) > 1:
    raise config_lib.ConfigError(
        f'analysis.lens maps each layer into the final states, but this tower\'s layers are '
        f'{sorted(widths)} wide (a bilstm with its join or its own LSTM width); set '
        'analysis.lens=False for this run')

  @jax.jit
  def fn(params, inputs_BxL):
    states = structural_probe.layer_states(model, params, inputs_BxL)
    return jnp.stack([states[n] for n in names], axis=1), states['final']
  return fn, names


def identity_lens(n: int, s: int, h: int) -> dict[str, jax.Array]:
  """Every translator the identity map (the "logit lens")."""
  return {'w_NxSxHxH': jnp.broadcast_to(jnp.eye(h), (n, s, h, h)),
          'b_NxSxH': jnp.zeros((n, s, h))}


def least_squares_lens(x_NxSxPxH: np.ndarray, ridge: float = 1e-6) -> dict[str, jax.Array]:
  """Each layer's affine least-squares map onto the last layer's state over the P positions
  (Din et al. 2023; a tiny ridge, relative to the states' variance, keeps it solvable); the
  last layer keeps the identity, being that state itself."""
  n, s, _, h = x_NxSxPxH.shape
  w, b = np.tile(np.eye(h), (n, s, 1, 1)), np.zeros((n, s, h))
  for k in range(n):
    y = np.asarray(x_NxSxPxH[k, -1], np.float64)
    for si in range(s - 1):
      x = np.asarray(x_NxSxPxH[k, si], np.float64)
      xm, ym = x.mean(0), y.mean(0)
      xc = x - xm
      gram = xc.T @ xc
      gram += ridge * max(np.trace(gram) / h, 1e-30) * np.eye(h)
      w[k, si] = np.linalg.solve(gram, xc.T @ (y - ym))
      b[k, si] = ym - xm @ w[k, si]
  return {'w_NxSxHxH': jnp.asarray(w, jnp.float32), 'b_NxSxH': jnp.asarray(b, jnp.float32)}


def lens_logits(model, params, lens, x_XxH: jax.Array, h_NxXxH: jax.Array, k, s) -> jax.Array:
  """logits_XxV of lens (k, s): tower k's translated state, its final norm, then the gate
  with the other towers' final states."""
  t_XxH = x_XxH @ lens['w_NxSxHxH'][k, s] + lens['b_NxSxH'][k, s]
  if model.cfg.ln_final:
    norm = jax.tree.map(lambda p: p[k], params['towers']['ln_final'])
    t_XxH = layers_lib.layer_norm().apply({'params': norm}, t_XxH)
  h_NxXxH = h_NxXxH.at[k].set(t_XxH.astype(h_NxXxH.dtype))
  return lm.apply_gate(model, params, h_NxXxH[:, None])['logits_BxLxV'][0]


def kl_and_nll(model_logits_XxV, logits_XxV, targets_X):
  """Per position KL(model || lens) and the lens's NLL of the target."""
  log_m = jax.nn.log_softmax(model_logits_XxV.astype(jnp.float32), -1)
  log_l = jax.nn.log_softmax(logits_XxV.astype(jnp.float32), -1)
  kl_X = jnp.sum(jnp.exp(log_m) * (log_m - log_l), -1)
  nll_X = -jnp.take_along_axis(log_l, targets_X[:, None], -1)[:, 0]
  return kl_X, nll_X


def _pairs(n: int, s: int) -> tuple[jax.Array, jax.Array]:
  ks, ss = np.meshgrid(np.arange(n), np.arange(s), indexing='ij')
  return jnp.asarray(ks.ravel()), jnp.asarray(ss.ravel())


def mean_kl_fn(model):
  """(params, lens, x_NxSxXxH, h_NxXxH, w_X) -> each lens's mean KL over the X positions
  (NxS), weighted by w; for use inside jit."""
  def fn(params, lens, x, h, w_X):
    n, s = x.shape[:2]
    model_logits = lm.apply_gate(model, params, h[:, None])['logits_BxLxV'][0]
    ks, ss = _pairs(n, s)

    def one(k, si):
      kl_X, _ = kl_and_nll(model_logits, lens_logits(model, params, lens, x[k, si], h, k, si),
                           jnp.zeros(w_X.shape, jnp.int32))
      return jnp.sum(kl_X * w_X) / jnp.maximum(jnp.sum(w_X), 1.0)
    return jax.vmap(one)(ks, ss).reshape(n, s)
  return fn


def cache(ctx, windows: np.ndarray, forward) -> dict[str, np.ndarray]:
  """The scored positions of `windows` (masks as the probes draw them): layer states
  x_NxSxPxH, final states h_NxPxH, targets_P."""
  a = ctx.config.analysis
  make_example = towers.get(ctx.model.cfg.tower_type).make_example
  batch = int(ctx.config.train.batch_size)
  xs, hs, ts = [], [], []
  for i in range(0, len(windows), batch):
    ex = make_example(jnp.asarray(windows[i:i + batch]),
                      jax.random.fold_in(jax.random.PRNGKey(int(a.seed)), i), ctx.model.cfg)
    x, h = forward(ctx.params, ex['inputs'])
    keep = np.asarray(ex['weights']).reshape(-1) > 0
    xs.append(np.asarray(x).reshape(x.shape[:2] + (-1, x.shape[-1]))[:, :, keep])
    hs.append(np.asarray(h).reshape(h.shape[0], -1, h.shape[-1])[:, keep])
    ts.append(np.asarray(ex['targets']).reshape(-1)[keep])
  return {'x': np.concatenate(xs, 2), 'h': np.concatenate(hs, 1), 't': np.concatenate(ts)}


def train(ctx, forward, n_layers: int) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """Lenses trained from the identity on cached training windows until the held-out mean KL
  stops improving (probe_eval_every / probe_patience / probe_min_delta; cap lens_steps)."""
  a, cfg = ctx.config.analysis, ctx.model.cfg
  rng = np.random.default_rng(int(a.seed))
  n_windows = min(int(a.lens_windows), len(ctx.train_windows))
  rows = ctx.train_windows[np.sort(rng.choice(len(ctx.train_windows), n_windows,
                                              replace=False))]
  held = probe.heldout_windows(len(rows), float(a.probe_heldout), rng)
  tr, he = cache(ctx, rows[~held], forward), cache(ctx, rows[held], forward)
  n, s, h = tr['x'].shape[0], n_layers, tr['x'].shape[-1]
  lens = least_squares_lens(tr['x'])
  tx = optax.adam(float(a.lens_lr))
  opt = tx.init(lens)
  kl_fn = mean_kl_fn(ctx.model)

  @jax.jit
  def step(lens, opt, x_NxSxPxH, h_NxPxH, idx):
    x, hh = x_NxSxPxH[:, :, idx], h_NxPxH[:, idx]
    loss_fn = lambda p: jnp.sum(kl_fn(ctx.params, p, x, hh, jnp.ones(idx.shape)))
    loss, g = jax.value_and_grad(loss_fn)(lens)
    # The last layer's map stays the identity: it is the final state. (Its gradient is float
    # noise, which Adam would scale up to full-size steps.)
    g = jax.tree.map(lambda x: x.at[:, -1].set(0.0), g)
    updates, opt = tx.update(g, opt, lens)
    return optax.apply_updates(lens, updates), opt, loss / (n * s)

  x_train, h_train = jnp.asarray(tr['x']), jnp.asarray(tr['h'])

  held_kl = jax.jit(kl_fn)

  def heldout(lens):
    chunk, total = 512, np.zeros((n, s))
    for i in range(0, he['t'].size, chunk):
      w = np.ones(min(chunk, he['t'].size - i))
      total += np.asarray(held_kl(ctx.params, lens, jnp.asarray(he['x'][:, :, i:i + chunk]),
                                  jnp.asarray(he['h'][:, i:i + chunk]), jnp.asarray(w))) * w.size
    return total / max(he['t'].size, 1)

  identity, start = heldout(identity_lens(n, s, h)), heldout(lens)
  curve = [{'step': 0, 'heldout_kl': start.tolist()}]
  # The best lenses are kept; patience counts checks without a gain of probe_min_delta.
  best, best_lens, plateau, since, converged, i = start.mean(), lens, start.mean(), 0, False, 0
  batch = min(int(a.lens_batch), tr['t'].size)
  for i in range(1, int(a.lens_steps) + 1):
    idx = jnp.asarray(rng.choice(tr['t'].size, batch, replace=False))
    lens, opt, _ = step(lens, opt, x_train, h_train, idx)
    if i % int(a.probe_eval_every) and i != int(a.lens_steps):
      continue
    kl = heldout(lens)
    curve.append({'step': i, 'heldout_kl': kl.tolist()})
    if kl.mean() < best:
      best, best_lens = kl.mean(), lens
    if kl.mean() < plateau - float(a.probe_min_delta):
      plateau, since = kl.mean(), 0
    else:
      since += 1
      if since >= int(a.probe_patience):
        converged = True
        break
  tuned = min(curve, key=lambda c: np.mean(c['heldout_kl']))['heldout_kl']
  return best_lens, {'steps': i, 'converged': converged, 'identity_heldout_kl': identity.tolist(),
                     'least_squares_heldout_kl': start.tolist(), 'heldout_kl': tuned, 'n_train_positions': int(tr['t'].size),
                     'n_heldout_positions': int(he['t'].size), 'curve': curve}


def evaluate(ctx, lens, forward, n_layers: int) -> dict[str, np.ndarray]:
  """Over the scored eval positions: per lens the summed KL and NLL, per item the summed
  NLL (NxSxV), the positions' count per item, and per layer the summed relative update."""
  vocab = ctx.model.cfg.vocab_size

  @jax.jit
  def batch_sums(params, lens, window_BxL1, index):
    ex = base.example(ctx.model, window_BxL1, index)
    x, h = forward(params, ex['inputs'])
    n, s = x.shape[:2]
    w_X, t_X = ex['weights'].reshape(-1), ex['targets'].reshape(-1)
    x = x.reshape(n, s, -1, x.shape[-1])
    h = h.reshape(n, -1, h.shape[-1])
    model_logits = lm.apply_gate(ctx.model, params, h[:, None])['logits_BxLxV'][0]
    ks, ss = _pairs(n, s)

    def one(k, si):
      kl_X, nll_X = kl_and_nll(model_logits, lens_logits(ctx.model, params, lens, x[k, si], h,
                                                         k, si), t_X)
      seg = jax.ops.segment_sum(nll_X * w_X, t_X, num_segments=vocab)
      return jnp.sum(kl_X * w_X), jnp.sum(nll_X * w_X), seg
    kl, nll, seg = jax.lax.map(lambda ks_: one(*ks_), (ks, ss))
    norm = jnp.linalg.norm(x, axis=-1)
    update = jnp.linalg.norm(x[:, 1:] - x[:, :-1], axis=-1) / jnp.maximum(norm[:, :-1], 1e-30)
    return {'kl': kl.reshape(n, s), 'nll': nll.reshape(n, s), 'item_nll': seg.reshape(n, s, -1),
            'count': jax.ops.segment_sum(w_X, t_X, num_segments=vocab), 'weight': jnp.sum(w_X),
            'update': jnp.einsum('nsx,x->ns', update, w_X)}

  total = None
  for i, window in enumerate(ctx.eval_batches):
    out = batch_sums(ctx.params, lens, window, i)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return {k: np.asarray(v, np.float64) for k, v in jax.device_get(total).items()}


def run(ctx, out_dir: str) -> dict[str, Any]:
  """Trains and evaluates the lenses; writes out_dir/tuned_lens.json and returns it."""
  t0 = time.perf_counter()
  forward, names = states_fn(ctx.model, ctx.params, ctx.eval_batches[0].shape[1] - 1)
  lens, record = train(ctx, forward, len(names))
  sums = evaluate(ctx, lens, forward, len(names))
  w = max(sums['weight'], 1.0)
  a = ctx.config.analysis
  items = np.flatnonzero(sums['count'] >= int(a.min_count))
  n = sums['kl'].shape[0]
  contribution = np.concatenate([np.full((n, 1), np.nan), sums['update'] / w], axis=1)
  item_loss = ctx.item_loss if ctx.item_loss is not None else np.full(sums['count'].size, np.nan)
  result = {
      'layers': names, 'n_towers': int(n), 'n_positions': int(sums['weight']),
      'kl': sums['kl'] / w, 'loss': sums['nll'] / w,
      'model_loss': float(np.nansum(item_loss * sums['count']) / w),
      'contribution': contribution, 'training': record,
      'items': {'token_id': items, 'count': sums['count'][items],
                'loss': sums['item_nll'][:, :, items] / sums['count'][items],
                'model_loss': item_loss[items]},
      'settings': {k: a[k] for k in ('lens_windows', 'lens_batch', 'lens_steps', 'lens_lr',
                                     'probe_heldout', 'probe_eval_every', 'probe_patience',
                                     'probe_min_delta', 'seed', 'min_count')},
  }
  result['seconds'] = time.perf_counter() - t0
  workdir_lib.write_json(os.path.join(out_dir, workdir_lib.TUNED_LENS_JSON), result)
  log.info('tuned lens: %d lenses, %d steps (%s) in %.1fs; KL per layer, tower 0: %s',
           n * len(names), record['steps'], 'converged' if record['converged'] else
           'NOT converged: hit analysis.lens_steps', result['seconds'],
           ' '.join(f'{v:.3f}' for v in result['kl'][0]))
  return result
