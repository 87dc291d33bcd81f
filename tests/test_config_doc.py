"""docs/CONFIG.md is generated from config.py's comments and kept current: every field is
there with its default, and a field added without a comment or a default changed without
regenerating fails here, naming the field and the command to run."""

import re
import subprocess
import sys

import pytest

from conftest import REPO
from twotower_jax import analysis_config
from twotower_jax import config as config_lib
from twotower_jax import config_doc

with open(config_lib.__file__, encoding='utf-8') as f:
  SOURCE = f.read()
with open(analysis_config.__file__, encoding='utf-8') as f:
  ANALYSIS_SOURCE = f.read()  # the analysis section's fields (config.py builds it from there)


def test_config_md_is_current():
  with open(config_doc.DOC_PATH, encoding='utf-8') as f:
    on_disk = f.read()
  problems = config_doc.stale(on_disk, config_lib.base_config())
  assert not problems, ('docs/CONFIG.md is stale:\n  ' + '\n  '.join(problems) +
                        f'\nregenerate it: {config_doc.REGENERATE}')
  assert on_disk == config_doc.current(), (
      f'docs/CONFIG.md is stale (field comments changed); regenerate it: {config_doc.REGENERATE}')


def test_every_field_has_a_row_with_its_default_and_comment():
  text = config_doc.current()
  rows = config_doc.documented_defaults(text)
  assert rows['data.seq_len'] == '128' and rows['model.gate'] == "'concat'"
  assert rows['model.embedding.tied'] == 'True' and rows['imports'] == "''"
  assert set(rows) == set(config_doc.field_values(config_lib.base_config()))
  assert len(rows) > 100
  assert '| `data.seq_len` | `128` | tokens per training window |' in text
  # Pipes and HTML in a comment stay text, inside a table cell too.
  assert "'unigram' \\| 'bpe' \\| 'word'" in text and 'word\\<TAB>closed\\|open' in text


def _with_field(source, after, line):
  """`source` with `line` inserted after the line that assigns `after`."""
  m = re.search(rf'^  c\.{re.escape(after)} = .*\n', source, re.M)
  return source[:m.end()] + line + '\n' + source[m.end():]


def test_a_new_field_without_a_comment_is_refused_by_name():
  config = config_lib.base_config()
  config.data.new_knob = 3
  source = _with_field(SOURCE, 'data.seq_len', '  c.data.new_knob = 3')
  with pytest.raises(config_doc.ConfigDocError, match=r'without a comment in config.py '
                     r'\(analysis.\*: in analysis_config.py\): data.new_knob; add one'):
    config_doc.render(source, config, ANALYSIS_SOURCE)
  text = config_doc.render(_with_field(SOURCE, 'data.seq_len',
                                       '  c.data.new_knob = 3  # a new knob'), config,
                            ANALYSIS_SOURCE)
  assert '| `data.new_knob` | `3` | a new knob |' in text


def test_a_missing_field_and_a_stale_default_are_named():
  """What another branch's new field or changed default does to the committed file."""
  text = config_doc.current()
  config = config_lib.base_config()
  config.data.seq_len = 64
  config.train.new_knob = 'x'
  assert sorted(config_doc.stale(text, config)) == [
      'data.seq_len: documented default 128, the code has 64', 'train.new_knob: missing']
  del config.train['new_knob']
  assert config_doc.stale(text.replace('| `imports` |', '| `imported` |'), config)[-1] == (
      'imported: documented, but config.py has no such field')


def test_check_command_tells_what_to_regenerate(tmp_path, monkeypatch, capsys):
  proc = subprocess.run([sys.executable, '-m', 'twotower_jax.config_doc', '--check'], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  stale_doc = tmp_path / 'CONFIG.md'
  stale_doc.write_text(config_doc.current().replace('| `data.seq_len` | `128` |',
                                                    '| `data.seq_len` | `256` |'))
  monkeypatch.setattr(config_doc, 'DOC_PATH', str(stale_doc))
  assert config_doc.main(['config_doc', '--check']) == 1
  err = capsys.readouterr().err
  assert 'data.seq_len: documented default 256, the code has 128' in err
  assert 'regenerate it: python -m twotower_jax.config_doc' in err
  assert '| `data.seq_len` | `256` |' in stale_doc.read_text()  # --check writes nothing
  assert config_doc.main(['config_doc']) == 0 and stale_doc.read_text() == config_doc.current()


def test_an_analysis_field_is_documented_from_analysis_config():
  """The analysis section lives in analysis_config.py: its fields are read from there."""
  config = config_lib.base_config()
  config.analysis.new_knob = 1
  m = re.search(r'^  a\.min_count = .*\n', ANALYSIS_SOURCE, re.M)
  bare = ANALYSIS_SOURCE[:m.end()] + '  a.new_knob = 1\n' + ANALYSIS_SOURCE[m.end():]
  with pytest.raises(config_doc.ConfigDocError, match='analysis.new_knob; add one'):
    config_doc.render(SOURCE, config, bare)
  told = bare.replace('  a.new_knob = 1\n', '  a.new_knob = 1  # a new analysis knob\n')
  text = config_doc.render(SOURCE, config, told)
  assert '| `analysis.new_knob` | `1` | a new analysis knob |' in text
  assert '| `analysis.primary` | `' in config_doc.current()
