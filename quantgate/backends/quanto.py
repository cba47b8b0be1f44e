"""optimum-quanto: int8 and int4 weights, quantized after loading and saved in quanto's own format
(transformers cannot save a quanto model)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from quantgate import modeling
from quantgate.backends import Backend, RecipeBase, register


class QuantoRecipe(RecipeBase):
    method: Literal["quanto"]
    weights: Literal["int8", "int4"]


class Quanto(Backend):
    method, recipe = "quanto", QuantoRecipe
    quant_method = "quanto"
    packages, tags, imports = ("optimum-quanto",), ("optimum-quanto",), ("optimum.quanto",)

    def stored_bits(self, recipe: QuantoRecipe) -> float:
        return 8.0 if recipe.weights == "int8" else 4 + 32 / 128  # int4: a scale and shift per 128 weights

    def after_load(self, model, recipe: QuantoRecipe, keep: list[str], tokenizer):
        from optimum.quanto import QuantizedModelForCausalLM, qint4, qint8

        weights = {"int8": qint8, "int4": qint4}[recipe.weights]
        return QuantizedModelForCausalLM.quantize(model, weights=weights, exclude=keep)._wrapped

    def save(self, model, recipe, path: Path) -> None:
        from optimum.quanto import QuantizedModelForCausalLM

        QuantizedModelForCausalLM(model).save_pretrained(path)

    def load(self, path: Path, device: str, dtype: str = "auto", **load_kwargs):
        # quanto's weights keep the dtype they were saved in ("the dtype of a weights Tensor cannot be
        # changed"), and its loader places them on one device (no offloading limits).
        from optimum.quanto import QuantizedModelForCausalLM

        return QuantizedModelForCausalLM.from_pretrained(path)._wrapped.to(modeling.single_device(device)).eval()

    def snippet(self, path: str) -> str:
        return (f"from optimum.quanto import QuantizedModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = QuantizedModelForCausalLM.from_pretrained({path!r})._wrapped.eval()\n"
                f"tokenizer = AutoTokenizer.from_pretrained({path!r})")


register(Quanto())
