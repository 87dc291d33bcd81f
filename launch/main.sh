#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, train the default config on the
# embedded corpus, analyse the final checkpoint, and print where the results are.
# Rerunning resumes training and reuses the trained probe heads.
#   bash launch/main.sh [WORKDIR] [--config.KEY=VALUE ...]
# TWOTOWER_TREEBANK: a UD English EWT folder (CoNLL-U files; universaldependencies.org,
# repository UD_English-EWT) for gold word classes and the structural probe. Unset:
# treebanks/ud_english_ewt in the repository when it exists (git ignores it). None: the
# analysis uses the built-in function-word list and skips the structural probe.
source "$(dirname "$0")/env.sh"
WORKDIR="${1:-runs/default}"
[[ $# -gt 0 ]] && shift
CONFIG="${CONFIG:-configs/default.py}"
TREEBANK="${TWOTOWER_TREEBANK:-}"
if [[ -z "$TREEBANK" && -e "$ROOT/treebanks/ud_english_ewt" ]]; then
  TREEBANK="$ROOT/treebanks/ud_english_ewt"
fi
python -m twotower_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
# A shorter structural-probe schedule than its default (1000 steps) keeps the analysis
# near 2 minutes on a 2-core CPU (README: Numbers).
analysis_flags=(--config.analysis.struct_steps=500)
if [[ -n "$TREEBANK" ]]; then
  analysis_flags+=(--config.analysis.conllu="$TREEBANK" --config.analysis.struct_conllu="$TREEBANK")
fi
python -m twotower_jax.analyze --workdir="$WORKDIR" "${analysis_flags[@]}"
# One short sample from the final checkpoint, each piece coloured by the tower it leans to
# (docs/GENERATION.md).
python -m twotower_jax.generate --workdir="$WORKDIR" --max_new_tokens=40 --temperature=0.8 \
    --top_p=0.95 --seed=0 --prompt="Fellow citizens of the Senate and House of Representatives"
echo "results: $WORKDIR (config.json, metrics.jsonl, checkpoints/, tensorboard/)"
echo "report:  $WORKDIR/analysis/report.md and report.html (figures in analysis/figures/)"
echo "sample:  $WORKDIR/generate/generations.jsonl and generations.html"
