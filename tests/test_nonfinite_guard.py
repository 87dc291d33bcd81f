"""The non-finite guard covers the updated parameters and optimizer state, no checkpoint is ever
written from non-finite state, `skip` gives up after a bounded run of skipped updates, and the
optimizer fields are validated (docs/RELIABILITY.md, "Non-finite loss, gradients or state")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from test_reliability import restored_state
from twotower_jax import config as config_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import loop as train
from twotower_jax.train import nonfinite
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib


@pytest.mark.parametrize('field, value', [
    ('lr', float('nan')), ('lr', 0.0), ('lr', float('inf')), ('b1', 1.0), ('b1', -0.1),
    ('b2', 1.0), ('b2', float('nan')), ('weight_decay', -0.01), ('clip_norm', 0.0),
    ('warmup_steps', -1)])
def test_optimizer_fields_are_validated(tiny, field, value):
  with pytest.raises(config_lib.ConfigError, match=f'optimizer.{field}='):
    config_lib.validate(tiny(**{f'optimizer.{field}': value}))


def test_max_consecutive_skips_is_validated(tiny):
  with pytest.raises(config_lib.ConfigError, match='train.max_consecutive_skips=0'):
    config_lib.validate(tiny(**{'train.max_consecutive_skips': 0}))


def test_a_nan_learning_rate_is_caught_in_the_updated_params(tiny, tmp_path):
  """lr = NaN (bypassing validation): loss and gradients stay finite, the parameters do not.
  The step flags them; with skip it keeps the old params and optimizer state."""
  config = tiny(**{'optimizer.lr': float('nan')})
  setup = setup_lib.build(config, str(tmp_path), train_tokenizer=True)
  tx = optimizer_lib.make(config)
  state = state_lib.init(setup.model, tx, 0)
  state = state.replace(step=jnp.asarray(3, jnp.int32))  # past warm-up's lr = 0 * NaN start
  rows = setup.splits.train_windows[:8]
  names = nonfinite.quantity_names(state.params)
  for mode in ('stop', 'skip'):
    new, metrics = jax.jit(lambda s, b, mode=mode: step_lib.train_step(
        s, b, model=setup.model, tx=tx, lr_schedule=optimizer_lib.schedule(config),
        on_nonfinite=mode))(state, rows)
    assert np.isfinite(float(metrics['loss']))
    first = nonfinite.first_offender(metrics[nonfinite.FLAGS_KEY], names)
    assert first is not None and first.startswith('updated params['), first
    if mode == 'skip':
      assert float(metrics['skipped']) == 1.0
      for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                      jax.tree.leaves((new.params, new.opt_state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def nan_updates_from(config, step):
  """optimizer.make, then updates multiplied by NaN from `step` on (finite loss and grads)."""
  real_make = optimizer_lib.make

  def make(_):
    return optax.chain(real_make(config), optax.scale_by_schedule(
        lambda count: jnp.where(count >= step - 1, jnp.nan, 1.0)))
  return make


def all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_stop_on_a_nan_update_saves_nothing_from_it(tiny, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = tiny(**{'train.checkpoint_every': 1, 'train.log_every': 5, 'train.keep_checkpoints': 2,
                   'train.steps': 8})
  monkeypatch.setattr(train.optimizer_lib, 'make', nan_updates_from(config, 4))
  with pytest.raises(nonfinite.NonFiniteError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert message.startswith('step 4: updated params[') and 'last good checkpoint is step 3' in (
      message), message
  assert checkpoints.complete_steps(workdir) == [2, 3]  # rotation kept the newest finite one
  assert all_finite(restored_state(config, workdir, step=3))


def test_skip_gives_up_after_max_consecutive_skips(tiny, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = tiny(**{'train.on_nonfinite': 'skip', 'train.max_consecutive_skips': 3,
                   'train.checkpoint_every': 1, 'train.log_every': 1, 'train.steps': 12,
                   'train.keep_checkpoints': 2})
  monkeypatch.setattr(train.optimizer_lib, 'make', nan_updates_from(config, 3))
  with pytest.raises(nonfinite.NonFiniteError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert message.startswith('step 5: 3 updates in a row were skipped'), message
  assert 'max_consecutive_skips' in message
  steps = checkpoints.complete_steps(workdir)
  assert steps and max(steps) <= 4
  for step in steps:  # skipped updates kept the state finite: every checkpoint is good
    assert all_finite(restored_state(config, workdir, step=step))
  lines = workdir_lib.read_metrics(workdir)
  assert [l['step'] for l in lines if l['kind'] == 'nonfinite'] == [5]


def test_skip_streak_counts_across_calls():
  assert nonfinite.skip_streak([1, 1, 0, 1], 0, 3) == (1, None)
  assert nonfinite.skip_streak([1, 1], 1, 3) == (3, 1)
  assert nonfinite.skip_streak([0, 1, 1, 1, 1], 0, 3) == (3, 3)


def test_a_checkpoint_is_never_written_from_nonfinite_state(tmp_path):
  mngr = checkpoints.manager(str(tmp_path))
  state = {'params': {'w': np.array([1.0, np.nan], np.float32)}, 'step': np.int32(3)}
  with pytest.raises(checkpoints.CheckpointError, match=r"state\['params'\]\['w'\] is not finite"):
    checkpoints.save(mngr, 3, state, None, {})
  mngr.close()
  assert checkpoints.complete_steps(str(tmp_path)) == []
