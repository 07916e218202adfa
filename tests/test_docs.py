"""The documentation site: it builds under `mkdocs build --strict` (so a broken link, a
missing anchor or a page left out of mkdocs.yml's nav fails), and every plug-in the config
can choose, each repair and each detector, has its page. Imports nothing from the project
and runs in a few seconds."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "src" / "badnet_repair"


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    command += ["--config-file", str(config), "--site-dir", str(site)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def repairs() -> list[str]:
    return sorted(path.stem for path in (ROOT / "conf" / "repair").glob("*.yaml"))


def detectors() -> list[str]:
    """The detector modules, wherever the package keeps them now."""
    for folder in (PACKAGE / "defenses" / "detectors", PACKAGE / "detectors"):
        if folder.is_dir():
            return sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    raise AssertionError(f"no detectors package under {PACKAGE}")


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


@pytest.mark.parametrize(
    "damage",
    [
        ("broken link", "repairs/sau.md", "\n[gone](../no-such-page.md)\n"),
        ("missing anchor", "safety.md", "\n[gone](index.md#no-such-section)\n"),
        ("page not in nav", "orphan.md", "# An orphan page\n"),
    ],
    ids=lambda damage: damage[0],
)
@pytest.mark.slow
def test_strict_build_refuses(tmp_path, damage):
    """The strictness the first test relies on: each kind of damage stops the build."""
    _, page, text = damage
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with open(tmp_path / "docs" / page, "a", encoding="utf-8") as f:
        f.write(text)
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0, f"{damage[0]} did not stop the build:\n{result.stderr}"


@pytest.mark.parametrize("name", repairs())
def test_every_repair_has_a_page(name):
    assert (DOCS / "repairs" / f"{name}.md").is_file(), f"repair={name}: no docs/repairs/{name}.md"


@pytest.mark.parametrize("name", detectors())
def test_every_detector_has_a_page(name):
    page = DOCS / "detectors" / f"{name}.md"
    assert page.is_file(), f"goodnet.detector={name}: no docs/detectors/{name}.md"


def test_readme_links_resolve():
    """The README's relative links (to docs/*.md and others) point at files that exist, so
    they work on GitHub too."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to no docs page"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
