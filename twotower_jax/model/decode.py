"""Decoding a left-to-right model: the cache, one pure decode step, sampling and Co-LLM.

The cache holds, per pondering pass (`pass_p`), what the tower type's `decode_cache`
declares, stacked along a leading tower axis like the towers' parameters; for causal
transformers each layer's keys and values at all T = model.max_len positions
(k_NxMxDxT, v_NxMxTxD per layer; M = B*K rows, one per batch row and head). Pass p
has its own keys because its inputs carry pass p-1's prediction. `step` runs the model on S new positions of each row against
the cache (S = the prompt for the prefill, 1 per generated token); `generate` is the
whole loop as one pure function: prefill once, then a `lax.while_loop` over new
tokens that stops when every row is done. Rows may have prompts of different
lengths (right-padded): each row writes and reads at its own positions.

A row stops at EOS (when `stop_at_eos`), after `max_new_tokens`, or when the
sequence fills the window: the model reads positions 0..max_len-1, so the last
token it can predict sits at position max_len (no sliding window). Tower types
without a `decode_cache` (and `cached=False`, the benchmark's baseline) re-run the
full forward over a max_len buffer for every new token instead; the outputs are
the same.

Per generated token `generate` also returns what the token view shows: the model's
log p(token); for a mixture gate (latent) the prior pi_t over towers before the
token and the posterior after it; otherwise, given the towers' mean states mu_NxH,
the log-likelihood lost when tower k's state at that position is replaced by mu_k
(at the last pondering pass; the analysis's ablation estimator replaces it at every
pass, which equals this without pondering).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from twotower_jax import errors
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import gates
from twotower_jax.model import layers
from twotower_jax.model import lm as lm_lib
from twotower_jax.model import towers

CO_LLM_RULES = ('off', 'argmax', 'threshold')


class DecodeError(errors.UserError):
  """A model or setting that cannot generate; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How tokens are chosen (hashable: a static argument of the jitted loop).

  temperature 0 is greedy; top_k 0 and top_p 1 are off. co_llm (latent gate only):
  'argmax' draws each token from the tower the gate's prior ranks first; 'threshold'
  from `co_llm_tower` when its prior exceeds `co_llm_threshold` (Co-LLM's deferral),
  else from the most likely other tower. `cached=False` re-runs the full forward.
  """
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  co_llm: str = 'off'
  co_llm_tower: int = 1
  co_llm_threshold: float = 0.5
  stop_at_eos: bool = True
  cached: bool = True


def check(cfg: layers.ModelConfig, sampling: Sampling) -> None:
  """Raises DecodeError (one line) for a model that is not a left-to-right generator or
  settings out of range."""
  if not towers.get(cfg.tower_type).left_to_right:
    raise DecodeError(f'model.tower_type={cfg.tower_type} is not a left-to-right generator (each '
                      'position reads tokens on both sides of it), so it cannot generate text; '
                      'use a run with left-to-right towers, e.g. causal')
  s = sampling
  if s.max_new_tokens < 1:
    raise DecodeError(f'--max_new_tokens={s.max_new_tokens} must be >= 1')
  if not 0 <= s.temperature < float('inf'):
    raise DecodeError(f'--temperature={s.temperature} must be a finite number >= 0 (0 = greedy)')
  if s.top_k < 0:
    raise DecodeError(f'--top_k={s.top_k} must be >= 0 (0 = off)')
  if not 0.0 < s.top_p <= 1.0:
    raise DecodeError(f'--top_p={s.top_p} must be in (0, 1] (1 = off)')
  if s.co_llm not in CO_LLM_RULES:
    raise DecodeError(f'--co_llm={s.co_llm!r} is unknown; choose one of {list(CO_LLM_RULES)}')
  if s.co_llm != 'off':
    if not gates.get(cfg.gate).mixture:
      raise DecodeError(f'--co_llm needs a mixture gate (model.gate=latent), this run has '
                        f'model.gate={cfg.gate}; use --co_llm=off')
    if not 0 <= s.co_llm_tower < cfg.n_towers or not 0.0 <= s.co_llm_threshold <= 1.0:
      raise DecodeError(f'--co_llm_tower={s.co_llm_tower} must name one of the {cfg.n_towers} '
                        f'towers (0..{cfg.n_towers - 1}) and --co_llm_threshold='
                        f'{s.co_llm_threshold} be in [0, 1]')


def uses_cache(cfg: layers.ModelConfig, sampling: Sampling) -> bool:
  return sampling.cached and bool(lm_lib.cache_spec(cfg, 1))


def init_cache(cfg: layers.ModelConfig, batch: int) -> dict[str, dict[str, jax.Array]]:
  """The empty cache for `batch` rows, in the towers' compute dtype (lm.cache_spec)."""
  dtype = layers.compute_dtype(cfg)
  return lm_lib.constrain_cache(cfg, {
      p: {name: jnp.zeros(shape, dtype) for name, (shape, _) in arrays.items()}
      for p, arrays in lm_lib.cache_spec(cfg, batch).items()})


def step(model: lm_lib.TwoTowerLM, params: Any, cache: dict[str, dict[str, jax.Array]],
         tokens_BxS: jax.Array, positions_BxS: jax.Array) -> dict[str, jax.Array]:
  """The decode step: the model's outputs at S new positions of each row (logits_BxSxV,
  tower_states_NxBxSxH, the gate's extras) and the updated `cache`. Pure; jit it."""
  return model.apply({'params': params}, tokens_BxS, cache=cache, positions_BxL=positions_BxS)


def at_positions(out: dict[str, jax.Array], index_B: jax.Array) -> dict[str, jax.Array]:
  """What choosing and attributing a token needs, at position index_B[b] of each row."""
  rows_B = jnp.arange(index_B.shape[0])
  res = {'logits_BxV': out['logits_BxLxV'][rows_B, index_B].astype(jnp.float32),
         'h_NxBxH': out['tower_states_NxBxLxH'][:, rows_B, index_B]}
  if 'gate_log_weights_NxBxL' in out:
    res['log_pi_NxB'] = out['gate_log_weights_NxBxL'][:, rows_B, index_B]
    res['tower_logits_NxBxV'] = out['tower_logits_NxBxLxV'][:, rows_B, index_B]
  return res


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """-inf outside the top_k most likely tokens and outside the nucleus: the fewest most
  likely tokens whose probability reaches top_p (the most likely one always stays)."""
  if top_k:
    kth_Bx1 = lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely ones
    cut_Bx1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), -1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cut_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def choose(keys_B: jax.Array, index: jax.Array, logits_BxV: jax.Array,
           sampling: Sampling) -> jax.Array:
  """token_B: argmax (temperature 0) or a draw from softmax(filtered logits / temperature),
  row b with its own key folded with the token index (independent of the batch)."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p)
  draw = lambda key, logits_V: jax.random.categorical(jax.random.fold_in(key, index), logits_V)
  return jax.vmap(draw)(keys_B, logits_BxV).astype(jnp.int32)


def co_llm_towers(log_pi_NxB: jax.Array, sampling: Sampling) -> jax.Array:
  """tower_B: the tower whose own distribution writes the next token (Co-LLM decoding)."""
  if sampling.co_llm == 'argmax':
    return jnp.argmax(log_pi_NxB, axis=0)
  k = sampling.co_llm_tower
  others_B = jnp.argmax(log_pi_NxB.at[k].set(-jnp.inf), axis=0)
  return jnp.where(jnp.exp(log_pi_NxB[k]) > sampling.co_llm_threshold, k, others_B)


def ablation_drops(model: lm_lib.TwoTowerLM, params: Any, h_NxBxH: jax.Array, mu_NxH: jax.Array,
                   tokens_B: jax.Array, logp_B: jax.Array) -> jax.Array:
  """drop_BxN: log p(token) minus log p(token) with tower k's state replaced by mu_k (the
  gate run once on N copies of the batch, copy k ablating tower k)."""
  n, b, _ = h_NxBxH.shape
  ablate_NxNx1x1 = jnp.eye(n, dtype=bool)[:, :, None, None]  # [copy k, tower j]: j == k
  h_NxNxBxH = jnp.where(ablate_NxNx1x1, mu_NxH[None, :, None, :].astype(h_NxBxH.dtype),
                        h_NxBxH[None])
  h_NxKBx1xH = jnp.moveaxis(h_NxNxBxH, 1, 0).reshape(n, n * b, 1, -1)
  logits_KBxV = lm_lib.apply_gate(model, params, h_NxKBx1xH)['logits_BxLxV'][:, 0]
  logp_KBxV = jax.nn.log_softmax(logits_KBxV.astype(jnp.float32), -1)
  ablated_NxB = jnp.take_along_axis(logp_KBxV, jnp.tile(tokens_B, n)[:, None], -1).reshape(n, b)
  return (logp_B[None] - ablated_NxB).T


def _pick(model, params, at, keys_B, index, done_B, room_B, mu_NxH, sampling):
  """Chooses token `index` of each row and what the token view records about it."""
  rows_B = jnp.arange(done_B.shape[0])
  logp_BxV = jax.nn.log_softmax(at['logits_BxV'], axis=-1)
  dist_BxV = logp_BxV
  rec = {}
  if 'log_pi_NxB' in at:
    tower_logp_NxBxV = jax.nn.log_softmax(at['tower_logits_NxBxV'].astype(jnp.float32), -1)
    if sampling.co_llm != 'off':
      tower_B = co_llm_towers(at['log_pi_NxB'], sampling)
      dist_BxV = tower_logp_NxBxV[tower_B, rows_B]
      rec['tower_B'] = tower_B
  token_B = choose(keys_B, index, dist_BxV, sampling)
  valid_B = ~done_B & (room_B > index)
  token_B = jnp.where(valid_B, token_B, tokenizer_lib.PAD_ID)
  rec.update(token_B=token_B, valid_B=valid_B, logp_B=logp_BxV[rows_B, token_B])
  if 'log_pi_NxB' in at:
    rec['prior_BxN'] = jnp.exp(at['log_pi_NxB']).T
    rec['posterior_BxN'] = gates.latent_posteriors(
        at['tower_logits_NxBxV'][:, :, None], at['log_pi_NxB'][:, :, None], token_B[:, None])[
            :, :, 0].T
  elif mu_NxH is not None:
    rec['drop_BxN'] = ablation_drops(model, params, at['h_NxBxH'], mu_NxH, token_B, rec['logp_B'])
  stop_B = ~valid_B | (sampling.stop_at_eos & (token_B == tokenizer_lib.EOS_ID))
  return token_B, done_B | stop_B, rec


def generate(params: Any, prompt_BxP: jax.Array, lengths_B: jax.Array, keys_B: jax.Array,
             mu_NxH: jax.Array | None = None, *, model: lm_lib.TwoTowerLM,
             sampling: Sampling) -> dict[str, jax.Array]:
  """Continues each row's prompt (its first lengths_B[b] tokens, 1 <= length <= max_len).

  Returns per new token m (BxM, M = max_new_tokens): `token_BxM` (PAD where not
  generated), `valid_BxM`, `logp_BxM`, and `prior_BxMxN`/`posterior_BxMxN` (mixture
  gate), `tower_BxM` (Co-LLM) or `drop_BxMxN` (given mu_NxH). `keys_B`: one PRNG key
  per row. Pure; jit it with `model` and `sampling` static.
  """
  cfg = model.cfg
  b, p = prompt_BxP.shape
  if p > cfg.max_len:
    raise ValueError(f'prompts of {p} tokens do not fit model.max_len={cfg.max_len}')
  rows_B = jnp.arange(b)
  lengths_B = lengths_B.astype(jnp.int32)
  room_B = cfg.max_len + 1 - lengths_B  # tokens that still fit: positions up to max_len
  cached = uses_cache(cfg, sampling)
  if cached:
    positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = step(model, params, init_cache(cfg, b), prompt_BxP, positions_BxP)
    state = out['cache']
  else:  # the baseline: every new token re-runs the model over a max_len buffer
    state = jnp.zeros((b, cfg.max_len), jnp.int32).at[:, :p].set(prompt_BxP)
    out = model.apply({'params': params}, state)
  pick = lambda at, index, done_B: _pick(model, params, at, keys_B, index, done_B, room_B,
                                         mu_NxH, sampling)
  token_B, done_B, rec = pick(at_positions(out, lengths_B - 1), 0, jnp.zeros((b,), bool))
  m = sampling.max_new_tokens
  records = {name: jnp.zeros((b, m) + x.shape[1:], x.dtype).at[:, 0].set(x)
             for name, x in rec.items()}

  def body(carry):
    index, state, token_B, done_B, records = carry
    position_B = jnp.minimum(lengths_B + index - 1, cfg.max_len - 1)  # where token_B goes
    if cached:
      out = step(model, params, state, token_B[:, None], position_B[:, None])
      state, at = out['cache'], at_positions(out, jnp.zeros_like(position_B))
    else:
      state = state.at[rows_B, position_B].set(token_B)
      at = at_positions(model.apply({'params': params}, state), position_B)
    token_B, done_B, rec = pick(at, index, done_B)
    records = {name: records[name].at[:, index].set(x) for name, x in rec.items()}
    return index + 1, state, token_B, done_B, records

  carry = (jnp.ones((), jnp.int32), state, token_B, done_B, records)
  _, _, _, _, records = lax.while_loop(lambda c: (c[0] < m) & ~jnp.all(c[3]), body, carry)
  return {name.replace('_B', '_BxM', 1): x for name, x in records.items()}
