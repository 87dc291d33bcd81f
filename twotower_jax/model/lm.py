"""The two-tower LM: shared embeddings -> N stacked towers -> mixing gate.

The towers are one tower module vmapped along a leading `tower` axis with
independent initialisation, so N towers cost one definition and the tower axis
can be sharded across devices. Pure functions: `model.init` / `model.apply`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from twotower_jax import config as config_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import attention
from twotower_jax.model import embeddings
from twotower_jax.model import gates
from twotower_jax.model import layers
from twotower_jax.model import partitioning
from twotower_jax.model import towers


class TwoTowerLM(nn.Module):
  """Returns a dict: `logits_BxLxV`, `tower_states_NxBxLxH`, `aux_loss`, `metrics`, ..."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, weights_BxL: jax.Array | None = None,
               deterministic: bool = True,
               states_fn: Callable[[jax.Array], jax.Array] | None = None,
               tower_states: jax.Array | None = None,
               cache: dict[str, dict[str, jax.Array]] | None = None,
               positions_BxL: jax.Array | None = None,
               targets_BxL: jax.Array | None = None, loss_chunk: int = 0):
    """`weights_BxL`: the loss weights, for the gate's averages (None: every position).
    `states_fn` (analysis hook) edits the tower states h_NxBxLxH before the gate.
    `tower_states` (analysis): h_NxBxLxH computed before from these tokens; the towers
    are skipped and only the gate runs on them (no pondering: its passes need the towers).
    Decoding (model/decode.py): with a `cache` (decode.init_cache: per pondering pass
    `pass_p`, the tower type's cache stacked along the tower axis) the tokens sit at
    `positions_BxL` of each row and the result also holds the updated `cache`.
    With `targets_BxL` and `loss_chunk` > 0, where the gate returns its output layer's
    input, the result also holds `loss_sum` = sum of weights_BxL * CE(logits, targets),
    computed `loss_chunk` rows at a time (Embedder.decode_loss): a step that reads only
    it never forms the whole logits_BxLxV (XLA drops them).
    """
    cfg = self.cfg
    embedder = embeddings.Embedder(cfg, name='embed')
    gate = gates.build(cfg, deterministic, name='gate')
    if tower_states is not None:
      if cfg.pondering.steps:
        raise ValueError('tower_states needs model.pondering.steps=0 (each pass reruns the '
                         'towers)')
      h_NxBxLxH = tower_states if states_fn is None else states_fn(tower_states)
      out = dict(gate(h_NxBxLxH, embedder.decode, embedder.decode_towers, weights_BxL))
      out['tower_states_NxBxLxH'] = h_NxBxLxH
      out.setdefault('aux_loss', jnp.zeros((), jnp.float32))
      out.setdefault('metrics', {})
      return out
    ponder = cfg.pondering
    # PonderingLM's weights (1.0: the plain path): sqrt(d) on every token embedding, and
    # the first pass's token embedding counted `steps` times.
    scale = cfg.d_model ** 0.5 if ponder.embed_scale == 'sqrt_d' else 1.0
    first = scale * (ponder.steps if ponder.initial_weight == 'steps' else 1)
    tower_type = towers.get(cfg.tower_type)
    x_NxBxLxH = embedder.encode(tokens_BxL, positions_BxL, token_scale=first,
                                deterministic=deterministic,
                                shifts=tower_type.input_shifts(cfg))
    # Activations split by batch, not by the (FSDP-sharded) width of the token table.
    x_NxBxLxH = partitioning.constrain(x_NxBxLxH, ('tower', 'batch', 'length', None))
    mask_keys = cfg.released.mask_pad_keys and cache is None  # as released: PAD keys unseen
    in_axes = (0, 0, None) if cache is not None else (0, None, None, None) if mask_keys else 0
    stacked = nn.vmap(tower_type.module, in_axes=in_axes, out_axes=0,
                      axis_size=cfg.n_towers,
                      variable_axes={'params': 0, 'intermediates': 0},
                      split_rngs={'params': True, 'dropout': True},
                      metadata_params={nn.PARTITION_NAME: 'tower'},
                      spmd_axis_name=partitioning.mesh_axis('tower'))
    tower_stack = stacked(cfg, deterministic, name='towers')
    new_caches = []
    if mask_keys:  # the towers' (x, cache, positions, keep_BxL), all but x shared
      keep_BxL, towers_module = tokens_BxL != tokenizer_lib.PAD_ID, tower_stack
      tower_stack = lambda x_NxBxLxH: towers_module(x_NxBxLxH, None, None, keep_BxL)

    def forward(x_NxBxLxH):
      if cache is None:
        h_NxBxLxH = tower_stack(x_NxBxLxH)
      else:  # pass p reads and extends its own cache: its keys depend on pass p-1's output
        h_NxBxLxH, pass_cache = tower_stack(x_NxBxLxH, cache[f'pass_{len(new_caches)}'],
                                            positions_BxL)
        new_caches.append(pass_cache)
      if states_fn is not None:
        h_NxBxLxH = states_fn(h_NxBxLxH)
      out = dict(gate(h_NxBxLxH, embedder.decode, embedder.decode_towers, weights_BxL))
      out['tower_states_NxBxLxH'] = h_NxBxLxH
      return out

    out = forward(x_NxBxLxH)
    # Pondering: each extra pass adds the expected token embedding under the current
    # prediction (the gate's mix, or with per_tower tower k's own) to the inputs; the
    # towers and gate are reused (same parameters).
    for _ in range(ponder.steps):
      logits = out['tower_logits_NxBxLxV'] if ponder.per_tower else out['logits_BxLxV']
      probs = jax.nn.softmax(logits.astype(jnp.float32) / ponder.temperature, axis=-1)
      x_NxBxLxH = x_NxBxLxH + embedder.soft_embed(probs, scale)
      out = forward(x_NxBxLxH)
    if cache is not None:
      out['cache'] = constrain_cache(cfg, {f'pass_{p}': c for p, c in enumerate(new_caches)})
    if targets_BxL is not None and loss_chunk > 0 and 'output_in_BxLxZ' in out:
      weights = jnp.ones(targets_BxL.shape, jnp.float32) if weights_BxL is None else weights_BxL
      out['loss_sum'] = embedder.decode_loss(out['output_in_BxLxZ'], targets_BxL, weights,
                                             loss_chunk)
    out.setdefault('aux_loss', jnp.zeros((), jnp.float32))
    out.setdefault('metrics', {})
    return out


def cache_spec(cfg: layers.ModelConfig, batch: int) -> dict[str, dict[str, tuple]]:
  """{'pass_p': {name: (shape, logical names)}} of the decoding cache: per pondering pass,
  the tower type's cache with a leading tower axis; {} when the type has none."""
  per_tower = towers.get(cfg.tower_type).decode_cache
  if per_tower is None:
    return {}
  one = {name: ((cfg.n_towers,) + tuple(shape), ('tower',) + tuple(names))
         for name, (shape, names) in per_tower(cfg, batch).items()}
  return {f'pass_{p}': dict(one) for p in range(cfg.pondering.steps + 1)}


def constrain_cache(cfg: layers.ModelConfig, cache: dict) -> dict:
  """The cache pinned to the sharding its logical names give (inside `with_rules` only)."""
  spec = cache_spec(cfg, 1)
  return {p: {name: partitioning.constrain(c, spec[p][name][1]) for name, c in arrays.items()}
          for p, arrays in cache.items()}


def apply_gate(model: TwoTowerLM, params, h_NxBxLxH: jax.Array) -> dict[str, jax.Array]:
  """The gate alone on given tower states, with the model's own parameters: what the full
  model's last pass returns for these states (per-token ablations while decoding; unlike
  `tower_states=`, also for pondering runs, whose last pass is what this reproduces)."""
  cfg = model.cfg
  embedder = embeddings.Embedder(cfg).bind({'params': params['embed']})
  gate = gates.build(cfg).bind({'params': params['gate']})
  return dict(gate(h_NxBxLxH, embedder.decode, embedder.decode_towers))


def build(config: ml_collections.ConfigDict, vocab_size: int, platform: str = '') -> TwoTowerLM:
  """The model of `config`; `platform` ('cpu', 'tpu', 'cuda'): the platform its steps are
  lowered for, where that is not this process's backend (attention.py)."""
  return TwoTowerLM(layers.model_config(config.model, vocab_size, platform=platform))


def check_config(config: ml_collections.ConfigDict) -> None:
  """model.* names a registered tower type, gate and embedding mode that fit together (and
  a gate that analysis.probe_input can read)."""
  m = config.model
  if m.tower_type not in towers.TOWER_TYPES:
    raise config_lib.unknown_name('model.tower_type', m.tower_type, towers.TOWER_TYPES)
  if m.pondering.steps and not towers.get(m.tower_type).allows_pondering:
    raise config_lib.ConfigError(
        f'model.pondering.steps>0 with model.tower_type={m.tower_type} would leak the target '
        'into its own prediction (fed back through its neighbours); use 0')
  if m.gate not in gates.GATES:
    raise config_lib.unknown_name('model.gate', m.gate, gates.GATES)
  if m.pondering.per_tower and not gates.get(m.gate).tower_logits:
    raise config_lib.ConfigError(
        'model.pondering.per_tower needs a gate with per-tower distributions (latent, '
        f'logit_sum), not model.gate={m.gate}')
  if config.analysis.probe_input == 'joint_ln' and not gates.get(m.gate).joint_ln:
    raise config_lib.ConfigError(
        f"analysis.probe_input='joint_ln' reads the concat head's joint LayerNorm, which "
        f"model.gate={m.gate} does not have; use model.gate=concat or analysis.probe_input=tower")
  for field, choices in embeddings.PROJECTED_OPTIONS.items():
    value = m.embedding[field]
    if value not in choices:
      raise config_lib.unknown_name(f'model.embedding.{field}', value, choices)
    if value != choices[0] and m.embedding.mode != 'projected':
      raise config_lib.ConfigError(
          f"model.embedding.{field}={value!r} needs model.embedding.mode='projected' (not "
          f"{m.embedding.mode!r}); set the mode or {field}={choices[0]!r}")
  if m.remat_policy not in layers.REMAT_POLICIES:
    raise config_lib.unknown_name('model.remat_policy', m.remat_policy, layers.REMAT_POLICIES)
  attention.check_config(config)
  tower_type = towers.get(m.tower_type)
  if (m.attention_dropout or m.released.mask_pad_keys) and not tower_type.attention_layers(m):
    raise config_lib.ConfigError(
        f'model.tower_type={m.tower_type} has no attention; set model.attention_dropout=0 and '
        'model.released.mask_pad_keys=False')
  if m.released.zero_backward and not tower_type.backward_stream:
    raise config_lib.ConfigError(f'model.released.zero_backward needs a tower type with a '
                                 f'backward stream (bilstm), not {m.tower_type}; set it False')
  if m.head.joint_ln_dropout and not gates.get(m.gate).joint_ln:
    raise config_lib.ConfigError(
        f'model.head.joint_ln_dropout drops the concat head\'s joint LayerNorm, which '
        f'model.gate={m.gate} does not have; use model.gate=concat or set it False')
  if m.head.width == 'table' and m.gate != 'concat':
    raise config_lib.ConfigError(
        f"model.head.width='table' needs model.gate=concat (the per-tower heads of {m.gate} "
        "are d_model wide and decode through out_proj); use model.head.width='model'")
  if not tower_type.backward_stream:
    if m.embedding.ln == 'per_direction':
      raise config_lib.ConfigError(
          "model.embedding.ln='per_direction' needs a tower type with forward and backward "
          f"streams (bilstm), not {m.tower_type}; use 'shared'")
    changed = [f'model.bilstm.{k}' for k, v in m.bilstm.items()
               if v != config_lib.base_config().model.bilstm[k]]
    if changed:
      raise config_lib.ConfigError(f'{", ".join(changed)} apply only to model.tower_type='
                                   f'bilstm, not {m.tower_type}; leave them at their defaults')
  if m.embedding.mode not in embeddings.MODES:
    raise config_lib.ConfigError(f'model.embedding.mode={m.embedding.mode!r} is unknown; choose '
                                 f'one of {list(embeddings.MODES)}')


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
