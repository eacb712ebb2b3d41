"""The README's layout section names every module of the package, and every module it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "deltatune"


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout") :]
    return section.split("```")[1]


def test_layout_names_every_module_outside_the_cli():
    named = set(re.findall(r"\w+\.py", layout_block()))
    modules = {
        path.name
        for path in PACKAGE.rglob("*.py")
        if "cli" not in path.relative_to(PACKAGE).parts and path.name not in ("__init__.py", "__main__.py")
    }
    assert modules - named == set(), "modules the README's layout does not name"


def test_every_module_and_folder_the_layout_names_exists():
    block = layout_block()
    files = {path.name for path in PACKAGE.rglob("*.py")}
    folders = {path.name for path in PACKAGE.rglob("*") if path.is_dir()}
    assert set(re.findall(r"\w+\.py", block)) - files == set()
    assert set(re.findall(r"^\s*(\w+)/", block, re.MULTILINE)) - folders - {"src"} == set()
