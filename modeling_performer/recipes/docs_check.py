"""The check that every measured number a page quotes is held by a committed results file in
docs/figures (`check_page`; mkdocs runs it on every page through mkdocs_hooks.py, so
`mkdocs build --strict` fails on a stale number). A number with a unit (0.86x, 46.0 ms, 99.7%,
5.7 MiB, 2.8 GB, 63 s ...) is held when a value of some results file, or a unit conversion of one
(fraction -> %, s -> ms, bytes -> MiB/GiB/GB, s -> min), or for a ratio the quotient of two values
of one file, rounds to it at the precision the page shows. A page that names a results file that
does not exist fails too."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re

from . import ROOT


FIGURES = ROOT / "docs" / "figures"
# A measured number: digits (thousands separated by commas), then a unit.
MEASURED = re.compile(r"(?<![\w.\-/])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s?"
                      r"(x|%|ms|s|MiB|GiB|GB|MB|KiB|min|minutes|seconds|tokens/s|GFLOP/s)(?![\w/])")
# A results file named on a page: docs/figures/... or figures/... (.json, .png, .md).
NAMED_FILE = re.compile(r"(?:docs/)?figures/([\w./\-]+\.(?:json|png|md))")
SCALES = (1.0, 100.0, 1000.0, 1 / 2**20, 1 / 2**30, 1 / 1e9, 1 / 1e6, 1 / 1024, 1 / 60, 1 / 1e3)


def _numbers(value, found: list):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            found.append(float(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            _numbers(key, found)
            _numbers(item, found)
    elif isinstance(value, list):
        for item in value:
            _numbers(item, found)
    elif isinstance(value, str):
        try:
            found.append(float(value))
        except ValueError:
            pass


@functools.cache
def results_values(folder: pathlib.Path = FIGURES) -> dict:
    """{results file: the sorted numbers it holds (values, numeric keys and strings)}."""
    held = {}
    for path in sorted(folder.rglob("*.json")):
        found = []
        _numbers(json.loads(path.read_text()), found)
        held[path] = sorted(set(found))
    return held


def _rounds_to(value: float, shown: float, decimals: int) -> bool:
    return any(round(value * scale, decimals) == shown for scale in SCALES)


def is_held(shown_text: str, unit: str, held: dict) -> bool:
    shown = float(shown_text.replace(",", ""))
    decimals = len(shown_text.split(".")[1]) if "." in shown_text else 0
    for values in held.values():
        if any(_rounds_to(v, shown, decimals) for v in values):
            return True
    if unit == "x":  # a ratio of two values of one file
        for values in held.values():
            nonzero = [v for v in values if v]
            for a in nonzero:
                for b in nonzero:
                    if round(a / b, decimals) == shown:
                        return True
    return False


def check_page(text: str, name: str, folder: pathlib.Path = FIGURES) -> list[str]:
    """The problems of one page's markdown: results files it names that do not exist, and measured
    numbers no results file holds (code blocks are commands and outputs, not quotes)."""
    problems = []
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for line_number, line in enumerate(prose.splitlines(), 1):
        for match in NAMED_FILE.finditer(line):
            if not (folder / match.group(1)).exists():
                problems.append(f"{name}:{line_number}: names figures/{match.group(1)}, which does not exist")
        for match in MEASURED.finditer(line):
            shown = match.group(1) + (match.group(2) or "")
            if not is_held(shown, match.group(3), results_values(folder)):
                problems.append(f"{name}:{line_number}: {match.group(0)!r} is held by no results file in docs/figures")
    return problems
