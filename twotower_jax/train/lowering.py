"""A step lowered for another platform on any machine (`jax.export`), and its FLOPs.

`export(fn, platform, *args)` lowers a jitted step for 'tpu' or 'cuda' on a CPU-only
machine. `jax.export` itself refuses what the target cannot run: host callbacks
(`jax.debug.callback`, `pure_callback`: "host_callbacks" / a backend mismatch), ops
that have no lowering for the platform (e.g. a `platform_dependent` with only a CPU
branch) and custom calls without a compatibility guarantee. The only ones let
through are the target's attention kernels (`KERNEL_CALLS`: cuDNN's fused attention;
Pallas TPU kernels are `tpu_custom_call`, which jax.export accepts); `check` then
refuses any custom call that runs on the host or is CPU-only.

`module_flops(text)` counts the matmul FLOPs of the lowered StableHLO: every
`dot_general` (2 x output elements x contracted size), times the trip counts of the
loops around it (scans over layers, time steps and micro-batches lower to `while`),
the ops inside a `shard_map` region times the devices that run them; a cuDNN
attention call counts the model FLOPs of the attention it replaces (flops.py's
convention: the full T x S score matrix, 4 B N T S D forward, twice that backward).
Other kernel calls (Pallas) are listed as uncounted.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

from jax import export as jax_export

KERNEL_CALLS = {'cuda': ('__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward'), 'tpu': ()}
_HOST_ONLY = ('callback', 'lapack', 'ducc')  # substrings of host / CPU-only call targets
_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @([\w$.]+)')


class LoweringError(Exception):
  """A step lowered for an accelerator would run on (or call back to) the host."""


def export(fn: Any, platform: str, *args: Any) -> jax_export.Exported:
  """`fn` (jitted) lowered for `platform` on abstract `args`, checked with `check`."""
  disabled = [jax_export.DisabledSafetyCheck.custom_call(name)
              for name in KERNEL_CALLS.get(platform, ())]
  exported = jax_export.export(fn, platforms=(platform,), disabled_checks=disabled)(*args)
  check(exported, platform)
  return exported


def custom_calls(text: str) -> collections.Counter:
  """Custom-call targets in a StableHLO module's text, with their counts."""
  return collections.Counter(_CUSTOM_CALL.findall(text))


def check(exported: jax_export.Exported, platform: str) -> None:
  """Raises LoweringError unless the module is for `platform` alone and calls no host code."""
  if tuple(exported.platforms) != (platform,):
    raise LoweringError(f'lowered for {exported.platforms}, not ({platform!r},)')
  host = [t for t in custom_calls(exported.mlir_module()) if any(h in t.lower()
                                                                 for h in _HOST_ONLY)]
  if host:
    raise LoweringError(f'the step lowered for {platform} calls host code: {sorted(host)}')


# ---------------------------------------------------------------- FLOPs of a module


@dataclasses.dataclass
class ModuleFlops:
  """Matmul FLOPs of one call of a lowered module (all devices together)."""
  dots: float = 0.0  # stablehlo.dot_general
  attention_kernels: float = 0.0  # cuDNN fused attention calls, as model FLOPs
  uncounted: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def total(self) -> float:
    return self.dots + self.attention_kernels

  def scaled(self, factor: float) -> 'ModuleFlops':
    return ModuleFlops(self.dots * factor, self.attention_kernels * factor,
                       collections.Counter({k: v * factor for k, v in self.uncounted.items()}))

  def add(self, other: 'ModuleFlops') -> None:
    self.dots += other.dots
    self.attention_kernels += other.attention_kernels
    self.uncounted.update(other.uncounted)


def module_flops(text: str) -> ModuleFlops:
  """Matmul FLOPs of the StableHLO module `text` (`exported.mlir_module()`), from `main`."""
  # jax's own MLIR context knows every dialect a jax module uses (func, stablehlo, sdy).
  from jax._src.interpreters import mlir as jax_mlir  # pylint: disable=g-import-not-at-top
  from jax.extend.mlir import ir  # pylint: disable=g-import-not-at-top
  with jax_mlir.make_ir_context() as context:
    module = ir.Module.parse(text, context=context)
    return _Counter(module, ir).function('main')


class _Counter:
  """Walks a parsed module: functions by name (memoised), loops by trip count."""

  def __init__(self, module, ir):
    self._ir = ir
    self._functions, self._memo, self._mesh = {}, {}, {}
    for op in module.body.operations:
      name = op.operation.name
      if name == 'func.func':
        self._functions[ir.StringAttr(op.attributes['sym_name']).value] = op
      elif name == 'sdy.mesh':
        self._mesh.update({a: int(s) for a, s in re.findall(r'"(\w+)"=(\d+)',
                                                             str(op.attributes['mesh']))})

  def function(self, name: str) -> ModuleFlops:
    if name not in self._memo:
      self._memo[name] = self._block(self._functions[name].regions[0].blocks[0])
    return self._memo[name]

  def _block(self, block) -> ModuleFlops:
    total = ModuleFlops()
    for op in block.operations:
      total.add(self._op(op))
    return total

  def _regions(self, op) -> list[ModuleFlops]:
    return [self._block(block) for region in op.regions for block in region.blocks]

  def _op(self, op) -> ModuleFlops:
    name = op.operation.name
    if name == 'stablehlo.dot_general':
      return ModuleFlops(dots=self._dot_flops(op))
    if name == 'stablehlo.custom_call':
      return self._custom_call(op)
    if name == 'func.call':
      return self.function(self._ir.FlatSymbolRefAttr(op.attributes['callee']).value)
    if name == 'stablehlo.while':
      return self._block(op.regions[1].blocks[0]).scaled(self._trip_count(op))
    if name in ('stablehlo.case', 'stablehlo.if'):  # one branch runs: the costliest
      return max(self._regions(op), key=lambda f: f.total, default=ModuleFlops())
    if name == 'sdy.manual_computation':  # per-device shapes, run by every device
      axes = re.findall(r'"(\w+)"', str(op.attributes['manual_axes']))
      devices = math.prod(self._mesh.get(a, 1) for a in axes)
      return self._block(op.regions[0].blocks[0]).scaled(devices)
    total = ModuleFlops()
    for part in self._regions(op):
      total.add(part)
    return total

  def _shape(self, value) -> list[int]:
    return list(self._ir.RankedTensorType(value.type).shape)

  def _dot_flops(self, op) -> float:
    from jax.extend.mlir.dialects import stablehlo  # pylint: disable=g-import-not-at-top
    numbers = stablehlo.DotDimensionNumbers(op.attributes['dot_dimension_numbers'])
    lhs = self._shape(op.operands[0])
    contracted = math.prod(lhs[d] for d in numbers.lhs_contracting_dimensions)
    return 2.0 * math.prod(self._shape(op.results[0])) * contracted

  def _custom_call(self, op) -> ModuleFlops:
    target = self._ir.StringAttr(op.attributes['call_target_name']).value
    fwd, bwd = KERNEL_CALLS['cuda']
    if target in (fwd, bwd):  # q, k, v first, B x T x N x D (jax's default layout)
      q, k = self._shape(op.operands[0]), self._shape(op.operands[1])
      forward = 4.0 * math.prod(q) * k[1]
      return ModuleFlops(attention_kernels=forward if target == fwd else 2.0 * forward)
    return ModuleFlops(uncounted=collections.Counter({target: 1}))

  def _trip_count(self, op) -> int:
    """Iterations of a `while` lowered from a scan: `i < N` on a counter that starts at c."""
    cond = op.regions[0].blocks[0]
    for inner in cond.operations:
      if inner.operation.name != 'stablehlo.compare' or 'LT' not in str(
          inner.attributes['comparison_direction']):
        continue
      counter, bound = inner.operands
      if isinstance(counter.owner, self._ir.Block):
        start = self._constant(op.operands[counter.arg_number])
        stop = self._constant(bound)
        if start is not None and stop is not None:
          return max(stop - start, 0)
    raise ValueError('a while loop without a constant trip count (i < N); its FLOPs are unknown')

  def _constant(self, value) -> int | None:
    owner = value.owner
    if isinstance(owner, self._ir.Block) or owner.name != 'stablehlo.constant':
      return None
    values = self._ir.DenseIntElementsAttr(owner.attributes['value'])
    return int(values[0]) if len(values) == 1 else None
