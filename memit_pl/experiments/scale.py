"""The memory plan of a large edit, on paper: what each stage holds for a model, a window and n edits, and
where accelerate's ``device_map`` puts the weights under given per-GPU limits (on the meta device: no
weights are loaded). ``docs/scale.md`` is its output for GPT-J-6B and GPT-NeoX-20B at 10,000 edits:

    python -m memit_pl.experiments.scale > docs/scale.md.table
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GiB = 1024**3


def gptj_6b_config():
    """GPT-J-6B's architecture (EleutherAI/gpt-j-6B's config.json), built without a download."""
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                      n_inner=None, tie_word_embeddings=False)


def gpt_neox_20b_config():
    """GPT-NeoX-20B's architecture (EleutherAI/gpt-neox-20b's config.json), built without a download."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                         intermediate_size=24576, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True, tie_word_embeddings=False)


def empty_model(cfg, dtype):
    """The model of ``cfg`` on the meta device (shapes and dtypes, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)


@dataclass
class Plan:
    """Bytes each stage holds at its peak, for one model, window and number of edits."""

    name: str
    n_params: int
    weights: int
    """All weights in the weights' dtype."""
    stats_per_layer: int
    """One layer's E[k kᵀ] (fp32, d_key²), kept for the update; the statistics pass holds one Σ k kᵀ per layer."""
    stats_window: int
    keys: int
    """Keys of all edits at one layer (fp32, n × d_key), the update holds one layer's at a time."""
    zs: int
    """z of all edits (fp32, n × d_model)."""
    solve: int
    """The fp64 solve of one layer: λC + KKᵀ (d_key²), Kᵀ and the result (d_key × n each)."""
    z_batch: int
    """Activations of one z batch (edits × rows × tokens) through the blocks above L, with their backward."""
    update_peak: int
    """The update's peak on the device of the edited layer: its statistics, the keys and the solve."""

    def row(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GiB, 2) for k in ("weights", "stats_window", "keys", "zs", "solve",
                                                               "z_batch", "update_peak")}


def plan(cfg, layers: Sequence[int], n_edits: int, weight_bytes: int, *, z_batch: int = 32, rows_per_edit: int = 7,
         tokens_after_subject: int = 12, name: str = "") -> Plan:
    """The plan of one edit; ``rows_per_edit``: the context prefixes + the essence prompt (the paper: 6 + 1)."""
    import torch

    n_params = sum(p.numel() for p in empty_model(cfg, torch.float32).parameters())
    d_model = cfg.hidden_size
    d_key = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
    n_layers = cfg.num_hidden_layers
    above = n_layers - max(layers) - 1
    per_layer = d_key * d_key * 4
    keys = n_edits * d_key * 4
    solve = d_key * d_key * 8 + 2 * d_key * n_edits * 8
    # per token of a block: the stream, attention q/k/v/out, the MLP's d_key-wide activations, kept for backward
    per_token_block = (6 * d_model + 3 * d_key) * 4
    z_act = z_batch * rows_per_edit * tokens_after_subject * above * per_token_block
    return Plan(name=name, n_params=n_params, weights=n_params * weight_bytes, stats_per_layer=per_layer,
                stats_window=per_layer * len(layers), keys=keys, zs=n_edits * d_model * 4, solve=solve,
                z_batch=z_act, update_peak=per_layer * len(layers) + keys + solve)


def place(cfg, weight_dtype, n_gpus: int, gpu_gib: float, reserve_gib: float) -> dict[str, float]:
    """GiB of weights per device when accelerate places the model on ``n_gpus`` GPUs of ``gpu_gib`` each with
    ``reserve_gib`` of each left for the stages' own tensors (statistics, keys, the solve, z activations), as
    ``device_map="auto"`` with ``max_memory`` does; what does not fit goes to "cpu" (offloaded: slow)."""
    from accelerate import infer_auto_device_map

    model = empty_model(cfg, weight_dtype)
    budget: dict = {i: f"{max(gpu_gib - reserve_gib, 0.01):.2f}GiB" for i in range(n_gpus)}
    budget["cpu"] = "1024GiB"
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules,
                                       dtype=weight_dtype)
    out: dict[str, float] = {}
    for pname, param in model.named_parameters():
        prefix = max((k for k in device_map if k == "" or pname == k or pname.startswith(k + ".")), key=len)
        dev = str(device_map[prefix])
        out[dev] = out.get(dev, 0.0) + param.numel() * param.element_size() / GiB
    return {k: round(v, 2) for k, v in sorted(out.items())}


def markdown(n_edits: int = 10_000, gpu_gib: float = 48.0) -> str:
    """The tables of docs/scale.md."""
    import torch

    cases = [("GPT-J-6B", gptj_6b_config(), [3, 4, 5, 6, 7, 8], torch.float32, 4, 32),
             ("GPT-J-6B", gptj_6b_config(), [3, 4, 5, 6, 7, 8], torch.float16, 2, 32),
             ("GPT-NeoX-20B", gpt_neox_20b_config(), [6, 7, 8, 9, 10], torch.float16, 2, 8)]
    lines = [f"| model | weights | weights GiB | stats of the window | keys (n={n_edits:,}) | z | fp64 solve | "
             "z batch (edits) | update peak |", "|---|---|---|---|---|---|---|---|---|"]
    places = ["| model | weights | GPUs | reserve per GPU (GiB) | weights per GPU (GiB) | offloaded to CPU (GiB) |",
              "|---|---|---|---|---|---|"]
    for name, cfg, layers, dtype, nbytes, zb in cases:
        p = plan(cfg, layers, n_edits, nbytes, name=name, z_batch=zb).row()
        dt = str(dtype).removeprefix("torch.")
        lines.append(f"| {name} | {dt} | {p['weights']} | {p['stats_window']} | {p['keys']} | {p['zs']} | {p['solve']} | "
                     f"{p['z_batch']} ({zb}) | {p['update_peak']} |")
        reserve = max(p["update_peak"], p["z_batch"]) + 2.0  # + the CUDA context and allocator slack
        for n in (1, 2, 4):
            where = place(cfg, dtype, n, gpu_gib, reserve)
            gpus = ", ".join(f"{where.get(str(i), 0.0):g}" for i in range(n))
            places.append(f"| {name} | {dt} | {n} × {gpu_gib:g} GiB | {reserve:.1f} | {gpus} | {where.get('cpu', 0.0):g} |")
    return "\n".join(lines) + "\n\n" + "\n".join(places) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
