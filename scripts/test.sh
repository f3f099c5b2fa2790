#!/usr/bin/env bash
# Test job: install what is missing into .venv, lint, then run the whole pytest suite (CPU).
# Extra arguments are passed to pytest, e.g. `bash scripts/test.sh -k sampling`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
.venv/bin/ruff check .            # lint (pyproject.toml: line length 100, pyflakes, isort)
.venv/bin/ruff format --check .   # formatting
exec .venv/bin/python -m pytest -v --durations=15 tests "$@"
