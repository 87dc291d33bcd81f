#!/usr/bin/env bash
# Runs the test suite on CPU with 8 fake devices (set in tests/conftest.py).
#   bash launch/test.sh            # everything, about 10 minutes on 2 cores
#   bash launch/test.sh -m 'not slow' -x tests/test_model.py
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "${@:-tests}"
