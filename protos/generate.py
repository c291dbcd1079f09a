"""Regenerate the protobuf and gRPC code under service/api/ and fix its imports.

protoc emits absolute imports rooted at the proto package (``from casledger.v1 import ...``);
installed, the generated modules live at ``casledger.service.api.casledger.v1``, so every such
import is rewritten to that path. Run through ``make protos``; the output is committed and CI
fails when regenerating it gives a diff.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "service" / "api"
INSTALLED_PREFIX = "casledger.service.api."

# `from casledger.v1 import x` / `import casledger.v1.x` / `casledger.v1.x.Type` in annotations.
_IMPORT = re.compile(r"^(from|import) casledger\.v1\b", re.MULTILINE)
_QUALIFIED = re.compile(r"(?<![\w.'/])casledger\.v1\.(\w+_pb2(?:_grpc)?)\b")


def fix_imports(text: str) -> str:
    text = _IMPORT.sub(lambda m: f"{m.group(1)} {INSTALLED_PREFIX}casledger.v1", text)
    return _QUALIFIED.sub(lambda m: f"{INSTALLED_PREFIX}casledger.v1.{m.group(1)}", text)


def generate(out: Path) -> int:
    """Run protoc into `out` and fix the imports of what it wrote; 0 on success."""
    generated = out / "casledger"
    if generated.exists():
        shutil.rmtree(generated)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    # google/rpc/*.proto ship with googleapis-common-protos, beside their generated modules.
    googleapis = Path(status_pb2.__file__).parents[2]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"-I{googleapis}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for directory in [generated, *[p for p in generated.rglob("*") if p.is_dir()]]:
        (directory / "__init__.py").touch()
    for path in sorted(generated.rglob("*.py*")):
        path.write_text(fix_imports(path.read_text()))
    return 0


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.py*"))}


def main(argv: list[str]) -> int:
    if "--check" not in argv:
        return generate(OUT)
    with tempfile.TemporaryDirectory() as tmp:
        if generate(Path(tmp)) != 0:
            return 1
        fresh, committed = snapshot(Path(tmp) / "casledger"), snapshot(OUT / "casledger")
    stale = sorted(k for k in fresh.keys() | committed.keys() if fresh.get(k) != committed.get(k))
    if stale:
        print("service/api is out of date with protos/ (run `make protos` and commit):",
              *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
