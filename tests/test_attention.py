"""model.attention: which implementation each platform gets, the refusals, and the splash
kernel's wrapper (run in Pallas's interpreter) against XLA's attention."""

import jax
import jax.numpy as jnp
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import attention
from twotower_jax.model import layers
from twotower_jax.model import lm as model_lib


def _cfg(choice='auto', dtype='bfloat16', d_model=64, n_heads=4, platform=''):
  return layers.model_config(vocab_size=64, platform=platform, attention=choice, dtype=dtype,
                             d_model=d_model, n_heads=n_heads)


@pytest.mark.parametrize('choice,dtype,platform,expected', [
    ('auto', 'bfloat16', 'cuda', 'cudnn'),
    ('auto', 'float32', 'cuda', 'xla'),  # cuDNN flash attention needs bf16: XLA
    ('auto', 'bfloat16', 'tpu', 'xla'),
    ('auto', 'bfloat16', 'cpu', 'xla'),
    ('xla', 'bfloat16', 'cuda', 'xla'),
    ('cudnn', 'bfloat16', 'cuda', 'cudnn'),
    ('cudnn', 'bfloat16', 'tpu', 'xla'),  # no cuDNN on a TPU
    ('splash', 'bfloat16', 'tpu', 'splash'),
    ('splash', 'bfloat16', 'cuda', 'xla'),
    ('splash', 'float32', 'cpu', 'xla'),  # a splash run is still read on CPU
])
def test_implementation_per_platform(choice, dtype, platform, expected):
  assert attention.implementation(_cfg(choice, dtype), platform) == expected


def test_the_platform_comes_from_the_model_or_the_backend():
  assert attention.implementation(_cfg(platform='cuda')) == 'cudnn'
  assert attention.implementation(_cfg(platform='')) == 'xla'  # this machine: CPU
  assert attention.backend_platform() == 'cpu'


def test_auto_falls_back_where_cudnn_cannot_take_the_head_width():
  assert attention.implementation(_cfg(d_model=60, n_heads=4), 'cuda') == 'xla'  # 15
  assert attention.implementation(_cfg(d_model=1024, n_heads=4), 'cuda') == 'xla'  # 256


@pytest.mark.parametrize('overrides,message', [
    ({'model.attention': 'flash'}, "model.attention='flash' is unknown"),
    ({'model.attention': 'cudnn'}, "model.attention='cudnn' cannot run model.dtype='float32'"),
    ({'model.attention': 'cudnn', 'model.dtype': 'bfloat16', 'model.n_heads': 1},
     'head dim 256'),
    ({'model.attention': 'splash'}, 'data.seq_len a multiple of 128 (got 32)'),
])
def test_forced_kernels_that_cannot_run_are_refused(tiny, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    model_lib.check_config(tiny(**{'model.d_model': 256, **overrides}))


def test_every_choice_runs_xla_attention_on_this_cpu(tiny):
  """On CPU every choice is XLA's attention: the default job's numbers cannot move."""
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 2, 16))
  ref = jax.nn.dot_product_attention(q, q, q, is_causal=True)
  for choice in attention.CHOICES:
    out = attention.attend(q, q, q, causal=True, cfg=_cfg(choice, 'float32', 32, 2))
    assert jnp.array_equal(out, ref), choice


def test_splash_wrapper_matches_xla_attention_in_the_interpreter():
  """Layout, scaling and masks of the splash wrapper, value and gradient (Pallas interpret
  mode on CPU; the TPU lowering is tested in test_lowering.py)."""
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q, k, v = (jax.random.normal(key, (2, 128, 2, 16)) for key in keys)
  for causal in (True, False):
    out = attention._splash(  # pylint: disable=protected-access
        q, k, v, causal, interpret=True)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    assert jnp.max(jnp.abs(out - ref)) < 1e-5, causal
  splash = lambda q: attention._splash(  # pylint: disable=protected-access
      q, k, v, True, interpret=True)
  grad = jax.grad(lambda q: jnp.sum(jnp.sin(splash(q))))(q)
  ref = jax.grad(lambda q: jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v,
                                                                       is_causal=True))))(q)
  assert jnp.max(jnp.abs(grad - ref)) < 1e-5
