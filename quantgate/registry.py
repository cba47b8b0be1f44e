"""The local registry's layout: `<registry>/<model>/<recipe>/v<N>/` for published checkpoints and
`<registry>/adapters/<name>/v<N>/` for LoRA adapters, each version a folder with its manifest.json (every file's
sha256), made by a rename so that none is ever half-written or overwritten."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from quantgate.fetching import check_manifest
from quantgate.files import SLUG, manifest, under, write_json

ADAPTERS = "adapters"
T = TypeVar("T")
VERSION = re.compile(r"v[1-9][0-9]*")
ADAPTER_SOURCE = re.compile(rf"^registry:(?P<name>{SLUG.pattern})(?:/(?P<version>{VERSION.pattern}))?$")


class RegistryError(ValueError):
    """A registry entry that is not there or not intact: a one-line message naming it."""


def versions(folder: Path) -> list[int]:
    return sorted(int(p.name[1:]) for p in folder.glob("v*") if VERSION.fullmatch(p.name)) if folder.is_dir() else []


def next_version(folder: Path) -> int:
    return max(versions(folder), default=0) + 1


def adapter_folder(source: str, registry_dir: Path) -> Path:
    """`registry:NAME[/vN]` as its intact version folder (the latest where none is named)."""
    found = ADAPTER_SOURCE.match(source)
    if not found:
        raise RegistryError(f"{source}: allowed: registry:NAME or registry:NAME/vN (an adapter `quantgate "
                            "publish-adapter` put in the registry)")
    entry = Path(registry_dir) / ADAPTERS / found["name"]
    have = versions(entry)
    if not have:
        raise RegistryError(f"{source}: no adapter named {found['name']} in the registry {registry_dir}")
    version = found["version"] or f"v{have[-1]}"
    if int(version[1:]) not in have:
        raise RegistryError(f"{source}: no {version} of {found['name']}; allowed: " + ", ".join(f"v{v}" for v in have))
    if problems := check_manifest(entry / version, entry / version / "manifest.json"):
        raise RegistryError(f"{source}: not intact: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return entry / version


def add_version(parent: Path, fill: Callable[[Path, Path], T]) -> tuple[Path, T]:
    """The next version folder of `parent`: `fill(staging, target)` writes its files into a staging folder beside it,
    which a rename makes `parent/v<N>`. rename(2) onto an existing non-empty folder fails, so a version is never
    overwritten: a concurrent publisher that took the number makes this one fill again for the next."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=parent))
    try:
        while True:
            target = parent / f"v{next_version(parent)}"
            filled = fill(staging, target)
            try:
                staging.rename(target)
                return target, filled
            except OSError:
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_adapter(folder: Path, name: str, registry_dir: Path, files: tuple[str, ...]) -> Path:
    """The adapter's files copied into the registry as the next version of `name`, with their manifest."""
    def fill(staging: Path, target: Path) -> None:
        for file in files:
            shutil.copy2(Path(folder) / file, staging / file)
        write_json(staging / "manifest.json", {"source": str(Path(folder).resolve()), "files": manifest(staging)})

    return add_version(under(Path(registry_dir), ADAPTERS, name), fill)[0]
