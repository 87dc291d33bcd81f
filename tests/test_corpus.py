"""Corpus sources: markers stripped, whole documents held out, clear errors."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.train import setup as setup_lib


def _data_config(**kw):
  c = config_lib.base_config().data
  for k, v in kw.items():
    c[k] = v
  return c


def test_strip_markers():
  text = 'Thank you. [Applause] We will [laughter] go on.\n[Members of the audience spoke.]\nEnd.'
  assert corpus_lib.strip_markers(text) == 'Thank you. We will go on.\n\nEnd.'


def test_sotu_split_holds_out_whole_speeches():
  corpus = corpus_lib.load(_data_config(source='sotu'))
  assert len(corpus.train_names) + len(corpus.val_names) == 249
  assert set(corpus.train_names).isdisjoint(corpus.val_names)
  assert 10 <= len(corpus.val_names) <= 15  # 5% of 249
  # held-out speeches span the collection, not one era
  years = sorted(int(n[:4]) for n in corpus.val_names)
  assert years[0] < 1820 and years[-1] > 1990
  for doc in corpus.train_docs + corpus.val_docs:
    assert '[Applause]' not in doc and '[Laughter]' not in doc and '[laughter]' not in doc
  assert all(doc.strip() for doc in corpus.train_docs)


def test_text_source_split_and_val_glob(tmp_path):
  for i in range(4):
    (tmp_path / f'doc{i}.txt').write_text(f'document {i} text\n')
  corpus = corpus_lib.load(_data_config(source='text', text_glob=str(tmp_path / '*.txt'),
                                        val_fraction=0.25))
  assert len(corpus.train_docs) == 3 and len(corpus.val_docs) == 1
  corpus = corpus_lib.load(_data_config(source='text', text_glob=str(tmp_path / '*.txt'),
                                        text_val_glob=str(tmp_path / 'doc0.txt')))
  assert corpus.val_docs == ['document 0 text\n'] and len(corpus.train_docs) == 3


@pytest.mark.parametrize('setup,match', [
    (lambda d: None, 'matches no files'),
    (lambda d: (d / 'a.txt').write_text('only one file'), 'matches one file'),
    (lambda d: ((d / 'a.txt').write_text('x'), (d / 'b.txt').write_text('  \n')), 'empty file'),
    (lambda d: ((d / 'a.txt').write_text('x'), (d / 'b.txt').write_bytes(b'ok \xff\xfe bad')),
     'b.txt: not UTF-8'),
])
def test_text_source_errors(tmp_path, setup, match):
  setup(tmp_path)
  with pytest.raises(corpus_lib.CorpusError, match=match):
    corpus_lib.load(_data_config(source='text', text_glob=str(tmp_path / '*.txt')))


def test_unknown_source():
  with pytest.raises(config_lib.ConfigError, match="data.source='nope' is unknown"):
    corpus_lib.load(_data_config(source='nope'))


_BUILD_TFDS = '''
import sys
import tensorflow_datasets as tfds

class TinyText(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')
  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))
  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(12), 'test': self._generate_examples(3, 100)}
  def _generate_examples(self, n, offset=0):
    for i in range(n):
      yield i, {'text': f'document number {i + offset} says hello.'}

class TinyBooks(tfds.core.GeneratorBasedBuilder):  # pg19-like: another key, other splits
  VERSION = tfds.core.Version('1.0.0')
  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'book_text': tfds.features.Text()}))
  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(5), 'validation': self._generate_examples(2, 50)}
  def _generate_examples(self, n, offset=0):
    for i in range(n):
      yield i, {'book_text': f'book number {i + offset} begins.'}

TinyText(data_dir=sys.argv[1], file_format='array_record').download_and_prepare()
TinyBooks(data_dir=sys.argv[1], file_format='array_record').download_and_prepare()
'''

_READ_TFDS = '''
import sys
from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
c = config_lib.base_config().data
c.source, c.tfds_name, c.tfds_data_dir = 'tfds', 'tiny_text', sys.argv[1]
corpus = corpus_lib.load(c)
print(len(corpus.train_docs), len(corpus.val_docs))
print(sorted(corpus.val_docs)[0])
# two datasets, one after the other: a key and splits each, max_docs per dataset
c.tfds_name, c.tfds_text_key = 'tiny_text, tiny_books', 'text,book_text'
c.tfds_val_split, c.tfds_max_docs = 'test,validation', 10
both = corpus_lib.load(c)
print(len(both.train_docs), len(both.val_docs), sorted(both.train_docs[10:])[-1],
      sorted(both.val_docs[3:])[-1])  # (TFDS stores examples in its own order)
print(both.train_names[0], both.val_names[-1])
print('tensorflow' in sys.modules)
'''


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  """Prepared locally (no network); read in a fresh process that never defines the builder."""
  env = dict(os.environ, PYTHONPATH=REPO)
  subprocess.run([sys.executable, '-c', _BUILD_TFDS, str(tmp_path)], check=True, env=env,
                 capture_output=True)
  out = subprocess.run([sys.executable, '-c', _READ_TFDS, str(tmp_path)], check=True, env=env,
                       capture_output=True, text=True).stdout.split('\n')
  assert out[0] == '12 3'
  assert out[1] == 'document number 100 says hello.'
  assert out[2] == '15 5 book number 4 begins. book number 51 begins.'
  assert out[3] == 'tiny_text:train[0] tiny_books:validation[1]'
  assert out[4] == 'False'


@pytest.mark.parametrize('fields,match', [
    ({'tfds_name': ''}, 'data.source=tfds needs --config.data.tfds_name=NAME'),
    ({'tfds_name': 'a,,b'}, "got 'a,,b'"),
    ({'tfds_name': 'a,b,c', 'tfds_text_key': 'text,book_text'},
     "data.tfds_text_key='text,book_text' needs one value or one per dataset of "
     'data.tfds_name \\(3: a, b, c\\)'),
    ({'tfds_name': 'a,b', 'tfds_val_split': 'test,'}, 'data.tfds_val_split'),
])
def test_tfds_list_fields_are_checked_before_any_read(fields, match):
  c = config_lib.base_config()
  c.data.source = 'tfds'
  c.data.update(fields)
  with pytest.raises(config_lib.ConfigError, match=match) as err:
    setup_lib.check_config(c)
  assert '\n' not in str(err.value)


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  c = _data_config(source='tfds', tfds_name='no_such_dataset_xyz', tfds_data_dir=str(tmp_path))
  with pytest.raises(corpus_lib.CorpusError, match='is not prepared'):
    corpus_lib.load(c)


def test_sotu_years_keep_one_era_and_the_collections_held_out_speeches():
  """An era's run trains and is scored only on its speeches; its held-out speeches are the
  whole collection's that fall in those years, so no era trains on another's held-out one."""
  full = corpus_lib.load(_data_config(source='sotu'))
  eras = {}
  for years in ('1790-1899', '1945-2026', '1790-1899,1945-2026'):
    eras[years] = corpus_lib.load(_data_config(source='sotu', sotu_years=years))
  old, new, both = eras['1790-1899'], eras['1945-2026'], eras['1790-1899,1945-2026']
  assert all(1790 <= int(n[:4]) <= 1899 for n in old.train_names + old.val_names)
  assert all(int(n[:4]) >= 1945 for n in new.train_names + new.val_names)
  assert old.val_names and new.val_names
  for era in eras.values():
    assert set(era.val_names) <= set(full.val_names)
    assert set(era.train_names) <= set(full.train_names)
  assert set(both.val_names) == set(old.val_names) | set(new.val_names)
  assert set(both.train_names) == set(old.train_names) | set(new.train_names)
  assert len(full.train_names) > len(both.train_names)  # 1900-1944 left out


@pytest.mark.parametrize('fields,match', [
    ({'sotu_years': '1899-1790'}, 'FROM-TO ranges'),
    ({'sotu_years': '18th century'}, 'FROM-TO ranges'),
    ({'sotu_years': '1790-1899,'}, 'FROM-TO ranges'),
    ({'source': 'text', 'text_glob': '*.txt', 'sotu_years': '1790-1899'},
     'applies to data.source=sotu'),
])
def test_sotu_years_errors_name_the_fix(fields, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    corpus_lib.check_config(_data_config(**fields))


def test_sotu_years_without_held_out_speeches_is_one_clear_error():
  # a single year: 1862 has one speech, a training one
  with pytest.raises(corpus_lib.CorpusError, match='keeps 1 training and 0 held-out'):
    corpus_lib.load(_data_config(source='sotu', sotu_years='1862'))
