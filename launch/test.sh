#!/usr/bin/env bash
# Runs the test suite on CPU with 8 fake devices (set in tests/conftest.py).
#   bash launch/test.sh                        # fast local loop: every test not marked slow
#   bash launch/test.sh tests                  # everything, the slow end-to-end tests too (CI)
#   bash launch/test.sh -m 'not slow' -x tests/test_model.py
source "$(dirname "$0")/env.sh"
if [[ $# -eq 0 ]]; then
  set -- -m 'not slow' tests
fi
exec python -m pytest -q --durations=15 "$@"
