#!/usr/bin/env bash
# Creates .venv (CPU torch), installs the package with its test extras, runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k attention`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# transformers' common model tests are fetched from its source distribution (a package registry);
# fail rather than skip them when that is not possible.
export PERFORMER_REQUIRE_COMMON_TESTS=1
python -m pytest -q "$@"
