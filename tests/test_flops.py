"""Analytic FLOPs (flops.py) and the MFU arithmetic of the pre-flight report."""

import types

import pytest

from twotower_jax.train import flops
from twotower_jax.model import layers
from twotower_jax.model import lm as model_lib
from twotower_jax.train import preflight


def test_tree_count_equals_closed_form_for_causal_towers(tiny):
  config = tiny(**{'model.n_layers': 3, 'model.d_model': 48, 'model.d_mlp': 96})
  model = model_lib.build(config, 256)
  per_token = flops.train_flops_per_token(model, 32)
  assert per_token == flops.causal_formula_flops_per_token(model.cfg, 32)
  h, f, v, n = 48, 96, 256, 3
  by_hand = 3 * (2 * (2 * n * (4 * h * h + 2 * h * f) + 2 * h * h + v * h) + 4 * 32 * h * 2 * n)
  assert per_token == by_hand
  assert flops.train_flops_per_step(model, 8, 32) == by_hand * 8 * 32
  # One tower of the same shape costs a bit more than half (the shared output layer).
  single = flops.causal_formula_flops_per_token(
      layers.model_config(vocab_size=256, n_towers=1, n_layers=3, d_model=48, d_mlp=96), 32)
  assert per_token / 2 < single < per_token


@pytest.mark.parametrize('kind,dtype,peak', [
    ('TPU v4', 'bfloat16', 275e12), ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5p', 'float32', 459e12), ('TPU v6 lite', 'bfloat16', 918e12),
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12), ('NVIDIA H100 PCIe', 'float32', 378e12),
    ('NVIDIA H200', 'float32', 494.7e12), ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312e12),
    ('cpu', 'float32', None)])
def test_device_peaks(kind, dtype, peak):
  assert flops.device_peak(types.SimpleNamespace(device_kind=kind), dtype) == peak


def test_throughput_reports_mfu_only_with_a_peak():
  pf = preflight.Preflight(None, 1.0, flops_per_step=1e12, peak_flops=4e12, peak_source='x',
                           memory={'temp_size_in_bytes': 5})
  assert pf.throughput(steps=2, seconds=1.0) == {'flops_per_s': 2e12, 'mfu': 0.5}
  assert pf.summary()['memory_temp_size_in_bytes'] == 5
  pf.peak_flops = None
  assert 'mfu' not in pf.throughput(steps=2, seconds=1.0)


@pytest.mark.parametrize('mode,tied', [('projected', True), ('shared', False)])
def test_projections_and_untied_output_are_matmuls(tiny, mode, tied):
  """`projected` tables reach the towers through in_proj and the output through out_proj;
  an untied output layer is `output`, and then the token table is only looked up."""
  config = tiny(**{'model.embedding.mode': mode, 'model.embedding.tied': tied})
  params = flops.param_shapes(model_lib.build(config, 256))
  n, h, v = 2, 32, 256
  towers_and_gate = flops.matmul_params({'towers': params['towers'], 'gate': params['gate']})
  if mode == 'projected':  # table V x NH, in_proj N x NH x H, out_proj H x NH
    embed = v * n * h + n * (n * h) * h + h * n * h
  else:  # output V x H (the V x H token table is looked up only)
    embed = v * h
  assert flops.matmul_params(params) == towers_and_gate + embed
