#!/usr/bin/env bash
# The lowest transformers release the package admits (the lower bound in pyproject.toml), in a venv
# of its own (.venv-lowest): conversion (GGUF included), generation and the cache, the config, save/load and
# remote code. scripts/test.sh tests the newest release the range admits; CI runs both.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
LOWEST="$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml | head -n 1)"
if [ -z "$LOWEST" ]; then
    echo "scripts/test_lowest.sh: no transformers lower bound found in pyproject.toml" >&2
    exit 2
fi
case "$LOWEST" in *.*.*) ;; *) LOWEST="$LOWEST.0" ;; esac
export PERFORMER_VENV=.venv-lowest PERFORMER_EXTRAS=gguf,convert
export PERFORMER_PINS="transformers==$LOWEST pytest>=8 hypothesis>=6 parameterized>=0.9"
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -c "import transformers; print('transformers', transformers.__version__, '(the lowest the package admits)')"
python -m pytest -q -p no:cacheprovider tests/test_conversion.py tests/test_conversion_llama.py tests/test_gguf.py \
    tests/test_generation.py tests/test_cache_performer.py tests/test_modeling_performer.py \
    tests/test_configuration_performer.py tests/test_storage_performer.py tests/test_hub.py "$@"
