"""The wheel: everything under the one import name `casledger`, generated code and typing markers
included, the `casledger` command declared, and every third-party import a declared dependency.

The wheel is built (offline, no build isolation) from a copy of the source tree, so a stale
`build/` directory cannot leak into it and the working tree is not written to.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import HeaderParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# Package directory in the source tree -> where setuptools' package-dir puts it in the wheel.
MAPPED = {"service": "casledger/service", "http_bridge": "casledger/http_bridge"}
NOT_SOURCE = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
              ".mypy_cache", ".ruff_cache", ".hypothesis", "tests", "bench", "*.db", "*.db-*",
              "*.lock")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this venv, and --no-build-isolation needs "
                    "it (pip install 'setuptools>=77')")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(work / "dist"), str(source)],
        capture_output=True, text=True, check=False, timeout=300, stdin=subprocess.DEVNULL)
    output = built.stdout + built.stderr
    if built.returncode != 0 and re.search(r"No module named '?(setuptools|wheel)", output):
        pytest.skip(f"cannot build without isolation, the build backend is missing:\n{output}")
    assert built.returncode == 0, output
    [path] = (work / "dist").glob("casledger-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def dist_info(wheel: zipfile.ZipFile) -> str:
    [directory] = {name.split("/")[0] for name in wheel.namelist()
                   if name.split("/")[0].endswith(".dist-info")}
    return directory


def test_everything_lives_under_casledger(wheel: zipfile.ZipFile) -> None:
    info = dist_info(wheel)
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"casledger", info}
    for name in wheel.namelist():
        if name.endswith((".py", ".pyi")):
            assert name.startswith("casledger/"), name
        assert not name.startswith(("service/", "http_bridge/")), name


def test_no_top_level_service_or_http_bridge(wheel: zipfile.ZipFile) -> None:
    top_level = f"{dist_info(wheel)}/top_level.txt"
    if top_level in wheel.namelist():
        assert wheel.read(top_level).decode().split() == ["casledger"]


def test_generated_code_and_typing_markers_are_included(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for expected in (
        "casledger/service/api/casledger/v1/ledger_pb2.py",
        "casledger/service/api/casledger/v1/ledger_pb2.pyi",
        "casledger/service/api/casledger/v1/ledger_pb2_grpc.py",
        "casledger/service/api/casledger/v1/ledger_pb2_grpc.pyi",
        "casledger/service/py.typed",
        "casledger/http_bridge/py.typed",
        "casledger/service/cli.py",
    ):
        assert expected in names, expected


def test_every_source_module_is_packaged(wheel: zipfile.ZipFile) -> None:
    # The packages list in pyproject.toml is explicit: a new subpackage must be added to it.
    names = set(wheel.namelist())
    missing = []
    for directory, packaged in MAPPED.items():
        for path in sorted((REPO / directory).rglob("*.py*")):
            if "__pycache__" in path.parts or path.suffix not in (".py", ".pyi"):
                continue
            relative = path.relative_to(REPO / directory).as_posix()
            if f"{packaged}/{relative}" not in names:
                missing.append(f"{directory}/{relative}")
    assert not missing, f"not in the wheel: {missing}"


def test_the_casledger_command_is_declared(wheel: zipfile.ZipFile) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{dist_info(wheel)}/entry_points.txt").decode())
    assert entry_points["console_scripts"]["casledger"].strip() == "casledger.service.cli:main"


def imports_of(source: bytes) -> Iterator[tuple[str, int]]:
    """(absolute module, relative level) of every import statement."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def module_exists(names: set[str], module: str) -> bool:
    path = module.replace(".", "/")
    return (module == "casledger" or f"{path}.py" in names or f"{path}/__init__.py" in names)


def test_absolute_casledger_imports_resolve_inside_the_wheel(wheel: zipfile.ZipFile) -> None:
    # protoc emits `from casledger.v1 import ...`; the generator must rewrite it to the
    # installed path, or the generated code only imports from a source checkout.
    names = set(wheel.namelist())
    unresolved = []
    for name in sorted(names):
        if not name.endswith(".py"):
            continue
        for module, level in imports_of(wheel.read(name)):
            if level == 0 and module.split(".")[0] == "casledger" and not module_exists(
                    names, module):
                unresolved.append(f"{name}: {module}")
    assert not unresolved, unresolved


def test_every_third_party_import_is_a_declared_dependency(wheel: zipfile.ZipFile) -> None:
    metadata = HeaderParser().parsestr(wheel.read(f"{dist_info(wheel)}/METADATA").decode())
    required = {
        re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in metadata.get_all("Requires-Dist") or []
        if "extra ==" not in requirement
    }
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for name in sorted(wheel.namelist()):
        if not name.endswith(".py"):
            continue
        for module, level in imports_of(wheel.read(name)):
            top = module.split(".")[0]
            if level or not top or top == "casledger" or top in sys.stdlib_module_names:
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
            if not dists & required:
                undeclared.append(f"{name}: {module} (from {sorted(dists) or 'nothing'})")
    assert not undeclared, undeclared
