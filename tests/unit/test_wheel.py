"""The wheel users install holds the plugin and nothing else: no tests, no development kit, no
benchmarks or demo scripts."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_holds_the_plugin_its_alias_and_cli_modules_only(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("axolotl_dskd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    shipped = {n for n in names if ".dist-info/" not in n}
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "axolotl_dskd").rglob("*.py")} | {
        "axolotl_dskd_alias.pth"
    }
    assert shipped == expected
    assert {
        "axolotl_dskd/evaluate.py",
        "axolotl_dskd/dolly.py",
        "axolotl_dskd/core/loss.py",
        "axolotl_dskd/integration/plugin.py",
    } <= shipped
    assert not any(n.startswith(("tests/", "dskd_devkit/", "benchmarks/", "scripts/")) for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # no `axolotl.plugins` entry point: Axolotl 0.21 would load the plugin into every run in the
    # environment (and twice beside `plugins: [axolotl_dskd]`); the YAML's `plugins:` opts in
    entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as archive:
        assert not any(b"[axolotl.plugins]" in archive.read(n) for n in entry_points)
