"""The pre-flight dry run (--dry_run=TARGET): targets, the report, and that it writes nothing.

In-process cases use 8-device targets (v5e-8, H100x8), the 8 fake CPU devices of the tests;
the command-line case runs a 16-chip target in its own process.
"""

import importlib
import os

import pytest

from conftest import run_module, snapshot
from twotower_jax import errors
from twotower_jax.model import lm as model_lib
from twotower_jax.train import dryrun
from twotower_jax.train import flops as flops_lib


@pytest.mark.parametrize('name,platform,devices,hbm,peak_bf16', [
    ('v5e-8', 'tpu', 8, 16, 197e12), ('v5litepod-16', 'tpu', 16, 16, 197e12),
    ('v4-32', 'tpu', 16, 32, 275e12), ('v5p-8', 'tpu', 4, 95, 459e12),
    ('v6e-8', 'tpu', 8, 32, 918e12), ('H100', 'cuda', 1, 80, 989e12),
    ('H100x8', 'cuda', 8, 80, 989e12), ('A100', 'cuda', 1, 80, 312e12)])
def test_targets(name, platform, devices, hbm, peak_bf16):
  t = dryrun.target(name)
  assert (t.platform, t.devices, t.hbm_gib) == (platform, devices, hbm)
  assert t.peak_flops('bfloat16') == peak_bf16


@pytest.mark.parametrize('name', ['v3-8', 'v4-3', 'h100', 'H100x0', ''])
def test_unknown_targets_are_one_line_errors(name):
  with pytest.raises(errors.UserError) as e:
    dryrun.target(name)
  assert '\n' not in str(e.value) and '--dry_run=' in str(e.value)


def test_report_for_a_tpu_slice(tiny):
  config = tiny(**{'mesh.tower': 2, 'train.batch_size': 16})
  r = dryrun.run(config, dryrun.target('v5e-8'), mfu=0.5)
  assert r['platform'] == 'tpu' and r['mesh'] == {'data': 4, 'fsdp': 1, 'tower': 2}
  assert r['lowered_flops_per_step'] == pytest.approx(r['flops_per_step'], rel=0.05)
  assert r['step_s'] == pytest.approx(r['flops_per_step'] / (0.5 * 197e12 * 8))
  assert r['memory_per_device']['argument_size_in_bytes'] > 0
  assert r['memory_total_per_device'] < r['hbm_per_device']
  text = dryrun.format_report(r, config)
  for piece in ('dry run for v5e-8 (8 tpu devices)', 'lowered for tpu (jax.export): ok',
                'ESTIMATE', 'expected step time at MFU 0.50'):
    assert piece in text, piece


def test_gpu_report_counts_cudnn_and_estimates_flash_memory(tiny, cudnn_lowering):
  """bf16 on H100s: the lowering calls cuDNN (counted as attention FLOPs), and the CPU
  estimate keeps no score matrix, so it needs less than forcing XLA's attention."""
  base = {'model.dtype': 'bfloat16', 'data.seq_len': 64, 'model.max_len': 64,
          'mesh.tower': 2}
  flash = dryrun.run(tiny(**base), dryrun.target('H100x8'), mfu=0.45)
  xla = dryrun.run(tiny(**base, **{'model.attention': 'xla'}), dryrun.target('H100x8'), 0.45)
  assert flash['attention'] == 'cudnn' and '__cudnn$fmhaSoftmax' in flash['kernel_calls']
  assert xla['attention'] == 'xla' and not xla['kernel_calls']
  assert flash['lowered_flops_per_step'] == pytest.approx(flash['flops_per_step'], rel=0.05)
  temp = lambda r: r['memory_per_device']['temp_size_in_bytes']
  assert temp(flash) < temp(xla)


def test_dry_run_needs_cuda_only_to_name_the_kernel(tiny):
  """Without the CUDA plugin, cuDNN cannot be traced here: the report says so and lowers
  XLA's attention for the same FLOPs."""
  if dryrun.cudnn_traceable():
    pytest.skip('this machine can trace cuDNN')
  config = tiny(**{'model.dtype': 'bfloat16', 'model.n_layers': 1, 'mesh.tower': 1})
  r = dryrun.run(config, dryrun.target('H100x8'), 0.45)
  assert r['attention'].startswith('cudnn (lowered here with xla')
  assert r['lowered_flops_per_step'] == pytest.approx(r['flops_per_step'], rel=0.05)


def test_bad_mfu_is_refused(tiny):
  with pytest.raises(errors.UserError, match='dry_run_mfu'):
    dryrun.run(tiny(), dryrun.target('v5e-8'), mfu=1.5)


def test_command_line_dry_run_of_a_paper_preset_writes_nothing(tmp_path):
  """v4-32 (16 chips) in its own process; a --workdir given is left alone."""
  workdir = tmp_path / 'run'
  before = snapshot(str(tmp_path))
  proc = run_module('twotower_jax.main', '--config=configs/paper.py:causal,base',
                    '--dry_run=v4-32', '--dry_run_mfu=0.4', f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  for piece in ('dry run for v4-32 (16 tpu devices)', "mesh {'data': 16, 'fsdp': 1, 'tower': 1}",
                'lowered for tpu (jax.export): ok', '(1.000x)', 'expected step time at MFU 0.40',
                'of 32 GiB'):
    assert piece in out, (piece, out)
  assert not os.path.exists(workdir) and snapshot(str(tmp_path)) == before
  config = importlib.import_module('configs.paper').get_config('causal,base')
  model = model_lib.build(config, config.data.vocab_size)
  flops = float(out.split('FLOPs/step: ')[1].split(' ')[0])
  assert flops == pytest.approx(flops_lib.train_flops_per_step(model, 5120, 128), rel=1e-3)
  assert 'run: 655,360 tokens/step (5120 x 128) x 12,500 steps = 8,192,000,000 tokens' in out


def test_command_line_dry_run_refuses_an_unknown_target():
  proc = run_module('twotower_jax.main', '--config=configs/paper.py:causal,base',
                    '--dry_run=tpu-9000', timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --dry_run='tpu-9000'")


def test_pondering_passes_are_counted_as_the_lowered_step_runs_them(tiny, steps=2):
  # Each pass reruns the whole forward plus the expected-embedding matmul: the analytic
  # count (flops.py) must follow the lowered program, or pondering's FLOPs comparisons lie.
  config = tiny(**{'model.pondering.steps': steps, 'train.batch_size': 8})
  r = dryrun.run(config, dryrun.target('v5e-8'), mfu=0.5)
  plain = dryrun.run(tiny(**{'train.batch_size': 8}), dryrun.target('v5e-8'), mfu=0.5)
  assert r['lowered_flops_per_step'] == pytest.approx(r['flops_per_step'], rel=0.05)
  assert r['flops_per_step'] > (1 + steps) * plain['flops_per_step']
