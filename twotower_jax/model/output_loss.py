"""Cross-entropy straight from the output layer's input: the logits in row chunks, never whole.

The plain path forms logits_TxV = z E^T + b for all T = B*L positions (2048 x 8000 f32,
65 MB, in the default job), keeps them for the backward pass and walks them several
more times (bias, max, exp, sum, softmax minus one-hot, a transposed copy for dE). Here
the rows go through in chunks small enough to stay in cache, and because the loss is
where differentiation starts, each chunk's gradient is formed in the forward pass
itself: dlogits = w * (softmax - onehot) feeds dz = dlogits E, dE += dlogits^T z and
db += sum(dlogits) at once, so nothing V-wide outlives its chunk and no matmul is
added (the forward's logits and the backward's two products, as before). The
backward pass scales the saved gradients by the incoming cotangent.
Same arithmetic as `optax.softmax_cross_entropy_with_integer_labels` on f32 logits;
sums over chunks change the order of float additions, nothing else. Under a mesh each
device takes its own rows of the batch (`shard_map` over the batch's mesh axes, then the
others, so no device of the tower axis scores another's rows), and the table's and bias's
gradients are summed over the devices as the plain path's are.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from twotower_jax.model import partitioning


def _chunk_rows(t: int, chunk: int) -> int:
  """Rows per chunk: at most `chunk`, as even as the ceil(t / chunk) chunks allow (the
  last is padded with rows of weight 0 only where t has no such divisor)."""
  return -(-t // -(-t // chunk))


def _chunks(x_TxD: jax.Array, chunk: int) -> jax.Array:
  """[T, ...] -> [T/C, C, ...], zero rows appended to fill the last chunk."""
  t = x_TxD.shape[0]
  pad = -t % chunk
  if pad:
    x_TxD = jnp.concatenate([x_TxD, jnp.zeros((pad,) + x_TxD.shape[1:], x_TxD.dtype)])
  return x_TxD.reshape((-1, chunk) + x_TxD.shape[1:])


def _loss_and_grads(z_TxZ, table_VxZ, bias_V, targets_T, weights_T, chunk: int):
  """(per-row losses, dz, dE, db) of sum_t w_t CE_t, one chunk of rows at a time."""
  t = z_TxZ.shape[0]
  v = table_VxZ.shape[0]
  chunk = _chunk_rows(t, chunk)

  def body(carry, xs):
    d_table_VxZ, d_bias_V = carry
    z_CxZ, targets_C, weights_C = xs
    logits_CxV = jnp.dot(z_CxZ, table_VxZ.T, preferred_element_type=jnp.float32) + bias_V
    shifted_CxV = logits_CxV - jax.lax.stop_gradient(jnp.max(logits_CxV, axis=-1, keepdims=True))
    sum_exp_C = jnp.sum(jnp.exp(shifted_CxV), axis=-1)
    onehot_CxV = jax.nn.one_hot(targets_C, v, dtype=jnp.float32)
    losses_C = jnp.log(sum_exp_C) - jnp.sum(shifted_CxV * onehot_CxV, axis=-1)
    probs_CxV = jnp.exp(shifted_CxV) / sum_exp_C[:, None]
    d_logits_CxV = (probs_CxV - onehot_CxV) * weights_C[:, None]
    d_z_CxZ = d_logits_CxV @ table_VxZ
    d_table_VxZ = d_table_VxZ + d_logits_CxV.T @ z_CxZ
    d_bias_V = d_bias_V + jnp.sum(d_logits_CxV, axis=0)
    return (d_table_VxZ, d_bias_V), (losses_C, d_z_CxZ)

  zeros = (jnp.zeros(table_VxZ.shape, jnp.float32), jnp.zeros((v,), jnp.float32))
  xs = (_chunks(z_TxZ.astype(jnp.float32), chunk), _chunks(targets_T, chunk),
        _chunks(weights_T.astype(jnp.float32), chunk))
  (d_table_VxZ, d_bias_V), (losses_NxC, d_z_NxCxZ) = jax.lax.scan(body, zeros, xs)
  losses_T = losses_NxC.reshape(-1)[:t]
  d_z_TxZ = d_z_NxCxZ.reshape(-1, z_TxZ.shape[1])[:t]
  return losses_T, d_z_TxZ, d_table_VxZ, d_bias_V


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def cross_entropy_sum(z_TxZ: jax.Array, table_VxZ: jax.Array, bias_V: jax.Array,
                      targets_T: jax.Array, weights_T: jax.Array, chunk: int) -> jax.Array:
  """sum_t w_t CE(softmax(z_t E^T + b), target_t), in float32, `chunk` rows at a time."""
  losses_T = _loss_and_grads(z_TxZ, table_VxZ, bias_V, targets_T, weights_T, chunk)[0]
  return jnp.sum(losses_T * weights_T)


def _forward(z_TxZ, table_VxZ, bias_V, targets_T, weights_T, chunk):
  losses_T, d_z, d_table, d_bias = _loss_and_grads(z_TxZ, table_VxZ, bias_V, targets_T,
                                                   weights_T, chunk)
  return jnp.sum(losses_T * weights_T), (losses_T, d_z.astype(z_TxZ.dtype),
                                          d_table.astype(table_VxZ.dtype),
                                          d_bias.astype(bias_V.dtype), weights_T)


def _backward(chunk, saved, g):
  del chunk
  losses_T, d_z, d_table, d_bias, weights_T = saved
  return (g * d_z, g * d_table, g * d_bias, None, (g * losses_T).astype(weights_T.dtype))


cross_entropy_sum.defvjp(_forward, _backward)


def batch_cross_entropy_sum(z_BxLxZ: jax.Array, table_VxZ: jax.Array, bias_V: jax.Array,
                            targets_BxL: jax.Array, weights_BxL: jax.Array,
                            chunk: int) -> jax.Array:
  """`cross_entropy_sum` of a batch's rows; inside `partitioning.with_rules` each device
  runs on its own block of the batch (the loss summed over them afterwards)."""
  def local(z_BxLxZ, table_VxZ, bias_V, targets_BxL, weights_BxL):
    loss = cross_entropy_sum(z_BxLxZ.reshape(-1, z_BxLxZ.shape[-1]), table_VxZ, bias_V,
                             targets_BxL.reshape(-1), weights_BxL.reshape(-1), chunk)
    return loss[None]  # one per device: summed outside, so no collective in the step

  args = (z_BxLxZ, table_VxZ, bias_V, targets_BxL, weights_BxL)
  spec = partitioning.logical_spec(('batch',))
  if spec is None or not len(spec) or spec[0] is None:
    return local(*args)[0]
  mesh = jax.sharding.get_abstract_mesh()
  rows_axes = _row_axes(spec[0], dict(mesh.shape), z_BxLxZ.shape[0])
  rows, whole = jax.sharding.PartitionSpec(rows_axes), jax.sharding.PartitionSpec()
  per_shard = jax.shard_map(local, mesh=mesh, in_specs=(rows, whole, whole, rows, rows),
                            out_specs=rows, check_vma=False)
  return jnp.sum(per_shard(*args))


def _row_axes(batch_axes, mesh_shape: dict[str, int], n_rows: int) -> tuple[str, ...]:
  """The mesh axes the loss's rows are split over: the batch's, then every other axis of
  the mesh while the rows divide evenly. The batch is replicated over the others (the
  tower axis, for one), and rows left whole there would be scored once per device of that
  axis: 1.16x the step's FLOPs with a tower axis of 2 (tests/test_lowering.py)."""
  axes = tuple(batch_axes) if isinstance(batch_axes, (tuple, list)) else (batch_axes,)
  size = math.prod(mesh_shape[a] for a in axes)
  for a, n in mesh_shape.items():
    if a not in axes and n > 1 and n_rows % (size * n) == 0:
      axes, size = axes + (a,), size * n
  return axes
