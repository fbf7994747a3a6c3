"""The README and docs/ as a reader meets them: the figures and configs they show are the ones
the scripts wrote and the tests validate, and every link leads somewhere."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_included_tables_and_configs_are_the_files_they_name():
    """Every ``<!-- include: ... -->`` block holds its file as written by its script (regenerate
    with ``python scripts/render_docs.py``)."""
    render = runpy.run_path(str(REPO / "scripts" / "render_docs.py"))["render"]
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert render(text) == text, (
            f"{page.relative_to(REPO)} is out of date: run python scripts/render_docs.py"
        )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_to_files_in_the_repository(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        resolved = (page.parent / target).resolve()
        assert resolved.exists() and REPO in resolved.parents, f"{page.name}: {target}"
