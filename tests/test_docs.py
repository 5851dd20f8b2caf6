"""The README and the documentation: tables rendered from the committed results files, every quoted
number held by one of them, and every command line they show accepted by its script's --help."""

import functools
import json
import re
import subprocess
import sys

import pytest

from modeling_performer.recipes import docs_check, docs_numbers, docs_tables

from .conftest import ROOT

PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_rendered_tables_and_quoted_numbers_match_the_results_files():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_docs.py"), "--check"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    readme = (ROOT / "README.md").read_text()
    assert "<!-- results:chat -->" in readme
    assert docs_numbers.render_readme(readme) == readme  # the committed table is the one the file gives


def test_the_check_finds_numbers_and_files_that_no_results_file_holds(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"ms_per_token": 46.04328, "rows": [{"a": 3.0, "b": 4.0}],
                                                   "accuracy": 0.997, "peak_bytes": 1388318720}))
    held = ("46.0 ms and 46.04 ms, 0.75x (a ratio of two values), 99.7%, 1324 MiB, 1.3 GiB; "
            "see `docs/figures/run.json`")
    assert docs_check.check_page(held, "page.md", tmp_path) == []
    problems = docs_check.check_page("46.1 ms, 0.76x, 98.0%; `docs/figures/gone.json`", "page.md", tmp_path)
    assert len(problems) == 4, problems
    assert "gone.json, which does not exist" in problems[0] and "'46.1 ms'" in problems[1]
    # commands and outputs in code blocks are not quotes
    assert docs_check.check_page("```\n12.345x\n```\n", "page.md", tmp_path) == []


def test_a_table_goes_stale_when_its_results_file_changes(tmp_path, monkeypatch):
    original = docs_tables.serving_table()
    data = json.loads((ROOT / "docs" / "figures" / "serving.json").read_text())
    data["results"][0]["decode_tokens_per_s"] *= 2
    (tmp_path / "serving.json").write_text(json.dumps(data))
    monkeypatch.setattr(docs_tables, "FIGURES", tmp_path)
    assert docs_tables.serving_table() != original


def command_lines(text: str):
    """(script, arguments) of every `python scripts/X.py ...` command a page shows, continuation
    lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    for match in re.finditer(r"python (scripts/[\w]+\.py)((?: +[^\s`#|;)]+)*)", text):
        yield match.group(1), match.group(2)


@functools.cache
def help_options(script: str, command: str = None) -> set:
    """The options `script --help` lists; with a command, `script COMMAND --help`'s (a script with
    subcommands), or the script's own where COMMAND is not one of its commands."""
    done = subprocess.run([sys.executable, str(ROOT / script), *([command] if command else []), "--help"],
                          capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                          timeout=120)
    if command and done.returncode:
        return help_options(script)
    assert done.returncode == 0, f"{script} --help failed: {done.stderr[-1000:]}"
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", done.stdout))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_line_a_page_shows_is_accepted_by_its_scripts_help(page):
    """Each script's --help is the reference its page points to: every option a page shows is one
    the script lists."""
    unknown = []
    for script, arguments in command_lines(page.read_text()):
        if not (ROOT / script).exists():
            unknown.append(f"{script}: no such script")
            continue
        options = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", arguments))
        first = arguments.split()[0] if arguments.split() else ""
        missing = options - help_options(script, first if re.fullmatch(r"[a-z][a-z-]*", first) else None)
        if missing:
            unknown.append(f"{script}: {sorted(missing)}")
    assert not unknown, f"{page.name} shows options the scripts do not take: {unknown}"


def test_the_api_reference_covers_every_public_name_and_each_has_a_docstring():
    import inspect

    import modeling_performer

    page = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^::: modeling_performer\.(\w+)$", page, flags=re.M))
    assert listed == set(modeling_performer.__all__), set(modeling_performer.__all__) ^ listed
    undocumented = [name for name in modeling_performer.__all__
                    if (inspect.isclass(getattr(modeling_performer, name))
                        and not (vars(getattr(modeling_performer, name)).get("__doc__") or "").strip())
                    or (inspect.isfunction(getattr(modeling_performer, name))
                        and not (getattr(modeling_performer, name).__doc__ or "").strip())]
    assert not undocumented, f"public names without a docstring of their own: {undocumented}"
