"""python -m twotower_jax.experiment: the points of a config, bad input, and (slow) a 2 x 2 tiny
experiment end to end: one command, the same split into --point jobs (one killed with -9 and
rerun) plus --aggregate giving the same results.json, and the SLURM array script."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from conftest import REPO, run_module
from twotower_jax import cli
from twotower_jax import experiment
from twotower_jax.experiment import __main__ as experiment_main
from twotower_jax.experiment import runner
from twotower_jax.experiment import spec as spec_lib
from twotower_jax.train import checkpoints

TINY = 'tests/data/tiny_experiment.py'
PREFERENCE = 'configs/experiments/preference.py'
NAMES = ['causal_seed0', 'causal_seed1', 'mlm_seed0', 'mlm_seed1', 'causal_control',
         'mlm_control']


@pytest.fixture(scope='module')
def tiny_spec(tmp_path_factory):
  """The tiny experiment's --config value, on a small corpus of its own."""
  from conftest import SMALL_SPEECHES  # pylint: disable=import-outside-toplevel
  from twotower_jax.data import sotu  # pylint: disable=import-outside-toplevel
  corpus = tmp_path_factory.mktemp('experiment_corpus')
  for name in SMALL_SPEECHES:
    shutil.copy(os.path.join(sotu.sotu_speech_dir(), name + '.txt'), corpus / (name + '.txt'))
  return f'{TINY}:{corpus}/*.txt'


def _load(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(':')
  return cli.check_config_file(os.path.join(REPO, path) + (f':{arg}' if arg else ''))


def test_points_are_the_product_of_the_axes_then_the_controls(tiny_spec):
  points = spec_lib.points(_load(tiny_spec))
  assert [p.name for p in points] == NAMES
  assert [p.index for p in points] == list(range(6))
  assert [p.kind for p in points] == ['point'] * 4 + ['control'] * 2
  assert [p.group for p in points] == ['causal', 'causal', 'mlm', 'mlm', 'causal', 'mlm']
  c = {p.name: p.config for p in points}
  assert c['causal_seed1'].train.seed == 1 and c['mlm_seed0'].model.tower_type == 'mlm'
  # The base file's {model.tower_type}: each type gets its paper embedding mode.
  assert c['causal_seed0'].model.embedding.mode == 'shared'
  assert c['mlm_seed1'].model.embedding.mode == 'projected'
  assert c['mlm_control'].model.n_towers == 1 and c['mlm_control'].mesh.tower == 1
  assert c['mlm_control'].train.seed == 0 and c['causal_seed0'].model.n_towers == 2
  assert c['causal_seed0'].model.d_model == 32 and c['causal_seed0'].analysis.min_count == 3


def test_the_preference_study_has_its_twelve_points_at_both_scales():
  for scale, layers in (('cpu', 2), ('paper', 12)):
    points = spec_lib.points(_load(f'{PREFERENCE}:{scale}'))
    assert [p.name for p in points] == [f'{t}_seed{s}' for t in ('causal', 'mlm', 'bilstm')
                                        for s in range(3)] + [
                                            f'{t}_control' for t in ('causal', 'mlm', 'bilstm')]
    assert {p.config.model.n_layers for p in points if p.config.model.tower_type != 'bilstm'} == {
        layers}
    assert {p.config.analysis.estimators for p in points} == {'probe,resample'}


def _edited(spec: str, **fields) -> ml_collections.ConfigDict:
  exp = _load(spec)
  for key, value in fields.items():
    *path, last = key.split('.')
    node = exp
    for name in path:
      if name not in node:
        node[name] = ml_collections.ConfigDict()
      node = node[name]
    node[last] = value
  return exp


@pytest.mark.parametrize('fields,message', [
    ({'axes.model.tower_typ': 'causal'}, 'model.tower_typ is not a field of the run config; '
                                         'did you mean model.tower_type?'),
    ({'axes.train.seed': ''}, "axes.train.seed='' is empty"),
    ({'axes.train.seed': '0,,1'}, 'is empty or has an empty value'),
    ({'axes.train.seed': '0,x'}, "axes.train.seed: 'x' is not of type int"),
    ({'overrides.train.stepz': 3}, 'overrides.train.stepz: train.stepz is not a field'),
    ({'overrides.train.seed': 'many'}, "overrides.train.seed='many': "),
    ({'group_by': 'train.steps'}, "group_by='train.steps' is not one of the axes"),
    ({'base': 'configs/tiny.py:{model.gate}'}, 'names {model.gate}, which is not an axis'),
    ({'base': 'configs/nope.py'}, 'cannot load base=configs/nope.py: the file does not exist'),
    ({'name': ''}, 'give the experiment a name'),
    ({'overrides.model.n_heads': 3}, 'point causal_seed0: model.n_heads=3 does not divide'),
])
def test_bad_experiment_configs_are_one_line_errors(tiny_spec, fields, message):
  with pytest.raises(spec_lib.ExperimentError) as e:
    spec_lib.points(_edited(tiny_spec, **fields))
  assert message in str(e.value) and '\n' not in str(e.value)


def test_an_unknown_experiment_field_is_named(tiny_spec):
  exp = _load(tiny_spec)
  exp.axis = ml_collections.ConfigDict()
  with pytest.raises(spec_lib.ExperimentError, match='unknown experiment field axis; did you '
                     'mean axes'):
    spec_lib.points(exp)


def _record(spec: str, **fields):
  exp = _edited(spec, **fields)
  points = spec_lib.points(exp)
  return exp, points, experiment.record(exp, points, experiment.provenance(spec, {}))


def test_a_dir_of_another_experiment_or_a_run_is_refused_and_left_alone(tiny_spec, tmp_path):
  exp, points, rec = _record(tiny_spec)
  root = str(tmp_path / 'exp')
  experiment.check_dir(root, rec, create=True)
  file = os.path.join(root, experiment.EXPERIMENT_JSON)
  before = open(file).read()
  for fields, what in (({'name': 'other'}, "holds experiment 'tiny'"),
                       ({'axes.train.seed': '0,2'}, 'this experiment with other points'),
                       ({'overrides.train.steps': 8}, 'with other points or run configs')):
    _, _, other = _record(tiny_spec, **fields)
    with pytest.raises(spec_lib.ExperimentError, match=what):
      experiment.check_dir(root, other, create=True)
  assert open(file).read() == before and os.listdir(root) == [experiment.EXPERIMENT_JSON]
  # Analysis settings are not part of the identity: the record is updated, no refusal.
  _, _, more = _record(tiny_spec, **{'overrides.analysis.n_perm': 199})
  experiment.check_dir(root, more, create=True)
  assert json.load(open(file))['points'][0]['config']['analysis']['n_perm'] == 199
  # Nor a compile-only field: an experiment recorded before it existed resumes with it set.
  _, _, unrolled = _record(tiny_spec, **{'overrides.model.scan_unroll': 4})
  older = json.load(open(file))
  for point in older['points']:
    del point['config']['model']['scan_unroll']
  with open(file, 'w') as f:
    json.dump(older, f)
  experiment.check_dir(root, unrolled, create=True)
  assert json.load(open(file))['points'][0]['config']['model']['scan_unroll'] == 4
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  (run_dir / 'config.json').write_text('{}')
  with pytest.raises(spec_lib.ExperimentError, match='holds a training run'):
    experiment.check_dir(str(run_dir), rec, create=True)
  (tmp_path / 'files').mkdir()
  (tmp_path / 'files' / 'notes.txt').write_text('x')
  with pytest.raises(spec_lib.ExperimentError, match='holds files but no experiment.json'):
    experiment.check_dir(str(tmp_path / 'files'), rec, create=True)
  with pytest.raises(spec_lib.ExperimentError, match='holds no experiment; run its points'):
    experiment.aggregate(str(tmp_path / 'new'), exp, points, experiment.provenance(tiny_spec, {}))
  with pytest.raises(spec_lib.ExperimentError, match=r'points not finished: 0 causal_seed0 '
                     r'\(new\), 1 causal_seed1 \(new\)'):
    experiment.aggregate(root, exp, points, experiment.provenance(tiny_spec, {}))
  with pytest.raises(spec_lib.ExperimentError, match=r'point 6 is out of range: this experiment '
                     r'has 6 points \(0-5\); --list prints them'):
    experiment.run_point(str(tmp_path / 'none'), exp, points, 6, {})
  assert not os.path.exists(tmp_path / 'none')


def test_the_scheduler_index_comes_from_its_variable(monkeypatch):
  for name in experiment_main.INDEX_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  assert experiment_main.point_from_env() is None
  monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '4')
  assert experiment_main.point_from_env() == 4
  monkeypatch.setenv('JOB_COMPLETION_INDEX', '2')  # Kubernetes' first
  assert experiment_main.point_from_env() == 2
  monkeypatch.setenv('JOB_COMPLETION_INDEX', 'two')
  with pytest.raises(Exception, match="JOB_COMPLETION_INDEX='two' is not an integer"):
    experiment_main.point_from_env()


@pytest.mark.parametrize('args,message', [
    (('--config=configs/experiments/preference.py:gpu',), "the scale is 'cpu'"),
    (('--config=configs/experiments/preference.py:cpu', '--config.axes.train.seed='),
     "axes.train.seed='' is empty"),
    (('--config=configs/experiments/preference.py:cpu', '--point=12'),
     'point 12 is out of range: this experiment has 12 points (0-11)'),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
  wd = tmp_path / 'exp'
  proc = run_module('twotower_jax.experiment', *args, f'--workdir={wd}')
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
  assert not wd.exists()


def test_cli_lists_the_points():
  proc = run_module('twotower_jax.experiment', f'--config={PREFERENCE}:paper', '--list')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 12 and lines[0].split()[:3] == ['0', 'causal_seed0', 'point']
  assert lines[11].split()[:3] == ['11', 'bilstm_control', 'control']


# ---------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope='module')
def finished(tiny_spec, tmp_path_factory):
  """The tiny experiment run by the one command."""
  root = str(tmp_path_factory.mktemp('experiment') / 'one')
  proc = run_module('twotower_jax.experiment', f'--config={tiny_spec}', f'--workdir={root}',
                    timeout=3000)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root


def _results(root: str) -> str:
  with open(os.path.join(root, 'results.json')) as f:
    return f.read()


@pytest.mark.slow
def test_one_command_trains_analyses_and_aggregates(finished, tiny_spec):
  res = json.loads(_results(finished))
  assert [p['name'] for p in res['points']] == NAMES
  assert list(res['groups']) == ['causal', 'mlm']
  for group in ('causal', 'mlm'):
    g = res['groups'][group]
    assert g['points'] == [f'{group}_seed0', f'{group}_seed1']
    assert g['control'] == f'{group}_control'
    assert sorted(g['estimators']) == ['probe', 'resample']
    probe = g['estimators']['probe']
    assert probe['pooled']['k'] == 2 and probe['pooled']['points'] == g['points']
    assert probe['seeds_with_split']['of'] == 2 and probe['primary_significant']['of'] == 2
    assert len(probe['stability']['pairs']) == 1 and probe['stability']['n_items'] > 10
    assert probe['control']['point'] == f'{group}_control'
    assert [r['step'] for r in probe['over_training']] == [3, 6]
    assert g['estimators']['resample']['control'] is None  # one tower: no resample
  for p in res['points']:
    assert [s for s, _ in p['eval_curve']] == [3, 6] and p['plateau']['reference_step'] == 3
    assert p['commit'] == {'commit': res['commit'], 'dirty': res['dirty']}
  assert res['commands']['point'] == (f'python -m twotower_jax.experiment --config={tiny_spec} '
                                      '--workdir=DIR --point=I')
  assert 'seconds' not in _results(finished) and finished not in _results(finished)
  for name in ('results.md', 'figures/pooled.png', 'figures/over_training.png',
               'figures/eval_loss.png', 'experiment.json',
               'mlm_seed1/analysis/steps/3/summary.json', 'mlm_seed1/analysis/over_training.json'):
    assert os.path.exists(os.path.join(finished, name)), name
  # Rerun: every point is kept, nothing is retrained, the results are the same.
  before = _results(finished)
  proc = run_module('twotower_jax.experiment', f'--config={tiny_spec}', f'--workdir={finished}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr.count('is done, kept') == 6 and 'experiment: training' not in proc.stderr
  assert _results(finished) == before


def _popen(*args, env=None):
  full = dict(os.environ, **(env or {}))
  full['PYTHONPATH'] = REPO + os.pathsep + full.get('PYTHONPATH', '')
  return subprocess.Popen([sys.executable, '-m', 'twotower_jax.experiment', *args], cwd=REPO,
                          env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_points_as_jobs_then_aggregate_equal_the_one_command_after_a_kill_9(
    finished, tiny_spec, tmp_path):
  root = str(tmp_path / 'jobs')
  flags = (f'--config={tiny_spec}', f'--workdir={root}')
  wd0 = os.path.join(root, NAMES[0])
  proc = _popen(*flags, '--point=0')
  deadline = time.time() + 1500
  while not checkpoints.complete_steps(wd0) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # mid-point: the first checkpoint is written, not analysed
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(wd0, runner.POINT_MARK))
  for index, env in ((0, {}), (1, {'SLURM_ARRAY_TASK_ID': '1'}),
                     (2, {'JOB_COMPLETION_INDEX': '2'})):
    args = flags if env else (*flags, f'--point={index}')
    done = run_module_env(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'training {NAMES[index]}' in done.stderr or index == 0
    if index == 0:  # resumed where the kill left it
      assert 'resumed from' in done.stderr or 'is trained (6 steps), kept' in done.stderr
  early = run_module('twotower_jax.experiment', *flags, '--aggregate')
  assert early.returncode != 0 and NAMES[3] in early.stderr  # names the unfinished points
  for name in NAMES[3:]:  # the other jobs' points, as the one command wrote them (CI time)
    shutil.copytree(os.path.join(finished, name), os.path.join(root, name))
  agg = run_module('twotower_jax.experiment', *flags, '--aggregate')
  assert agg.returncode == 0, agg.stderr[-2000:]
  assert _results(root) == _results(finished)


def run_module_env(args, env):
  proc = _popen(*args, env=env)
  out, err = proc.communicate(timeout=1500)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _pinned_venv_env() -> dict:
  from test_launch import _pinned_venv_env as pinned  # pylint: disable=import-outside-toplevel
  return pinned()


@pytest.mark.slow
def test_slurm_array_script_runs_its_task_and_the_aggregation(finished, tiny_spec, tmp_path):
  root = str(tmp_path / 'slurm')
  shutil.copytree(finished, root)
  wd = os.path.join(root, NAMES[3])  # task 3 lost its analysis: the script must redo it
  shutil.rmtree(os.path.join(wd, 'analysis'))
  os.remove(os.path.join(wd, runner.POINT_MARK))
  os.remove(os.path.join(root, 'results.json'))
  env = {**os.environ, **_pinned_venv_env(), 'EXPERIMENT': tiny_spec, 'WORKDIR': root,
         'SLURM_ARRAY_TASK_ID': '3', 'SLURM_SUBMIT_DIR': REPO}
  script = os.path.join(REPO, 'launch', 'slurm_array.sh')
  proc = subprocess.run(['bash', script], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'analysing {NAMES[3]} at step 6' in proc.stderr
  assert 'experiment: training' not in proc.stderr
  assert os.path.exists(os.path.join(wd, runner.POINT_MARK))
  proc = subprocess.run(['bash', script, '--aggregate'], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _results(root) == _results(finished)
  env.pop('SLURM_ARRAY_TASK_ID')
  proc = subprocess.run(['bash', script], capture_output=True, text=True, env=env, cwd=REPO)
  assert proc.returncode == 2 and 'SLURM_ARRAY_TASK_ID is not set' in proc.stderr


def test_slurm_script_array_matches_the_paper_experiment():
  with open(os.path.join(REPO, 'launch', 'slurm_array.sh')) as f:
    text = f.read()
  n = len(spec_lib.points(_load(f'{PREFERENCE}:paper')))
  assert f'#SBATCH --array=0-{n - 1}\n' in text
  assert 'EXPERIMENT="${EXPERIMENT:-configs/experiments/preference.py:paper}"' in text
  assert '--point="$SLURM_ARRAY_TASK_ID"' in text


def test_gke_indexed_job_runs_one_point_per_pod_on_tpu():
  import yaml  # pylint: disable=import-outside-toplevel
  with open(os.path.join(REPO, 'launch', 'gke_indexed_job.yaml')) as f:
    job = yaml.safe_load(f)
  n = len(spec_lib.points(_load(f'{PREFERENCE}:paper')))
  assert job['apiVersion'] == 'batch/v1' and job['kind'] == 'Job'
  s = job['spec']
  assert s['completionMode'] == 'Indexed' and s['completions'] == n and s['parallelism'] == n
  pod = s['template']['spec']
  assert pod['restartPolicy'] == 'Never'
  assert pod['nodeSelector']['cloud.google.com/gke-tpu-accelerator'].startswith('tpu-')
  assert 'cloud.google.com/gke-tpu-topology' in pod['nodeSelector']
  (container,) = pod['containers']
  assert container['resources']['limits']['google.com/tpu'] == container['resources'][
      'requests']['google.com/tpu']
  script = ' '.join(container['command'] + container['args'])
  line = next(l for l in script.splitlines() if 'twotower_jax.experiment' in l)
  assert line.split()[:5] == ['exec', 'python', '-m', 'twotower_jax.experiment',
                              f'--config={PREFERENCE}:paper']
  assert '--point' not in line  # the pod's JOB_COMPLETION_INDEX picks the point
  assert 'JOB_COMPLETION_INDEX' in experiment_main.INDEX_VARIABLES
  workdir = next(a.split('=', 1)[1] for a in line.split() if a.startswith('--workdir='))
  mounts = {m['name']: m['mountPath'] for m in container['volumeMounts']}
  volumes = {v['name']: v for v in pod['volumes']}
  name = next(k for k, path in mounts.items() if workdir.startswith(path + '/'))
  assert volumes[name]['csi']['driver'] == 'gcsfuse.csi.storage.gke.io'
  assert s['template']['metadata']['annotations']['gke-gcsfuse/volumes'] == 'true'
  for needed in ('source launch/env.sh', 'jax[tpu]=='):
    assert needed in script
