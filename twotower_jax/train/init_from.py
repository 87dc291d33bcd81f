"""model.init_towers: a fresh run takes its towers from other runs' checkpoints.

Entry k of the comma list is DIR[:K] (tower K of the run in DIR) or '' (tower k stays
freshly initialised). What a tower is: every parameter stacked on the tower axis (its
logical axis names start with 'tower'): the tower itself (params['towers']), its token
and position tables with model.embedding.mode=per_tower (a source with one shared
V x H table gives that table), and its own output head (gate=latent or logit_sum).
Parameters shared by the towers (the gate's prior, the output bias, shared tables)
stay fresh. A source must have the same tokenizer file (sha256) and the same shapes.

Sources are read with train/checkpoints + train/state + workdir.read_config (the
train layer knows nothing of run.py), at their latest complete checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib

log = logging.getLogger('twotower_jax')
_VANISHED_RETRIES = 3  # a source still training can rotate away the checkpoint being read


class InitError(config_lib.ConfigError):
  """A model.init_towers source that cannot give this run its towers."""


def _specs_by_path(model) -> dict[str, Any]:
  """{'/'-joined path: logical PartitionSpec} of the model's parameters."""
  specs = state_lib.param_logical_specs(model)
  leaves = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  return {optimizer_lib.param_path(p): s for p, s in leaves}


def _per_tower(spec) -> bool:
  return len(spec) > 0 and spec[0] == 'tower'


def check_sources(config: ml_collections.ConfigDict, workdir: str) -> None:
  """InitError before anything is written (the tokenizer not yet trained): an entry naming
  this run's own workdir, a negative tower index, a source without checkpoints."""
  for k, entry in enumerate(config_lib.init_tower_entries(config.model.init_towers)):
    if entry is None:
      continue
    src_dir, k_src = paths.absolute(entry[0]), entry[1]
    if k_src < 0:
      raise InitError(f'model.init_towers: entry {k} ({entry[0]}:{k_src}) names tower {k_src}; '
                      'give DIR:K with K >= 0 (DIR alone is tower 0)')
    if src_dir == paths.absolute(workdir):
      raise InitError(f'model.init_towers: entry {k} names this run\'s own workdir {src_dir}; a '
                      'run takes its towers from other, trained runs: name their workdirs')
    if not paths.isdir(checkpoints.directory(src_dir)):
      raise InitError(f'model.init_towers: {src_dir} (entry {k}) has no checkpoints; train that '
                      'run first or fix the path')


def source_params(src_dir: str, tokenizer_sha256: str, vocab_size: int,
                  mesh) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], dict, dict]:
  """(config, {path: array}, {path: spec}, provenance) of the run in `src_dir` at its latest
  complete checkpoint (read again if its training run rotates it away while it is read);
  provenance: {'workdir', 'step', 'checkpoint_sha256'} (sha256 of the checkpoint's per-leaf
  fingerprints: which contents were taken, whatever that run writes later)."""
  if not paths.isdir(checkpoints.directory(src_dir)):
    raise InitError(f'model.init_towers: {src_dir} has no checkpoints; train that run first or '
                    'fix the path')
  src_tok = workdir_lib.path(src_dir, workdir_lib.TOKENIZER)
  if not paths.exists(src_tok) or tokenizer_lib.file_digest(src_tok) != tokenizer_sha256:
    raise InitError(f'model.init_towers: {src_tok} is not this run\'s tokenizer (sha256 '
                    'differs, and two separately trained files always do); copy that file into '
                    'this workdir before its first step (a new workdir) so the token ids match')
  src_config = workdir_lib.read_config(src_dir)
  src_model = model_lib.build(src_config, vocab_size)
  replicated = sharding_lib.replicated(mesh)

  def abstract_of(tx):
    shapes = jax.eval_shape(functools.partial(state_lib.init, src_model, tx, 0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        shapes)
  for attempt in range(_VANISHED_RETRIES + 1):
    mngr = checkpoints.manager(src_dir, read_only=True)
    try:
      step = checkpoints.latest_complete_step(mngr)
      if step is None:
        raise InitError(f'model.init_towers: {checkpoints.directory(src_dir)} holds no complete '
                        'checkpoint; train that run first')
      state, meta = checkpoints.restore(mngr, step, abstract_of(optimizer_lib.make(src_config)),
                                        legacy=state_lib.legacy_target(src_config, abstract_of))
      break
    except checkpoints.CheckpointVanished:
      if attempt == _VANISHED_RETRIES:
        raise
      log.warning('init_towers: checkpoint %d of %s was rotated away while it was read; reading '
                  'the newest one again', step, src_dir)
    finally:
      mngr.close()
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  params = {optimizer_lib.param_path(p): np.asarray(jax.device_get(x)) for p, x in leaves}
  prints = meta.get('fingerprints') or checkpoints.fingerprints(state)
  provenance = {'workdir': src_dir, 'step': int(step), 'checkpoint_sha256': hashlib.sha256(
      json.dumps(prints).encode()).hexdigest()}
  return src_config, params, _specs_by_path(src_model), provenance


def _tower_slice(src_dir: str, k_src: int, path: str, src: dict, src_specs: dict,
                 want: tuple[int, ...]) -> np.ndarray:
  """Source tower k_src's value for the per-tower parameter `path` (shape `want`)."""
  value = src[path]
  if _per_tower(src_specs[path]):
    value = value[k_src]
  if tuple(value.shape) != tuple(want):
    raise InitError(f'model.init_towers: {path} of {src_dir} has shape {tuple(value.shape)}, '
                    f'this run needs {tuple(want)}; give both runs the same model.* shapes')
  return value


def apply(state: state_lib.TrainState, config: ml_collections.ConfigDict, model,
          tokenizer_sha256: str, mesh) -> tuple[state_lib.TrainState, list[dict[str, Any]]]:
  """`state` (freshly initialised) with tower k's parameters taken from entry k's source, and
  per taken tower where it came from ({'tower', 'source_tower', 'workdir', 'step',
  'checkpoint_sha256'}: the run's metrics.jsonl records it as its `init_towers` line)."""
  entries = config_lib.init_tower_entries(config.model.init_towers)
  dst_specs = _specs_by_path(model)
  per_tower = sorted(p for p, s in dst_specs.items() if _per_tower(s))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state.params)
  new = {optimizer_lib.param_path(p): x for p, x in leaves}
  sources: dict[str, tuple] = {}
  taken = []
  for k, entry in enumerate(entries):
    if entry is None:
      continue
    src_dir, k_src = paths.absolute(entry[0]), entry[1]
    if src_dir not in sources:
      sources[src_dir] = source_params(src_dir, tokenizer_sha256, model.cfg.vocab_size, mesh)
    src_config, src, src_specs, provenance = sources[src_dir]
    if k_src >= src_config.model.n_towers:
      raise InitError(f'model.init_towers: {src_dir} has {src_config.model.n_towers} tower(s); '
                      f'tower {k_src} does not exist (use {src_dir}:K with K < '
                      f'{src_config.model.n_towers})')
    missing = [p for p in per_tower if p.startswith('towers/') and p not in src]
    if missing:
      raise InitError(f'model.init_towers: {src_dir} has no {missing[0]} (its towers are built '
                      'differently); give both runs the same model.tower_type, n_layers and '
                      'scan_layers')
    copied, fresh = [], []
    for path in per_tower:
      if path not in src:
        fresh.append(path)
        continue
      value = _tower_slice(src_dir, k_src, path, src, src_specs, new[path].shape[1:])
      new[path] = _set_slice(new[path], k, value)
      copied.append(path)
    taken.append({'tower': k, 'source_tower': k_src, **provenance})
    log.info('init_towers: tower %d <- tower %d of %s (step %d): %d parameters copied%s', k,
             k_src, src_dir, provenance['step'], len(copied),
             f'; fresh (not in the source): {", ".join(fresh)}' if fresh else '')
  shared = sorted(p for p in dst_specs if not _per_tower(dst_specs[p]) and p.startswith('embed/'))
  if any(entries) and config.model.embedding.mode != 'per_tower':
    log.warning('init_towers: the token tables (%s) are shared by the towers and stay freshly '
                'initialised; use model.embedding.mode=per_tower to take each source\'s tables',
                ', '.join(shared))
  params = jax.tree_util.tree_unflatten(treedef, [new[optimizer_lib.param_path(p)]
                                                  for p, _ in leaves])
  return state.replace(params=params), taken


def _set_slice(dst: jax.Array, k: int, value: np.ndarray) -> jax.Array:
  """dst with dst[k] = value, keeping dst's sharding."""
  fn = jax.jit(lambda d, v: d.at[k].set(v.astype(d.dtype)), out_shardings=dst.sharding)
  return fn(dst, value)
