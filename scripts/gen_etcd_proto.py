"""Regenerate coordkit's own protobuf stubs for etcd's gRPC API (the ``transport="grpc"`` of EtcdBackend).

The vendored ``.proto`` files in ``coordkit/_backends/etcd/_proto/`` are etcd's ``rpc.proto``, ``kv.proto`` and
``auth.proto`` (etcd v3.5, Apache-2.0, see LICENSE there) with three mechanical changes, made by this script:

- the gogoproto and ``google.api.http`` annotations are removed (they only steer Go code and the JSON gateway);
- the packages are renamed ``etcdserverpb`` -> ``coordkit.etcdserverpb`` (``mvccpb``, ``authpb`` likewise) and the
  files live under a coordkit path, so that the stubs of another etcd client loaded in the same process (which
  register ``etcdserverpb`` in protobuf's global descriptor pool) cannot clash with ours;
- nothing else: field numbers and types are untouched, so the wire format is etcd's. The gRPC method paths are
  strings the transport keeps as etcd's (``/etcdserverpb.KV/Range``); no service stubs are generated.

Usage (from the repository root, with the ``dev`` extra installed for grpcio-tools)::

    python scripts/gen_etcd_proto.py                      # regenerate *_pb2.py / *_pb2.pyi from the vendored .proto
    python scripts/gen_etcd_proto.py --etcd-src ../etcd   # first re-derive the .proto files from an etcd checkout
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "coordkit" / "_backends" / "etcd" / "_proto"
PROTO_IMPORT = "coordkit/_backends/etcd/_proto"
#: etcd's file -> our file name
SOURCES = {
    "api/etcdserverpb/rpc.proto": "rpc.proto",
    "api/mvccpb/kv.proto": "kv.proto",
    "api/authpb/auth.proto": "auth.proto",
}
HEADER = (
    "// Derived from etcd's {src} (https://github.com/etcd-io/etcd, Apache License 2.0, see LICENSE here) by\n"
    "// scripts/gen_etcd_proto.py: gogoproto and google.api annotations removed, package renamed under coordkit.\n"
    "// Field numbers and types are etcd's: the wire format is unchanged.\n"
)


def strip(text: str, src: str) -> str:
    """etcd's .proto text -> the vendored one (see the module docstring)."""
    text = re.sub(r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', "", text, flags=re.M)
    text = re.sub(r'import "etcd/api/\w+/(\w+\.proto)";', rf'import "{PROTO_IMPORT}/\1";', text)
    text = re.sub(r"^option \(gogoproto\.\w+\) = \w+;\n", "", text, flags=re.M)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    # rpc options: option (google.api.http) = { post: "..." body: "*" };
    text = re.sub(r"\s*option \(google\.api\.http\) = \{([^{}]|\{[^{}]*\})*\};", "", text)  # one nested level
    text = re.sub(r"^package (\w+);", r"package coordkit.\1;", text, flags=re.M)
    if "gogoproto" in text or "google.api" in text:
        raise SystemExit(f"{src}: annotations left after stripping; update scripts/gen_etcd_proto.py")
    return HEADER.format(src=src) + text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd-src", type=Path, help="an etcd checkout (v3.5) to re-derive the .proto files from")
    args = parser.parse_args()
    if args.etcd_src is not None:
        for src, name in SOURCES.items():
            (PROTO_DIR / name).write_text(strip((args.etcd_src / src).read_text(), src))
    protos = [f"{PROTO_IMPORT}/{name}" for name in SOURCES.values()]
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--pyi_out={ROOT}"]
    subprocess.run([*command, *protos], check=True, cwd=ROOT)
    print(f"generated {', '.join(p.rsplit('/', 1)[1] for p in protos)} stubs in {PROTO_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
