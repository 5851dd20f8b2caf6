# Sourced by the other shell scripts: makes and activates .venv with the CPU build of torch
# and the package installed editable. Re-running is cheap: installs happen once.
# PERFORMER_VENV (default .venv), PERFORMER_EXTRAS (default dev) and PERFORMER_PINS (more
# requirements, e.g. "transformers==5.24.0") choose another environment (scripts/test_lowest.sh).
VENV="${PERFORMER_VENV:-.venv}"
EXTRAS="${PERFORMER_EXTRAS:-dev}"
PINS="${PERFORMER_PINS:-}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
WANTED="extras=$EXTRAS pins=$PINS"
if [ ! -f "$VENV/.performer-installed" ] || [ pyproject.toml -nt "$VENV/.performer-installed" ] \
        || [ "$(cat "$VENV/.performer-installed")" != "$WANTED" ]; then
    python -m pip install -q --upgrade pip
    # The package itself accepts any torch>=2.4 (GPU users); here we pin the CPU build.
    python -m pip install -q "torch==2.13.0"
    # shellcheck disable=SC2086
    python -m pip install -q -e ".[$EXTRAS]" $PINS
    echo "$WANTED" > "$VENV/.performer-installed"
fi
# Large tensors are freed and re-allocated every step: keep glibc from returning them to the OS
# (otherwise page faults dominate CPU training time on small machines).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-17179869184}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}"
