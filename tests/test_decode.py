"""Cached decoding (model/decode.py): the cache reproduces the full forward at every position,
for every gate, tower count, pondering and layer layout; the sampling loop, its stopping
rules, Co-LLM choice and per-token attribution."""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _family
from twotower_jax import errors
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import decode
from twotower_jax.model import gates
from twotower_jax.model import layers
from twotower_jax.model import lm as lm_lib
from twotower_jax.model import towers

MAX_LEN = 10
LENGTHS = np.array([3, 1, 5])  # prompt lengths of the three rows (right-padded to 5)


def _model(**kw):
  return _family.tiny_model(**{'max_len': MAX_LEN, **kw})


PER_POSITION = ('logits_BxLxV', 'tower_states_NxBxLxH', 'tower_logits_NxBxLxV',
                'gate_log_weights_NxBxL')


def _b_l_first(name, x):
  """x as float32 with its batch and length axes first (read from the name's shape suffix)."""
  dims = name.rsplit('_', 1)[1].split('x')
  return np.moveaxis(np.asarray(x, np.float32), [dims.index('B'), dims.index('L')], [0, 1])


def _cached_outputs(model, params, tokens_BxT):
  """Teacher-forced through the cache: a prefill of each row's prompt (the padding beyond it
  holds other tokens, which must not leak), then one token per step at each row's own
  position. Returns each output at every position, batch and length axes first."""
  b, t = tokens_BxT.shape
  p = int(LENGTHS.max())
  garbage_BxP = jnp.asarray(_family.tokens((b, p), seed=9))
  prompt_BxP = jnp.where(jnp.arange(p)[None] < LENGTHS[:, None], tokens_BxT[:, :p], garbage_BxP)
  step = jax.jit(functools.partial(decode.step, model))
  out = step(params, decode.init_cache(model.cfg, b), prompt_BxP,
             jnp.broadcast_to(jnp.arange(p), (b, p)))
  names = [n for n in PER_POSITION if n in out]
  got = {n: np.full((b, t) + _b_l_first(n, out[n]).shape[2:], np.nan, np.float32) for n in names}
  for n in names:
    x = _b_l_first(n, out[n])
    for r, length in enumerate(LENGTHS):
      got[n][r, :length] = x[r, :length]
  cache = out['cache']
  for i in range(t - LENGTHS.min()):
    position_B = np.minimum(LENGTHS + i, t - 1)  # a row at the end re-feeds its last token
    out = step(params, cache, tokens_BxT[np.arange(b), position_B][:, None], position_B[:, None])
    cache = out['cache']
    for n in names:
      x = _b_l_first(n, out[n])
      for r in range(b):
        if LENGTHS[r] + i < t:
          got[n][r, LENGTHS[r] + i] = x[r, 0]
  return got


CASES = [
    dict(gate='concat', n_towers=1),
    dict(gate='concat', n_towers=2, scan_layers=True, n_layers=2),
    dict(gate='concat', n_towers=2, scan_layers=True, n_layers=2, scan_unroll=2),  # tiny.py's
    dict(gate='latent', n_towers=2, **{'embedding.mode': 'per_tower'}),
    dict(gate='logit_sum', n_towers=3, **{'embedding.mode': 'projected'}),
    dict(gate='concat', n_towers=2, n_layers=2, **{'pondering.steps': 2}),
    dict(gate='latent', n_towers=3, scan_layers=True, remat=True, **{'pondering.steps': 1}),
    dict(gate='logit_sum', n_towers=2, **{'pondering.steps': 1, 'embedding.tied': False}),
    dict(gate='latent', n_towers=2, **{  # PonderingLM's options (test_pondering_options.py)
        'pondering.steps': 2, 'pondering.embed_scale': 'sqrt_d', 'pondering.per_tower': True,
        'pondering.initial_weight': 'steps', 'pondering.init_std_scale': 'passes'}),
]


@pytest.mark.parametrize('kw', CASES, ids=lambda kw: '-'.join(f'{k}={v}' for k, v in kw.items()))
def test_cached_decode_equals_the_full_forward_at_every_position(kw):
  model = _model(**kw)
  params = _family.init(model)
  tokens_BxT = _family.tokens((3, MAX_LEN), seed=3)
  full = _apply(model, params, tokens_BxT)
  got = _cached_outputs(model, params, tokens_BxT)
  assert 'logits_BxLxV' in got and 'tower_states_NxBxLxH' in got
  assert ('gate_log_weights_NxBxL' in got) == (kw['gate'] == 'latent')
  for name, x in got.items():
    np.testing.assert_allclose(x, _b_l_first(name, full[name]), rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_bf16_cached_decode_tracks_the_full_forward():
  model = _model(gate='latent', dtype='bfloat16', **{'pondering.steps': 1})
  params = _family.init(model)
  tokens_BxT = _family.tokens((3, MAX_LEN), seed=3)
  assert decode.init_cache(model.cfg, 3)['pass_1']['k_0'].dtype == jnp.bfloat16
  full = _apply(model, params, tokens_BxT)['logits_BxLxV']
  got = _cached_outputs(model, params, tokens_BxT)['logits_BxLxV']
  np.testing.assert_allclose(got, np.asarray(full, np.float32), atol=0.05)


_jit_generate = jax.jit(decode.generate, static_argnames=('model', 'sampling'))
_jit_apply = jax.jit(lambda model, params, tokens_BxL: model.apply({'params': params}, tokens_BxL),
                     static_argnums=0)


def _generate(model, params, sampling, prompt_BxP=None, lengths_B=LENGTHS, seed=0, mu_NxH=None):
  if prompt_BxP is None:
    prompt_BxP = _family.tokens((len(lengths_B), int(np.max(lengths_B))), seed=4)
  keys_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
      jnp.arange(len(lengths_B)))
  return jax.device_get(_jit_generate(params, prompt_BxP, jnp.asarray(lengths_B), keys_B, mu_NxH,
                                      model=model, sampling=sampling))


def _apply(model, params, tokens_BxL):
  return jax.device_get(_jit_apply(model, params, tokens_BxL))


@pytest.mark.parametrize('gate', ['concat', 'latent', 'logit_sum'])
def test_greedy_is_deterministic_and_the_cache_changes_nothing(gate):
  model = _model(gate=gate, **{'pondering.steps': 1})
  params = _family.init(model)
  mu_NxH = jnp.full((2, 16), 0.1)
  greedy = decode.Sampling(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
  a = _generate(model, params, greedy, mu_NxH=mu_NxH)
  b = _generate(model, params, greedy, mu_NxH=mu_NxH, seed=5)  # the seed plays no part
  full = _generate(model, params, dataclasses.replace(greedy, cached=False), mu_NxH=mu_NxH)
  np.testing.assert_array_equal(a['token_BxM'], b['token_BxM'])
  np.testing.assert_array_equal(a['token_BxM'], full['token_BxM'])
  for name in a:
    np.testing.assert_allclose(np.asarray(a[name], float), np.asarray(full[name], float),
                               atol=1e-5, err_msg=name)
  # the window: a row continues until its last token sits at position max_len
  np.testing.assert_array_equal(a['valid_BxM'].sum(1), np.minimum(8, MAX_LEN + 1 - LENGTHS))


def test_a_row_draws_the_same_alone_or_in_a_batch_and_seeds_differ():
  model = _model()
  params = _family.init(model)
  s = decode.Sampling(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9)
  prompt_BxP = _family.tokens((3, 5), seed=4)
  both = _generate(model, params, s, prompt_BxP)
  again = _generate(model, params, s, prompt_BxP)
  alone = _generate(model, params, s, prompt_BxP[:1], lengths_B=LENGTHS[:1])
  other = _generate(model, params, s, prompt_BxP, seed=1)
  np.testing.assert_array_equal(both['token_BxM'], again['token_BxM'])
  np.testing.assert_array_equal(both['token_BxM'][:1], alone['token_BxM'])
  assert not np.array_equal(both['token_BxM'], other['token_BxM'])


def test_a_row_stops_after_eos_and_padding_follows():
  model = _model()
  params = _family.init(model)
  bias = params['embed']['output_bias'].at[tokenizer_lib.EOS_ID].set(50.0)
  params = dict(params, embed=dict(params['embed'], output_bias=bias))
  s = decode.Sampling(max_new_tokens=4, temperature=1.0)
  out = _generate(model, params, s)
  np.testing.assert_array_equal(out['valid_BxM'], [[True, False, False, False]] * 3)
  np.testing.assert_array_equal(out['token_BxM'][:, 0], tokenizer_lib.EOS_ID)
  np.testing.assert_array_equal(out['token_BxM'][:, 1:], tokenizer_lib.PAD_ID)
  on = _generate(model, params, dataclasses.replace(s, stop_at_eos=False))
  assert on['valid_BxM'].all() and (on['token_BxM'] == tokenizer_lib.EOS_ID).all()


def test_top_k_and_top_p_keep_the_right_tokens():
  logits_1xV = jnp.log(jnp.asarray([[0.05, 0.4, 0.3, 0.15, 0.1]]))
  kept = lambda k, p: np.isfinite(np.asarray(decode.filter_logits(logits_1xV, k, p)))[0]
  np.testing.assert_array_equal(kept(2, 1.0), [False, True, True, False, False])
  np.testing.assert_array_equal(kept(0, 0.4), [False, True, False, False, False])
  np.testing.assert_array_equal(kept(0, 0.41), [False, True, True, False, False])
  np.testing.assert_array_equal(kept(0, 0.85), [False, True, True, True, False])
  np.testing.assert_array_equal(kept(0, 1.0), [True] * 5)
  np.testing.assert_array_equal(kept(3, 0.5), [False, True, True, False, False])
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  draws = jax.vmap(lambda k: decode.choose(k[None], 0, logits_1xV, decode.Sampling(top_k=1)))(keys)
  assert (np.asarray(draws) == 1).all()  # top_k=1 is greedy whatever the key


def test_co_llm_tower_choice():
  log_pi_NxB = jnp.log(jnp.asarray([[0.7, 0.3, 0.1], [0.2, 0.6, 0.3], [0.1, 0.1, 0.6]]))
  argmax = decode.Sampling(co_llm='argmax')
  np.testing.assert_array_equal(decode.co_llm_towers(log_pi_NxB, argmax), [0, 1, 2])
  defer = decode.Sampling(co_llm='threshold', co_llm_tower=1, co_llm_threshold=0.5)
  # tower 1 when its prior exceeds 0.5, else the most likely of the others
  np.testing.assert_array_equal(decode.co_llm_towers(log_pi_NxB, defer), [0, 1, 2])
  low = decode.Sampling(co_llm='threshold', co_llm_tower=1, co_llm_threshold=0.25)
  np.testing.assert_array_equal(decode.co_llm_towers(log_pi_NxB, low), [0, 1, 1])


def test_co_llm_draws_from_the_chosen_towers_own_distribution():
  model = _model(gate='latent', n_towers=3)
  params = _family.init(model)
  s = decode.Sampling(max_new_tokens=6, temperature=0.0, co_llm='argmax', stop_at_eos=False)
  out = _generate(model, params, s)
  full = _apply(model, params, _sequences(out))
  for r, length in enumerate(LENGTHS):
    for m in range(int(out['valid_BxM'][r].sum())):
      at = length - 1 + m
      tower = int(np.argmax(full['gate_log_weights_NxBxL'][:, r, at]))
      assert out['tower_BxM'][r, m] == tower
      assert out['token_BxM'][r, m] == int(np.argmax(full['tower_logits_NxBxLxV'][tower, r, at]))


def _sequences(out, prompt_seed=4):
  """Each row's prompt and continuation in a max_len buffer (as _generate built them)."""
  prompt_BxP = np.asarray(_family.tokens((len(LENGTHS), int(LENGTHS.max())), seed=prompt_seed))
  seq_BxT = np.zeros((len(LENGTHS), MAX_LEN), np.int32)
  for r, length in enumerate(LENGTHS):
    seq_BxT[r, :length] = prompt_BxP[r, :length]
    n = min(int(out['valid_BxM'][r].sum()), MAX_LEN - length)
    seq_BxT[r, length:length + n] = out['token_BxM'][r, :n]
  return jnp.asarray(seq_BxT)


@pytest.mark.parametrize('gate', ['concat', 'latent', 'logit_sum'])
def test_attribution_equals_the_full_forward_and_the_ablation_estimator(gate):
  model = _model(gate=gate)
  params = _family.init(model)
  mu_NxH = jax.random.normal(jax.random.PRNGKey(3), (2, 16))
  s = decode.Sampling(max_new_tokens=5, temperature=1.0, stop_at_eos=False)
  out = _generate(model, params, s, mu_NxH=mu_NxH)
  seq_BxT = _sequences(out)
  logp = lambda o: np.asarray(jax.nn.log_softmax(o['logits_BxLxV'], -1))
  full = _apply(model, params, seq_BxT)
  ablate = jax.jit(lambda params, k: model.apply(
      {'params': params}, seq_BxT, states_fn=lambda h: h.at[k].set(mu_NxH[k][None, None])),
                   static_argnums=1)
  ablated = [jax.device_get(ablate(params, k)) for k in range(2)]
  for r, length in enumerate(LENGTHS):
    for m in range(int(out['valid_BxM'][r].sum()) - 1):  # the last token is never read
      at, tok = length - 1 + m, int(out['token_BxM'][r, m])
      assert tok == int(seq_BxT[r, at + 1])
      np.testing.assert_allclose(out['logp_BxM'][r, m], logp(full)[r, at, tok], atol=1e-5)
      if gates.get(gate).mixture:
        log_pi_N = full['gate_log_weights_NxBxL'][:, r, at]
        np.testing.assert_allclose(out['prior_BxMxN'][r, m], np.exp(log_pi_N), atol=1e-5)
        post_N = gates.latent_posteriors(full['tower_logits_NxBxLxV'][:, r:r + 1, at:at + 1],
                                         full['gate_log_weights_NxBxL'][:, r:r + 1, at:at + 1],
                                         jnp.asarray([[tok]]))[:, 0, 0]
        np.testing.assert_allclose(out['posterior_BxMxN'][r, m], post_N, atol=1e-5)
      else:
        want_N = [logp(full)[r, at, tok] - logp(a)[r, at, tok] for a in ablated]
        np.testing.assert_allclose(out['drop_BxMxN'][r, m], want_N, atol=1e-5)
  assert ('drop_BxMxN' in out) == (not gates.get(gate).mixture)


def test_apply_gate_is_the_models_own_gate():
  model = _model(gate='latent')
  params = _family.init(model)
  full = _apply(model, params, _family.tokens((2, MAX_LEN)))
  alone = jax.jit(functools.partial(lm_lib.apply_gate, model))(params,
                                                               full['tower_states_NxBxLxH'])
  np.testing.assert_allclose(alone['logits_BxLxV'], full['logits_BxLxV'], atol=1e-6)


@pytest.mark.parametrize('kw, message', [
    (dict(tower_type='mlm'), 'model.tower_type=mlm is not a left-to-right generator'),
    (dict(tower_type='bilstm'), 'model.tower_type=bilstm is not a left-to-right generator'),
    (dict(temperature=-0.5), '--temperature=-0.5 must be a finite number >= 0'),
    (dict(temperature=float('inf')), '--temperature=inf must be a finite number >= 0'),
    (dict(top_p=0.0), '--top_p=0.0 must be in (0, 1]'),
    (dict(top_p=1.5), '--top_p=1.5 must be in (0, 1]'),
    (dict(top_k=-1), '--top_k=-1 must be >= 0'),
    (dict(co_llm='argmax'), '--co_llm needs a mixture gate'),
    (dict(gate='latent', co_llm='threshold', co_llm_tower=2), '--co_llm_tower=2 must name one'),
])
def test_check_refuses_with_one_line(kw, message):
  model_kw = {k: kw.pop(k) for k in ('tower_type', 'gate') if k in kw}
  cfg = layers.model_config(vocab_size=40, **model_kw)
  with pytest.raises(errors.UserError) as e:
    decode.check(cfg, decode.Sampling(**kw))
  assert message in str(e.value) and '\n' not in str(e.value)


def test_the_refusal_reads_the_registry_not_the_type_name():
  base = towers.get('causal')
  towers.register('toy_right_to_left', base.module, base.make_example)  # left_to_right=False
  try:
    cfg = layers.model_config(vocab_size=40, tower_type='toy_right_to_left')
    with pytest.raises(decode.DecodeError, match='not a left-to-right generator'):
      decode.check(cfg, decode.Sampling())
  finally:
    towers.TOWER_TYPES.pop('toy_right_to_left')


@pytest.fixture
def toy_tower_and_gate():
  """The extension test's left-to-right toy tower (no decode cache) and toy gate."""
  for module in ('bigram_tower', 'mean_gate'):
    importlib.reload(importlib.import_module(f'toy_parts.{module}'))
  yield
  towers.TOWER_TYPES.pop('toy_bigram')
  gates.GATES.pop('toy_mean')


def test_a_tower_type_without_a_cache_generates_by_recomputation(toy_tower_and_gate):
  del toy_tower_and_gate
  model = _model(tower_type='toy_bigram', gate='toy_mean')
  params = _family.init(model)
  s = decode.Sampling(max_new_tokens=5, temperature=0.0, stop_at_eos=False)
  assert not decode.uses_cache(model.cfg, s)
  out = _generate(model, params, s, mu_NxH=jnp.zeros((2, 16)))
  full = _apply(model, params, _sequences(out))['logits_BxLxV']
  for r, length in enumerate(LENGTHS):
    np.testing.assert_array_equal(out['token_BxM'][r, 0], np.argmax(full[r, length - 1]))
  assert out['drop_BxMxN'].shape == (3, 5, 2)


def test_on_a_mesh_with_a_tower_axis_the_cache_is_sharded_and_the_samples_unchanged():
  """Under the training rules (4 data x 2 tower devices) the cache lives split by tower and
  batch row, and generation writes what it writes on one device."""
  from twotower_jax.model import partitioning  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import optimizer, sharding, state  # pylint: disable=g-import-not-at-top
  config = _family.step_config(gate='latent', **{'pondering.steps': 1})
  model = lm_lib.build(config, _family.VOCAB)
  mesh, rules = sharding.make_mesh(config), sharding.rules(config)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'tower': 2}
  tx = optimizer.make(config)
  params = state.create_sharded(model, tx, 0, state.shardings(model, tx, mesh, rules)).params
  batch_sh = sharding.batch_sharding(mesh, rules)
  prompt_BxP = jax.device_put(np.asarray(_family.tokens((4, 3), seed=4)), batch_sh)
  lengths_B = jax.device_put(np.array([3, 1, 2, 3], np.int32), batch_sh)
  positions_BxP = jax.device_put(np.tile(np.arange(3, dtype=np.int32), (4, 1)), batch_sh)
  prefill = jax.jit(partitioning.with_rules(
      lambda p, t, pos: decode.step(model, p, decode.init_cache(model.cfg, 4), t, pos)['cache'],
      mesh, rules))
  cache = prefill(params, prompt_BxP, positions_BxP)
  k_sharding = cache['pass_1']['k_0'].sharding  # k_NxMxDxT
  shape = cache['pass_1']['k_0'].shape
  assert shape[:2] == (2, 8)  # 2 towers, 4 rows x 2 heads
  assert k_sharding.shard_shape(shape) == (1, 2) + shape[2:]  # split by tower and batch row
  s = decode.Sampling(max_new_tokens=5, temperature=1.0, top_k=10)
  keys_B = jax.device_put(np.asarray(jax.vmap(jax.random.PRNGKey)(jnp.arange(4))), batch_sh)
  sharded = jax.jit(partitioning.with_rules(
      functools.partial(decode.generate, model=model, sampling=s), mesh, rules))(
          params, prompt_BxP, lengths_B, keys_B)
  plain = _jit_generate(jax.device_get(params), np.asarray(prompt_BxP), np.asarray(lengths_B),
                        np.asarray(keys_B), model=model, sampling=s)
  np.testing.assert_array_equal(sharded['token_BxM'], plain['token_BxM'])
  np.testing.assert_allclose(sharded['posterior_BxMxN'], plain['posterior_BxMxN'], atol=1e-5)


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_the_whole_generation_loop_lowers_for_accelerators_without_host_calls(platform):
  """decode.generate (prefill, while_loop, sampling, Co-LLM, attribution) exports for the
  platform; jax.export and lowering.check refuse host callbacks and CPU-only ops."""
  from twotower_jax.train import lowering  # pylint: disable=g-import-not-at-top
  model = _model(gate='latent', dtype='bfloat16', **{'pondering.steps': 1})
  params = jax.eval_shape(lambda: _family.init(model))
  s = decode.Sampling(max_new_tokens=4, top_k=5, top_p=0.9, co_llm='threshold')
  fn = jax.jit(functools.partial(decode.generate, model=model, sampling=s))
  b = jax.ShapeDtypeStruct((3,), jnp.int32)
  exported = lowering.export(fn, platform, params, jax.ShapeDtypeStruct((3, 5), jnp.int32), b,
                             jax.ShapeDtypeStruct((3, 2), jnp.uint32))
  assert 'stablehlo.while' in exported.mlir_module()
