"""bench/peer_torch.py, the PyTorch-eager peer the CPU step is timed against: from the same
weights it computes the project's loss and update (skipped without torch; CI installs it:
`pip install -e .[bench]`)."""

import json
import os
import sys

import pytest

torch = pytest.importorskip('torch')

from conftest import REPO  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(REPO, 'bench'))
import peer_torch  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position


@pytest.mark.parametrize('scan_layers', [True, False])
def test_peer_computes_the_projects_losses_from_the_same_weights(scan_layers):
  """configs/tiny.py without dropout, layers scanned (stacked parameters) or unrolled: the
  losses of four steps on one batch (the first two before any update: the warm-up's rate
  is 0 at step 0) agree to float32 noise, and the updates move them."""
  config = train_step.point_config({'model.dropout': 0.0, 'model.scan_layers': scan_layers},
                                   os.path.join(REPO, 'configs', 'tiny.py'))
  result = peer_torch.check(config, steps=4)
  assert result['max_abs_diff'] < 2e-5, result
  assert result['ours'][3] < result['ours'][1] - 1e-3, result


def test_peer_refuses_what_it_does_not_model():
  config = train_step.point_config({'model.dropout': 0.1})
  assert peer_torch.unsupported(config) == (
      "model.dropout=0.1 (the peer models model.dropout=0.0; set it so)")
  assert peer_torch.unsupported(train_step.point_config(
      {'model.dropout': 0.0, 'model.gate': 'latent'})).startswith("model.gate='latent'")
  assert peer_torch.unsupported(train_step.point_config({'model.dropout': 0.0})) is None


def test_peer_mode_alternates_who_goes_first_and_prints_the_median_ratio(monkeypatch, capsys,
                                                                         tmp_path):
  """bench/train_step.py --peer=torch: per round both sides run in their own process (here
  stubs), the first side alternating, the same huge-page arm; the ratio of each round and
  their median are printed and written with the rows."""
  order, peer_tokens_per_s = [], iter([1000.0, 800.0, 900.0])

  def ours(overrides, steps, repeats, flags=None, pages=None, preset=''):
    order.append(('jax', pages, overrides['model.dropout']))
    return {'tokens_per_s': 1100.0, 'ms_per_step': 1.0}

  def peer(overrides, steps, repeats, pages=None, preset=''):
    order.append(('torch', pages, overrides['model.dropout']))
    return {'tokens_per_s': next(peer_tokens_per_s), 'ms_per_step': 1.0}

  monkeypatch.setattr(train_step, 'run_point', ours)
  monkeypatch.setattr(train_step, 'run_peer_point', peer)
  out_file = tmp_path / 'rows.jsonl'
  monkeypatch.setattr(sys, 'argv', ['train_step.py', '--peer=torch', '--rounds=3',
                                    '--huge_pages=off', f'--out={out_file}'])
  train_step.main()
  assert order == [('jax', 'off', 0.0), ('torch', 'off', 0.0), ('torch', 'off', 0.0),
                   ('jax', 'off', 0.0), ('jax', 'off', 0.0), ('torch', 'off', 0.0)]
  out = capsys.readouterr().out
  assert ('target, huge_pages=off: jax / torch tokens/s, median of 3 rounds: 1.222 '
          '(rounds: 1.100, 1.375, 1.222)') in out
  rows = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert [r['side'] for r in rows] == ['jax', 'torch', 'torch', 'jax', 'jax', 'torch']
  assert [round(r['peer_ratio'], 3) for r in rows if r['side'] == 'jax'] == [1.1, 1.375, 1.222]


def test_peer_mode_refuses_a_point_the_peer_does_not_model(monkeypatch, capsys):
  monkeypatch.setattr(sys, 'argv', ['train_step.py', '--peer=torch', '--set',
                                    'model.dropout=0.1'])
  with pytest.raises(SystemExit) as exit_info:
    train_step.main()
  assert exit_info.value.code == 2
  assert ('--peer=torch cannot run point target: model.dropout=0.1 (the peer models '
          'model.dropout=0.0; set it so)') in capsys.readouterr().err
