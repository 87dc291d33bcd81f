"""Tower types: the registry. A tower maps embedded inputs x_BxLxH to final states h_BxLxH.

A tower type pairs a Flax module with its objective: `make_example` turns a packed
window of L+1 tokens into inputs, targets and loss weights (PAD weights are zero unless
model.released.pad_target);
the state h_t feeds the gate, which predicts `targets[t]`. Everything else that
depends on the tower type is a field of its registered entry, so a new type is one
module that calls `register` (the model, the train step, FLOPs, the paper presets
and the structural probe read these fields and never name a type):

- `paper_embedding_mode`: the token table the paper's variant of this type reads
  (configs/paper.py);
- `paper_fields`: size ('base' | 'large') -> dotted config fields the paper preset of
  this type sets on top of the shared ones (the original's architecture switches,
  docs/FIDELITY.md B1-B4);
- `allows_pondering`: False where feeding predictions back would leak the target;
- `layer_states`: the per-layer states the tower sowed ('intermediates'), by name
  ('input', 'block_1', ...), for the structural probe and the tuned lens;
- `layer_states_see_target`: (cfg) -> whether the state at position t of those layers has
  read the token the tower predicts at t (bilstm without its input shift: only the final
  states are shifted), so that no per-layer readout of the target (the tuned lens) may
  use them;
- `attention_layers`: attention layers applied per token (FLOPs);
- `left_to_right`: whether it generates text token by token (causal);
- `backward_stream`: whether it has ELMo's backward stream (model.released.zero_backward);
- `input_shifts`: the input streams it reads side by side, as token offsets: stream s holds
  at position t the embedded token t - s (PAD where that falls outside the window). The
  default (0,) is one plain stream; ELMo's two streams are (0, 0), or (1, -1) with the
  original's input shift (model/embeddings.py builds them);
- `decode_cache`: for a left-to-right type that decodes incrementally, the shape and
  logical axis names of each array of one tower's cache for a batch
  (`(cfg, batch) -> {name: (shape, names)}`); its module then also accepts
  `(x_BxSxH, cache, positions_BxS)` and returns `(h_BxSxH, cache)`: the S new
  positions of each row, which read what earlier calls left in the cache (model/decode.py).
  None: generation re-runs the whole window for every new token.

Built-in types: `causal` and `mlm` (transformer.py), `bilstm` (bilstm.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import layers


def input_dropout(cfg: layers.ModelConfig, x_BxLxH: jax.Array, deterministic: bool) -> jax.Array:
  """A tower's first step: dropout on its input (in the caller's scope), unless
  model.embedding.dropout_at='row' dropped the embedding row before the projections."""
  if cfg.embedding.dropout_at == 'row':
    return x_BxLxH
  return nn.Dropout(cfg.dropout)(x_BxLxH, deterministic=deterministic)


def final_norm(cfg: layers.ModelConfig, h_BxLxS: jax.Array) -> jax.Array:
  """A tower's last step: LayerNorm `ln_final` (in the caller's scope), or with
  model.ln_final=False the states unchanged (the original BERT/ELMo towers have none)."""
  if not cfg.ln_final:
    return h_BxLxS
  return layers.layer_norm(name='ln_final')(h_BxLxS)


def target_weights(targets_BxL: jax.Array, cfg: layers.ModelConfig) -> jax.Array:
  """Loss weights of next-token-style targets: 0 at PAD, 1 elsewhere; all 1 with
  model.released.pad_target (the original's loss has no ignore index). cfg None: defaults."""
  if cfg is not None and cfg.released.pad_target:
    return jnp.ones(targets_BxL.shape, jnp.float32)
  return (targets_BxL != tokenizer_lib.PAD_ID).astype(jnp.float32)


def sown_layers(inter: dict[str, Any]) -> dict[str, jax.Array]:
  """The default `layer_states`: 'tower_in' as 'input' and `layer_i` sown by the tower."""
  out = {}
  if 'tower_in' in inter:
    out['input'] = inter['tower_in'][0]
  for k in inter:
    if k.startswith('layer_'):
      out[f'block_{int(k[6:])}'] = inter[k][0]
  return out


@dataclasses.dataclass(frozen=True)
class TowerType:
  module: type[nn.Module]  # fields (cfg, deterministic); __call__(x_BxLxH) -> h_BxLxH
  make_example: Callable[..., dict[str, jax.Array]]  # (window_BxL1, rng, cfg) -> example
  paper_embedding_mode: str = 'shared'
  paper_fields: Callable[[str], dict[str, Any]] = lambda size: {}
  allows_pondering: bool = True
  layer_states: Callable[[dict[str, Any]], dict[str, jax.Array]] = sown_layers
  layer_states_see_target: Callable[[layers.ModelConfig], bool] = lambda cfg: False
  attention_layers: Callable[[layers.ModelConfig], int] = lambda cfg: 0
  left_to_right: bool = False
  backward_stream: bool = False
  input_shifts: Callable[[layers.ModelConfig], tuple[int, ...]] = lambda cfg: (0,)
  decode_cache: Callable[[layers.ModelConfig, int], dict[str, tuple]] | None = None


TOWER_TYPES: dict[str, TowerType] = {}


def register(name: str, module: type[nn.Module], make_example: Callable[..., dict],
             **fields: Any) -> TowerType:
  """Registers tower type `name` (fields: see TowerType)."""
  TOWER_TYPES[name] = TowerType(module, make_example, **fields)
  return TOWER_TYPES[name]


def get(name: str) -> TowerType:
  if name not in TOWER_TYPES:
    raise KeyError(f'model.tower_type={name!r} is unknown; choose one of {sorted(TOWER_TYPES)}')
  return TOWER_TYPES[name]
