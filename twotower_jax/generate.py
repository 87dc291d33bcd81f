"""Generate: python -m twotower_jax.generate --workdir=DIR --prompt="TEXT" [--max_new_tokens=N
--temperature=T --top_k=K --top_p=P --seed=S --num_samples=M --step=STEP --co_llm=argmax].

Restores the run's checkpoint (latest, or --step) and tokenizer, continues each prompt
(--prompt, or --prompt_file with one per line) and prints the continuations, each
generated piece coloured by the tower it leans to on a terminal. Writes
DIR/generate/generations.jsonl and generations.html (or --out). Bad input exits with
one line on stderr. See docs/GENERATION.md.
"""

import logging
import sys

from absl import flags

from twotower_jax import cli
from twotower_jax import errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (written by twotower_jax.main).')
_PROMPT = flags.DEFINE_string('prompt', None, 'Text to continue.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'File of prompts, one per line '
                                   '(generated together as one batch).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate per sample (fewer at '
                                'EOS or where the prompt and continuation fill model.max_len).')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the K most likely tokens (0 = all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the most likely tokens holding '
                            'this much probability, in (0, 1] (1 = all).')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed of the samples.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.')
_STEP = flags.DEFINE_integer('step', 0, 'Checkpoint step (0 = the latest).')
_CO_LLM = flags.DEFINE_enum('co_llm', 'off', ['off', 'argmax', 'threshold'],
                            'latent gate: draw each token from one tower\'s own distribution, '
                            'the tower the gate\'s prior ranks first (argmax) or --co_llm_tower '
                            'when its prior exceeds --co_llm_threshold (threshold).')
_CO_LLM_TOWER = flags.DEFINE_integer('co_llm_tower', 1, '--co_llm=threshold: the deferred-to '
                                     'tower.')
_CO_LLM_THRESHOLD = flags.DEFINE_float('co_llm_threshold', 0.5, '--co_llm=threshold: its prior '
                                       'threshold.')
_STOP_AT_EOS = flags.DEFINE_bool('stop_at_eos', True, 'End a sample at the end-of-document '
                                 'token.')
_CACHED = flags.DEFINE_bool('cached', True, 'Use the KV cache (--nocached re-runs the whole '
                            'window per token: slower, same output).')
_COLOR = flags.DEFINE_enum('color', 'auto', ['auto', 'always', 'never'],
                           'Colour the pieces by tower on stdout (auto: when it is a terminal).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default DIR/generate).')
_MEAN_WINDOWS = flags.DEFINE_integer('mean_windows', 64, 'Held-out windows whose tower states '
                                     'are averaged for the ablation attribution (0 = all, as '
                                     'the analysis scores them).')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --prompt="Fellow citizens"')
  if not _WORKDIR.value:
    raise errors.UserError('--workdir=DIR is required (a directory written by '
                           'python -m twotower_jax.main)')
  if _NUM_SAMPLES.value < 1 or _MEAN_WINDOWS.value < 0:
    raise errors.UserError(f'--num_samples={_NUM_SAMPLES.value} must be >= 1 and '
                           f'--mean_windows={_MEAN_WINDOWS.value} >= 0')
  if not 0 <= _SEED.value < 2**32:
    raise errors.UserError(f'--seed={_SEED.value} must be an integer in [0, 2**32)')
  if _STEP.value < 0:
    raise errors.UserError(f'--step={_STEP.value} must be >= 0 (0 = the latest checkpoint)')
  # Imported here so --help and flag errors answer without loading JAX.
  from twotower_jax import generation  # pylint: disable=g-import-not-at-top
  from twotower_jax import paths  # pylint: disable=g-import-not-at-top
  from twotower_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.model import decode  # pylint: disable=g-import-not-at-top
  from twotower_jax.model import layers  # pylint: disable=g-import-not-at-top
  prompts = generation.read_prompts(_PROMPT.value, _PROMPT_FILE.value)
  generation.check_rows(len(prompts), _NUM_SAMPLES.value)
  sampling = decode.Sampling(
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, co_llm=_CO_LLM.value, co_llm_tower=_CO_LLM_TOWER.value,
      co_llm_threshold=_CO_LLM_THRESHOLD.value, stop_at_eos=_STOP_AT_EOS.value,
      cached=_CACHED.value)
  workdir = _WORKDIR.value
  config = run_lib.load_config(workdir)
  out_dir = _OUT.value or workdir_lib.generate_dir(workdir)
  generation.check_out(out_dir, workdir, given=bool(_OUT.value))
  workdir_lib.check_writable(out_dir)  # before the restore and the sampling
  # Everything that needs no checkpoint is checked before the (slow) restore.
  decode.check(layers.model_config(config.model, config.data.vocab_size), sampling)
  sp = tokenizer_lib.load(workdir_lib.path(workdir, workdir_lib.TOKENIZER))
  prompt_ids = generation.encode_prompts(sp, prompts, config.model.max_len)
  logging.getLogger('absl').setLevel(logging.ERROR)  # Orbax's notices on read-only restores
  restored = run_lib.restore(config, workdir, _STEP.value)
  sampling = generation.fit_window(sampling, prompt_ids, config.model.max_len)
  result = generation.generate(restored, prompt_ids, sampling, _SEED.value, _NUM_SAMPLES.value,
                               _MEAN_WINDOWS.value)
  recs = generation.records(result, prompts, prompt_ids, sp, sampling, config.model.n_towers,
                            restored.step, _SEED.value, config.model.max_len)
  color = _COLOR.value == 'always' or (_COLOR.value == 'auto' and sys.stdout.isatty())
  print(generation.terminal_view(recs, color))
  title = f'Generations: {paths.absolute(workdir).rsplit("/", 1)[-1]}, step {restored.step}'
  jsonl, page = generation.write(recs, out_dir, title)
  logging.getLogger('twotower_jax').info('generate: wrote %s and %s', jsonl, page)


if __name__ == '__main__':
  sys.exit(cli.run(main))
