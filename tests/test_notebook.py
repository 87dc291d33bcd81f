"""examples/quickstart.ipynb, run top to bottom in a fresh kernel as a user would, and kept in
the repository without outputs."""

import json
import os
import sys

import nbformat
import pytest

from conftest import REPO

NOTEBOOK = os.path.join(REPO, 'examples', 'quickstart.ipynb')


def _notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_without_outputs():
  nb = _notebook()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code), (
      'commit the notebook without outputs (in Jupyter: Edit > Clear Outputs of All Cells)')


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  """Trains, restores, analyses, plots and generates; each step shows what it should."""
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  # The kernel is this interpreter (a kernelspec of its own, found first on JUPYTER_PATH),
  # with one CPU device as on a laptop, not the tests' 8 fake ones.
  spec = tmp_path / 'kernels' / 'twotower_test'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'twotower_jax test', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path))
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # the notebook's workdir goes here
  nb = _notebook()
  NotebookClient(nb, timeout=900, kernel_name='twotower_test',
                 resources={'metadata': {'path': os.path.join(REPO, 'examples')}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'step 60: held-out loss' in text and 'parameters' in text
  assert 'tower_0: ' in text and 'tower_1: ' in text
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2  # loss and preference
  assert 'prompt 2, sample 1' in text and '\x1b[48;2;' in text  # pieces on tower colours
  page = text.split('the same view as a web page: ')[1].split()[0]
  with open(page, encoding='utf-8') as f:
    assert f.read().count('class="passage"') == 2
  assert not [o for o in outputs if o.output_type == 'error']
