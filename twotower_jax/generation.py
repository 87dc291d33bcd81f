"""Generation from a trained run: prompts in, continuations and who wrote each token out.

A prompt is read as the start of a document: its pieces follow an EOS, as every
document does in the packed training windows. `generate` runs model/decode.py's
loop, jitted on the restored run's mesh with the training sharding rules, for
every (prompt, sample) row at once; each row draws with its own key, fold_in(
fold_in(seed, prompt), sample), so a sample does not depend on what else is in
the batch. Each sample becomes one record (`records`: JSON lines) with, per
generated token, its log-probability and attribution:

- latent gate (a mixture): the prior pi_t over towers before the token and the
  posterior after it; with Co-LLM decoding also the tower that wrote it;
- other gates: `drop`, the log-likelihood lost when tower k's state at that position
  is replaced by its mean state, computed as the analysis's ablation estimator does,
  over the first `mean_windows` held-out windows (0: all, as `analyze` scores them).

`lean` in [-1, 1] (+1 = tower 0; two towers) colours the views: Co-LLM: +-1 by the
tower that wrote the token; latent: posterior r_0 - r_1; otherwise (drop_0 - drop_1)
over the largest |drop_0 - drop_1| among the tokens generated in the call. Views: a
coloured terminal view (`terminal_view`) and a self-contained HTML page (`write`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import unicodedata
from typing import Sequence

import jax
import numpy as np

from twotower_jax import errors
from twotower_jax import paths
from twotower_jax import run as run_lib
from twotower_jax import staging
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import estimators as est_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import decode
from twotower_jax.model import gates
from twotower_jax.model import partitioning
from twotower_jax.report import render
from twotower_jax.report.format import SPACE_PIECE, md_escape
from twotower_jax.train import sharding as sharding_lib

log = logging.getLogger('twotower_jax')
SUPERSCRIPTS = '\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079'  # 0-9


class GenerationError(errors.UserError):
  """Prompts that cannot be generated from; the message says what to change."""


MAX_PROMPT_BYTES = 2**20  # --prompt_file is read up to this size (a prompt fits a window)
MAX_ROWS = 1024  # samples per call (prompts x --num_samples), generated as one batch


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
  """The prompts of --prompt or --prompt_file (one per line, blank lines skipped; at most
  MAX_PROMPT_BYTES are read, so /dev/zero or a huge file is refused, not read whole)."""
  if (prompt is None) == (not prompt_file):
    raise GenerationError('give exactly one of --prompt="TEXT" and --prompt_file=FILE (one '
                          'prompt per line)')
  if prompt is not None:
    if not prompt.strip():
      raise GenerationError('the prompt is empty; give some text to continue, e.g. '
                            '--prompt="The state of the Union"')
    return [prompt]
  where = f'--prompt_file={prompt_file}'
  try:
    with open(prompt_file, 'rb') as f:
      raw = f.read(MAX_PROMPT_BYTES + 1)
  except OSError as e:
    raise GenerationError(f'cannot read {where} ({e.strerror})') from None
  if len(raw) > MAX_PROMPT_BYTES:
    raise GenerationError(f'{where} is larger than {MAX_PROMPT_BYTES // 2**20} MiB; give a file '
                          f'of prompts, one per line (at most {MAX_ROWS} samples per call)')
  nul = raw.find(b'\0')
  if nul >= 0:
    raise GenerationError(f'{where} is a binary file, not text (NUL byte at byte {nul}); give a '
                          'text file of prompts, one per line')
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise GenerationError(f'{where} is not UTF-8 text (byte {e.start}); convert it with '
                          'iconv') from None
  prompts = [line.rstrip('\r') for line in text.split('\n') if line.strip()]
  if not prompts:
    raise GenerationError(f'{where} holds no prompt (one per line)')
  return prompts


def check_rows(n_prompts: int, num_samples: int) -> None:
  """GenerationError when the call asks for more than MAX_ROWS samples (one batch)."""
  if n_prompts * num_samples > MAX_ROWS:
    raise GenerationError(f'{n_prompts} prompt(s) x --num_samples={num_samples} = '
                          f'{n_prompts * num_samples} samples, more than the {MAX_ROWS} one call '
                          'generates; lower --num_samples or split the prompts over several calls')


def _control_chars(text: str) -> str:
  """'U+0001 at character 3, ...' for the control characters (tab aside) SentencePiece drops."""
  found = [f'U+{ord(c):04X} at character {i + 1}' for i, c in enumerate(text)
           if unicodedata.category(c) == 'Cc' and c != '\t']
  return ', '.join(found[:3]) + (f' and {len(found) - 3} more' if len(found) > 3 else '')


def encode_prompts(sp, prompts: Sequence[str], max_len: int) -> list[np.ndarray]:
  """Each prompt's ids after the document-start EOS; refuses one the window cannot hold and
  warns of control characters, which the tokenizer drops."""
  out = []
  for i, text in enumerate(prompts):
    ids = np.asarray([tokenizer_lib.EOS_ID] + list(sp.encode(text)), np.int32)
    where = f'prompt {i + 1} ({text[:40]!r}{"..." if len(text) > 40 else ""})'
    if _control_chars(text):
      log.warning('generate: %s has control characters (%s); the tokenizer drops them, so the '
                  'model reads the prompt without them', where, _control_chars(text))
    if len(ids) == 1:
      raise GenerationError(f'{where} is empty after tokenization; give some text')
    if len(ids) > max_len:
      raise GenerationError(f'{where} is {len(ids)} tokens with the document-start EOS, longer '
                            f'than model.max_len={max_len}; shorten it to at most '
                            f'{max_len - 1} tokens')
    out.append(ids)
  return out


def fit_window(sampling: decode.Sampling, prompt_ids: Sequence[np.ndarray], max_len: int
               ) -> decode.Sampling:
  """`sampling` with max_new_tokens clipped to what the window lets the shortest prompt
  produce (max_len + 1 - its length), with a note: the loop's buffers grow with it."""
  room = max_len + 1 - min(len(ids) for ids in prompt_ids)
  if sampling.max_new_tokens <= room:
    return sampling
  log.info('generate: --max_new_tokens=%d clipped to %d, the most the window leaves after the '
           'shortest prompt (model.max_len=%d positions and the token after the last)',
           sampling.max_new_tokens, room, max_len)
  return dataclasses.replace(sampling, max_new_tokens=room)


MEAN_WINDOWS = 64  # held-out windows averaged for the ablation mean (0: all)


def ablation_means(restored: run_lib.Run, mean_windows: int = MEAN_WINDOWS):
  """mu_NxH: the analysis's ablation estimator's mean tower states over the first
  `mean_windows` held-out windows (0: all), or None where the estimator does not apply."""
  config, setup = restored.config, restored.setup
  if gates.get(config.model.gate).mixture or config.model.n_towers < 2:
    return None
  if len(setup.splits.val_windows) == 0:
    log.info('generate: no held-out windows for the mean tower states; no ablation attribution')
    return None
  ctx = est_lib.Context(
      config=config, model=setup.model, params=restored.params,
      eval_batches=est_lib.base.eval_batches(setup.splits.val_windows, int(mean_windows),
                                             config.train.batch_size),
      train_windows=setup.splits.train_windows, analysis_dir='', step=restored.step)
  return est_lib.get('ablation').prepare(ctx)


@dataclasses.dataclass
class Result:
  """decode.generate's arrays for the rows (prompt, sample), with timings."""
  rows: list[tuple[int, int]]
  arrays: dict[str, np.ndarray]
  compile_s: float
  seconds: float


def generate(restored: run_lib.Run, prompt_ids: Sequence[np.ndarray], sampling: decode.Sampling,
             seed: int = 0, num_samples: int = 1, mean_windows: int = MEAN_WINDOWS) -> Result:
  """Samples `num_samples` continuations of each prompt on the run's mesh."""
  model, mesh, config = restored.model, restored.setup.mesh, restored.config
  decode.check(model.cfg, sampling)
  rows = [(i, j) for i in range(len(prompt_ids)) for j in range(num_samples)]
  data_ways = mesh.shape['data'] * mesh.shape['fsdp']
  b = -(-len(rows) // data_ways) * data_ways  # whole rows per data-parallel device
  p = max(len(ids) for ids in prompt_ids)
  prompt_BxP = np.full((b, p), tokenizer_lib.PAD_ID, np.int32)
  lengths_B = np.ones((b,), np.int32)  # padding rows: a one-token prompt, dropped after
  prompt_BxP[:, 0] = tokenizer_lib.EOS_ID
  for r, (i, _) in enumerate(rows):
    prompt_BxP[r, :len(prompt_ids[i])] = prompt_ids[i]
    lengths_B[r] = len(prompt_ids[i])
  base = jax.random.PRNGKey(seed)
  keys_B = np.stack([jax.random.fold_in(jax.random.fold_in(base, i), j) for i, j in rows] +
                    [base] * (b - len(rows)))
  rules = sharding_lib.rules(config)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  args = [restored.params] + [jax.device_put(x, batch_sh) for x in (prompt_BxP, lengths_B, keys_B)]
  args.append(ablation_means(restored, mean_windows))
  fn = functools.partial(decode.generate, model=model, sampling=sampling)
  t0 = time.perf_counter()
  compiled = jax.jit(partitioning.with_rules(fn, mesh, rules)).lower(*args).compile()
  t1 = time.perf_counter()
  arrays = jax.device_get(compiled(*args))
  t2 = time.perf_counter()
  arrays = {name: np.asarray(x)[:len(rows)] for name, x in arrays.items()}
  n_new = int(arrays['valid_BxM'].sum())
  log.info('generate: %d samples, %d new tokens in %.2fs (%.0f tokens/s; compile %.1fs, %s)',
           len(rows), n_new, t2 - t1, n_new / max(t2 - t1, 1e-9), t1 - t0,
           'KV cache' if decode.uses_cache(model.cfg, sampling) else 'full recomputation')
  return Result(rows, arrays, t1 - t0, t2 - t1)


def _share(winner_T: np.ndarray, n: int) -> list[float]:
  return [float(np.mean(winner_T == k)) if len(winner_T) else math.nan for k in range(n)]


def records(result: Result, prompts: Sequence[str], prompt_ids: Sequence[np.ndarray], sp,
            sampling: decode.Sampling, n_towers: int, step: int, seed: int,
            max_len: int | None = None) -> list[dict]:
  """One JSON-ready record per sample: prompt, continuation, why it stopped (`max_len`: the
  window, given model.max_len), per-token values, `lean` and `tower_share` (Co-LLM: the
  share of tokens each tower wrote; else the share each tower's attribution ranks first)."""
  a = result.arrays
  attribution = ('co_llm' if 'tower_BxM' in a else 'posterior' if 'posterior_BxMxN' in a
                 else 'ablation' if 'drop_BxMxN' in a else None)
  scale = 1.0
  if attribution == 'ablation' and n_towers == 2:
    d = (a['drop_BxMxN'][..., 0] - a['drop_BxMxN'][..., 1])[a['valid_BxM']]
    scale = max(float(np.max(np.abs(d))) if d.size else 0.0, 1e-12)
  out = []
  for r, (i, j) in enumerate(result.rows):
    m = int(a['valid_BxM'][r].sum())
    ids = [int(t) for t in a['token_BxM'][r, :m]]
    tokens, winners = [], []
    for t, tok in enumerate(ids):
      entry = {'id': tok, 'piece': sp.id_to_piece(tok), 'logp': float(a['logp_BxM'][r, t])}
      values = None
      if attribution in ('co_llm', 'posterior'):
        entry['prior'] = a['prior_BxMxN'][r, t].tolist()
        values = entry['posterior'] = a['posterior_BxMxN'][r, t].tolist()
      if attribution == 'co_llm':
        entry['tower'] = int(a['tower_BxM'][r, t])
        values = np.eye(n_towers)[entry['tower']]
      if attribution == 'ablation':
        values = entry['drop'] = a['drop_BxMxN'][r, t].tolist()
      if values is not None:
        winners.append(int(np.argmax(values)))
        if n_towers == 2:
          entry['lean'] = float(np.clip((values[0] - values[1]) / scale, -1, 1))
      tokens.append(entry)
    full = max_len is not None and m >= max_len + 1 - len(prompt_ids[i])
    stop = ('eos' if ids and ids[-1] == tokenizer_lib.EOS_ID and sampling.stop_at_eos else
            'max_new_tokens' if m == sampling.max_new_tokens and not full else 'max_len')
    text_ids = [t for t in ids if t not in (tokenizer_lib.EOS_ID, tokenizer_lib.PAD_ID)]
    out.append({'prompt_index': i, 'sample': j, 'prompt': prompts[i],
                'continuation': sp.decode(text_ids), 'stop': stop, 'step': int(step),
                'seed': int(seed), 'settings': dataclasses.asdict(sampling),
                'attribution': attribution,
                'prompt_pieces': [sp.id_to_piece(int(t)) for t in prompt_ids[i][1:]],
                'tower_share': _share(np.asarray(winners), n_towers) if winners else None,
                'tokens': tokens})
  return out


def _text(piece: str) -> str:
  return piece.replace(SPACE_PIECE, ' ')


def _mark(token: dict) -> str:
  """Three or more towers: the index of the tower that wrote the token (Co-LLM) or that
  its attribution ranks first; '' otherwise."""
  values = token.get('drop') or token.get('posterior') or []
  if len(values) < 3:
    return ''
  return str(token['tower'] if 'tower' in token else int(np.argmax(values)))


def _share_line(rec: dict) -> str:
  """'tokens written by: tower 0 60%, tower 1 40%' (Co-LLM) or 'tokens leaning to: ...'."""
  if not rec['tower_share']:
    return ''
  what = 'written by' if rec['attribution'] == 'co_llm' else f'leaning to ({rec["attribution"]})'
  return f'tokens {what}: ' + ', '.join(f'tower {k} {s:.0%}'
                                        for k, s in enumerate(rec['tower_share']))


def terminal_view(recs: Sequence[dict], color: bool) -> str:
  """The samples as text; with `color`, each generated piece on its tower's colour (ANSI
  24-bit background, strength = |lean|; three or more towers: a superscript index)."""
  lines = []
  if color and any(t.get('lean') is not None for r in recs for t in r['tokens']):
    lines.append(_ansi('tower 0', 1.0) + ' ' + _ansi('tower 1', -1.0) +
                 '  (paler: weaker lean; the prompt is plain)')
  for rec in recs:
    lines.append(f'--- prompt {rec["prompt_index"] + 1}, sample {rec["sample"] + 1} '
                 f'(stop: {rec["stop"]})')
    parts = [_text(p) for p in rec['prompt_pieces']]
    for t in rec['tokens']:
      piece = _text(t['piece'])
      if color and t.get('lean') is not None:
        piece = _ansi(piece, t['lean'])
      elif color and _mark(t):
        piece += ''.join(SUPERSCRIPTS[int(c)] for c in _mark(t))
      parts.append(piece)
    lines.append(''.join(parts).strip())
    if _share_line(rec):
      lines.append(f'({_share_line(rec)})')
  return '\n'.join(lines)


def _ansi(text: str, lean: float) -> str:
  """text on the tower's colour blended with white by |lean| (report.render.LEAN_RGB)."""
  rgb = render.LEAN_RGB[0 if lean >= 0 else 1]
  a = min(abs(lean), 1.0)
  r, g, b = (round(255 - a * (255 - c)) for c in rgb)
  return f'\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m'


def html_page(recs: Sequence[dict], title: str) -> str:
  """The samples as the report's token view: prompt grey, generated pieces coloured."""
  passages, rows = [], []
  for rec in recs:
    pieces = list(rec['prompt_pieces'])
    lean = [None] * len(pieces)
    for t in rec['tokens']:
      mark = '' if 'lean' in t else _mark(t)
      pieces.append(t['piece'] + (f'[{mark}]' if mark else ''))
      lean.append(t.get('lean'))
    passages.append({'pieces': pieces, 'lean': lean})
    rows.append([str(rec['prompt_index'] + 1), str(rec['sample'] + 1), str(len(rec['tokens'])),
                 rec['stop'], _share_line(rec) or 'n/a'])
  note = ('Each generated piece is coloured by the tower it leans to (blue: tower 0, orange: '
          'tower 1, paler: weaker; the prompt is grey, "not scored"); with more than two towers '
          'the leading tower follows the piece in brackets. Per-token values are in '
          f'{workdir_lib.GENERATIONS_JSONL}; docs/GENERATION.md defines them.')
  blocks = [('h', 1, md_escape(title)), ('p', note),
            ('table', ['prompt', 'sample', 'new tokens', 'stop', 'towers'], rows),
            ('tokens', passages)]
  return render.to_html(blocks, '', title=title)


def check_out(out_dir: str, workdir: str, given: bool) -> None:
  """GenerationError when `out_dir` may not hold the generations (staging.refusal): a given
  --out must be new, empty or hold earlier generations."""
  why = staging.refusal(out_dir, 'generation',
                        (workdir_lib.GENERATIONS_JSONL,) if given else None, reads=(workdir,))
  if why:
    raise GenerationError(why)


def write(recs: Sequence[dict], out_dir: str, title: str) -> tuple[str, str]:
  """OUT/generations.jsonl and OUT/generations.html, written as one unit: a staged folder
  renamed over OUT, so a signal or a failed write (a full disk) leaves the earlier outputs
  whole and no temporary file. Returns their paths."""
  out_dir = paths.absolute(out_dir)
  try:
    with staging.staged_dir(out_dir) as staged:
      workdir_lib.write_jsonl(paths.join(staged, workdir_lib.GENERATIONS_JSONL), recs)
      workdir_lib.write_text(paths.join(staged, workdir_lib.GENERATIONS_HTML),
                             html_page(recs, title))
  except OSError as e:
    raise GenerationError(f'cannot write the generations to {out_dir} ({e.strerror}); the '
                          'earlier ones there are unchanged: free space or pass --out=DIR, a '
                          'writable folder') from None
  return (paths.join(out_dir, workdir_lib.GENERATIONS_JSONL),
          paths.join(out_dir, workdir_lib.GENERATIONS_HTML))
