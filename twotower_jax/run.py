"""A trained run, read back: its config, tokenizer, data, model and checkpointed parameters.

What every reader of a workdir after training needs (the analysis, planted_check,
generation): `load_config` reads DIR/config.json, `restore` rebuilds the model and
the held-out windows exactly as training did and restores one checkpoint's
parameters onto this machine's devices. It reads the workdir and writes nothing; a
workdir still being trained is read at its newest complete checkpoint (read again if
the training run deletes that one while it is read).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections

from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib


log = logging.getLogger('twotower_jax')
# A training run rotating checkpoints can delete the one being read; read the newest again.
_VANISHED_RETRIES = 3


class RunError(errors.UserError):
  """A workdir that holds no usable run; the message says what to do."""


@dataclasses.dataclass
class Run:
  """A restored run: what `setup.build` makes from its config, plus one checkpoint."""
  setup: setup_lib.Setup
  params: Any
  step: int

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.setup.config

  @property
  def model(self):
    return self.setup.model


def load_config(workdir: str, analysis: ml_collections.ConfigDict | None = None,
                imports: str = '', analysis_overrides: dict[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """The run's config.json, with `analysis` (a whole analysis.* section) in place of the
  run's, `analysis_overrides` ({'analysis.x': value}, e.g. the command line's) on top and
  `imports` added to the run's, validated against this version's schema and registries."""
  if not paths.isdir(workdir):
    what = 'is a file, not a directory' if paths.exists(workdir) else 'does not exist'
    raise RunError(f'workdir {workdir} {what}; pass the --workdir of a training run')
  config = workdir_lib.read_config(workdir)
  if analysis is not None:
    config.analysis = ml_collections.ConfigDict(analysis.to_dict())
  if analysis_overrides:
    config_lib.set_fields(config, analysis_overrides)
  if imports:
    config.imports = ','.join(filter(None, [config.imports, imports]))
  setup_lib.check_config(config)
  return config


def fit_mesh(config: ml_collections.ConfigDict) -> list[jax.Device]:
  """The devices to read the run on, setting config.mesh to fit them.

  On CPU one device: the host's devices share its cores, so splitting a read gains
  nothing, and XLA:CPU's in-process collectives can deadlock when many sharded
  executables are in flight. Elsewhere the training mesh where it fits this machine;
  else data parallel over all devices; else over the most devices that divide the batch.
  """
  devices = jax.devices()
  if jax.default_backend() == 'cpu':
    config.mesh.data, config.mesh.fsdp, config.mesh.tower = -1, 1, 1
    return devices[:1]
  try:
    sharding_lib.make_mesh(config, devices)
    return devices
  except errors.UserError:
    pass
  config.mesh.data, config.mesh.fsdp, config.mesh.tower = -1, 1, 1
  n = len(devices)
  while config.train.batch_size % (n * config.train.grad_accum_steps):
    n -= 1
  return devices[:n]


def check_tokenizer(workdir: str, meta: dict[str, Any]) -> None:
  """Refuses a DIR/tokenizer.model other than the one the checkpoint was trained with (its
  sha256, saved with each checkpoint): with other pieces every id would mean another one."""
  file = workdir_lib.path(workdir, workdir_lib.TOKENIZER)
  if meta.get('tokenizer_sha256') not in (None, tokenizer_lib.file_digest(file)):
    raise RunError(f'{file} is not the tokenizer the checkpoints were trained with (its sha256 '
                   'differs from the one saved with them), so every token id would mean another '
                   'piece; put back the run\'s own tokenizer.model')


def restore(config: ml_collections.ConfigDict, workdir: str, step: int = 0) -> Run:
  """The run at checkpoint `step` (0 = the latest complete one)."""
  if not paths.isdir(checkpoints.directory(workdir)):
    raise RunError(f'{workdir} has no checkpoints; train it first (python -m '
                   'twotower_jax.main) or pass the right --workdir')
  if not paths.exists(workdir_lib.path(workdir, workdir_lib.TOKENIZER)):
    raise RunError(f'{workdir} has no {workdir_lib.TOKENIZER} next to its checkpoints; '
                   'copy the whole training workdir')
  setup = setup_lib.build(config, workdir, train_tokenizer=False, devices=fit_mesh(config))
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(setup.model, tx, setup.mesh, sharding_lib.rules(config))
  abstract = state_lib.abstract(setup.model, tx, state_sh)
  holder = workdir_lib.lock_holder(workdir)
  if holder:
    log.info('%s is being trained (%s): reading its newest complete checkpoint', workdir, holder)
  for attempt in range(_VANISHED_RETRIES + 1):
    mngr = checkpoints.manager(workdir, read_only=True)
    try:
      chosen = int(step) or checkpoints.latest_complete_step(mngr)
      if chosen is None:
        raise RunError(f'{checkpoints.directory(workdir)} holds no complete checkpoint; train '
                       'the run (python -m twotower_jax.main) first')
      if chosen not in mngr.all_steps():
        raise RunError(f'no checkpoint for step {chosen} in {checkpoints.directory(workdir)}; '
                       f'choose one of {sorted(mngr.all_steps())} or 0 for the latest')
      state, meta = checkpoints.restore(mngr, chosen, abstract, legacy=state_lib.legacy_target(
          config, lambda t: state_lib.abstract(setup.model, t, state_lib.shardings(
              setup.model, t, setup.mesh, sharding_lib.rules(config)))))
      check_tokenizer(workdir, meta)
      return Run(setup, state.params, chosen)
    except checkpoints.CheckpointVanished:
      if int(step) or attempt == _VANISHED_RETRIES:
        raise  # a step asked for by number is not silently replaced by another
      log.warning('checkpoint %d was removed by the training run while it was read; reading '
                  'the newest one again', chosen)
    finally:
      mngr.close()
  raise AssertionError('unreachable')
