"""The config schema: every field with its default, plus validation and JSON I/O.

Config files in configs/ start from `base_config()` and change what they need;
`main` locks the result so a mistyped `--config.x=` override fails loudly.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from twotower_jax import errors


class ConfigError(errors.UserError):
  """A bad config value; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
  """Every field the code reads, with a default that trains on CPU."""
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.source = 'sotu'  # 'sotu' | 'text' | 'tfds'
  c.data.text_glob = ''  # source=text: documents, one per file
  c.data.text_val_glob = ''  # source=text: held-out files (default: a fraction of text_glob)
  c.data.tfds_name = ''  # source=tfds: e.g. 'lm1b' (prepared as array_record)
  c.data.tfds_data_dir = ''  # where the prepared TFDS dataset lives ('' = TFDS default)
  c.data.tfds_train_split = 'train'
  c.data.tfds_val_split = 'test'
  c.data.tfds_text_key = 'text'
  c.data.tfds_max_docs = 0  # read at most this many training documents (0 = all)
  c.data.val_fraction = 0.05  # sotu/text: fraction of whole documents held out
  c.data.seq_len = 128  # tokens per training window
  c.data.vocab_size = 8000
  c.data.tokenizer_type = 'unigram'  # SentencePiece model type: 'unigram' | 'bpe'

  c.model = ml_collections.ConfigDict()
  c.model.n_towers = 2
  c.model.tower_type = 'causal'
  c.model.gate = 'concat'
  c.model.n_layers = 4
  c.model.d_model = 256
  c.model.n_heads = 4
  c.model.d_mlp = 1024
  c.model.max_len = 128  # rows of the position table
  c.model.dropout = 0.1
  c.model.scan_layers = True  # one compiled layer body, scanned: fast compiles

  c.train = ml_collections.ConfigDict()
  c.train.steps = 240  # the default main job: about 6 minutes on a 2-core CPU
  c.train.seed = 0
  c.train.batch_size = 16  # global, across all devices and hosts
  c.train.log_every = 20
  c.train.eval_every = 120
  c.train.eval_batches = 8  # a fixed slice of the validation split
  c.train.checkpoint_every = 120
  c.train.keep_checkpoints = 3

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.01
  c.optimizer.clip_norm = 1.0
  c.optimizer.warmup_steps = 24

  # Mesh axis sizes; one may be -1 to take the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tower = 1

  # Logical axis name -> mesh axis (or None: replicated). Parameters and
  # activations carry the logical names; this table decides where they live.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (
      ('batch', ('data', 'fsdp')),
      ('tower', 'tower'),
      ('layers', None),
      ('vocab', None),
      ('embed', 'fsdp'),
      ('mlp', None),
      ('heads', None),
      ('kv', None),
      ('length', None),
      ('gate_in', 'fsdp'),
  )

  # Scale-out (docs/SCALING.md): precision, rematerialisation, accumulation, pre-flight.
  c.model.dtype = 'float32'  # tower matmul compute dtype: 'float32' | 'bfloat16' (params f32)
  c.model.remat = False  # recompute each block's activations in the backward pass (saves memory)
  c.train.grad_accum_steps = 1  # micro-batches per step (scan in the jitted step); 1 = off
  c.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = look up (TPU/GPU) or measure (CPU)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks sizes that must agree; raises ConfigError with the fix."""
  m, d, t = config.model, config.data, config.train
  if d.source not in ('sotu', 'text', 'tfds'):
    raise ConfigError(f"data.source={d.source!r} is unknown; use 'sotu', 'text' or 'tfds'")
  if d.source == 'text' and not d.text_glob:
    raise ConfigError('data.source=text needs --config.data.text_glob=PATTERN')
  if d.source == 'tfds' and not d.tfds_name:
    raise ConfigError('data.source=tfds needs --config.data.tfds_name=NAME')
  if m.n_towers < 1:
    raise ConfigError(f'model.n_towers={m.n_towers} must be >= 1')
  if m.d_model % m.n_heads:
    raise ConfigError(f'model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; '
                      'choose heads that divide the width')
  if d.seq_len > m.max_len:
    raise ConfigError(f'data.seq_len={d.seq_len} exceeds model.max_len={m.max_len} (the position '
                      'table); raise model.max_len or lower data.seq_len')
  if d.vocab_size < 16:
    raise ConfigError(f'data.vocab_size={d.vocab_size} is too small; use at least 16')
  if not 0.0 < d.val_fraction < 1.0:
    raise ConfigError(f'data.val_fraction={d.val_fraction} must be in (0, 1)')
  for name in ('steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every',
               'keep_checkpoints', 'eval_batches'):
    if t[name] < 1:
      raise ConfigError(f'train.{name}={t[name]} must be >= 1')
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f'model.dropout={m.dropout} must be in [0, 1)')
  sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tower]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh sizes (data, fsdp, tower) = {tuple(sizes)}: use positive sizes, '
                      'at most one -1')
  if m.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"model.dtype={m.dtype!r} is unknown; use 'float32' or 'bfloat16'")
  if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'train.grad_accum_steps={t.grad_accum_steps} must be >= 1 and divide '
                      f'train.batch_size={t.batch_size}')
  if t.peak_flops < 0:
    raise ConfigError(f'train.peak_flops={t.peak_flops} must be >= 0 (0 = look up or measure)')
  if config.mesh.tower > 0 and m.n_towers % config.mesh.tower:
    raise ConfigError(f'mesh.tower={config.mesh.tower} does not divide model.n_towers='
                      f'{m.n_towers}; set mesh.tower to a divisor of n_towers')


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-ready plain dict (tuples become lists)."""
  return json.loads(config.to_json())


def save_json(config: ml_collections.ConfigDict, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(to_dict(config), f, indent=2, sort_keys=True)
    f.write('\n')


def load_json(path: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, as a ConfigDict."""
  with open(path) as f:
    raw = json.load(f)
  base = base_config()
  _merge(base, raw, prefix='')
  return base


def _merge(dst: ml_collections.ConfigDict, src: dict[str, Any], prefix: str) -> None:
  """Writes src onto dst; keys unknown to this version of the code are kept."""
  for key, value in src.items():
    if isinstance(value, dict):
      if key not in dst:
        dst[key] = ml_collections.ConfigDict()
      _merge(dst[key], value, prefix + key + '.')
    elif key == 'rules':
      dst[key] = tuple((a, tuple(b) if isinstance(b, list) else b) for a, b in value)
    else:
      dst[key] = tuple(value) if isinstance(value, list) else value
