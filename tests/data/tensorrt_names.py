"""Write tensorrt_<major>_names.txt: every public name of a tensorrt-cu12-bindings wheel's Python API.

The bindings' compiled module (tensorrt.so, pybind11) needs libnvinfer/libnvonnxparser/
libnvinfer_plugin at load time, which only NVIDIA's library wheels (and a GPU machine) bring. The
module imports just a handful of C entry points from them (createInferBuilder_INTERNAL,
getPluginRegistry, ...; everything else is a virtual call through an interface), so this script
compiles stand-ins for exactly those entry points (each returns 0/NULL and is never called while
names are listed), imports the real module against them in a subprocess, and walks it with
``dir()``: module attributes, every class's attributes (inherited ones included, as attribute
access sees them), enum members, nested classes. The names are the ones Python resolves, so a
listed name exists and an unlisted one raises AttributeError in that TensorRT version (no false
positives from docstrings or argument names, as a scan of the .so's strings would give).

    pip download --no-deps tensorrt-cu12-bindings==10.16.1.11 -d /tmp/trtwheels
    python tests/data/tensorrt_names.py /tmp/trtwheels/tensorrt_cu12_bindings-10.16.1.11-*.whl tests/data

Needs gcc and binutils (nm, readelf); no GPU, no NVIDIA libraries, no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ENTRY = re.compile(r"^(create|get|init)\w*$")  # TensorRT's C entry points; Python/libc symbols never match

WALK = r'''
import json, sys
sys.setrecursionlimit(10000)
import tensorrt_bindings as trt
names, seen = set(), set()

def walk(obj, prefix, depth):
    for n in dir(obj):
        if n.startswith("_") and n != "__version__":
            continue
        try:
            v = getattr(obj, n)
        except Exception:  # a property that needs an instance: the name still exists
            v = None
        names.add(prefix + n)
        if isinstance(v, type) and depth < 4 and (id(v), prefix) not in seen:
            seen.add((id(v), prefix))
            walk(v, prefix + n + ".", depth + 1)

walk(trt, "", 0)
print(json.dumps({"version": trt.__version__, "names": sorted(names)}))
'''


def entry_points(so: Path) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], check=True, capture_output=True, text=True).stdout
    syms = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}
    return sorted(s for s in syms if ENTRY.match(s))


def needed(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout
    return [m for m in re.findall(r"\[(lib[^\]]+)\]", out) if m.startswith("libnv")]


def main(wheel: Path, out_dir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp / "site")
        so = tmp / "site" / "tensorrt_bindings" / "tensorrt.so"
        syms, libs = entry_points(so), needed(so)
        stub_c = tmp / "stub.c"
        stub_c.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in syms))
        (tmp / "lib").mkdir()
        for lib in libs:  # one stand-in per library the module links, each defining every entry point
            subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp / "lib" / lib), str(stub_c)], check=True)
        env = {**os.environ, "LD_LIBRARY_PATH": str(tmp / "lib"), "PYTHONPATH": str(tmp / "site")}
        res = subprocess.run([sys.executable, "-c", WALK], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"importing the bindings failed:\n{res.stderr[-2000:]}")
        listing = json.loads(res.stdout.strip().splitlines()[-1])
    version = listing["version"]
    dest = Path(out_dir) / f"tensorrt_{version.split('.')[0]}_names.txt"
    sha = hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
    header = [
        f"# Public Python API names of TensorRT {version}: one dotted name per line (module attribute,",
        "# Class.attribute incl. inherited ones, Enum.MEMBER, Outer.Inner.NAME), as dir() lists them.",
        f"# Wheel: {Path(wheel).name} (sha256 {sha})",
        f"#   pip download --no-deps tensorrt-cu12-bindings=={version} -d /tmp/trtwheels",
        f"#   python tests/data/tensorrt_names.py /tmp/trtwheels/{Path(wheel).name} tests/data",
        f"# How: the real compiled module imported against stand-in {', '.join(libs)}",
        f"# defining only the C entry points it links ({', '.join(syms)}),",
        "# each returning NULL and never called while listing; see tests/data/tensorrt_names.py.",
    ]
    dest.write_text("\n".join(header + listing["names"]) + "\n")
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(main(Path(sys.argv[1]), Path(sys.argv[2])))
