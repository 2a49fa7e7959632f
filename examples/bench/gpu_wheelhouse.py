"""Build `.whl/`: the wheels the lent GPU machine lacks, for `examples/bench/gpu_smoke.sh` (run here, where pip works).

    python examples/bench/gpu_wheelhouse.py            # writes .whl/ (ignored by git), checks it under 60 MiB

The GPU machine's image has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15, peft, pyarrow,
pandas and xxhash, no package registry, and takes at most 64 MiB of files carried with the working tree
(`/work/.library/device`). It lacks bitsandbytes, TRL, datasets (and datasets' `dill` and `multiprocess`), and
its peft and pluggy may be older than this project's floors. So the wheelhouse holds: this project (built here),
and each of those at the floor this project declares in pyproject.toml (the releases `make test-floor` runs, which
work with transformers 5.17), for CPython 3.12 on manylinux x86_64.

bitsandbytes' wheel carries one native library per CUDA and ROCm release (43 MB); the slimmed copy keeps the
CPU library and those for CUDA 13 (what the image's torch is built with), about 8 MB.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE = REPO / ".whl"
LIMIT = 60 * 2**20  # the device tool carries 64 MiB with the working tree; the rest is the tree itself
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
FROM_FLOORS = ("bitsandbytes", "trl", "datasets", "peft", "pluggy")  # what the image lacks or may hold too old
EXTRA = ("dill", "multiprocess")  # datasets' own needs the image does not have
KEEP_CUDA = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.")


def floors(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """Each runtime dependency's `>=` floor, by name."""
    from packaging.requirements import Requirement

    found = {}
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        found[requirement.name] = next(s.version for s in requirement.specifier if s.operator == ">=")
    return found


def requirements(pins: dict[str, str]) -> list[str]:
    """`name==floor` for the libraries the image lacks or may hold too old."""
    return [f"{name}=={pins[name]}" for name in FROM_FLOORS if name in pins]


def needs_of(wheel: Path, names=EXTRA) -> list[str]:
    """The requirements a downloaded wheel declares on `names` (datasets' `dill<0.4.2,>=0.3.0`, ...), so the newest
    releases that fit it are fetched."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    found = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.name in names and requirement.marker is None:
                found.append(f"{requirement.name}{requirement.specifier}")
    return found


def slim_bitsandbytes(wheel: Path) -> Path:
    """Rewrites bitsandbytes' wheel without the native libraries of other CUDA and ROCm releases; its RECORD
    is rewritten to match, so pip installs it as it would the original."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {item.filename for item in src.infolist()
                   if item.filename.startswith("bitsandbytes/libbitsandbytes_") and not KEEP_CUDA.search(item.filename)}
        for item in src.infolist():
            if item.filename in dropped:
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",", 1)[0] not in dropped).encode()
            dst.writestr(item, data)
    slim.replace(wheel)
    return wheel


def build(out: Path = WHEELHOUSE) -> list[Path]:
    """Downloads and builds the wheelhouse into `out` (replaced whole) and returns its wheels."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        pip = [sys.executable, "-m", "pip"]
        download = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
                    "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(staging)]
        subprocess.run([*download, *requirements(floors())], check=True)
        subprocess.run([*download, *needs_of(next(staging.glob("datasets-*.whl")))], check=True)
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(staging), str(REPO)], check=True)
        for wheel in staging.glob("bitsandbytes-*.whl"):
            slim_bitsandbytes(wheel)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for wheel in staging.glob("*.whl"):
            shutil.move(str(wheel), out / wheel.name)
    return sorted(out.glob("*.whl"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WHEELHOUSE)
    args = parser.parse_args(argv)
    wheels = build(args.out)
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    print(f"{total / 2**20:6.1f} MiB  in {args.out} (limit {LIMIT / 2**20:.0f} MiB)")
    if total > LIMIT:
        print(f"gpu_wheelhouse: {total / 2**20:.1f} MiB is over the {LIMIT / 2**20:.0f} MiB the device tool carries",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
