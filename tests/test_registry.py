"""Adapters kept in the local registry: `quantgate publish-adapter` puts a LoRA folder there as the next version,
checksummed; a config serves it as `registry:NAME[/vN]`, resolved to its version's folder and checked intact when the
config loads."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantgate.config import ConfigError, load_config
from quantgate.paths import PROJECT_ROOT
from tests.conftest import quantgate

DEFAULT = PROJECT_ROOT / "configs" / "default.yaml"


def lora_folder(folder: Path, seed: int) -> Path:
    """What peft's save_pretrained writes for a rank-2 LoRA on q_proj (weights made here, no model loaded)."""
    from peft import LoraConfig

    LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], base_model_name_or_path="tiny").save_pretrained(folder)
    torch.manual_seed(seed)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 2)},
              folder / "adapter_model.safetensors")
    return folder


def served(registry: Path, source: str):
    return load_config(DEFAULT, [f"steps.publish.registry_dir={registry}",
                                 f"adapters=[{{name: support, source: '{source}'}}]"]).adapters[0].source


def test_a_published_adapter_is_served_by_its_latest_or_named_version(tmp_path):
    registry = tmp_path / "registry"
    for seed in (0, 1):
        code, shown = quantgate("publish-adapter", str(lora_folder(tmp_path / f"lora-{seed}", seed)), "support",
                                "--registry", str(registry))
        assert code == 0 and f"registry:support/v{seed + 1}" in shown, shown
    entry = registry / "adapters" / "support"
    assert sorted(p.name for p in entry.iterdir()) == ["v1", "v2"]
    assert (entry / "v2" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "lora-1" / "adapter_model.safetensors").read_bytes()
    assert served(registry, "registry:support") == str(entry / "v2")
    assert served(registry, "registry:support/v1") == str(entry / "v1")


def test_a_missing_or_damaged_registry_adapter_is_a_config_error(tmp_path):
    registry = tmp_path / "registry"
    assert quantgate("publish-adapter", str(lora_folder(tmp_path / "lora", 0)), "support", "--registry", str(registry))[0] == 0
    for source, why in (("registry:support/v9", "no v9 of support; allowed: v1"),
                        ("registry:other", f"no adapter named other in the registry {registry}"),
                        ("registry:support/latest", "allowed: registry:NAME or registry:NAME/vN"),
                        ("registry:support/v01", "allowed: registry:NAME or registry:NAME/vN")):
        with pytest.raises(ConfigError) as error:
            served(registry, source)
        assert f"adapters[0].source: {source}: {why}" in str(error.value)
    weights = registry / "adapters" / "support" / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    with pytest.raises(ConfigError) as error:
        served(registry, "registry:support")
    assert f"registry:support: not intact: {weights}: sha256 differs from the manifest (corrupted)" in str(error.value)


def test_a_folder_that_is_not_an_adapter_is_not_published(tmp_path):
    (tmp_path / "notes").mkdir()
    code, shown = quantgate("publish-adapter", str(tmp_path / "notes"), "support", "--registry", str(tmp_path / "r"))
    assert code == 2 and "has no adapter_config.json or adapter_model.safetensors" in shown
    assert not (tmp_path / "r").exists()
