#!/usr/bin/env bash
# The documentation site: its tables re-rendered and its numbers checked against docs/figures,
# `mkdocs build --strict` into site/ (no broken link, no missing page, the API reference
# importable), then the built site served on loopback and loaded in headless Chromium
# (tests/test_docs_site.py; screenshots in outputs/docs-screenshots/). Extra arguments go to mkdocs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_MKDOCS_2_WARNING=1
python scripts/render_docs.py --check
python -m mkdocs build --strict "$@"
PERFORMER_REQUIRE_DOCS=1 python -m pytest -q -p no:cacheprovider tests/test_docs_site.py
