"""Regenerate the committed Python stubs from the .proto files.

Run from anywhere: ``python protos/generate.py``. Uses grpcio-tools (pinned to
1.80.x, see pyproject's dev extra) and mypy-protobuf for the ``.pyi`` files.
``--check`` regenerates into a temporary folder and fails if the committed stubs differ.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "edgefarm" / "v1"


def generate(out_root: Path) -> list[Path]:
    """Generate stubs for every .proto under protos/edgefarm/v1 into ``out_root``."""
    from grpc_tools import protoc  # dev extra

    # protoc-gen-mypy lives next to the interpreter (mypy-protobuf, dev extra).
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    out_dir = out_root / "protos" / "edgefarm" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.suffix in {".py", ".pyi"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            target = PROTO_DIR / path.name
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(path.name)
            else:
                shutil.copyfile(path, target)
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run python protos/generate.py")
            return 1
    print("stubs are up to date" if args.check else f"wrote {len(generated)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
