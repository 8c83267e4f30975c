"""sam_core's public API: every advertised name resolves, and importing the package stays cheap."""

import subprocess
import sys

import sam_core


def test_every_public_name_resolves_to_its_module():
    assert sorted(sam_core.__all__) == sorted(sam_core._EXPORTS)
    for name in sam_core.__all__:
        value = getattr(sam_core, name)
        assert value is getattr(__import__(sam_core._EXPORTS[name], fromlist=[name]), name)


def test_unknown_names_raise_attribute_error():
    try:
        sam_core.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_errors_import_no_model_code():
    code = "import sys, sam_core, sam_core.errors; print(sorted(m for m in ('torch', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_type_checking_imports_match_the_lazy_table():
    """The names mypy sees (the TYPE_CHECKING imports) are exactly the lazy table's, from the same modules."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(sam_core.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    imported = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert imported == sam_core._EXPORTS
