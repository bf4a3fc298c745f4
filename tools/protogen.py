"""Generate the Python code in services/flywheel/v1/ from protos/ (the only schema source).

    python -m tools.protogen          # regenerate services/flywheel/v1/
    python -m tools.protogen --check  # exit 1 if services/flywheel/v1/ is stale

The generated modules import each other as `flywheel.v1.*_pb2`, which is this package.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "services" / "flywheel" / "v1"
INIT = '"""Generated from protos/flywheel/v1 by `python -m tools.protogen`. Do not edit."""\n'


def generate(dest: Path) -> None:
    """Write the generated package (pb2, pyi, grpc stubs and __init__) into dest."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the error above")
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(tmp) / "flywheel" / "v1").iterdir()):
            shutil.copy(f, dest / f.name)
    (dest / "__init__.py").write_text(INIT)


def stale_files(out: Path = OUT) -> list[str]:
    """Names of files in `out` that differ from a fresh generation (missing or extra included)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "v1"
        generate(fresh)
        cmp = filecmp.dircmp(fresh, out) if out.is_dir() else None
        if cmp is None:
            return sorted(p.name for p in fresh.iterdir())
        names = [n for n in cmp.left_only + cmp.right_only if n != "__pycache__"]
        _, mismatch, errors = filecmp.cmpfiles(fresh, out, cmp.common_files, shallow=False)
        return sorted(names + mismatch + errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether services/flywheel/v1 is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"services/flywheel/v1 is stale ({', '.join(stale)}): run `python -m tools.protogen`")
            return 1
        print("services/flywheel/v1 is fresh")
        return 0
    if OUT.exists():
        shutil.rmtree(OUT)
    generate(OUT)
    print(f"generated {OUT.relative_to(ROOT)} from {PROTOS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
