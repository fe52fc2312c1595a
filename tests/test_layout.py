"""The project's shape as a reader relies on it: layers import downwards, one writer of files, docs that match the
settings the code declares."""
import ast
from pathlib import Path

import pytest

from utils.settings import with_reference_tables

REPO = Path(__file__).resolve().parents[1]
CORE = ("base", "data_loader", "model", "trainer", "logger", "utils")


def imported_packages(path):
    """The top-level packages a module imports, at any depth of its code."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer, above", [
    ("utils", {"base", "data_loader", "model", "trainer", "logger"}),
    ("logger", {"base", "data_loader", "model", "trainer"}),
    ("base", {"data_loader", "model", "trainer"}),
])
def test_layers_import_only_downwards(layer, above):
    offenders = {str(p.relative_to(REPO)): imported_packages(p) & above for p in (REPO / layer).glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_files_are_renamed_into_place_by_one_writer():
    """Every atomic replace goes through utils.util.atomic_write."""
    writers = sorted(str(p.relative_to(REPO)) for package in CORE for p in (REPO / package).glob("*.py")
                     if "os.replace(" in p.read_text())
    assert writers == ["utils/util.py"]


def test_the_documented_settings_are_the_declared_ones():
    """docs/configuration.md's settings tables are exactly what `python -m utils.settings` writes from the code."""
    docs = (REPO / "docs" / "configuration.md").read_text()
    assert with_reference_tables(docs) == docs, "regenerate with: python -m utils.settings docs/configuration.md"
