"""The original BERT/ELMo variants' parts (docs/FIDELITY.md B1-B4), each switch against the
original's definition (hezq06/twotower_lm, ttlm/model.py: TwoTowerDsBert, TwoTowerELMo):

- B1 `model.embedding.ln`: a LayerNorm (BertLayerNorm, eps 1e-12) on the looked-up N*H row
  (BERT: token + position, one `ln_emb`; ELMo: one per direction) before tower k's Linear;
- B2 `model.head.width='table'`: LN(concat) -> Dense to the table's width -> GELU -> LN,
  scored against the N*H table directly (no out_proj);
- B3 `model.ln_final=False`: the towers end without a LayerNorm;
- B4 `model.bilstm.{hidden,residual,join}`, `model.embedding.positions=False`: ELMo's LSTMs
  (2 layers of width G per direction, h2o G -> H, no residual, no positions), whose
  [fwd; bwd] states go to the head as they are;
- B6 the nn.Linear projections, the row dropout, ELMo's input shift (`model.bilstm.
  input_shift`) and its dropout after the joint LN (`model.head.joint_ln_dropout`).

The ELMo reference below is the whole forward pass in numpy (float64) from that definition,
fed our parameters; the BERT reference covers the embedding and the head (its transformer
towers are the ones tests/test_fidelity.py checks). With every switch off the parameters
and logits are bit-identical to the defaults'.
"""

import math

import jax
import numpy as np
import pytest
import scipy.special

from twotower_jax import config as config_lib
from twotower_jax.model import embeddings
from twotower_jax.train import setup as setup_lib

import _family

ORIGINAL_HEAD = {'head.ln_eps': 1e-12, 'head.gelu': 'erf', 'head.init': 'torch_linear'}
ORIGINAL_INPUT = {'embedding.mode': 'projected', 'embedding.proj_init': 'torch_linear',
                  'embedding.dropout_at': 'row'}
BERT = {'tower_type': 'mlm', 'embedding.ln': 'shared', 'head.width': 'table', 'ln_final': False,
        **ORIGINAL_INPUT, **ORIGINAL_HEAD}
ELMO_G = 24  # the LSTM width (the original's 2048 / 4096); d_model 16 is the interface (256)
ELMO = {'tower_type': 'bilstm', 'n_layers': 2, **ORIGINAL_INPUT,
        'embedding.ln': 'per_direction', 'embedding.positions': False, 'head.width': 'table',
        'ln_final': False, 'bilstm.hidden': ELMO_G, 'bilstm.residual': False,
        'bilstm.join': False, **ORIGINAL_HEAD}
# B6: the original's input shift and the dropout after its joint LN on top
ELMO_SHIFTED = {**ELMO, 'bilstm.input_shift': True, 'head.joint_ln_dropout': True}


def _np(x):
  return np.asarray(x, np.float64)


def _ln(x, p, eps):
  """BertLayerNorm: biased variance, eps inside the square root."""
  x = _np(x)
  u = x.mean(-1, keepdims=True)
  s = ((x - u) ** 2).mean(-1, keepdims=True)
  return (x - u) / np.sqrt(s + eps) * _np(p['scale']) + _np(p['bias'])


def _gelu_erf(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _moved(tree, seed=0):
  """Every parameter moved off its init (LayerNorm scales off 1, biases off 0), so a missed
  or swapped one shows in the outputs."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _run(model, params, toks, **kw):
  return model.apply({'params': params}, toks, mutable=['intermediates'], **kw)


def _paths(params):
  return sorted('/'.join(str(k.key) for k in path)
                for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _joint_ln(states_NxBxLxS, g):
  return _ln(np.concatenate(list(_np(states_NxBxLxS)), axis=-1), g['ln_in'], 1e-12)


def _head_after_ln(x, g, table_VxW, bias_V):
  """The original head after its joint LN: Dense -> GELU -> LN -> F.linear(., table) + bias."""
  z = _gelu_erf(_np(x) @ _np(g['dense']['kernel']) + _np(g['dense']['bias']))
  return _ln(z, g['ln_out'], 1e-12) @ _np(table_VxW).T + _np(bias_V)


def _head_reference(states_NxBxLxS, g, table_VxW, bias_V):
  """The original head: LN([h_1; h_2]) -> Dense -> GELU -> LN -> F.linear(., table) + bias."""
  return _head_after_ln(_joint_ln(states_NxBxLxS, g), g, table_VxW, bias_V)


# --- defaults unchanged ---------------------------------------------------------------------

DEFAULT_PATHS = {
    'causal': ['embed/output_bias', 'embed/position', 'embed/token'],
    'mlm': ['embed/in_proj', 'embed/out_proj', 'embed/output_bias', 'embed/position',
            'embed/token'],
    'bilstm': ['embed/in_proj', 'embed/out_proj', 'embed/output_bias', 'embed/position',
               'embed/token'],
}
GATE_PATHS = ['gate/dense/bias', 'gate/dense/kernel', 'gate/ln_in/bias', 'gate/ln_in/scale',
              'gate/ln_out/bias', 'gate/ln_out/scale']


@pytest.mark.parametrize('tower_type', ['causal', 'mlm', 'bilstm'])
def test_defaults_keep_the_parameter_names_and_are_bit_identical_to_explicit_defaults(tower_type):
  mode = 'shared' if tower_type == 'causal' else 'projected'
  kw = dict(tower_type=tower_type, n_layers=2, **{'embedding.mode': mode})
  implicit = _family.tiny_model(**kw)
  explicit = _family.tiny_model(**kw, **{
      'embedding.ln': 'none', 'embedding.positions': True, 'head.width': 'model',
      'ln_final': True, 'bilstm.hidden': 0, 'bilstm.residual': True, 'bilstm.join': True})
  p1, p2 = _family.init(implicit), _family.init(explicit)
  paths = _paths(p1)
  assert [p for p in paths if p.startswith('embed/')] == DEFAULT_PATHS[tower_type]
  assert [p for p in paths if p.startswith('gate/')] == GATE_PATHS
  assert 'towers/ln_final/scale' in paths and 'towers/ln_final/bias' in paths
  if tower_type == 'bilstm':
    assert {'towers/join/kernel', 'towers/fwd_1/ii/kernel'} <= set(paths)
    assert not [p for p in paths if 'h2o' in p]
    assert p1['towers']['fwd_1']['hi']['kernel'].shape == (2, 16, 16)  # width d_model
  assert _paths(p2) == paths
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  toks = _family.tokens()
  np.testing.assert_array_equal(
      np.asarray(implicit.apply({'params': p1}, toks)['logits_BxLxV']),
      np.asarray(explicit.apply({'params': p1}, toks)['logits_BxLxV']))


# --- B1: the embedding LayerNorm ------------------------------------------------------------

def test_bert_embedding_ln_normalises_token_plus_position_before_each_projection():
  model = _family.tiny_model(**BERT)
  params = _moved(_family.init(model))
  e = params['embed']
  assert e['ln_emb']['scale'].shape == (32,) and e['position'].shape == (8, 32)
  toks = _family.tokens()
  _, inter = _run(model, params, toks)
  x_NxBxLxH = inter['intermediates']['towers']['tower_in'][0]
  row = _np(e['token'])[np.asarray(toks)] + _np(e['position'])[:8]
  ref = np.stack([_ln(row, e['ln_emb'], 1e-12) @ _np(e['in_proj'][k]) + _np(e['in_proj_bias'][k])
                  for k in range(2)])
  np.testing.assert_allclose(np.asarray(x_NxBxLxH), ref, atol=1e-5)
  # really normalised: an affine change of every row (table and positions) changes nothing
  shifted = jax.tree.map(lambda x: x, params)
  shifted['embed']['token'] = 3.0 * e['token'] + 0.5
  shifted['embed']['position'] = 3.0 * e['position']
  _, inter2 = _run(model, shifted, toks)
  np.testing.assert_allclose(np.asarray(inter2['intermediates']['towers']['tower_in'][0]),
                             np.asarray(x_NxBxLxH), atol=1e-5)


def test_torch_linear_projection_has_the_original_init_and_a_bias_per_tower():
  """B6: proj_init='torch_linear' makes in_proj torch's nn.Linear (U(+-1/sqrt(N*H)) weight
  and bias); with 'normal' there is no bias and the weight is N(0, 0.02)."""
  fields = {'tower_type': 'mlm', 'embedding.mode': 'projected'}
  plain = _family.init(_family.tiny_model(**fields))['embed']
  assert 'in_proj_bias' not in plain
  e = _family.init(_family.tiny_model(**fields, **{'embedding.proj_init': 'torch_linear'}))['embed']
  bound = 1.0 / math.sqrt(32)  # fan-in N*H = 2 x 16
  for name, shape in (('in_proj', (2, 32, 16)), ('in_proj_bias', (2, 16))):
    x = _np(e[name])
    assert x.shape == shape and np.abs(x).max() <= bound
    assert np.abs(x).max() > 0.9 * bound and abs(x.std() - bound / math.sqrt(3)) < 0.25 * bound
  assert abs(_np(plain['in_proj']).std() - 0.02) < 0.005
  boxed = _family.tiny_model(**fields, **{'embedding.proj_init': 'torch_linear'}).init(
      {'params': jax.random.PRNGKey(0)}, _family.tokens((1, 8)))['params']['embed']
  assert boxed['in_proj_bias'].names == ('tower', 'embed')  # sharded like in_proj's tower axis
  # the bias reaches tower k's input, and only tower k's
  model = _family.tiny_model(**fields, **{'embedding.proj_init': 'torch_linear'})
  params = _moved(_family.init(model))
  toks = _family.tokens()
  x = embeddings.Embedder(model.cfg).apply({'params': params['embed']}, toks, method='encode')
  moved = jax.tree.map(lambda v: v, params['embed'])
  moved['in_proj_bias'] = params['embed']['in_proj_bias'].at[1].add(1.0)
  x2 = embeddings.Embedder(model.cfg).apply({'params': moved}, toks, method='encode')
  np.testing.assert_array_equal(np.asarray(x[0]), np.asarray(x2[0]))
  np.testing.assert_allclose(np.asarray(x2[1] - x[1]), 1.0, atol=1e-5)


@pytest.mark.parametrize('fields', [BERT, ELMO], ids=['bert', 'elmo'])
def test_row_dropout_is_one_mask_before_the_projections(fields):
  """B6: dropout_at='row' drops the (normalised) table row once, before the projections,
  so towers with the same projection read the same input; 'tower' drops each tower's
  input with its own mask. ELMo's two streams get a mask each."""
  def tower_in(dropout_at):
    model = _family.tiny_model(**{**fields, 'dropout': 0.5, 'embedding.dropout_at': dropout_at})
    params = _moved(_family.init(model))
    for name in ('in_proj', 'in_proj_bias'):  # tower 1 projects exactly as tower 0
      params['embed'][name] = params['embed'][name].at[1].set(params['embed'][name][0])
    if 'ln_emb_bwd' in params['embed']:  # and both streams are normalised alike
      params['embed']['ln_emb_bwd'] = params['embed']['ln_emb_fwd']
    rngs = {'dropout': jax.random.PRNGKey(3)}
    _, inter = _run(model, params, _family.tokens(), deterministic=False, rngs=rngs)
    _, plain = _run(model, params, _family.tokens())
    return (np.asarray(inter['intermediates']['towers']['tower_in'][0]),
            np.asarray(plain['intermediates']['towers']['tower_in'][0]))
  row, clean = tower_in('row')
  np.testing.assert_array_equal(row[0], row[1])  # one mask for both towers
  assert np.abs(row - clean).max() > 0.1  # and it did drop
  if fields is ELMO:  # a mask per stream
    assert np.abs(row[..., :16] - row[..., 16:]).max() > 0.1
  per_tower, _ = tower_in('tower')
  assert np.abs(per_tower[0] - per_tower[1]).max() > 0.1


def test_elmo_embedding_has_one_ln_per_direction_each_read_by_its_own_stack():
  model = _family.tiny_model(**ELMO)
  params = _moved(_family.init(model))
  e = params['embed']
  assert 'position' not in e  # B4: no position table
  assert set(e) >= {'ln_emb_fwd', 'ln_emb_bwd'} and 'ln_emb' not in e
  toks = _family.tokens()
  x = embeddings.Embedder(model.cfg).apply({'params': e}, toks, method='encode')
  row = _np(e['token'])[np.asarray(toks)]  # no positions added
  for k in range(2):
    w, b = _np(e['in_proj'][k]), _np(e['in_proj_bias'][k])
    np.testing.assert_allclose(np.asarray(x[k, ..., :16]),
                               _ln(row, e['ln_emb_fwd'], 1e-12) @ w + b, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x[k, ..., 16:]),
                               _ln(row, e['ln_emb_bwd'], 1e-12) @ w + b, atol=1e-5)
  # the backward norm reaches the backward stack only
  _, inter = _run(model, params, toks)
  other = jax.tree.map(lambda x: x, params)
  other['embed']['ln_emb_bwd'] = jax.tree.map(lambda x: x + 0.3, e['ln_emb_bwd'])
  _, inter2 = _run(model, other, toks)
  t1, t2 = inter['intermediates']['towers'], inter2['intermediates']['towers']
  np.testing.assert_array_equal(np.asarray(t1['fwd'][0]), np.asarray(t2['fwd'][0]))
  assert np.abs(np.asarray(t1['bwd'][0] - t2['bwd'][0])).max() > 1e-3


# --- B2: the head as wide as the table -------------------------------------------------------

def test_bert_head_scores_the_table_directly_with_no_out_proj():
  model = _family.tiny_model(**BERT)
  params = _moved(_family.init(model))
  assert 'out_proj' not in params['embed']
  g = params['gate']
  assert g['dense']['kernel'].shape == (32, 32)  # N*H -> N*H (the original's dense_act)
  assert g['ln_out']['scale'].shape == (32,)
  out = model.apply({'params': params}, _family.tokens())
  ref = _head_reference(out['tower_states_NxBxLxH'], g, params['embed']['token'],
                        params['embed']['output_bias'])
  np.testing.assert_allclose(np.asarray(out['logits_BxLxV']), ref, atol=2e-5)


def test_table_head_alone_changes_only_the_head():
  """head.width='table' with the other defaults: the default towers and embedding, the
  head Dense to N*H, no out_proj."""
  base = dict(tower_type='mlm', **{'embedding.mode': 'projected'})
  p_default = _family.init(_family.tiny_model(**base))
  p_table = _family.init(_family.tiny_model(**base, **{'head.width': 'table'}))
  assert set(p_default['embed']) - set(p_table['embed']) == {'out_proj'}
  assert p_table['gate']['dense']['kernel'].shape == (32, 32)
  for a, b in zip(jax.tree.leaves(p_default['towers']), jax.tree.leaves(p_table['towers'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- B3: no per-tower final LayerNorm --------------------------------------------------------

@pytest.mark.parametrize('tower_type,scan', [('causal', False), ('mlm', True), ('bilstm', False)])
def test_ln_final_off_removes_the_parameter_and_the_norm(tower_type, scan):
  kw = dict(tower_type=tower_type, n_layers=2, scan_layers=scan)
  if tower_type != 'causal':
    kw['embedding.mode'] = 'projected'
  model = _family.tiny_model(**kw, ln_final=False)
  params = _family.init(model)
  assert 'ln_final' not in params['towers']
  with_ln = _family.init(_family.tiny_model(**kw))
  assert set(with_ln['towers']) - set(params['towers']) == {'ln_final'}
  params = _moved(params)
  out, inter = _run(model, params, _family.tokens())
  h = np.asarray(out['tower_states_NxBxLxH'])
  t = inter['intermediates']['towers']
  if tower_type == 'bilstm':  # the join's output as it is
    fwd, bwd = _np(t['fwd'][0]), _np(t['bwd'][0])
    zero = np.zeros_like(fwd[:, :, :1])
    joined = np.concatenate([np.concatenate([zero, fwd[:, :, :-1]], 2),
                             np.concatenate([bwd[:, :, 1:], zero], 2)], -1)
    j = params['towers']['join']
    ref = np.einsum('nbls,nsh->nblh', joined, _np(j['kernel'])) + _np(j['bias'])[:, None, None]
    np.testing.assert_allclose(h, ref, atol=1e-5)
  else:  # the last block's output as it is
    last = t['blocks']['block_out'][0][:, -1] if scan else t['block_1']['block_out'][0]
    np.testing.assert_array_equal(h, np.asarray(last))
  assert np.abs(h.std(-1) - 1.0).max() > 0.05  # not normalised


# --- B4: the original ELMo towers, and the whole ELMo forward pass --------------------------

def _lstm(p, k, x_BxLxI, reverse):
  """torch.nn.LSTM's (and flax LSTMCell's) recurrence, zero initial state, tower k's weights."""
  w = lambda name, part: _np(p[name][part][k])  # noqa: E731
  b_, length, _ = x_BxLxI.shape
  g = w('hi', 'kernel').shape[0]
  h, c = np.zeros((b_, g)), np.zeros((b_, g))
  out = np.zeros((b_, length, g))
  for t in (range(length - 1, -1, -1) if reverse else range(length)):
    a = {n: x_BxLxI[:, t] @ w('i' + n, 'kernel') + h @ w('h' + n, 'kernel') + w('h' + n, 'bias')
         for n in 'ifgo'}
    c = _sigmoid(a['f']) * c + _sigmoid(a['i']) * np.tanh(a['g'])
    h = _sigmoid(a['o']) * np.tanh(c)
    out[:, t] = h
  return out


def original_elmo_logits(params, tokens_BxL, input_shift=False):
  """TwoTowerELMo phase 1 from its definition, on our parameters: per direction
  LN(E[x]) -> tower k's Linear 2H -> H (with bias) -> 2-layer LSTM (width G, no residual) -> h2o G -> H;
  LN([f_1; b_1; f_2; b_2]) -> Dense 4H -> 2H -> GELU -> LN -> F.linear(., E) + bias.
  input_shift=False: position t reads fwd_{t-1} and bwd_{t+1} (this project's shift, zeros
  at the ends); True: forward_tt's (`:598-602`): the forward LSTM reads [PAD, x[:-1]], the
  backward one flip(x) likewise padded, and its output is flipped back (as meant; the
  released flip_seq zeroes it, B5)."""
  e, t = params['embed'], params['towers']
  toks = np.asarray(tokens_BxL)
  pad = np.zeros_like(toks[:, :1])  # [PAD] is id 0 here as in the original
  inputs = ({'fwd': np.concatenate([pad, toks[:, :-1]], 1),
             'bwd': np.concatenate([pad, toks[:, ::-1][:, :-1]], 1)} if input_shift
            else {'fwd': toks, 'bwd': toks})
  states = []
  for k in range(2):
    streams = []
    for d in ('fwd', 'bwd'):
      row = _np(e['token'])[inputs[d]]
      x = _ln(row, e[f'ln_emb_{d}'], 1e-12) @ _np(e['in_proj'][k]) + _np(e['in_proj_bias'][k])
      reverse = d == 'bwd' and not input_shift  # the shifted input is already flipped
      for i in range(2):
        x = _lstm(t[f'{d}_{i}'], k, x, reverse)  # no residual
      h2o = t[f'{d}_h2o']
      y = x @ _np(h2o['kernel'][k]) + _np(h2o['bias'][k])
      streams.append(y[:, ::-1] if d == 'bwd' and input_shift else y)
    f, b = streams
    if input_shift:
      states.append(np.concatenate([f, b], -1))
      continue
    zero = np.zeros_like(f[:, :1])
    states.append(np.concatenate([np.concatenate([zero, f[:, :-1]], 1),
                                  np.concatenate([b[:, 1:], zero], 1)], -1))
  return _head_reference(np.stack(states), params['gate'], e['token'], e['output_bias'])


def test_original_elmo_towers_have_the_original_parts():
  params = _family.init(_family.tiny_model(**ELMO))
  t = params['towers']
  g, h = ELMO_G, 16
  for d in ('fwd', 'bwd'):
    assert [k for k in t if k.startswith(f'{d}_') and k[-1].isdigit()] == [f'{d}_0', f'{d}_1']
    assert t[f'{d}_0']['ii']['kernel'].shape == (2, h, g)  # reads the H-wide interface
    assert t[f'{d}_1']['ii']['kernel'].shape == (2, g, g)  # reads layer 0's G-wide output
    assert t[f'{d}_1']['hi']['kernel'].shape == (2, g, g)
    assert t[f'{d}_h2o']['kernel'].shape == (2, g, h)  # h2o: G -> H
  assert 'join' not in t and 'ln_final' not in t and 'position' not in params['embed']
  assert params['gate']['dense']['kernel'].shape == (4 * h, 2 * h)  # 4*256 -> 2*256


@pytest.mark.parametrize('fields', [ELMO, ELMO_SHIFTED], ids=['output_shift', 'input_shift'])
def test_original_elmo_reproduces_our_logits_with_every_switch_on(fields):
  model = _family.tiny_model(**fields)
  params = _moved(_family.init(model), seed=3)
  toks = _family.tokens((2, 8))
  out = model.apply({'params': params}, toks)
  assert out['tower_states_NxBxLxH'].shape == (2, 2, 8, 32)  # [fwd; bwd] per tower
  shifted = fields is ELMO_SHIFTED
  ref = original_elmo_logits(params, toks, input_shift=shifted)
  diff = np.abs(np.asarray(out['logits_BxLxV']) - ref).max()
  assert diff < 1e-4, diff  # float32 against float64
  # the two shifts differ at the window's ends (PAD's LSTM state, not zeros) and inside
  other = original_elmo_logits(params, toks, input_shift=not shifted)
  assert np.abs(other - ref)[:, [0, -1]].max() > 1e-3


def test_elmo_input_shift_keeps_token_t_out_of_position_t():
  """B6 input_shift: token j still reaches every position but j; at the window's ends the
  stream with nothing to read holds the LSTMs' state after PAD (the same for every window,
  not zero), where the output shift puts zeros."""
  model = _family.tiny_model(**ELMO_SHIFTED)
  params = _moved(_family.init(model), seed=5)
  toks = _family.tokens((1, 8), seed=2)
  length = toks.shape[1]
  batch = [toks] + [toks.at[0, j].set(5 + (toks[0, j] - 5 + 7) % 30) for j in (0, 3, 7)]
  logits = np.asarray(model.apply({'params': params}, np.concatenate(batch))['logits_BxLxV'])
  for j, row in zip((0, 3, 7), logits[1:]):
    changed = set(np.nonzero(np.abs(row - logits[0]).max(-1) > 1e-6)[0].tolist())
    assert changed == set(range(length)) - {j}, (j, changed)
  windows = _family.tokens((3, 8), seed=4)
  for fields, after_pad in ((ELMO_SHIFTED, True), (ELMO, False)):
    m = _family.tiny_model(**fields)
    h = np.asarray(m.apply({'params': params}, windows)['tower_states_NxBxLxH'])
    for ends in (h[:, :, 0, :16], h[:, :, -1, 16:]):  # past at 0, future at L-1
      np.testing.assert_allclose(ends, np.broadcast_to(ends[:, :1], ends.shape), atol=1e-6)
      assert (np.abs(ends).min() > 1e-4) if after_pad else not ends.any()


def test_elmo_head_drops_its_joint_ln_output_in_training_only():
  """B6 head.joint_ln_dropout: the head's joint LN output is dropped (`:635`): each unit 0 or
  LN/(1-p), the rest of the head applied to it; none of it without dropout, and none with
  the switch off. The probes' joint_ln input is dropped alike when drawn with dropout."""
  from twotower_jax.model import gates  # pylint: disable=g-import-not-at-top
  model = _family.tiny_model(**{**ELMO_SHIFTED, 'dropout': 0.5})
  params = _moved(_family.init(model), seed=7)
  toks = _family.tokens((2, 8))
  h = model.apply({'params': params}, toks)['tower_states_NxBxLxH']
  g, e = params['gate'], params['embed']
  x = _joint_ln(h, g)

  def gate_out(m, **kw):
    out, inter = m.apply({'params': params}, toks, tower_states=h, capture_intermediates=True,
                         mutable=['intermediates'], **kw)
    return np.asarray(out['logits_BxLxV']), inter['intermediates']['gate']

  logits, inter = gate_out(model, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  dropped = _np(inter['Dropout_0']['__call__'][0])
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], 2.0 * x[kept], rtol=1e-4, atol=1e-5)
  assert 0.4 < 1.0 - kept.mean() < 0.6  # p = 0.5
  np.testing.assert_allclose(logits, _head_after_ln(dropped, g, e['token'], e['output_bias']),
                             atol=1e-4)
  eval_logits, _ = gate_out(model, deterministic=True)
  np.testing.assert_allclose(eval_logits, _head_reference(h, g, e['token'], e['output_bias']),
                             atol=1e-4)
  off = _family.tiny_model(**{**ELMO_SHIFTED, 'dropout': 0.5, 'head.joint_ln_dropout': False})
  _, inter_off = gate_out(off, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  assert 'Dropout_0' not in inter_off
  probe_in = _np(gates.head_joint_ln(model.cfg, g, h, jax.random.PRNGKey(2)))
  probe_plain = _np(gates.head_joint_ln(model.cfg, g, h))
  np.testing.assert_allclose(probe_plain, np.stack(np.split(x, 2, axis=-1)), atol=1e-4)
  assert 0.4 < (probe_in == 0).mean() < 0.6


def test_bilstm_residual_and_hidden_alone():
  """residual=False stacks plainly; hidden alone adds only the h2o projections."""
  kw = dict(tower_type='bilstm', n_layers=2, **{'embedding.mode': 'projected'})
  model = _family.tiny_model(**kw, **{'bilstm.residual': False})
  params = _moved(_family.init(model))
  toks = _family.tokens()
  _, inter = _run(model, params, toks)
  t = inter['intermediates']['towers']
  x = _np(t['tower_in'][0])
  for k in range(2):
    f = _lstm(params['towers']['fwd_1'], k, _lstm(params['towers']['fwd_0'], k, x[k], False),
              False)
    np.testing.assert_allclose(_np(t['fwd'][0][k]), f, atol=1e-5)
  p_hidden = _family.init(_family.tiny_model(**kw, **{'bilstm.hidden': ELMO_G}))
  p_default = _family.init(_family.tiny_model(**kw))
  assert set(p_hidden['towers']) - set(p_default['towers']) == {'fwd_h2o', 'bwd_h2o'}


# --- the presets, training, validation -------------------------------------------------------

@pytest.mark.parametrize('fields', [BERT, ELMO], ids=['bert', 'elmo'])
def test_original_variants_train_sharded_over_fsdp_and_towers(fields):
  """The new parameters carry logical names: FSDP shards the N*H-wide norms and head."""
  config = _family.step_config(**fields)
  config.mesh.fsdp = 2
  metrics = _family.sharded_steps(config, n_steps=3)
  assert all(np.isfinite(float(m['loss'])) and float(m['n_tokens']) > 0 for m in metrics)


@pytest.mark.parametrize('tower_type,fields,match', [
    ('mlm', {'embedding.ln': 'layer'}, "model.embedding.ln='layer' is unknown"),
    ('mlm', {'embedding.ln': 'shared'}, "model.embedding.ln='shared' needs model.embedding.mode="
                                        "'projected'"),
    ('causal', {'embedding.mode': 'projected', 'embedding.ln': 'shared', 'pondering.steps': 1},
     'with model.pondering.steps>0 is not supported'),
    ('mlm', {'embedding.mode': 'projected', 'embedding.ln': 'per_direction'},
     "'per_direction' needs a tower type with forward and backward streams"),
    ('mlm', {'head.width': 'wide'}, "model.head.width='wide' is unknown"),
    ('mlm', {'embedding.proj_init': 'xavier'}, "model.embedding.proj_init='xavier' is unknown"),
    ('mlm', {'embedding.dropout_at': 'head'}, "model.embedding.dropout_at='head' is unknown"),
    ('causal', {'embedding.dropout_at': 'row'},
     "model.embedding.dropout_at='row' needs model.embedding.mode='projected'"),
    ('causal', {'embedding.proj_init': 'torch_linear'},
     "model.embedding.proj_init='torch_linear' needs model.embedding.mode='projected'"),
    ('mlm', {'head.width': 'table'}, "model.head.width='table' needs model.embedding.mode="),
    ('mlm', {'embedding.mode': 'projected', 'embedding.tied': False, 'head.width': 'table'},
     "model.head.width='table' needs"),
    ('mlm', {'embedding.mode': 'projected', 'head.width': 'table', 'gate': 'latent'},
     "model.head.width='table' needs model.gate=concat"),
    ('bilstm', {'bilstm.hidden': -1}, 'model.bilstm.hidden=-1 must be an integer >= 0'),
    ('causal', {'bilstm.residual': False}, 'model.bilstm.residual apply only to model.'
                                           'tower_type=bilstm'),
    ('causal', {'bilstm.input_shift': True}, 'model.bilstm.input_shift apply only to model.'
                                             'tower_type=bilstm'),
    ('causal', {'head.joint_ln_dropout': True, 'gate': 'latent'},
     "model.head.joint_ln_dropout drops the concat head's joint LayerNorm, which "
     'model.gate=latent does not have'),
])
def test_bad_original_options_are_one_line_config_errors(tower_type, fields, match):
  c = config_lib.base_config()
  c.model.tower_type = tower_type
  config_lib.set_fields(c.model, fields)
  with pytest.raises(config_lib.ConfigError, match=match) as err:
    setup_lib.check_config(c)
  assert '\n' not in str(err.value)
