# Sourced by the launch scripts: creates .venv (Python 3.11) and installs the pinned
# environment from requirements.lock when missing or when the lock/setup.py changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TWOTOWER_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
stamp="$(cat "$ROOT/requirements.lock" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp" ]]; then
  echo "setting up $VENV (pinned: requirements.lock)" >&2
  "$PYTHON_BIN" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.lock"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
  echo "$stamp" > "$VENV/.installed"
  rm -f "$VENV/.installed_extras"
fi
# TWOTOWER_EXTRAS=bench (as .ci/run sets it) adds setup.py's extra: torch==2.13.0 for the
# PyTorch peer of bench/train_step.py --peer=torch and its test; the lock pins the rest.
extras="${TWOTOWER_EXTRAS:-}"
if [[ -n "$extras" && "$(cat "$VENV/.installed_extras" 2>/dev/null)" != "$stamp $extras" ]]; then
  echo "installing the [$extras] extra into $VENV (setup.py)" >&2
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/requirements.lock" -e "$ROOT[$extras]"
  echo "$stamp $extras" > "$VENV/.installed_extras"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
# Host tuning for XLA:CPU (twotower_jax/hostmem.py): back each step's temporaries with
# transparent huge pages where glibc and the kernel allow it; TWOTOWER_HUGE_PAGES=0 opts out.
eval "$(python -m twotower_jax.hostmem --export)"
