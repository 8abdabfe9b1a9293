"""Causal tracing (Meng et al. 2022, ROME Section 2; MEMIT Section 4.1, Figure 3, Appendix A).

Corrupt the subject's token embeddings with Gaussian noise (``noise`` × σ, σ the standard deviation
of the embeddings of the facts' subjects), then restore clean states and measure how much of the
answer's probability comes back (the indirect effect). Follows kmeng01/rome
``experiments/causal_trace.py`` (``trace_with_patch``, ``calculate_hidden_flow``,
``trace_important_states``, ``trace_important_window``) and the severed-module traces of its
``trace_with_repatch``, but runs every restoration of a fact in batched forward passes: one row per
(restoration, noise sample), all patches applied by ``memit_pl.modeling.hooks`` context managers.

The same noise samples serve every restoration of one fact (common random numbers, as the reference's
fixed seed), so differences between restorations are not blurred by noise.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from memit_pl.data.edits import EditFileError, load_edits, target_ids
from memit_pl.modeling import hooks
from memit_pl.modeling.loading import input_device
from memit_pl.modeling.spec import ModelSpec, get_spec
from memit_pl.modeling.tail import Tail
from memit_pl.modeling.tokens import tokenize_with_subject

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
"""Restored state: a block's output (residual stream), or windows of MLP / attention outputs."""

ROWS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
"""Token groups of the averaged heatmaps (as the paper's Figure 2 / Figure 8)."""

# (kind, layer, position, source) with source "clean" (restore) or "corrupt" (freeze, severing)
Patch = tuple[str, int, int, str]


@dataclass
class Fact:
    """A true fact: ``template.replace("{}", subject)`` is completed by ``answer``."""

    case_id: str
    subject: str
    template: str
    answer: str

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject, 1)


def load_facts(path: str | Path, tokenizer=None) -> list[Fact]:
    """True facts from an edits file (rewrite prompt + ``target_true``) or the ``known_1000.json``
    schema of the ROME code (``subject``, ``prompt`` already filled, ``attribute``).

    Raises:
        EditFileError: naming the record and field (subject not in prompt, missing answer, ...).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"facts file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        data = None  # JSON lines: an edits file
    first = data[0] if isinstance(data, list) and data else None
    if isinstance(first, dict) and {"subject", "prompt", "attribute"} <= first.keys():
        return _parse_known(data, path)
    facts = []
    for i, r in enumerate(load_edits(path, tokenizer=tokenizer)):
        if not r.target_true:
            raise EditFileError(f"{path}: record {i} (case_id {r.case_id}): field 'target_true': missing "
                                "(causal tracing needs the true answer)")
        facts.append(Fact(r.case_id, r.subject, r.prompt, r.target_true))
    return facts


def _parse_known(records: list, path: Path) -> list[Fact]:
    out = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i} (known_id {rec.get('known_id', i) if isinstance(rec, dict) else i})"
        if not isinstance(rec, dict):
            raise EditFileError(f"{where}: expected a JSON object")
        for key in ("subject", "prompt", "attribute"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise EditFileError(f"{where}: field {key!r}: expected a non-empty string")
        if rec["subject"] not in rec["prompt"]:
            raise EditFileError(f"{where}: field 'prompt': does not contain the subject {rec['subject']!r}")
        template = rec["prompt"].replace(rec["subject"], "{}", 1)
        out.append(Fact(str(rec.get("known_id", i)), rec["subject"], template, rec["attribute"].strip()))
    return out


@torch.no_grad()
def embedding_std(model: nn.Module, tokenizer, subjects: Sequence[str], batch_size: int = 256) -> float:
    """σ: the standard deviation of the embedding outputs over the subjects' tokens (ROME's
    ``collect_embedding_std``; no special tokens)."""
    spec = get_spec(model)
    name = spec.name("embed")
    dev = input_device(model)
    values = []
    for i in range(0, len(subjects), batch_size):
        enc = tokenizer(list(subjects[i : i + batch_size]), padding=True, return_tensors="pt",
                        add_special_tokens=False).to(dev)
        with hooks.trace(model, [name], stop=True) as tr:
            hooks.forward(model, enc["input_ids"], enc["attention_mask"])
        values.append(tr[name].output[enc["attention_mask"].bool()].float().reshape(-1))
    return float(torch.cat(values).std())


def subject_range(tokenizer, template: str, subject: str) -> tuple[Tensor, int, int]:
    """The prompt's token ids [pos] and the subject's token range [start, end)."""
    batch = tokenize_with_subject(tokenizer, [template], [subject])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()]
    offset = int(batch.attention_mask[0].long().argmax())  # left padding (none for one row)
    end = int(batch.subject_last[0]) - offset + 1
    text = template.replace("{}", subject, 1)
    first_char = template.index("{}") + len(subject) - len(subject.lstrip())
    if getattr(tokenizer, "is_fast", False):
        start = tokenizer([text]).char_to_token(0, first_char)
    else:  # the prefix's tokens (a trailing space merges into the subject's first token)
        prefix = text[:first_char].rstrip(" ")
        start = len(tokenizer(prefix)["input_ids"]) if prefix else len(tokenizer("")["input_ids"])
    if start is None or not 0 <= start < end:
        raise ValueError(f"cannot locate the subject {subject!r} in {text!r}")
    return ids, int(start), end


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers of the window centred at ``layer`` (``trace_important_window``)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass
class FactTrace:
    """Causal traces of one fact: probabilities of the answer token.

    ``scores[kind]`` is [pos, layer] (restoring that state at that token, or the window centred at
    that layer); ``severed[kind]`` is [layer] at the last subject token with the ``kind`` modules of
    that token frozen in their corrupted state; ``high``/``low`` the clean/corrupted probabilities.
    """

    fact: Fact
    tokens: list[str]
    subject: tuple[int, int]
    answer_id: int
    high: float
    low: float
    scores: dict[str, Tensor] = field(default_factory=dict)
    severed: dict[str, Tensor] = field(default_factory=dict)

    def effect(self, kind: str) -> Tensor:
        """Indirect effect [pos, layer]: restored minus corrupted probability."""
        return self.scores[kind] - self.low


class Tracer:
    """Batched causal tracing of one model (ROME's ``calculate_hidden_flow`` and friends).

    Layers below the lowest restored state are never recomputed: every restoration starts from the
    corrupted run's residual stream at that layer (``memit_pl.modeling.tail``), which gives the same result as a
    full forward pass (a test checks it) at about half the cost.

    Args:
        noise_std: the absolute noise scale (``noise`` × σ).
        samples: noise samples per restoration (the paper: 10).
        window: layers restored together for MLP / attention (the paper: 10).
        batch_size: rows (restorations × samples) per forward pass.
        skip_layers: start each restoration at its lowest patched layer (False: full forward passes).
    """

    def __init__(self, model: nn.Module, tokenizer, noise_std: float, samples: int = 10, window: int = 10,
                 batch_size: int = 256, seed: int = 0, skip_layers: bool = True, spec: ModelSpec | None = None):
        if samples < 1 or window < 1 or batch_size < 1:
            raise ValueError("samples, window and batch_size must be >= 1")
        self.model, self.tok = model, tokenizer
        self.spec = spec or get_spec(model)
        self.n_layers = self.spec.n_layers(model)
        self.noise_std, self.samples, self.window = float(noise_std), samples, window
        self.batch_size, self.seed, self.skip_layers = batch_size, seed, skip_layers
        self.device = input_device(model)

    def name(self, kind: str, layer: int) -> str:
        return self.spec.name({"hidden": "block", "mlp": "mlp", "attn": "attn"}[kind], layer)

    def names(self, kind: str) -> list[str]:
        return [self.name(kind, i) for i in range(self.n_layers)]

    def noise(self, n_subject: int) -> Tensor:
        """The fact's noise samples [samples, n_subject, d_model] (seeded; shared by all restorations)."""
        g = torch.Generator().manual_seed(self.seed)
        d = self.spec.d_model(self.model)
        return self.noise_std * torch.randn(self.samples, n_subject, d, generator=g)

    @torch.no_grad()
    def clean_run(self, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-token probabilities [vocab] and every block / MLP / attention output [pos, d_model]
        (plus, under ``"calls"``, the arguments each block was called with, batch 1)."""
        names = [n for k in KINDS for n in self.names(k)]
        with hooks.trace(self.model, names) as tr, hooks.capture_args(self.model, self.names("hidden")) as calls:
            logits = self._logits(ids[None])
        out = {n: tr[n].output[0] for n in names}
        out["calls"] = {i: calls[n] for i, n in enumerate(self.names("hidden"))}
        return logits[0].float().softmax(-1), out

    @torch.no_grad()
    def corrupted_run(self, ids: Tensor, subject: tuple[int, int], noise: Tensor, capture: Sequence[str],
                      clean: dict) -> tuple[Tensor, dict[str, Tensor], tuple[Tail, list[Tensor]]]:
        """Probabilities [samples, vocab] under noise; outputs of ``capture`` [samples, pos, d_model];
        and the corrupted residual stream at every block's input, to start later runs from."""
        s = noise.shape[0]
        blocks = self.names("hidden")
        start, end = subject
        pos = torch.arange(start, end).repeat(s)
        b = torch.arange(s).repeat_interleave(end - start)
        with ExitStack() as stack:
            stack.enter_context(hooks.add_to_output(self.model, self.spec.name("embed"), noise.reshape(-1, noise.shape[-1]), b, pos))
            tr = stack.enter_context(hooks.trace(self.model, list(dict.fromkeys([*blocks, *capture])), inputs=True))
            logits = self._logits(ids[None].expand(s, -1))
        outputs = {n: tr[n].output for n in capture}
        inputs = [tr[n].input for n in blocks] + [tr[blocks[-1]].output]  # [layer + 1] x [samples, pos, d]
        tail = Tail(self.spec, -1, inputs[0][:1], clean["calls"])  # batch-1 arguments broadcast over rows
        return logits.float().softmax(-1), outputs, (tail, inputs)

    @torch.no_grad()
    def run(self, ids: Tensor, subject: tuple[int, int], noise: Tensor, answer: int,
            configs: Sequence[Sequence[Patch]], clean: dict[str, Tensor], corrupt: dict[str, Tensor],
            start_from=None) -> Tensor:
        """P(answer) averaged over the noise samples, for each configuration of patches: [n_configs].

        A patch ``(kind, layer, pos, src)`` sets that module's output at ``pos`` to its clean value
        (``src="clean"``) or freezes it at its corrupted value of the same noise sample (``"corrupt"``).
        Each configuration runs once per noise sample (rows ``c * samples + s``), batched; with
        ``start_from`` (from :meth:`corrupted_run`) a configuration starts at its lowest patched layer.
        """
        s = noise.shape[0]
        starts = []
        for cfg in configs:
            first = min((layer + 1 if kind == "hidden" else layer) for kind, layer, _, _ in cfg) if cfg else 0
            starts.append(first if start_from is not None else 0)
        order = sorted(range(len(configs)), key=lambda i: starts[i])
        out = torch.empty(len(configs))
        per_chunk = max(1, self.batch_size // s)
        for c0 in range(0, len(order), per_chunk):
            chunk = order[c0 : c0 + per_chunk]  # sorted by start: the chunk starts at its lowest
            probs = self._run_chunk(ids, subject, noise, answer, [configs[i] for i in chunk], clean,
                                    corrupt, starts[chunk[0]], start_from)
            out[chunk] = probs
        return out

    def _run_chunk(self, ids, subject, noise, answer, chunk, clean, corrupt, first, start_from) -> Tensor:
        s = noise.shape[0]
        rows = len(chunk) * s
        sample_rows = torch.arange(s)
        hidden = None
        if start_from is not None:
            tail, inputs = start_from
            hidden = inputs[first].repeat(len(chunk), 1, 1).to(self.device)  # block ``first``'s input
        patches: dict[str, tuple[list, list, list]] = {}
        for ci, cfg in enumerate(chunk):
            for kind, layer, p, src in cfg:
                name = self.name(kind, layer)
                value = clean[name][p].expand(s, -1) if src == "clean" else corrupt[name][:, p]
                if hidden is not None and kind == "hidden" and layer == first - 1:
                    hidden = hooks.scatter_set(hidden, sample_rows + ci * s, torch.full((s,), p), value)
                    continue
                r, q, v = patches.setdefault(name, ([], [], []))
                r.append(sample_rows + ci * s)
                q.append(torch.full((s,), p))
                v.append(value)
        with ExitStack() as stack:
            for name, (r, q, v) in patches.items():
                stack.enter_context(hooks.replace_at(self.model, name, torch.cat(v), torch.cat(r), torch.cat(q)))
            if hidden is None:
                start, end = subject
                pos = torch.arange(start, end).repeat(rows)
                b = torch.arange(rows).repeat_interleave(end - start)
                delta = noise.repeat(len(chunk), 1, 1).reshape(-1, noise.shape[-1])
                stack.enter_context(hooks.add_to_output(self.model, self.spec.name("embed"), delta, b, pos))
                logits = self._logits(ids[None].expand(rows, -1))
            else:
                tail = Tail(self.spec, first - 1, tail.hidden, {i: c for i, c in tail.calls.items() if i >= first})
                normed = tail.run(self.model, hidden)
                logits = Tail.logits(self.model, self.spec, normed[:, -1])
        return logits.float().softmax(-1)[:, answer].view(len(chunk), s).mean(1).cpu()

    def _logits(self, ids: Tensor) -> Tensor:
        """Logits of the last position only: [batch, vocab]."""
        return hooks.forward(self.model, ids.to(self.device), logits_to_keep=1).logits[:, -1]

    def grid(self, kind: str, n_pos: int, first: int) -> tuple[list[list[Patch]], list[tuple[int, int]]]:
        """Restorations of ``kind`` at each (token >= first, layer); tokens before the subject are
        never corrupted, so restoring them changes nothing (their effect is exactly zero)."""
        configs, cells = [], []
        for t in range(first, n_pos):
            for layer in range(self.n_layers):
                span = [layer] if kind == "hidden" else window_layers(layer, self.window, self.n_layers)
                configs.append([(kind, j, t, "clean") for j in span])
                cells.append((t, layer))
        return configs, cells

    def trace_fact(self, fact: Fact, kinds: Sequence[str] = KINDS, sever: Sequence[str] = ("mlp", "attn"),
                   require_correct: bool = True) -> FactTrace | None:
        """Trace one fact; ``None`` when the model's top-1 token is not the answer's first token."""
        ids, start, end = subject_range(self.tok, fact.template, fact.subject)
        answer = target_ids(self.tok, fact.answer)[0]
        probs, clean = self.clean_run(ids)
        if require_correct and int(probs.argmax()) != answer:
            return None
        noise = self.noise(end - start)
        capture = [n for k in sever for n in self.names(k)]
        low_probs, corrupt, start_from = self.corrupted_run(ids, (start, end), noise, capture, clean)
        low = float(low_probs[:, answer].mean())
        start_from = start_from if self.skip_layers else None
        out = FactTrace(fact, [self.tok.decode([i]) for i in ids.tolist()], (start, end), answer,
                        float(probs[answer]), low)
        n_pos, last = ids.shape[0], end - 1
        for kind in dict.fromkeys([*kinds, *(["hidden"] if sever else [])]):
            configs, cells = self.grid(kind, n_pos, start)
            scores = torch.full((n_pos, self.n_layers), low)
            got = self.run(ids, (start, end), noise, answer, configs, clean, corrupt, start_from)
            for (t, layer), p in zip(cells, got.tolist()):
                scores[t, layer] = p
            out.scores[kind] = scores
        for kind in sever:
            # frozen at every layer (trace_with_repatch); below the restored layer the run is the
            # corrupted one anyway, so only the layers above it need a patch
            configs = [[("hidden", layer, last, "clean"), *((kind, j, last, "corrupt") for j in range(layer + 1, self.n_layers))]
                       for layer in range(self.n_layers)]
            out.severed[kind] = self.run(ids, (start, end), noise, answer, configs, clean, corrupt, start_from)
        if sever:
            out.severed["none"] = out.scores["hidden"][last].clone()
        return out


def token_groups(n_pos: int, subject: tuple[int, int]) -> list[list[int]]:
    """Positions of each row of ``ROWS`` (empty when a prompt has none, e.g. no middle subject token)."""
    start, end = subject
    last = n_pos - 1
    return [
        [start],
        list(range(start + 1, end - 1)),
        [end - 1],
        [end] if end <= last else [],
        list(range(end + 1, last)),
        [last],
    ]


def grouped(effect: Tensor, subject: tuple[int, int]) -> Tensor:
    """Per-fact effects [pos, layer] averaged within each token group: [len(ROWS), layer] (NaN when empty)."""
    rows = []
    for idx in token_groups(effect.shape[0], subject):
        rows.append(effect[idx].mean(0) if idx else torch.full((effect.shape[1],), math.nan))
    return torch.stack(rows)


def mean_ci(x: Tensor, z: float = 1.96) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, half-width of the normal confidence interval and count over the first dim, ignoring NaNs."""
    ok = ~torch.isnan(x)
    n = ok.sum(0)
    x0 = torch.where(ok, x, torch.zeros_like(x))
    mean = x0.sum(0) / n.clamp(min=1)
    var = (torch.where(ok, x - mean, torch.zeros_like(x)) ** 2).sum(0) / (n - 1).clamp(min=1)
    half = z * var.sqrt() / n.clamp(min=1).sqrt()
    mean = torch.where(n > 0, mean, torch.full_like(mean, math.nan))
    half = torch.where(n > 1, half, torch.full_like(half, math.nan))
    return mean, half, n


def suggest_layers(gap: Tensor, k: int = 5) -> list[int]:
    """The ``k`` consecutive layers with the largest summed gap [layer] (plain − MLP-severed effect)."""
    n = gap.shape[0]
    k = min(k, n)
    sums = torch.stack([gap[i : i + k].sum() for i in range(n - k + 1)])
    i = int(sums.argmax())
    return list(range(i, i + k))


def summarize(traces: Sequence[FactTrace], k: int = 5, z: float = 1.96) -> dict:
    """Average indirect effects over facts with confidence intervals, and the suggested layers."""
    if not traces:
        raise ValueError("no facts to summarise (none was predicted correctly?)")
    out: dict = {"n_facts": len(traces), "rows": list(ROWS),
                 "high": _stats(torch.tensor([t.high for t in traces]), z),
                 "low": _stats(torch.tensor([t.low for t in traces]), z), "kinds": {}, "severed": {}}
    for kind in traces[0].scores:
        per = torch.stack([grouped(t.effect(kind), t.subject) for t in traces])
        out["kinds"][kind] = _stats(per, z)
    if traces[0].severed:
        for name in traces[0].severed:
            per = torch.stack([t.severed[name] - t.low for t in traces])
            out["severed"][name] = _stats(per, z)
        gap = torch.stack([t.severed["none"] - t.severed["mlp"] for t in traces]) if "mlp" in traces[0].severed else None
        if gap is not None:
            out["gap_mlp"] = _stats(gap, z)
            out["suggested_layers"] = suggest_layers(gap.mean(0), k)
    return out


def _stats(x: Tensor, z: float) -> dict:
    mean, half, n = mean_ci(x, z)
    return {"mean": _list(mean), "ci": _list(half), "n": n.tolist()}


def _list(x: Tensor):
    if x.ndim == 0:
        return None if math.isnan(float(x)) else round(float(x), 6)
    return [None if math.isnan(v) else round(v, 6) for v in x.tolist()] if x.ndim == 1 else [_list(r) for r in x]


def yaml_snippet(layers: Sequence[int]) -> str:
    """The suggestion as a config snippet for ``memit.layers``."""
    return f"memit:\n  layers: [{', '.join(str(i) for i in layers)}]\n"
