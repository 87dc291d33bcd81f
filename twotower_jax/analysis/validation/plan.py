"""What `validate` trains and analyses: the graded ladder and the replicated nulls, as runs.

On the planted language (docs/PLANTED.md), under DIR:
- the **ladder**: for each tower type and each w of the ladder, two one-tower sources
  trained with class weights (`src0`: w on syntax targets, 1 - w on topic targets; `src1`:
  the reverse), composed two ways: `gate` (model.gate=latent, towers frozen, only the
  gate's prior and the output bias trained on every target) and `joint` (the default
  concat gate, everything trained on every target). Syntax items belong to tower 0 by a
  degree that falls with w; at w = 0.5 both sources see the same weights and no class
  split exists. One more rung uses SentencePiece pieces instead of whole words.
- the **nulls**, replicated on fresh corpora (planted_seed = base + 1 + r): `seeds` composes
  two independently seeded runs on every target, `quality` one of them with a run trained
  for far fewer steps (one tower simply better); both gate-only with frozen towers, so no
  division of labour exists. The shuffled-tower null is tested inside every analysis
  (analysis.control_class_tests).
Runs in one `tokenizer` group share the group's first tokenizer file (model.init_towers
needs the same file, and the ladder's rungs then have the same token ids).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax import errors

# What trains in a gate-only composition: the latent gate's prior (its input LayerNorm and
# Dense) and the shared output bias. Towers, tables and each tower's own head stay frozen.
TRAINABLE = '^gate/(ln_in|gate)/|^embed/output_bias$'
PRIMARY = 'resample/planted'
# A masked LM scores 15% of the held-out positions per pass: its analyses score them this
# many times, with new masks each (analysis.mask_draws), for as many positions as a causal one.
MLM_MASK_DRAWS = 4


class ValidationError(errors.UserError):
  """A config or flag the validation cannot use; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validation's own settings (validate's flags)."""
  gate_steps: int = 300
  ladder: tuple[float, ...] = (1.0, 0.9, 0.75, 0.6, 0.5)
  tower_types: tuple[str, ...] = ('causal', 'mlm')
  pieces_rung: float = 0.9  # w of the SentencePiece rung (causal, gate); 0 = none
  pieces_vocab: int = 0  # its SentencePiece vocabulary (0: a third of the word count)
  replicates: int = 20
  short_steps: int = 0  # steps of the quality null's weaker tower (0: train.steps // 6)
  control_tests: int = 5  # shuffled-tower draws tested per analysis (the third null)
  alpha: float = 0.05
  max_fpr: float = 0.10


@dataclasses.dataclass(frozen=True)
class Run:
  """One run under DIR: trained (sources and composed models), analysed when composed."""
  name: str  # its path under DIR
  config: ml_collections.ConfigDict
  tokenizer: str  # tokenizer group: runs of a group share one tokenizer file
  group: dict[str, Any]  # what it is: kind, tower type, w, mode, null, replicate
  sources: tuple[str, ...] = ()  # composed models: the runs towers 0 and 1 come from

  @property
  def composed(self) -> bool:
    return bool(self.sources)


def check(base: ml_collections.ConfigDict, s: Settings) -> None:
  """One-line errors for a config or settings the validation cannot use."""
  d = base.data
  if d.source != 'planted' or d.tokenizer_type != 'word':
    raise ValidationError(f'validate needs the planted language with the word tokenizer '
                          f'(configs/planted.py); this config has data.source={d.source!r}, '
                          f'data.tokenizer_type={d.tokenizer_type!r}')
  if (d.planted_loss_class or d.planted_class_weights or base.model.init_towers
      or base.train.trainable):
    raise ValidationError('validate sets data.planted_loss_class/planted_class_weights, '
                          'model.init_towers and train.trainable itself; leave them at their '
                          'defaults')
  if s.gate_steps < 1 or s.replicates < 0 or s.control_tests < 0 or s.short_steps < 0:
    raise ValidationError('--gate_steps must be >= 1 and --replicates, --control_tests, '
                          '--short_steps >= 0')
  if not s.ladder or any(not 0.5 <= w <= 1.0 for w in s.ladder) or 0.5 not in s.ladder or (
      len(set(s.ladder)) < 2):
    raise ValidationError(f'--ladder={",".join(map(str, s.ladder))}: give at least two weights '
                          'in [0.5, 1], 0.5 (the no-split rung) among them, e.g. 1,0.75,0.5')
  if not 0.0 < s.alpha < 1.0 or not 0.0 < s.max_fpr < 1.0:
    raise ValidationError(f'--alpha={s.alpha} and --max_fpr={s.max_fpr} must be in (0, 1)')
  if s.pieces_rung and not 0.5 < s.pieces_rung <= 1.0:
    raise ValidationError(f'--pieces_rung={s.pieces_rung} must be in (0.5, 1] (0 = no rung)')


def _copy(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return config_lib.from_dict(config_lib.to_dict(base))


def _common(base, tower_type: str, control_tests: int) -> ml_collections.ConfigDict:
  c = _copy(base)
  c.model.tower_type = tower_type
  c.model.gate = 'latent'
  c.model.embedding.mode = 'per_tower'
  c.model.latent.uniform_init = True
  c.analysis.primary = PRIMARY
  c.analysis.control_class_tests = control_tests
  return c


def _source(base, tower_type, weights: tuple[float, float] | None, seed: int, s: Settings,
            steps: int | None = None) -> ml_collections.ConfigDict:
  c = _common(base, tower_type, s.control_tests)
  c.model.n_towers, c.mesh.tower = 1, 1
  c.data.planted_class_weights = '' if weights is None else f'{weights[0]:g},{weights[1]:g}'
  c.train.seed = seed
  if steps is not None:
    c.train.steps = steps
    c.train.eval_every = min(c.train.eval_every, steps)
    c.train.checkpoint_every = min(c.train.checkpoint_every, steps)
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(steps // 10, 1))
  return c


def _composed(base, tower_type, sources: tuple[str, str], workdir: str, mode: str,
              s: Settings) -> ml_collections.ConfigDict:
  c = _common(base, tower_type, s.control_tests)
  c.model.n_towers = 2
  c.mesh.tower = base.mesh.tower if base.mesh.tower in (1, 2) else 1
  c.model.init_towers = ','.join(os.path.join(workdir, src) + ':0' for src in sources)
  if mode == 'gate':
    c.model.dropout = 0.0  # frozen towers run as they are analysed
    c.train.trainable = TRAINABLE
  else:  # joint: the default concat gate, everything trains
    c.model.gate = 'concat'
  t = c.train
  t.steps = s.gate_steps
  t.eval_every, t.checkpoint_every = min(t.eval_every, t.steps), min(t.checkpoint_every, t.steps)
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(t.steps // 10, 1))
  return c


def _rung(w: float) -> str:
  return f'w{w:.2f}'


def runs(base: ml_collections.ConfigDict, workdir: str, s: Settings) -> list[Run]:
  """Every run of the validation, sources before the models composed from them."""
  check(base, s)
  out: list[Run] = []
  seed = int(base.train.seed)
  ladders = [(t, 'word', s.ladder, ('gate', 'joint')) for t in s.tower_types]
  if s.pieces_rung:
    ladders.append(('causal', 'pieces', (s.pieces_rung,), ('gate',)))
  for tower_type, tok, weights, modes in ladders:
    lb = _copy(base)
    if tok == 'pieces':
      words = lb.data.vocab_size
      lb.data.tokenizer_type = 'unigram'
      lb.data.vocab_size = s.pieces_vocab or max(16, words // 3)
    for w in weights:
      prefix = f'ladder/{tower_type if tok == "word" else "pieces"}/{_rung(w)}'
      group = {'kind': 'ladder', 'tower_type': tower_type, 'tokens': tok, 'w': float(w)}
      for k, cw in enumerate(((w, 1 - w), (1 - w, w))):
        out.append(Run(f'{prefix}/src{k}', _source(lb, tower_type, cw, seed + k, s),
                       f'ladder-{tok}', dict(group, role=f'src{k}')))
      srcs = (f'{prefix}/src0', f'{prefix}/src1')
      for mode in modes:
        out.append(Run(f'{prefix}/{mode}', _composed(lb, tower_type, srcs, workdir, mode, s),
                       f'ladder-{tok}', dict(group, mode=mode), srcs))
  short = s.short_steps or max(int(base.train.steps) // 6, 1)
  for r in range(s.replicates):
    nb = _copy(base)
    nb.data.planted_seed = int(base.data.planted_seed) + 1 + r
    prefix, group = f'nulls/r{r:02d}', {'kind': 'null', 'tower_type': 'causal', 'replicate': r}
    rs = 1000 + 3 * r
    out += [Run(f'{prefix}/a', _source(nb, 'causal', None, rs, s), prefix, dict(group, role='a')),
            Run(f'{prefix}/b', _source(nb, 'causal', None, rs + 1, s), prefix,
                dict(group, role='b')),
            Run(f'{prefix}/short', _source(nb, 'causal', None, rs + 2, s, steps=short), prefix,
                dict(group, role='short', steps=short))]
    for null, srcs in (('seeds', ('a', 'b')), ('quality', ('a', 'short'))):
      srcs = tuple(f'{prefix}/{x}' for x in srcs)
      out.append(Run(f'{prefix}/{null}', _composed(nb, 'causal', srcs, workdir, 'gate', s),
                     prefix, dict(group, null=null, mode='gate'), srcs))
  return out
