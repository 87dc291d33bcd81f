"""paths.py: the same file operations on a local folder and on gs:// (a local emulator)."""

import csv
import os

import pytest

from tests import _gcs
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib


@pytest.fixture(scope='module')
def gs_root():
  with _gcs.emulator() as url:
    saved = dict(os.environ)
    os.environ.update(_gcs.environment(url))
    try:
      yield f'gs://{_gcs.BUCKET}/paths'
    finally:
      os.environ.clear()
      os.environ.update(saved)


def test_names_of_local_paths_and_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute('run') == str(tmp_path / 'run')
  assert paths.absolute('gs://b/run/') == 'gs://b/run'
  assert paths.join('gs://b/run', 'checkpoints', '3') == 'gs://b/run/checkpoints/3'
  assert paths.join('run', 'x') == str(tmp_path / 'run' / 'x')
  assert workdir_lib.path('gs://b/run', workdir_lib.CONFIG_JSON) == 'gs://b/run/config.json'


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_file_operations(where, tmp_path, request):
  root = str(tmp_path / 'root') if where == 'local' else request.getfixturevalue('gs_root')
  paths.makedirs(root)
  d = paths.join(root, 'a')
  paths.makedirs(d)
  paths.write_atomic(paths.join(d, 'x.json'), '{"v": 1}\n')
  paths.write_atomic(paths.join(d, 'y.bin'), b'\x00\x01')
  assert paths.exists(paths.join(d, 'x.json')) and paths.isfile(paths.join(d, 'y.bin'))
  assert paths.isdir(d) and paths.listdir(d) == ['x.json', 'y.bin']
  assert workdir_lib.read_json(paths.join(d, 'x.json')) == {'v': 1}
  assert paths.read_bytes(paths.join(d, 'y.bin')) == b'\x00\x01'
  workdir_lib.write_text(paths.join(d, 'rows.csv'), 'a,b\r\n"1\nx",2\r\n')
  with paths.open_file(paths.join(d, 'rows.csv'), newline='', encoding='utf-8') as f:
    assert list(csv.DictReader(f)) == [{'a': '1\nx', 'b': '2'}]
  copy = str(tmp_path / 'copy')
  paths.copy_tree(root, copy)
  assert sorted(os.listdir(os.path.join(copy, 'a'))) == ['rows.csv', 'x.json', 'y.bin']
  workdir_lib.append_metrics(root, {'kind': 'train', 'step': 1})
  workdir_lib.append_metrics(root, {'kind': 'train', 'step': 2})
  assert [l['step'] for l in workdir_lib.read_metrics(root)] == [1, 2]
  paths.remove(paths.join(d, 'y.bin'))
  assert not paths.exists(paths.join(d, 'y.bin'))
  paths.rmtree(d)
  paths.rmtree(d)  # gone already: no error
  assert not paths.exists(paths.join(d, 'x.json'))
