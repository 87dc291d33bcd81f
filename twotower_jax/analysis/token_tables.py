"""The token matrices of trained runs, compared row by row (python -m twotower_jax.align).

Which matrices a run has (model/embeddings.py; docs/COMPANIONS.md):
- `table`: a tied run's one token table (`embed/token`), read at the input and scoring the
  vocabulary at the output. shared mode: V x H; projected: V x (N*H), each tower reads it
  through its own projection and the head's output is projected up to it.
- `input` and `output`: an untied run's token table (`embed/token`, as above) and its own
  V x H output matrix (`embed/output`).
- per_tower mode: `input_t0`, `input_t1`, ... (tower k's own V x H table) and `output`: the
  untied output matrix, or for a tied run the mean of the towers' tables, which is what
  the concat head scores against (a per-tower head of latent or logit_sum scores against
  tower k's own table, `input_t{k}`).

Every run must share one tokenizer file (sha256), as model.init_towers demands. Tokens
compared: the non-special ones that occur at least `min_count` times in every run's
training windows (a row that was never read stays near its initialisation). Pairs: every
matrix of one run against every matrix of another, and an untied run's input against its
output. A pair of runs whose configs differ only in train.seed is the *seed reference*:
the level two equally trained matrices reach, against which the other pairs are read.
The gradient norms of the token table that training logged (metrics.jsonl) come along
for the gradient-dominance figure.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any

import jax
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import run as run_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import alignment
from twotower_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger('twotower_jax')

GRAD_KEYS = ('embed_grad_norm_input', 'embed_grad_norm_output',
             'embed_grad_norm_output_matrix')


class AlignError(errors.UserError):
  """Runs whose token matrices cannot be compared; the message says why and what to do."""


def matrices(model_cfg, embed: dict[str, Any]) -> dict[str, np.ndarray]:
  """{name: V x W} of one run's `params['embed']` (names: the module docstring)."""
  e = model_cfg.embedding
  token = np.asarray(jax.device_get(embed['token']), np.float64)
  out = {}
  if e.mode == 'per_tower':
    out.update({f'input_t{k}': token[k] for k in range(token.shape[0])})
    out['output'] = token.mean(axis=0) if e.tied else None
  elif e.tied:
    out['table'] = token
  else:
    out['input'] = token
  if not e.tied:
    out['output'] = np.asarray(jax.device_get(embed['output']), np.float64)
  return out


def grad_series(workdir: str) -> dict[str, list[float]]:
  """{'step': [...], GRAD_KEY: [...]} of the training lines of DIR/metrics.jsonl (NaN where
  a line lacks a key; the output-matrix norm exists only for untied runs)."""
  lines = [m for m in workdir_lib.read_metrics(workdir)
           if m.get('kind') == 'train' and 'embed_grad_norm_input' in m]
  out = {'step': [int(m['step']) for m in lines]}
  for key in GRAD_KEYS:
    out[key] = [float(m.get(key, float('nan'))) for m in lines]
  return out


@dataclasses.dataclass
class TableRun:
  """One run's matrices, training-token counts, tokenizer digest and config."""
  workdir: str
  step: int
  config: Any
  digest: str
  counts_V: np.ndarray
  matrices: dict[str, np.ndarray]


def read_run(workdir: str, step: int = 0) -> TableRun:
  """Restores a run's checkpoint (0 = latest) and takes its token matrices."""
  config = run_lib.load_config(workdir)
  restored = run_lib.restore(config, workdir, step)
  digest = tokenizer_lib.file_digest(workdir_lib.path(workdir, workdir_lib.TOKENIZER))
  return TableRun(os.path.abspath(workdir), restored.step, config, digest,
                  np.asarray(restored.setup.splits.train_token_counts),
                  matrices(config.model, restored.params['embed']))


def check_tokenizers(runs: list[TableRun]) -> None:
  """One tokenizer file for all runs, or a one-line error naming the first that differs."""
  for r in runs[1:]:
    if r.digest != runs[0].digest:
      raise AlignError(
          f'{r.workdir}/{workdir_lib.TOKENIZER} is not the tokenizer of {runs[0].workdir} (sha256 '
          'differs), so token i is not the same piece in both; compare runs trained with one '
          'tokenizer file (copy it into a new workdir before its first step)')


def compared_tokens(runs: list[TableRun], min_count: int) -> np.ndarray:
  """Non-special token ids seen at least min_count times in every run's training windows."""
  counts = np.min(np.stack([r.counts_V for r in runs]), axis=0)
  ids = np.flatnonzero(counts >= min_count)
  return ids[ids >= len(tokenizer_lib.SPECIAL_IDS)]


def _differences(a: Any, b: Any, prefix: str = '') -> list[str]:
  """Dotted fields of two config dicts that differ (analysis.* ignored)."""
  out = []
  for key in sorted(set(a) | set(b)):
    name = f'{prefix}{key}'
    if name == 'analysis':
      continue
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _differences(va, vb, name + '.')
    elif va != vb:
      out.append(name)
  return out


def run_labels(runs: list[TableRun]) -> list[str]:
  """A short label per run: its tying, mode and input_grad_scale, then its seed."""
  labels = []
  for r in runs:
    e = r.config.model.embedding
    s = f'{"tied" if e.tied else "untied"}'
    if e.input_grad_scale != 1.0:
      s += f' s={e.input_grad_scale:g}'
    if e.mode != 'shared':
      s += f' {e.mode}'
    labels.append(f'{s} seed {r.config.train.seed}')
  return labels


def compare_runs(runs: list[TableRun], min_count: int = 20, k: int = 10, n_boot: int = 200,
                 seed: int = 0) -> dict[str, Any]:
  """Every pair of matrices (module docstring) with each measure and its interval."""
  if len(runs) < 2:
    raise AlignError('give at least two run directories to compare')
  check_tokenizers(runs)
  ids = compared_tokens(runs, min_count)
  if ids.size < 8:
    raise AlignError(f'only {ids.size} tokens occur at least {min_count} times in every run\'s '
                     'training windows; lower --min_count')
  plain = [config_lib.to_dict(r.config) for r in runs]
  seed_pairs = {(i, j) for i, j in itertools.combinations(range(len(runs)), 2)
                if _differences(plain[i], plain[j]) == ['train.seed']}
  labels = run_labels(runs)
  items = [(i, name) for i, r in enumerate(runs) for name, m in r.matrices.items()
           if m is not None]
  pairs = []
  for (i, a), (j, b) in itertools.combinations(items, 2):
    within = i == j
    if within and not {a, b} == {'input', 'output'}:
      continue
    log.info('align: %s %s vs %s %s (%d tokens)', labels[i], a, labels[j], b, ids.size)
    measures = alignment.compare(runs[i].matrices[a][ids], runs[j].matrices[b][ids], k=k,
                                 n_boot=n_boot, seed=seed)
    pairs.append({'run_a': i, 'matrix_a': a, 'run_b': j, 'matrix_b': b,
                  'seed_reference': (i, j) in seed_pairs and a == b, **measures})
  return {'runs': [{'workdir': r.workdir, 'step': r.step, 'label': lab,
                    'tied': bool(r.config.model.embedding.tied),
                    'mode': r.config.model.embedding.mode,
                    'input_grad_scale': float(r.config.model.embedding.input_grad_scale),
                    'seed': int(r.config.train.seed),
                    'matrices': {n: list(m.shape) for n, m in r.matrices.items() if m is not None},
                    'grad_norms': grad_series(r.workdir)}
                   for r, lab in zip(runs, labels)],
          'n_tokens': int(ids.size), 'min_count': min_count, 'k': k, 'n_boot': n_boot,
          'seed': seed, 'measures': list(alignment.MEASURES),
          'rotation_invariant': list(alignment.ROTATION_INVARIANT), 'pairs': pairs}
