"""Splices generated files into the README and the docs pages: ``python scripts/render_docs.py``.

A block ``<!-- include: PATH -->`` ... ``<!-- end include -->`` in a page is replaced by the file
``PATH`` (relative to the repository root): a benchmark's results table (its headings demoted
under the page's), or a YAML config in a fenced block. So every figure and config a page shows
is the one its script wrote or a test validates; ``--check`` (run by the tests) fails where a
page differs from what this would write.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- include: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.DOTALL)


def _included(path: str) -> str:
    text = (REPO / path).read_text(encoding="utf-8").rstrip("\n") + "\n"
    if path.endswith((".yml", ".yaml")):
        return f"```yaml\n{text}```\n"
    return re.sub(r"^#", "###", text, flags=re.MULTILINE)


def render(page: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + _included(m.group("path")) + m.group(4), page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report pages that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        rendered = render(text)
        if rendered != text:
            stale.append(page.relative_to(REPO))
            if not args.check:
                page.write_text(rendered, encoding="utf-8")
    if args.check and stale:
        print(f"out of date (run python scripts/render_docs.py): {', '.join(map(str, stale))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
