"""The device mesh and the map from logical axis names to mesh axes.

Mesh axes are ('data', 'fsdp', 'tower'); sizes come from config.mesh, one of them
may be -1 to take the remaining devices. Parameters carry logical names
(`tower`, `embed`, ...); `config.sharding.rules` maps them onto the mesh.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twotower_jax import config as config_lib

MESH_AXES = ('data', 'fsdp', 'tower')


def mesh_shape(mesh_config: ml_collections.ConfigDict, n_devices: int) -> tuple[int, ...]:
  """Resolves a -1 entry; raises ConfigError when the sizes do not fit the devices."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise config_lib.ConfigError(
          f'mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {n_devices} devices; '
          'choose sizes whose product divides the device count')
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise config_lib.ConfigError(
        f'mesh sizes {dict(zip(MESH_AXES, sizes))} use {int(np.prod(sizes))} devices but '
        f'{n_devices} are present; set one mesh axis to -1 or match the device count')
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(config.mesh, len(devices))
  if config.model.n_towers % shape[2]:
    raise config_lib.ConfigError(
        f'the mesh tower axis ({shape[2]}) does not divide model.n_towers='
        f'{config.model.n_towers}; set mesh.tower to a divisor of n_towers')
  batch_devices = shape[0] * shape[1]
  accum = int(config.train.get('grad_accum_steps', 1))
  if config.train.batch_size % (batch_devices * accum):
    raise config_lib.ConfigError(
        f'train.batch_size={config.train.batch_size} is not divisible by the {batch_devices} '
        f'data-parallel devices (mesh.data * mesh.fsdp) times train.grad_accum_steps={accum}; '
        'change the batch, the mesh or the accumulation')
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding.rules)


def logical_shardings(logical_specs: Any, mesh: Mesh, axis_rules) -> Any:
  """A tree of logical PartitionSpecs -> the same tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules)


def batch_sharding(mesh: Mesh, axis_rules) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes."""
  return nn.logical_to_mesh_sharding(P('batch'), mesh, axis_rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
  """Assembles this process's rows into the global, sharded batch array."""
  shape = (global_rows,) + local_rows.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_rows, shape)


def process_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows this process's devices hold.

  The data pipeline loads exactly these rows; they must be one contiguous block
  (true when the batch axes lead the mesh, as make_mesh builds it).
  """
  index_map = sharding.addressable_devices_indices_map((global_rows,))
  slices = {idx[0].indices(global_rows)[:2] for idx in index_map.values()}
  start, stop = min(s for s, _ in slices), max(e for _, e in slices)
  covered = sum(e - s for s, e in slices)
  if covered != stop - start:
    raise config_lib.ConfigError(
        f'process {jax.process_index()} holds non-contiguous batch rows {sorted(slices)}; '
        'put the hosts along mesh.data (keep mesh.tower and mesh.fsdp within a host)')
  return start, stop
