"""The numbers of the README and the documentation come from the committed results files in
docs/figures, never from hand-typed copies. Tables are rendered from those files
(`docs_tables.TABLES`) into docs/snippets/<name>.md, which pages include
(`--8<-- "snippets/<name>.md"`), and into the README between `<!-- results:<name> -->` and
`<!-- /results -->`: `python scripts/render_docs.py` writes them, `--check` fails where a committed
copy differs from what the files give now, or where a page quotes a number no results file holds
(`docs_check.check_page`)."""

from __future__ import annotations

import re

from . import ROOT
from .docs_check import check_page
from .docs_tables import TABLES


SNIPPETS = ROOT / "docs" / "snippets"
README = ROOT / "README.md"
README_TABLES = ("chat", "chat_lm")
MARKER = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


def render_readme(text: str) -> str:
    """The README with every marked table rendered anew."""
    return MARKER.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)


def render(write: bool) -> list[str]:
    """Renders every table; writes what changed (write) or lists what differs (check)."""
    stale = []
    if write:
        SNIPPETS.mkdir(parents=True, exist_ok=True)
    for name, table in TABLES.items():
        path = SNIPPETS / f"{name}.md"
        text = table()
        if not path.exists() or path.read_text() != text:
            stale.append(str(path.relative_to(ROOT)))
            if write:
                path.write_text(text)
    readme = README.read_text()
    fresh = render_readme(readme)
    if fresh != readme:
        stale.append("README.md")
        if write:
            README.write_text(fresh)
    return stale


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; fail when a rendered table or a page's number is stale")
    args = parser.parse_args(argv)
    stale = render(write=not args.check)
    problems = []
    for page in sorted((ROOT / "docs").glob("*.md")) + [README]:
        problems += check_page(page.read_text(), str(page.relative_to(ROOT)))
    if args.check and stale:
        problems += [f"{path}: differs from what the results files give (python scripts/render_docs.py)" for path in stale]
    elif stale:
        print("rendered: " + ", ".join(stale))
    if problems:
        raise SystemExit("\n".join(problems))
    print("every table and quoted number is drawn from docs/figures")
