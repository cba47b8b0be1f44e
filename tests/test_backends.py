"""A backend is one module: a throwaway one, registered here, goes through the whole flow."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantgate import modeling
from quantgate.backends import BACKENDS, Backend, RecipeBase, register
from tests.conftest import QUICK, write_config


class RoundToNearestRecipe(RecipeBase):
    method: str = "rtn-test"
    bits: int = 8


class RTNLinear(torch.nn.Module):
    """int8 weights with one scale per output row, dequantized at each call."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))

    def forward(self, x):
        return torch.nn.functional.linear(x, (self.qweight.float() * self.scale).to(x.dtype))


class RoundToNearest(Backend):
    method, recipe = "rtn-test", RoundToNearestRecipe

    def after_load(self, model, recipe, keep, tokenizer):
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name not in keep:
                w = module.weight.detach().float()
                q = RTNLinear(*w.shape)
                q.scale.copy_(w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127)
                q.qweight.copy_((w / q.scale).round().clamp(-127, 127).to(torch.int8))
                model.set_submodule(name, q)
        return model

    def save(self, model, recipe, path: Path) -> None:
        model.config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})

    def load(self, path: Path, device: str, dtype: str = "auto", **load_kwargs):
        from transformers import AutoConfig

        model = modeling.model_class(config := AutoConfig.from_pretrained(path))(config)
        state = load_file(path / "model.safetensors")
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and f"{name}.qweight" in state:
                model.set_submodule(name, RTNLinear(module.out_features, module.in_features))
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        return model.to(torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)).to(device).eval()


register(RoundToNearest())


def test_a_backend_registered_in_one_module_runs_the_whole_flow(tiny_llama, cache_dir, prefect_server, tmp_path,
                                                                  monkeypatch):
    """On the tiny Llama: the backend's path through every step is the same whatever the model."""
    from flows.quantize_model import quantize_model

    monkeypatch.setenv("QUANTGATE_BACKENDS", __name__)  # the benchmark's own process registers it too
    assert "rtn-test" in BACKENDS
    config = write_config(tmp_path / "rtn.yaml", f"model: {{source: '{tiny_llama}', dtype: float32}}\n"
                                                 "recipes:\n  - {name: rtn8, method: rtn-test}\n")
    run_dir = Path(quantize_model(str(config), overrides=[
        f"output.runs_dir={tmp_path / 'runs'}", f"output.cache_dir={cache_dir}",
        f"output.history_db={tmp_path / 'history.sqlite'}",
        *QUICK, "steps.benchmark.quantize_on_load=true",  # asked for, and not measured for a pass after loading
        f"steps.publish.registry_dir={tmp_path / 'registry'}"]))
    m = json.loads((run_dir / "metrics.json").read_text())
    rtn = m["recipes"]["rtn8"]
    assert rtn["status"] == "passed", rtn.get("reason")
    assert rtn["quantize"]["quantized_modules"] == 2 * 7 and rtn["quantize"]["skipped_modules"] == 1  # lm_head
    assert rtn["validate"]["verdict"] == "pass" and rtn["validate"]["kl_mean"] < 0.05
    assert rtn["benchmark"]["loaded"] == str(run_dir / "rtn8" / "checkpoint")
    assert "quantize_on_load" not in rtn["benchmark"]  # it quantizes after loading: nothing to measure there
    card = (Path(rtn["publish"]["location"]) / "README.md").read_text()
    assert "method: rtn-test" in card and f"{rtn['validate']['kl_mean']:.4f}" in card
