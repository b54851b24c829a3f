#!/usr/bin/env python3
"""Install the ONNX Runtime library and the face models listed in models/manifest.toml, checking
every sha256. Used by README, CI and the package docs.

Online: the ONNX Runtime wheel comes from PyPI (its JSON API, so pip is not needed; `pip download`
as a fallback), models from their manifest URL.
Offline: wheels from $MENSHEN_ORT_WHEEL_DIR, models from $MENSHEN_MODELS_DIR, else ../shared/models
beside the project. A file whose checksum differs is refused, never installed.

usage: setup_runtime.py [--arch x86_64|aarch64] [--dest DIR] [--models-only | --runtime-only]
"""
import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fail(msg: str) -> None:
    print(f"setup-runtime: error: {msg}", file=sys.stderr)
    sys.exit(1)


def model_sources() -> list[Path]:
    out = []
    if os.environ.get("MENSHEN_MODELS_DIR"):
        out.append(Path(os.environ["MENSHEN_MODELS_DIR"]))
    out.append(ROOT.parent / "shared" / "models")
    return out


def install_models(manifest: dict, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for m in manifest["model"]:
        target = dest / m["file"]
        if target.exists() and sha256(target) == m["sha256"]:
            print(f"  {m['file']}: present, sha256 ok")
            continue
        src = next((d / m["file"] for d in model_sources() if (d / m["file"]).exists()), None)
        with tempfile.TemporaryDirectory() as tmp:
            tmpfile = Path(tmp) / m["file"]
            if src is not None:
                shutil.copyfile(src, tmpfile)
                origin = str(src)
            elif m.get("url"):
                urllib.request.urlretrieve(m["url"], tmpfile)
                origin = m["url"]
            else:
                fail(f"{m['file']}: not in {', '.join(map(str, model_sources()))} and no download URL "
                     f"(source: {m['source']}); put it in MENSHEN_MODELS_DIR")
            got = sha256(tmpfile)
            if got != m["sha256"]:
                fail(f"{m['file']} from {origin}: sha256 {got}, manifest says {m['sha256']}; refusing it")
            shutil.move(tmpfile, target)
        print(f"  {m['file']}: installed from {origin}, sha256 ok")


def download_wheel(rt: dict, pin: dict, dest: Path) -> "str | None":
    """Fetch the pinned wheel through PyPI's simple JSON API (PEP 691; no pip needed). None when
    done, else why not. The caller checks its sha256 against the manifest either way."""
    index = os.environ.get("MENSHEN_PYPI_SIMPLE", "https://pypi.org/simple")
    try:
        import json
        req = urllib.request.Request(f"{index}/{rt['name']}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            meta = json.load(r)
        url = next((u["url"] for u in meta["files"] if u["filename"] == pin["wheel"]), None)
        if url is None:
            return f"PyPI lists no file {pin['wheel']}"
        with urllib.request.urlopen(url, timeout=600) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f)
        return None
    except Exception as e:  # network, TLS, JSON: the pip route is tried next
        return str(e)


def install_runtime(manifest: dict, arch: str, dest: Path) -> None:
    rt = manifest["runtime"]
    if arch not in rt:
        fail(f"no ONNX Runtime pinned for {arch} (pinned: x86_64, aarch64)")
    pin = rt[arch]
    lib = dest / rt["library"]
    if lib.exists() and sha256(lib) == pin["library_sha256"]:
        print(f"  {rt['library']} ({arch}): present, sha256 ok")
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = os.environ.get("MENSHEN_ORT_WHEEL_DIR")
        wheel = Path(wheel_dir) / pin["wheel"] if wheel_dir else None
        if wheel is None or not wheel.exists():
            wheel = Path(tmp) / pin["wheel"]
            why = download_wheel(rt, pin, wheel)
            if why is not None:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--platform", pin["platform"], "--python-version", "311",
                       f"{rt['name']}=={rt['version']}", "-d", tmp, "-q"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    fail(f"the wheel could not be fetched from PyPI ({why}), nor with pip: {r.stderr.strip()[-400:]}")
                if not wheel.exists():
                    fail(f"pip did not fetch {pin['wheel']}")
        got = sha256(wheel)
        if got != pin["wheel_sha256"]:
            fail(f"{wheel.name}: sha256 {got}, manifest says {pin['wheel_sha256']}; refusing it")
        with zipfile.ZipFile(wheel) as z:
            data = z.read(f"onnxruntime/capi/{rt['library']}")
        if hashlib.sha256(data).hexdigest() != pin["library_sha256"]:
            fail(f"{rt['library']} inside {wheel.name} does not match the pinned sha256")
        tmp_lib = Path(tmp) / rt["library"]
        tmp_lib.write_bytes(data)
        shutil.move(tmp_lib, lib)
    print(f"  {rt['library']} ({arch}): installed, sha256 ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    machine = {"arm64": "aarch64"}.get(platform.machine(), platform.machine())
    ap.add_argument("--arch", default=machine, choices=["x86_64", "aarch64"])
    ap.add_argument("--dest", default=str(ROOT / "runtime"), help="install here: DEST/lib and DEST/models")
    ap.add_argument("--manifest", default=str(ROOT / "models" / "manifest.toml"))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--models-only", action="store_true")
    g.add_argument("--runtime-only", action="store_true")
    a = ap.parse_args()
    with open(a.manifest, "rb") as f:
        manifest = tomllib.load(f)
    dest = Path(a.dest)
    print(f"setup-runtime: into {dest}")
    if not a.models_only:
        install_runtime(manifest, a.arch, dest / "lib")
    if not a.runtime_only:
        install_models(manifest, dest / "models")


if __name__ == "__main__":
    main()
