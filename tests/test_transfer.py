"""Known-answer building blocks on tiny models: train.trainable (frozen parameters),
per-source target weights (data.planted_loss_class), model.init_towers and the latent
gate's uniform start."""

import functools
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from twotower_jax import config as config_lib
from twotower_jax import run as run_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import planted
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import towers
from twotower_jax.train import checkpoints
from twotower_jax.train import init_from
from twotower_jax.train import loop
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib

import _family

GATE_ONLY = '^gate/(ln_in|gate)/'


def _paths(tree) -> dict:
  return {optimizer_lib.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _steps(config, n=3, target_weights_V=None, model_kw=None, tx=None, negative_zero=''):
  """Params before and after n jitted train steps of a tiny latent model on fixed windows
  (`tx`: in place of optimizer.make's; `negative_zero`: a leaf whose first entry is -0.0)."""
  model = _family.tiny_model(gate='latent', **(model_kw or {}))
  tx = tx or optimizer_lib.make(config)
  state = state_lib.init(model, tx, 0)
  state = state.replace(params=jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[(0,) * x.ndim].set(-0.0) if optimizer_lib.param_path(p) == negative_zero
      else x, state.params))
  before = _paths(state.params)
  step = jax.jit(functools.partial(
      step_lib.train_step, model=model, tx=tx, lr_schedule=optimizer_lib.schedule(config),
      target_weights_V=target_weights_V, trainable=config.train.trainable))
  window = _family.tokens((4, 9), seed=3)
  for _ in range(n):
    state, metrics = step(state, window)
  return before, _paths(state.params), state, metrics


def _opt_config(**fields):
  c = config_lib.base_config()
  c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.weight_decay = 0.1, 0, 0.5
  c.train.steps = 10
  config_lib.set_fields(c, fields)
  return c


def test_default_optimizer_is_the_plain_chain():
  """trainable='' builds exactly the earlier optimizer, so old optimizer states restore."""
  c = _opt_config()
  params = _family.init(_family.tiny_model())
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optimizer_lib.schedule(c), b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.5,
      mask=optimizer_lib.decay_mask))
  got = optimizer_lib.make(c).init(params)
  assert jax.tree.structure(got) == jax.tree.structure(plain.init(params))
  frozen = optimizer_lib.make(_opt_config(**{'train.trainable': GATE_ONLY})).init(params)
  assert jax.tree.structure(frozen) != jax.tree.structure(got)


def test_frozen_parameters_stay_bit_identical_and_get_no_decay():
  """Large lr and weight decay: any update or decay of a frozen leaf would show."""
  c = _opt_config(**{'train.trainable': GATE_ONLY})
  before, after, _, metrics = _steps(c)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed == {'gate/gate/kernel', 'gate/gate/bias', 'gate/ln_in/scale', 'gate/ln_in/bias'}
  assert float(metrics['embed_grad_norm_input']) == 0.0  # the frozen table's gradient is zero


def _old_frozen_chain(c):
  """The hand-written freeze optimizer.make built up to 88fe442: frozen gradients zeroed by
  a mask, then the clip and AdamW (with moments for every leaf, weight decay masked)."""
  o, pattern = c.optimizer, c.train.trainable

  def zero(grads, _):
    return jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads,
                        optimizer_lib.trainable_mask(grads, pattern))

  def decayed(params):
    return jax.tree.map(lambda d, t: d and t, optimizer_lib.decay_mask(params),
                        optimizer_lib.trainable_mask(params, pattern))

  return optax.chain(optax.stateless(zero), optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(optimizer_lib.schedule(c), b1=o.b1, b2=o.b2, eps=1e-8,
                                 weight_decay=o.weight_decay, mask=decayed))


def _bits(x):
  return np.asarray(x).view(np.uint32)


def _adam_moments(opt_state):
  """{'mu/PATH' or 'nu/PATH': array} of the AdamW moments in an optimizer state."""
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  return {f'{m}/{p}': x for m in ('mu', 'nu') for p, x in _paths(getattr(adam[0], m)).items()}


def test_multi_transform_freeze_updates_as_the_old_mask_and_keeps_no_state_for_frozen_leaves():
  """optax.multi_transform + set_to_zero against the hand-written mask it replaced, 3 steps
  at a large lr and weight decay: every parameter bit for bit the same (a frozen -0.0 too),
  the trained leaves' AdamW moments the same, and no moments at all for the frozen leaves
  (the old chain kept them, at zero)."""
  c = _opt_config(**{'train.trainable': GATE_ONLY})
  kw = dict(negative_zero='towers/ln_final/bias')
  before, old, old_state, _ = _steps(c, tx=_old_frozen_chain(c), **kw)
  _, new, new_state, _ = _steps(c, **kw)
  for p in before:
    assert np.array_equal(_bits(new[p]), _bits(old[p])), p
    if not optimizer_lib.selects(GATE_ONLY, p):
      assert np.array_equal(_bits(new[p]), _bits(before[p])), p
  assert np.signbit(new['towers/ln_final/bias'].flat[0])
  old_m, new_m = _adam_moments(old_state.opt_state), _adam_moments(new_state.opt_state)
  trained = {k for k in old_m if optimizer_lib.selects(GATE_ONLY, k.split('/', 1)[1])}
  assert set(new_m) == trained and len(trained) == 8
  for k in old_m:
    if k in trained:
      assert np.array_equal(_bits(new_m[k]), _bits(old_m[k])), k
    else:
      assert not np.any(old_m[k]), k  # the old chain's frozen moments: zeros, never touched


FROZEN_88FE442 = os.path.join(os.path.dirname(__file__), 'data', 'workdir_frozen_88fe442')


@pytest.mark.slow
def test_a_frozen_run_written_before_multi_transform_restores_and_resumes(tmp_path):
  """A train.trainable workdir of 88fe442 (the old optimizer-state layout) is read by the
  analysis's restore, and resumed from its step 2 it reaches the step-4 parameters that
  88fe442 itself wrote, bit for bit: the AdamW state carried over."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(FROZEN_88FE442, workdir)
  written = run_lib.restore(workdir_lib.read_config(workdir), workdir, 4)
  assert written.step == 4
  shutil.rmtree(os.path.join(checkpoints.directory(workdir), '4'))
  result = loop.train_and_evaluate(workdir_lib.read_config(workdir), workdir)
  assert result['step'] == 4
  resumed = run_lib.restore(workdir_lib.read_config(workdir), workdir, 4)
  old, new = _paths(written.params), _paths(resumed.params)
  assert old.keys() == new.keys()
  for p in old:
    assert np.array_equal(_bits(new[p]), _bits(old[p])), p


@pytest.fixture(scope='module')
def plain_update():
  """Params after the default steps (every parameter trains, no target weights)."""
  return _steps(_opt_config(**{'optimizer.weight_decay': 0.01}))[1]


def test_trainable_everything_equals_the_default_update(plain_update):
  """A pattern that selects every parameter changes nothing about the update."""
  plain = plain_update
  _, every, _, _ = _steps(_opt_config(**{'optimizer.weight_decay': 0.01,
                                         'train.trainable': '.'}))
  for p in plain:
    np.testing.assert_array_equal(plain[p], every[p], err_msg=p)


def test_trainable_is_checked():
  c = _family.step_config()
  c.train.trainable = '(unclosed'
  with pytest.raises(config_lib.ConfigError, match='train.trainable.*regular expression'):
    config_lib.validate(c)
  params = _family.init(_family.tiny_model())
  with pytest.raises(Exception, match='selects no parameter.*towers/'):
    optimizer_lib.check_trainable('^nothing_here/', params)
  optimizer_lib.check_trainable('^gate/', params)


def test_uniform_init_starts_the_latent_prior_at_uniform():
  model = _family.tiny_model(gate='latent', **{'latent.uniform_init': True})
  params = _family.init(model)
  assert not np.any(np.asarray(params['gate']['gate']['kernel']))
  out = model.apply({'params': params}, _family.tokens())
  np.testing.assert_array_equal(np.exp(np.asarray(out['gate_log_weights_NxBxL'])),
                                np.full(out['gate_log_weights_NxBxL'].shape, 0.5, np.float32))
  default = _family.init(_family.tiny_model(gate='latent'))
  assert np.any(np.asarray(default['gate']['gate']['kernel']))


# ------------------------------------------------------------------ target weights


def _planted_config(**data):
  c = config_lib.base_config()
  c.data.source, c.data.tokenizer_type = 'planted', 'word'
  c.data.planted_docs, c.data.planted_sentences = 60, 6
  c.data.planted_topics, c.data.planted_topic_words, c.data.planted_zipf = 3, 6, 0.0
  config_lib.set_fields(c.data, data)
  c.data.vocab_size = planted.required_vocab_size(c.data)
  return c


@pytest.fixture(scope='module')
def planted_sp(tmp_path_factory):
  c = _planted_config()
  path = str(tmp_path_factory.mktemp('tok') / 'tok.model')
  tokenizer_lib.train(corpus_lib.load(c.data).train_docs, path, c.data.vocab_size, 'word')
  return tokenizer_lib.load(path)


def test_planted_target_weights_select_one_class(planted_sp):
  c = _planted_config()
  assert corpus_lib.target_weights(c.data, planted_sp) is None  # '' = every target
  classes_V = planted.token_classes(c, planted_sp)
  for name, cls in (('syntax', planted.SYNTAX), ('topic', planted.TOPIC)):
    w_V = corpus_lib.target_weights(_planted_config(planted_loss_class=name).data, planted_sp)
    assert w_V.dtype == np.float32 and w_V.shape == (c.data.vocab_size,)
    np.testing.assert_array_equal(w_V, (classes_V == cls).astype(np.float32))
    assert w_V[list(tokenizer_lib.SPECIAL_IDS)].sum() == 0  # EOS, PAD, ... carry no loss


@pytest.mark.parametrize('fields,match', [
    ({'planted_loss_class': 'nouns'}, 'planted_loss_class.*unknown'),
    ({'planted_loss_class': 'syntax', 'tokenizer_type': 'unigram'}, "tokenizer_type='word'"),
])
def test_planted_loss_class_is_checked(fields, match):
  c = _planted_config()
  config_lib.set_fields(c.data, fields)
  with pytest.raises(config_lib.ConfigError, match=match):
    corpus_lib.check_config(c.data)
  text = config_lib.base_config()
  text.data.planted_loss_class = 'topic'
  with pytest.raises(config_lib.ConfigError, match='needs data.source=planted'):
    corpus_lib.check_config(text.data)


def test_target_weights_zero_the_other_class_loss():
  """Training loss and gradient see only the weighted targets; eval reports both losses."""
  model = _family.tiny_model(gate='latent')
  params = _family.init(model)
  window = _family.tokens((4, 9), seed=5)
  w_V = (jnp.arange(_family.VOCAB) % 2).astype(jnp.float32)  # odd ids: the trained class
  ex = towers.get('causal').make_example(window, jax.random.PRNGKey(0), model.cfg)
  weighted = step_lib.weight_targets(ex, w_V)
  np.testing.assert_array_equal(weighted['weights'], ex['weights'] * (ex['targets'] % 2))
  rng = jax.random.PRNGKey(0)
  _, aux = step_lib.loss_fn(params, model, weighted, rng)
  assert float(aux['n_tokens']) == float(np.sum(np.asarray(ex['targets']) % 2))
  # The gradient of the loss with respect to the logits of even-target positions is zero.
  out = model.apply({'params': params}, ex['inputs'])
  g = jax.grad(lambda lg: step_lib.cross_entropy(lg, ex['targets'], weighted['weights'])[0])(
      out['logits_BxLxV'])
  even = np.asarray(ex['targets']) % 2 == 0
  assert even.any() and not np.any(np.asarray(g)[even]) and np.any(np.asarray(g)[~even])
  ev = step_lib.eval_step(params, window, model=model, target_weights_V=w_V)
  plain = step_lib.eval_step(params, window, model=model)
  assert float(ev['weight_sum']) == float(aux['n_tokens'])
  assert float(ev['loss_sum_all']) == float(plain['loss_sum'])
  assert set(plain) == {'loss_sum', 'weight_sum'}


def test_all_ones_target_weights_leave_training_bit_identical(plain_update):
  plain = plain_update
  c = _opt_config(**{'optimizer.weight_decay': 0.01})
  _, ones, _, _ = _steps(c, target_weights_V=jnp.ones(_family.VOCAB, jnp.float32))
  for p in plain:
    np.testing.assert_array_equal(plain[p], ones[p], err_msg=p)


# ------------------------------------------------------------------ init_towers


def _tiny_latent(tiny, **fields):
  return tiny(**{'model.gate': 'latent', 'model.dropout': 0.0, 'train.steps': 2,
                 'train.eval_every': 2, 'train.checkpoint_every': 2, **fields})


@pytest.fixture(scope='module')
def source_run(small_corpus_dir, tmp_path_factory):
  """A one-tower run with a shared V x H table and a latent gate (so one output head)."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  wd = str(tmp_path_factory.mktemp('source'))
  c = tiny_config(small_corpus_dir, **{'model.gate': 'latent', 'model.n_towers': 1,
                                       'mesh.tower': 1, 'train.steps': 2,
                                       'train.eval_every': 2, 'train.checkpoint_every': 2})
  loop.train_and_evaluate(c, wd)
  return wd


def _params(wd):
  return _paths(run_lib.restore(run_lib.load_config(wd), wd).params)


def test_init_towers_copies_one_tower_exactly_and_frozen_towers_stay(tiny, tmp_path, source_run):
  """Tower 0 from a shared-table source (its table goes into tower 0's slice), tower 1 fresh;
  with the towers frozen, the trained run still holds exactly the source's values."""
  wd = str(tmp_path / 'dst')
  os.makedirs(wd)
  shutil.copy(os.path.join(source_run, 'tokenizer.model'), wd)
  c = _tiny_latent(tiny, **{'model.embedding.mode': 'per_tower',
                            'model.init_towers': f'{source_run}:0,',
                            'train.trainable': GATE_ONLY})
  loop.train_and_evaluate(c, wd)
  (line,) = [l for l in workdir_lib.read_metrics(wd) if l['kind'] == 'init_towers']
  meta = json.loads(open(os.path.join(source_run, 'checkpoints', '2', 'meta', 'metadata')).read())
  assert line['towers'] == [{  # which checkpoint of which run gave the tower, by its contents
      'tower': 0, 'source_tower': 0, 'workdir': source_run, 'step': 2,
      'checkpoint_sha256': hashlib.sha256(json.dumps(meta['fingerprints']).encode()).hexdigest()}]
  src, dst = _params(source_run), _params(wd)
  per_tower = [p for p in dst if p.startswith(('towers/', 'gate/heads/'))]
  assert len(per_tower) > 10 and any(p.startswith('gate/heads/') for p in per_tower)
  for p in per_tower:
    np.testing.assert_array_equal(dst[p][0], src[p][0], err_msg=p)
    if p.endswith('kernel'):
      assert not np.array_equal(dst[p][1], src[p][0]), p  # tower 1 is fresh
  for p in ('embed/token', 'embed/position'):
    np.testing.assert_array_equal(dst[p][0], src[p], err_msg=p)  # the source's V x H table
    assert not np.array_equal(dst[p][1], src[p])


def _refused(tiny, tmp_path, source_run, copy_tokenizer=True, **fields):
  wd = str(tmp_path / 'refused')
  os.makedirs(wd, exist_ok=True)
  if copy_tokenizer:
    shutil.copy(os.path.join(source_run, 'tokenizer.model'), wd)
  c = _tiny_latent(tiny, **{'model.embedding.mode': 'per_tower', **fields})
  with pytest.raises(init_from.InitError) as e:
    loop.train_and_evaluate(c, wd)
  assert not os.path.exists(os.path.join(wd, 'config.json'))  # refused before writing
  return str(e.value)


def test_init_towers_refuses_another_tokenizer(tiny, tmp_path, source_run):
  msg = _refused(tiny, tmp_path, source_run, copy_tokenizer=False,
                 **{'model.init_towers': f'{source_run},'})
  assert 'sha256' in msg and 'copy' in msg


def test_init_towers_refuses_other_shapes_and_missing_towers(tiny, tmp_path, source_run):
  msg = _refused(tiny, tmp_path, source_run, **{'model.init_towers': f',{source_run}:0',
                                                'model.d_mlp': 48})
  assert 'shape' in msg and 'mlp' in msg
  msg = _refused(tiny, tmp_path, source_run, **{'model.init_towers': f'{source_run}:1,'})
  assert 'tower 1 does not exist' in msg


def test_init_towers_refuses_its_own_workdir_and_negative_towers(tiny, tmp_path, source_run):
  """DIR:-1 said 'DIR:-1 has no checkpoints'; a run naming itself got 'config.json is
  missing'."""
  msg = _refused(tiny, tmp_path, source_run, **{'model.init_towers': f'{source_run}:-1,'})
  assert 'names tower -1; give DIR:K with K >= 0' in msg
  msg = _refused(tiny, tmp_path, source_run, **{'model.init_towers': f'{tmp_path}/refused,'})
  assert f"names this run's own workdir {tmp_path}/refused" in msg


def test_init_towers_entries_are_checked(tiny):
  c = tiny(**{'model.init_towers': 'a:0,b:1,c'})
  with pytest.raises(config_lib.ConfigError, match='3 entries for model.n_towers=2'):
    setup_lib.check_config(c)
  assert config_lib.init_tower_entries('/x/run:3, ,/y:z') == [('/x/run', 3), None, ('/y:z', 0)]
  assert config_lib.init_tower_entries('') == []
  assert config_lib.init_tower_entries('/x:-1,') == [('/x', -1), None]


def test_a_source_checkpoint_rotated_away_while_read_is_read_again(tiny, tmp_path, source_run,
                                                                   monkeypatch):
  """A source still training deletes its older checkpoints: the newest is read again, and
  the provenance names the step actually taken."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  src = str(tmp_path / 'src')
  shutil.copytree(source_run, src)
  config = run_lib.load_config(src)
  config.train.steps = 4
  loop.train_and_evaluate(config, src)  # checkpoints 2 and 4
  real = ocp.CheckpointManager.restore
  deleted = []

  def rotated(self, step, *args, **kwargs):
    if not deleted:
      deleted.append(step)
      shutil.rmtree(os.path.join(src, 'checkpoints', str(step)))
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', rotated)
  digest = tokenizer_lib.file_digest(os.path.join(src, 'tokenizer.model'))
  config.mesh.tower = 1
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  _, _, _, provenance = init_from.source_params(src, digest, config.data.vocab_size, mesh)
  assert deleted == [4] and provenance['step'] == 2 and provenance['workdir'] == src
