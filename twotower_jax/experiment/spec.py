"""An experiment config and its points: the fields, the checks, and the list of runs.

An experiment config (configs/experiments/*.py, `get_config(scale)` starting from
`experiment_config()`) names a base run config, the overrides every point shares, the axes
it varies and the analysis each point gets. Its points are the product of the axes' values,
the `group_by` axis outermost and the others in the order of their dotted keys (ConfigDict
sorts its keys), then one one-tower control per value of `group_by` (the other axes at
their first value). Each point is a full run config; DIR/<point name>/ is its workdir.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
from typing import Any

import ml_collections

from twotower_jax import cli
from twotower_jax import config as config_lib
from twotower_jax import errors

VARIANT = 'variant'  # the axis of exp.variants
# exp.aggregation -> the module whose aggregate(exp, points, root, provenance) gives
# results.json's content and writeup(root, results) its results.md and figures.
AGGREGATIONS = {'preference': 'twotower_jax.experiment.aggregate',
                'loss': 'twotower_jax.experiment.loss',
                'tying': 'twotower_jax.experiment.tying',
                'deferral': 'twotower_jax.experiment.deferral'}
CONTROL = 'control'  # a point's kind: 'point' or 'control' (one tower)
# Where a treebank is looked for when `treebank='auto'` (as launch/main.sh): the variable,
# then these folders relative to the repository root.
TREEBANK_ENV = 'TWOTOWER_TREEBANK'
TREEBANK_PLACES = ('treebanks/ud_english_ewt',)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINING_SECTIONS = ('data', 'model', 'train', 'optimizer')  # what makes a point's checkpoints


class ExperimentError(errors.UserError):
  """An experiment config, flag or DIR that cannot be used; the message says the fix."""


def experiment_config() -> ml_collections.ConfigDict:
  """Every field of an experiment config, with its default."""
  c = ml_collections.ConfigDict()
  c.name = ''  # recorded in DIR/experiment.json: a DIR holds one experiment
  # Run config file, 'path[:arg]' (relative to the current folder or the repository root);
  # '{KEY}' is replaced by the point's value of axis KEY, e.g. 'configs/tiny.py:{model.tower_type}'.
  c.base = ''
  c.overrides = ml_collections.ConfigDict()  # nested run-config fields set on every point
  # Nested run-config keys -> comma-separated values, e.g. axes.train.seed = '0,1,2'; each
  # value is typed by the run config's field.
  c.axes = ml_collections.ConfigDict()
  # Named sets of run-config overrides, e.g. variants.ponder2 = {'model': {'pondering':
  # {'steps': 2}}}: an axis of its own, VARIANT, first in the product and in point names (an
  # empty set is the base as it is). For comparisons that are not a product of field values.
  # In key order: build it with sort_keys=False to keep yours (loss.py compares to the first).
  # A text value may name another variant's workdir as '{point:VARIANT}' (its point of the
  # same other axis values, listed earlier), e.g. model.init_towers='{point:old},{point:new}'.
  c.variants = ml_collections.ConfigDict()
  c.group_by = ''  # the axis the aggregation groups by ('' = the first key); its value names
  c.controls = True  # also a one-tower control per value of group_by (n_towers=1, mesh.tower=1)
  # Word classes of the analysis (analysis.conllu): 'auto' = $TWOTOWER_TREEBANK, else the
  # first of TREEBANK_PLACES that exists, else the built-in function-word list; '' = that
  # list; or a CoNLL-U file, folder or glob.
  c.treebank = 'auto'
  c.over_training = False  # also analyse every kept checkpoint (analyze --steps=all)
  c.analyse = True  # False: the points are trained only (an aggregation that reads metrics)
  # More analyses of each point's final step: name -> analysis.* fields set on the point's
  # own, written to DIR/<point>/analysis_<name>/, e.g. analyses.old = {'eval_documents': '^18'}.
  c.analyses = ml_collections.ConfigDict()
  # True: one tokenizer for every point, DIR/tokenizer.model (trained once, on the first
  # point's training documents), so their token matrices are row for row comparable and
  # towers can move between points (tying.py, deferral.py).
  c.shared_tokenizer = False
  # What the points show together: a name in twotower_jax/experiment AGGREGATIONS,
  # 'preference' (the class test pooled over seeds), 'loss' (eval loss at equal tokens and
  # at equal training FLOPs, loss.py), 'tying' (tied vs untied token matrices, tying.py) or
  # 'deferral' (Co-LLM: loss and gate shares per domain, deferral.py).
  c.aggregation = 'preference'
  c.n_boot = 1000  # aggregation's bootstrap draws over items (cross-fit effects, stability)
  c.seed = 0  # aggregation's bootstrap seed
  # A run has levelled off when its eval loss fell by less than this share over the last
  # quarter of training.
  c.plateau_tolerance = 0.01
  return c


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the experiment."""
  index: int
  name: str  # its folder under DIR
  kind: str  # 'point' or 'control'
  group: str  # its value of the group_by axis
  values: dict[str, Any]  # axis key -> value (a control: the values it was made from)
  config: ml_collections.ConfigDict

  def record(self) -> dict[str, Any]:
    """What DIR/experiment.json holds of the point."""
    return {'index': self.index, 'name': self.name, 'kind': self.kind, 'group': self.group,
            'values': dict(self.values), 'config': config_lib.to_dict(self.config)}


def _leaves(node: ml_collections.ConfigDict, prefix: str = ''):
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _field(config: ml_collections.ConfigDict, key: str, where: str):
  """The run config's value at dotted `key`; an ExperimentError naming a close key if none."""
  node, path = config, key.split('.')
  for i, name in enumerate(path):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(name, known, n=1)
      hint = f'did you mean {".".join(path[:i] + close[:1])}? ' if close else ''
      raise ExperimentError(f'{where}: {key} is not a field of the run config; {hint}every '
                            'field is in twotower_jax/config.py')
    node = node[name]
  if isinstance(node, ml_collections.ConfigDict):
    raise ExperimentError(f'{where}: {key} is a section of the run config, not a field; name '
                          'one of its fields')
  return node


def _typed(text: str, like: Any, where: str) -> Any:
  """An axis value as the type of the run config's field."""
  try:
    if isinstance(like, bool):
      if text.lower() not in ('true', 'false'):
        raise ValueError
      return text.lower() == 'true'
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
  except ValueError:
    raise ExperimentError(f'{where}: {text!r} is not of type {type(like).__name__}, the '
                          "field's type") from None
  return text


def axes(exp: ml_collections.ConfigDict) -> list[tuple[str, list[str]]]:
  """[(dotted key, [value text, ...])], group_by first; one-line errors for an empty axis."""
  found = []
  if len(exp.variants):
    names = list(exp.variants.keys())
    bad = [n for n in names if not re.fullmatch(r'[A-Za-z0-9_.-]+', n)]
    if bad:
      raise ExperimentError(f'variants {bad}: name each variant with letters, digits, '
                            "'_', '.' or '-' (it names the point folders)")
    found.append((VARIANT, names))
  for key, value in _leaves(exp.axes):
    values = [v.strip() for v in str(value).split(',')]
    if not str(value).strip() or not all(values):
      raise ExperimentError(f'axes.{key}={value!r} is empty or has an empty value; give '
                            "comma-separated values, e.g. axes.train.seed='0,1,2'")
    if len(set(values)) != len(values):
      raise ExperimentError(f'axes.{key}={value!r} repeats a value; give each value once')
    found.append((key, values))
  if not found:
    raise ExperimentError("the experiment has no axes; give at least one, e.g. "
                          "axes.train.seed='0,1,2'")
  first = exp.group_by or found[0][0]
  if first not in [k for k, _ in found]:
    raise ExperimentError(f'group_by={exp.group_by!r} is not one of the axes '
                          f'({", ".join(k for k, _ in found)}); name one of them')
  return sorted(found, key=lambda kv: kv[0] != first)


def _base_spec(exp: ml_collections.ConfigDict, values: dict[str, str]) -> str:
  def sub(m):
    if m.group(1) not in values:
      raise ExperimentError(f'base={exp.base!r} names {{{m.group(1)}}}, which is not an axis; '
                            f'use one of {", ".join("{" + k + "}" for k in values)}')
    return values[m.group(1)]
  return re.sub(r'\{([^{}]+)\}', sub, exp.base)


def _base_path(spec: str) -> str:
  path, sep, arg = spec.partition(':')
  if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(
      os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return path + sep + arg


def _merge(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict,
           prefix: str = 'overrides') -> None:
  for key, value in _leaves(overrides):
    where = f'{prefix}.{key}'
    _field(config, key, where)
    try:
      config_lib.set_fields(config, {key: value})
    except (TypeError, ValueError) as e:
      raise ExperimentError(f'{where}={value!r}: {cli.one_line(e)}; give a value of the '
                            "field's type") from None


def treebank(exp: ml_collections.ConfigDict) -> str:
  """The analysis.conllu the points get ('' = the built-in function-word list)."""
  if exp.treebank != 'auto':
    return exp.treebank
  if os.environ.get(TREEBANK_ENV):
    return os.environ[TREEBANK_ENV]
  for place in TREEBANK_PLACES:
    path = os.path.normpath(os.path.join(REPO, place))
    if os.path.exists(path):
      return path
  return ''


def check(exp: ml_collections.ConfigDict) -> None:
  """The experiment config's own fields (the points' run configs are checked in `points`)."""
  known = experiment_config()
  for key in exp.keys():
    if key not in known:
      close = difflib.get_close_matches(key, list(known.keys()), n=1)
      hint = f'did you mean {close[0]}? ' if close else ''
      raise ExperimentError(f'unknown experiment field {key}; {hint}the fields are in '
                            'twotower_jax/experiment/spec.py (experiment_config)')
  if not str(exp.name).strip() or not re.fullmatch(r'[A-Za-z0-9_.-]+', exp.name):
    raise ExperimentError(f'name={exp.name!r}: give the experiment a name of letters, digits, '
                          "'_', '.' or '-' (DIR/experiment.json records it)")
  if not exp.base:
    raise ExperimentError("base is empty; name a run config file, e.g. "
                          "base='configs/tiny.py:{model.tower_type}'")
  if exp.aggregation not in AGGREGATIONS:
    raise ExperimentError(f'aggregation={exp.aggregation!r} is unknown; use one of '
                          f'{", ".join(sorted(AGGREGATIONS))}')
  if not exp.analyse and (exp.aggregation == 'preference' or exp.over_training):
    raise ExperimentError('analyse=False trains the points only, but aggregation='
                          f'{exp.aggregation!r}, over_training={bool(exp.over_training)} read '
                          "analyses; set analyse=True, or aggregation='loss' and "
                          'over_training=False')
  if int(exp.n_boot) < 2 or not 0 < float(exp.plateau_tolerance) < 1:
    raise ExperimentError(f'n_boot={exp.n_boot} must be >= 2 and plateau_tolerance='
                          f'{exp.plateau_tolerance} in (0, 1)')


def _name(values: dict[str, Any]) -> str:
  """'causal_seed0': a text value as it is, any other as its field name and value."""
  parts = [str(v) if isinstance(v, str) else f'{k.rsplit(".", 1)[-1]}{v}'.lower()
           for k, v in values.items()]
  return re.sub(r'[^A-Za-z0-9_.-]+', '-', '_'.join(parts))


def points(exp: ml_collections.ConfigDict) -> list[Point]:
  """Every point of the experiment, checked: product of the axes, then the controls."""
  from twotower_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  check(exp)
  order = axes(exp)
  conllu = treebank(exp)
  combos = [(dict(zip([k for k, _ in order], texts)), 'point')
            for texts in itertools.product(*[v for _, v in order])]
  if exp.controls:
    combos += [({k: (v if k == order[0][0] else vals[0]) for k, vals in order}, CONTROL)
               for v in order[0][1]]
  cache: dict[str, ml_collections.ConfigDict] = {}
  out = []
  for index, (texts, kind) in enumerate(combos):
    spec = _base_path(_base_spec(exp, texts))
    if spec not in cache:
      try:
        cache[spec] = cli.check_config_file(spec, where=f'cannot load base={spec}')
      except errors.UserError as e:
        raise ExperimentError(str(e)) from None
    config = config_lib.from_dict(config_lib.to_dict(cache[spec]))
    _merge(config, exp.overrides)
    if VARIANT in texts:
      _merge(config, exp.variants[texts[VARIANT]], f'variants.{texts[VARIANT]}')
    values = {k: (t if k == VARIANT else _typed(t, _field(config, k, f'axes.{k}'), f'axes.{k}'))
              for k, t in texts.items()}
    config_lib.set_fields(config, {k: v for k, v in values.items() if k != VARIANT})
    if kind == CONTROL:
      config.model.n_towers, config.mesh.tower = 1, 1
    if conllu:
      config.analysis.conllu = conllu
    name = f'{texts[order[0][0]]}_{CONTROL}' if kind == CONTROL else _name(values)
    try:
      setup_lib.check_config(config)
      runner.check_config(config)
    except errors.UserError as e:
      raise ExperimentError(f'point {name}: {cli.one_line(e)}') from None
    out.append(Point(index, name, kind, str(values[order[0][0]]), values, config))
  if exp.shared_tokenizer:
    kinds = {(p.config.data.vocab_size, p.config.data.tokenizer_type) for p in out}
    if len(kinds) > 1:
      raise ExperimentError('shared_tokenizer=True needs one data.vocab_size and '
                            'data.tokenizer_type for every point; the axes, variants or base set '
                            'them differently: make them equal or set shared_tokenizer=False')
  for p in out:
    references(p, out)  # every '{point:VARIANT}' names an earlier point
    for name, config in extra_analyses(p, exp).items():
      try:
        setup_lib.check_config(config)
        runner.check_config(config)
      except errors.UserError as e:
        raise ExperimentError(f'point {p.name}, analyses.{name}: {cli.one_line(e)}') from None
  names = [p.name for p in out]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ExperimentError(f'points {dupes} share a folder name; give the axes values that '
                          'differ in their text')
  return out


POINT_REF = re.compile(r'\{point:([^{}]*)\}')


def _texts(config: ml_collections.ConfigDict):
  for key, value in _leaves(config):
    if isinstance(value, str):
      yield key, value


def references(point: Point, points: list[Point]) -> list[Point]:
  """The points whose workdirs `point`'s config names ('{point:VARIANT}': the point of that
  variant with the same other axis values); one-line errors for a name that is not an
  earlier point."""
  out = []
  for key, text in _texts(point.config):
    for variant in POINT_REF.findall(text):
      want = dict(point.values, **{VARIANT: variant})
      found = [p for p in points if p.kind == point.kind and p.values == want]
      if VARIANT not in point.values or not found:
        raise ExperimentError(f'point {point.name}: {key}={text!r} names {{point:{variant}}}, '
                              'which is no variant of this experiment; name one of the variants')
      if found[0].index >= point.index:
        raise ExperimentError(f'point {point.name}: {key} names {found[0].name}, which comes '
                              f'later; list variant {variant} before {point.values[VARIANT]}')
      out.append(found[0])
  return out


def resolve(point: Point, points: list[Point], root: str) -> Point:
  """The point with every '{point:VARIANT}' replaced by that point's workdir under root."""
  refs = {p.values[VARIANT]: os.path.join(os.path.abspath(root), p.name)
          for p in references(point, points)}
  if not refs:
    return point
  config = config_lib.from_dict(config_lib.to_dict(point.config))
  config_lib.set_fields(config, {k: POINT_REF.sub(lambda m: refs[m.group(1)], t)
                                 for k, t in _texts(point.config) if POINT_REF.search(t)})
  return dataclasses.replace(point, config=config)


def extra_analyses(point: Point, exp: ml_collections.ConfigDict
                   ) -> dict[str, ml_collections.ConfigDict]:
  """name -> the point's config with exp.analyses[name]'s analysis.* fields set."""
  out = {}
  for name in exp.analyses.keys():
    if not re.fullmatch(r'[A-Za-z0-9_-]+', name):
      raise ExperimentError(f'analyses.{name}: name each analysis with letters, digits, '
                            "'_' or '-' (it names DIR/<point>/analysis_<name>/)")
    config = config_lib.from_dict(config_lib.to_dict(point.config))
    node = exp.analyses[name]
    _merge(config, ml_collections.ConfigDict({'analysis': node}), f'analyses.{name}')
    out[name] = config
  return out
