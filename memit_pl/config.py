"""Typed configuration: small dataclasses, one per concern, read from YAML by every command.

This module imports no torch: a config can be read, validated and written without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
"""The model every command and the editor use when none is named."""
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "float64")
"""Names a weights' dtype may be given by (``memit_pl.modeling.loading.DTYPES`` maps them to torch)."""


class ConfigError(ValueError):
    """A config value that cannot be used, naming its section and field."""


@dataclass
class ModelConfig:
    """Which model, where and in which precision."""

    name: str = DEFAULT_MODEL
    """Packaged short name (smollm2-135m, gemma3-270m), Hugging Face id or local directory."""
    dtype: str = "float32"
    """Weights' dtype: float32, float16 or bfloat16 (the edited weights stay in it; Δ is added in fp32)."""
    compute_dtype: str = "float32"
    """Dtype of the forward and backward passes of every stage: float32, bfloat16, float16 (autocast), or
    auto (bf16 on a GPU that supports it and on a CPU whose bf16 matmuls are fast, else fp32). Sums, δ,
    Adam and the solve stay in fp32/fp64 whatever it is."""
    device: str = "auto"
    """"auto" (first GPU, else CPU), "cpu", "cuda:1", ..."""
    device_map: str | None = None
    """Spread a model over devices with accelerate (e.g. "auto"); overrides ``device``."""
    cache_dir: str | None = None
    """Converted packaged models and statistics; default ``$MEMIT_PL_CACHE`` or ~/.cache/memit_pl."""

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.compute_dtype must be auto, float32, bfloat16 or float16, not {self.compute_dtype!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPE_NAMES)}, not {self.dtype!r}")


METHODS = ("memit", "alphaedit", "rome", "ft")


@dataclass
class MemitConfig:
    """MEMIT's hyperparameters (names follow the reference code). The defaults are the shipped config of the
    default model (SmolLM2-135M, ``configs/smollm2-135m.yaml``); the paper's GPT-J settings are in
    ``configs/gpt-j-6b.yaml``."""

    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6])
    """Critical MLP layers R; the target layer L is max(R)."""
    mom2_update_weight: float = 2000.0
    """λ, the weight of the covariance (preservation) term (Eqn. 14/15)."""
    v_lr: float = 2.0
    """Adam learning rate of δ (the reference's is 0.5 with 25 steps; lr 2 for 12 steps reaches the same
    quality in fewer passes: docs/z-optimisation.md)."""
    v_num_grad_steps: int = 12
    """Maximum optimisation steps per edit."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ is clamped to this fraction of ‖h^L‖ after every step."""
    kl_factor: float = 0.0625
    """Weight of the KL term on the essence prompt."""
    v_weight_decay: float = 0.5
    """Weight of ‖δ‖² / ‖h^L‖² in the loss."""
    v_loss_threshold: float = 5e-2
    """An edit stops early once its NLL falls below this."""
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    """Context prefixes: [length in tokens, how many] pairs, sampled from the model ("{}" is always added)."""
    context_seeds: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    """Words that start the sampled context prefixes (cycled)."""
    context_source: str = "model"
    """Where the context prefixes come from: ``model`` (sampled from the model from the seed words, Eqn. 16
    and the reference) or ``corpus`` (the openings of seeded sentences of the packaged Wikipedia sample,
    cut to the same lengths: text that reads as text whatever the model samples)."""
    essence_prompt: str = "{} is a"
    """The prompt of the KL ("essence") term."""
    z_batch_size: int = 32
    """Edits optimised together."""
    z_prefix_cache: bool = True
    """Run the positions before each subject's last token once per batch (key/value cache) instead of
    every step; off: every step re-runs all positions above L (same result, for models whose cache
    misbehaves)."""
    update_prefix_cache: bool = True
    """In the update's passes, run the tokens the rows of one context prefix share once per batch (key/value
    cache) and each row's own tokens after them, instead of every row in full; the bare prompts run apart.
    Same keys and h^L to 2e-6 (tested); 1.77× faster than every row in full (bench/update.py, 200 edits);
    off: every row in full, for a model whose cache misbehaves."""
    z_compile: bool = False
    """Run the blocks the z steps re-run through ``torch.compile`` (fused kernels; eager where it cannot
    compile). Same result; whether it is faster depends on the device (docs/z-optimisation.md)."""
    seed: int = 0
    """Seed of the sampled context prefixes."""
    method: str = "memit"
    """The update rule: memit (Eqn. 14); alphaedit (Eqn. 14's residuals projected onto the null space of
    the preserved keys, Fang et al. 2025; λ unused); rome (one rank-one update per edit, in sequence, at
    layer L only, from the same z; Meng et al. 2022); ft (FT-W: fine-tune the MLP output weight of layer
    ``ft_layer`` on the rewrite prompts, no z and no statistics; the paper's Appendix B.1)."""
    nullspace_threshold: float = 2e-2
    """alphaedit: eigenvalues of E[k kᵀ] below this span the null space the update is projected onto."""
    nullspace_energy: float | None = None
    """alphaedit: when set, the null space is instead the smallest eigen-directions of E[k kᵀ] that together
    hold at most this share of its trace (of the preserved keys' energy); free of the model's key scale,
    where ``nullspace_threshold`` is absolute."""
    alphaedit_l2: float = 10.0
    """alphaedit: the ridge weight α of its solve."""
    ft_layer: int | None = None
    """ft: the layer whose MLP output weight is fine-tuned (None: L = max(layers))."""
    ft_lr: float = 5e-4
    """ft: Adam learning rate."""
    ft_steps: int = 25
    """ft: at most this many full-batch Adam steps."""
    ft_weight_decay: float = 0.0
    """ft: weight of ‖W − W₀‖² (squared Frobenius norm of the change) in the loss."""
    ft_loss_threshold: float = 1e-2
    """ft: stop once the mean NLL of the new objects falls below this."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"memit.method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not self.layers:
            raise ValueError("memit.layers must name at least one layer")
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"memit.layers must be strictly ascending, got {self.layers}")
        if self.nullspace_energy is not None and not 0 <= self.nullspace_energy < 1:
            raise ValueError(f"memit.nullspace_energy must be in [0, 1), got {self.nullspace_energy}")
        if self.mom2_update_weight < 0:
            raise ValueError("memit.mom2_update_weight (λ) must be >= 0")
        if "{}" not in self.essence_prompt:
            raise ValueError("memit.essence_prompt needs a '{}' for the subject")
        if self.context_source not in ("model", "corpus"):
            raise ValueError(f"memit.context_source must be model or corpus, not {self.context_source!r}")
        for pair in self.context_templates:
            if len(pair) != 2 or pair[0] < 1 or pair[1] < 1:
                raise ValueError(f"memit.context_templates entries are [length, count], got {pair}")

    @property
    def target_layer(self) -> int:
        return max(self.layers)

    @property
    def edited_layers(self) -> list[int]:
        """The layers the method writes: all of R for memit and alphaedit, L for rome, ``ft_layer`` for ft."""
        if self.method == "rome":
            return [self.target_layer]
        if self.method == "ft":
            return [self.target_layer if self.ft_layer is None else self.ft_layer]
        return list(self.layers)

    @classmethod
    def from_file(cls, path: str | Path) -> MemitConfig:
        """The ``memit:`` section of a YAML config file (defaults for the keys it leaves out)."""
        return Config.from_file(path).memit

    @classmethod
    def from_name(cls, name: str) -> MemitConfig:
        """The ``memit:`` section of a packaged config (``smollm2-135m``, ``gpt-j-6b``, ...)."""
        return Config.from_name(name).memit


@dataclass
class StatsConfig:
    """The key second-moment statistics (Eqn. 15)."""

    corpus: str = "auto"
    """"auto" (wikitext-103 online, else the packaged Wikipedia sample), "wikitext", "wikipedia-sample",
    or text files (comma-separated paths or globs)."""
    n_samples: int = 100000
    """Number of text chunks to read."""
    seq_len: int = 256
    """Tokens per chunk."""
    batch_size: int = 8
    """Chunks per forward pass."""
    dtype: str = "float32"
    """Accumulation dtype of Σ k kᵀ (float32 or float64), whatever the model's dtype."""
    seed: int = 0
    """Seed of the corpus order."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by the stages."""

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    enable_progress_bar: bool = True
    precision: str | None = None
    """Lightning precision of the stages' passes; set from ``model.compute_dtype`` by the editor (leave unset)."""


@dataclass
class EvalConfig:
    """Evaluation settings."""

    batch_size: int = 256
    """Rows (prompt + target sequences) per forward pass; whole cases are packed together."""
    generation_length: int = 50
    """New tokens per generation prompt (Generation Entropy)."""
    max_generation_prompts: int = 2
    """Generation prompts used per case (0 disables Generation Entropy)."""
    generation_top_k: int = 5
    """Generation Entropy's texts are sampled from the top k tokens at each step, as the reference's
    ``generate_fast`` (k = 5); 1 is greedy decoding."""
    generation_seed: int = 0
    """Seed of that sampling (each prompt draws from its own generator, seeded by this and its text)."""
    generation_from_rewrite: bool = True
    """A case without generation prompts (EasyEdit's CounterFact, zsRE) generates from its filled rewrite
    prompt instead; off: such cases skip Generation Entropy."""
    generation_cases: int | None = None
    """Generation Entropy on a fixed sample of this many cases (chosen by a hash of each case id and the
    seed, so the same cases are sampled in every run); None: every case."""

    def __post_init__(self) -> None:
        if self.generation_top_k < 1:
            raise ValueError(f"eval.generation_top_k must be >= 1 (1 is greedy), got {self.generation_top_k}")
        if self.generation_cases is not None and self.generation_cases < 1:
            raise ValueError(f"eval.generation_cases must be >= 1 or null, got {self.generation_cases}")
        if self.generation_length < 0 or self.max_generation_prompts < 0:
            raise ValueError("eval.generation_length and eval.max_generation_prompts must be >= 0")


@dataclass
class Config:
    """Every section of a config file: what a run of any command (or a :class:`memit_pl.MEMIT`) uses."""

    model: ModelConfig = field(default_factory=ModelConfig)
    memit: MemitConfig = field(default_factory=MemitConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Sections from a mapping such as a parsed YAML file; unknown sections or keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS) - {"command"})
        if unknown:
            raise ConfigError(f"{source}: unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
        out = {}
        for name, kind in SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {name!r}: expected a mapping, got {type(values).__name__}")
            known = {f.name for f in fields(kind)}
            bad = sorted(set(values) - known)
            if bad:
                raise ConfigError(f"{source}: section {name!r}: unknown key {bad[0]!r}")
            try:
                out[name] = kind(**values)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: section {name!r}: {exc}") from exc
        return cls(**out)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """A YAML config file (``configs/*.yaml``)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_name(cls, name: str) -> Config:
        """A packaged config by name (the file names in ``configs/`` without ``.yaml``)."""
        path = packaged_config(name)
        if path is None:
            raise ConfigError(f"no packaged config {name!r}; packaged: {', '.join(packaged_configs())}")
        return cls.from_file(path)

    @classmethod
    def for_model(cls, name_or_path: str) -> Config | None:
        """The packaged config made for a model: by config name, else by its ``model.name`` (a Hugging Face
        id, compared case-insensitively); None when none is."""
        if packaged_config(name_or_path) is not None:
            return cls.from_name(name_or_path)
        for name in packaged_configs():
            cfg = cls.from_name(name)
            if name != "tiny-test" and cfg.model.name.lower() == str(name_or_path).lower():
                return cfg
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _configs_dir():
    return resources.files("memit_pl") / "resources" / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package."""
    return sorted(p.name[: -len(".yaml")] for p in _configs_dir().iterdir() if p.name.endswith(".yaml"))


def packaged_config(name: str) -> Path | None:
    """The path of a packaged config, or None."""
    path = _configs_dir() / f"{name}.yaml"
    return Path(str(path)) if path.is_file() else None


def demo_edits_path() -> Path:
    """The demo facts shipped with the package (``data/demo_edits.jsonl`` in the repository)."""
    return Path(str(resources.files("memit_pl") / "resources" / "demo_edits.jsonl"))


SECTIONS = {
    "model": ModelConfig,
    "memit": MemitConfig,
    "stats": StatsConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
}


def add_sections(parser) -> None:
    """Add every config section, so any config file is valid for any command."""
    from jsonargparse import ActionConfigFile

    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (configs/*.yaml)")
    for name, cls in SECTIONS.items():
        parser.add_class_arguments(cls, name, fail_untyped=False)


def sections(cfg) -> dict[str, Any]:
    """Dataclass instances of the sections from a parsed namespace."""
    out = {}
    for name, cls in SECTIONS.items():
        sub = cfg.get(name)
        values = sub.as_dict() if hasattr(sub, "as_dict") else dict(sub or {})
        try:
            out[name] = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config section {name!r}: {exc}") from exc
    return out


def to_yaml(data: dict[str, Any]) -> str:
    import yaml

    def plain(x):
        if hasattr(x, "__dataclass_fields__"):
            return plain(asdict(x))
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        return x

    return yaml.safe_dump(plain(data), sort_keys=False)
