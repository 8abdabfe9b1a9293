"""Architecture facts per model family, as data (``ModelSpec``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Where MEMIT finds things inside one model family.

    Templates take the layer index through ``str.format``.
    """

    family: str
    block: str
    """Transformer block; its output is the residual stream h^l."""
    mlp: str
    """The MLP of a block."""
    mlp_out: str
    """The MLP output projection: its input is MEMIT's key k, its weight is edited."""
    attn: str
    """The attention module of a block."""
    final_norm: str
    """The norm applied before the LM head."""
    lm_head: str
    """The unembedding."""
    embed: str
    """The token embedding."""
    transposed: bool = False
    """True when ``mlp_out.weight`` is stored [d_key, d_model] (GPT-2 ``Conv1D``)."""
    n_layer_attr: str = "num_hidden_layers"
    """Config attribute holding the number of blocks."""
    mlp_post_norm: str | None = None
    """A norm between the MLP's output and the residual stream (Gemma 2/3's ``post_feedforward_layernorm``),
    or None. With one, the residual stream receives norm(W k), not W k: each update target becomes the
    nearest output the norm can give (:func:`memit_pl.functional.solve.through_post_norm`)."""

    def name(self, what: str, layer: int | None = None) -> str:
        """The module path of ``what`` (a field name) at ``layer``."""
        template = getattr(self, what)
        if template is None:
            raise ValueError(f"{self.family} has no {what}")
        return template.format(layer) if "{}" in template else template

    def module(self, model: nn.Module, what: str, layer: int | None = None) -> nn.Module:
        return model.get_submodule(self.name(what, layer))

    def n_layers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.n_layer_attr))

    def d_model(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def d_key(self, model: nn.Module, layer: int = 0) -> int:
        """Size of the key: the input width of the MLP output projection."""
        w = self.out_weight(model, layer)
        return int(w.shape[0] if self.transposed else w.shape[1])

    def out_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The edited weight W_l; shape [d_model, d_key] unless ``transposed``."""
        return self.module(model, "mlp_out", layer).weight


_DECODER = dict(
    block="model.layers.{}",
    mlp="model.layers.{}.mlp",
    mlp_out="model.layers.{}.mlp.down_proj",
    attn="model.layers.{}.self_attn",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(
        family="gpt2",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.c_proj",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        transposed=True,
        n_layer_attr="n_layer",
    ),
    "gptj": ModelSpec(
        family="gptj",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        n_layer_attr="n_layer",
    ),
    "gpt_neox": ModelSpec(
        family="gpt_neox",
        block="gpt_neox.layers.{}",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        embed="gpt_neox.embed_in",
    ),
    "llama": ModelSpec(family="llama", **_DECODER),
    "mistral": ModelSpec(family="mistral", **_DECODER),
    "qwen2": ModelSpec(family="qwen2", **_DECODER),
    "gemma3_text": ModelSpec(family="gemma3_text", mlp_post_norm="model.layers.{}.post_feedforward_layernorm", **_DECODER),
}


class UnknownModelFamily(ValueError):
    """Raised for a ``model_type`` without a ``ModelSpec``."""


def _candidate_modules(model: nn.Module) -> tuple[str, list[str], list[str]]:
    """(path of the block list, "name (Class)" inside its first block, the other leaf modules)."""
    blocks = next(
        (n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1), None
    )
    inside, outside = [], []
    for name, mod in model.named_modules():
        if not name:
            continue
        if blocks is not None and name.startswith(blocks + "."):
            if name.startswith(f"{blocks}.0.") or name == f"{blocks}.0":
                inside.append(f"{name} ({type(mod).__name__})")
        elif not any(True for _ in mod.children()):
            outside.append(f"{name} ({type(mod).__name__})")
    return blocks or "(none found)", inside, outside


def get_spec(model: nn.Module) -> ModelSpec:
    """The spec for ``model.config.model_type``; a helpful error when unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = SPECS.get(str(model_type))
    if spec is not None:
        return spec
    blocks, inside, outside = _candidate_modules(model)
    raise UnknownModelFamily(
        f"no ModelSpec for model_type={model_type!r}; supported: {', '.join(sorted(SPECS))}.\n"
        f"Blocks: {blocks}. Modules of the first block: {', '.join(inside) or '(none found)'}.\n"
        f"Other modules: {', '.join(outside) or '(none)'}.\n"
        f"Add one with memit_pl.modeling.spec.register_spec(ModelSpec(family={str(model_type)!r}, block=..., mlp=..., "
        "mlp_out=..., attn=..., final_norm=..., lm_head=..., embed=..., transposed=False)), giving "
        "module-path templates with '{}' for the layer index (e.g. block='model.layers.{}'); mlp_out is "
        "the MLP output projection whose input is the key; transposed=True when its weight is stored "
        "[d_key, d_model] (GPT-2 Conv1D)."
    )


def register_spec(spec: ModelSpec) -> None:
    """Add (or replace) the spec of ``spec.family``."""
    SPECS[spec.family] = spec


def check_layers(model: nn.Module, layers, what: str = "memit.layers") -> None:
    """Fail with one line (a ``ConfigError``, naming ``what``) on layers the model does not have."""
    from memit_pl.config import ConfigError

    n_layers = get_spec(model).n_layers(model)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(f"{what} {bad} out of range: the model has layers 0..{n_layers - 1}")
