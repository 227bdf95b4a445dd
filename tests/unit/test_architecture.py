"""Dependencies point inward and each third-party library stays in its one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ledger", "projections", "consumers", "cli")
PKCS11_ADAPTER = "ledger/keystore/pkcs11_adapter.py"


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository root, with forward slashes
    line: int
    module: str  # absolute dotted name

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.module}"


def _package_of(path: str) -> list[str]:
    parts = path.removesuffix(".py").split("/")
    return parts[:-1]


def imports_in(source: str, path: str) -> list[Import]:
    """Every import in a module, at any depth, including literal dynamic imports."""
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append(Import(path, node.lineno, module))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append(Import(path, node.lineno, node.args[0].value))
    return found


def _all_imports() -> list[Import]:
    found = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            found += imports_in(file.read_text(encoding="utf-8"), path)
    return found


ALL_IMPORTS = _all_imports()


def _violations(
    *, in_paths: tuple[str, ...], forbidden: set[str], allowed_in: tuple[str, ...] = ()
) -> list[str]:
    return [
        str(imp)
        for imp in ALL_IMPORTS
        if imp.path.startswith(in_paths)
        and not imp.path.startswith(allowed_in or ("\0",))
        and imp.top in forbidden
    ]


def test_the_walk_sees_every_package_and_their_imports() -> None:
    seen = {imp.path.split("/")[0] for imp in ALL_IMPORTS}
    assert seen == set(PACKAGES)
    assert any(imp.module == "ledger.errors" for imp in ALL_IMPORTS)


def test_the_import_walker_resolves_relative_nested_and_dynamic_imports() -> None:
    source = (
        "from . import sibling\n"
        "from ..errors import X\n"
        "def f():\n"
        "    import kafka.admin\n"
        "    importlib.import_module('typer')\n"
        "    __import__('rich')\n"
    )
    modules = [imp.module for imp in imports_in(source, "ledger/keystore/port.py")]
    assert modules == ["ledger.keystore", "ledger.errors", "kafka.admin", "typer", "rich"]


def test_ledger_imports_no_outer_layer() -> None:
    forbidden = {"cli", "api", "consumers", "projections"}
    assert _violations(in_paths=("ledger/",), forbidden=forbidden) == []


def test_consumers_and_projections_import_neither_cli_nor_api() -> None:
    paths = ("consumers/", "projections/")
    assert _violations(in_paths=paths, forbidden={"cli", "api"}) == []


def test_pkcs11_is_imported_only_by_the_keystore_adapter() -> None:
    violations = _violations(in_paths=PACKAGES, forbidden={"pkcs11"}, allowed_in=(PKCS11_ADAPTER,))
    assert violations == []
    assert any(imp.top == "pkcs11" and imp.path == PKCS11_ADAPTER for imp in ALL_IMPORTS)


def test_kafka_is_imported_only_inside_consumers() -> None:
    violations = _violations(in_paths=PACKAGES, forbidden={"kafka"}, allowed_in=("consumers/",))
    assert violations == []


@pytest.mark.parametrize("library", ["typer", "rich", "click"])
def test_cli_libraries_are_imported_only_inside_cli(library: str) -> None:
    violations = _violations(in_paths=PACKAGES, forbidden={library}, allowed_in=("cli/",))
    assert violations == []


IMPORT_ALL_WITHOUT_NETWORK = """
import importlib, pkgutil, socket, sys

attempts = []

def refuse(*args, **kwargs):
    # Recorded as well as raised, so a module that swallows the error still fails.
    attempts.append(repr(args[1:] or args))
    raise OSError("a socket was used at import time")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.socket.bind = refuse
socket.create_connection = refuse

names = []
for package in sys.argv[1:]:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
print("\\n".join(names))
if attempts:
    sys.exit("sockets used at import time: " + ", ".join(attempts))
"""


def test_importing_every_module_opens_no_socket() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL_WITHOUT_NETWORK, *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    expected = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }
    assert expected <= imported
