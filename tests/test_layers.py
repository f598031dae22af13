"""The import layers (pyproject.toml [tool.importlinter], README "Architecture"): higher layers may
import lower ones, never the reverse, lazy imports inside functions included."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]


def lint(config: Path) -> int:
    return lint_imports(config_filename=str(config), no_cache=True)


def test_every_import_goes_down_the_stack(capsys):
    status = lint(REPO / "pyproject.toml")
    report = capsys.readouterr().out
    assert status == 0, report[report.find("Broken contracts"):] or report


@pytest.fixture
def two_layer_package(tmp_path, monkeypatch) -> Path:
    """``upper`` may import ``lower``; the lower layer has a lazy import of the upper one."""
    package = tmp_path / "layered"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "upper.py").write_text("from layered import lower\n")
    (package / "lower.py").write_text(textwrap.dedent("""
        def helper():
            from layered.upper import lower  # lazy, inside a function
            return lower
    """))
    (tmp_path / "contracts.toml").write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["layered"]

        [[tool.importlinter.contracts]]
        name = "upper above lower"
        type = "layers"
        layers = ["layered.upper", "layered.lower"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_lazy_upward_import_inside_a_function_breaks_the_layers(two_layer_package, capsys):
    assert lint(two_layer_package / "contracts.toml") == 1
    assert "layered.lower is not allowed to import layered.upper" in capsys.readouterr().out
