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
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
# Host tuning for XLA:CPU (twotower_jax/hostmem.py): back each step's temporaries with
# transparent huge pages where glibc and the kernel allow it; TWOTOWER_HUGE_PAGES=0 opts out.
eval "$(python -m twotower_jax.hostmem --export)"
