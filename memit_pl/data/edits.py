"""Edit requests and their loaders (CounterFact, zsRE, and a simple JSONL), validated up front."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class EditFileError(ValueError):
    """Bad input in an edits file, naming the record and the field."""


@dataclass
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by ``target_new``.

    Targets carry no leading space; one is added when they are tokenised after a prompt.
    """

    case_id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    """Paraphrased prompts, already filled with the subject."""
    neighborhood: list[str] = field(default_factory=list)
    """Prompts about other subjects whose answer should stay ``target_true``."""
    neighborhood_answers: list[str] = field(default_factory=list)
    """Per neighbourhood prompt, its answer when it is not ``target_true`` (zsRE's loc_ans)."""
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    target_new_id: str | None = None
    """CounterFact's ``target_new.id`` (a Wikidata id): keys the Reference Score's reference texts."""

    @classmethod
    def of(cls, prompt: str, subject: str, target_new: str, *, case_id: str | None = None, **fields: Any) -> EditRequest:
        """A request from a prompt template (``{}`` for the subject, or the filled prompt that contains the
        subject), the subject and the new object; the case id defaults to a hash of the three.

        >>> EditRequest.of("{} plays the sport of", "Michael Jordan", "baseball").text
        'Michael Jordan plays the sport of'
        """
        if "{}" not in prompt:
            if not subject or subject not in prompt:
                raise EditFileError(f"EditRequest.of: field 'prompt': {prompt!r} has neither a '{{}}' placeholder "
                                    f"nor the subject {subject!r}")
            prompt = prompt.replace(subject, "{}", 1)
        if case_id is None:
            import hashlib

            case_id = hashlib.sha256(f"{prompt}\x1f{subject}\x1f{target_new}".encode()).hexdigest()[:12]
        return cls(case_id=str(case_id), subject=subject, prompt=prompt, target_new=target_new, **fields)

    @property
    def text(self) -> str:
        """The rewrite prompt filled with the subject."""
        return fill(self.prompt, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fill(template: str, subject: str) -> str:
    """``template`` with its first ``{}`` replaced by ``subject`` (other braces left alone)."""
    return template.replace("{}", subject, 1)


def _fail(where: str, fld: str, what: str) -> EditFileError:
    return EditFileError(f"{where}: field {fld!r}: {what}")


def _str(rec: dict, key: str, where: str, *, required: bool = True) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise _fail(where, key, "missing")
        return None
    v = rec[key]
    if isinstance(v, dict) and "str" in v:
        v = v["str"]
    if not isinstance(v, str):
        raise _fail(where, key, f"expected a string, got {type(v).__name__}")
    return v


def _str_list(rec: dict, key: str, where: str) -> list[str]:
    v = rec.get(key) or []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _fail(where, key, "expected a list of strings")
    return list(v)


def _where(index: int, case_id: Any) -> str:
    return f"record {index} (case_id {case_id})"


def parse_counterfact(records: Sequence[dict]) -> list[EditRequest]:
    """The CounterFact schema (``requested_rewrite`` with ``target_new.str`` etc.)."""
    out = []
    for i, rec in enumerate(records):
        where = _where(i, rec.get("case_id", i) if isinstance(rec, dict) else i)
        if not isinstance(rec, dict) or not isinstance(rec.get("requested_rewrite"), dict):
            raise _fail(where, "requested_rewrite", "expected an object")
        rw = rec["requested_rewrite"]
        out.append(
            EditRequest(
                case_id=str(rec.get("case_id", i)),
                subject=_str(rw, "subject", where),
                prompt=_str(rw, "prompt", where),
                target_new=_str(rw, "target_new", where),
                target_true=_str(rw, "target_true", where, required=False),
                relation_id=_str(rw, "relation_id", where, required=False),
                paraphrases=_str_list(rec, "paraphrase_prompts", where),
                neighborhood=_str_list(rec, "neighborhood_prompts", where),
                attribute_prompts=_str_list(rec, "attribute_prompts", where),
                generation_prompts=_str_list(rec, "generation_prompts", where),
                target_new_id=_target_id(rw),
            )
        )
    return out


def _target_id(rw: dict) -> str | None:
    t = rw.get("target_new")
    return str(t["id"]) if isinstance(t, dict) and t.get("id") is not None else None


def parse_zsre(records: Sequence[dict]) -> list[EditRequest]:
    """The zsRE evaluation schema of the ROME/MEMIT code (``subject, src, rephrase, alt, answers, loc, loc_ans``).

    As there, the question becomes the prompt with the subject replaced by ``{}``.
    """
    out = []
    for i, rec in enumerate(records):
        where = _where(i, rec.get("case_id", i) if isinstance(rec, dict) else i)
        if not isinstance(rec, dict):
            raise _fail(where, "record", "expected an object")
        subject = _str(rec, "subject", where)
        src = _str(rec, "src", where)
        if subject and subject not in src:
            raise _fail(where, "src", f"does not contain the subject {subject!r}")
        answers = rec.get("answers") or []
        loc = _str(rec, "loc", where, required=False)
        out.append(
            EditRequest(
                case_id=str(rec.get("case_id", i)),
                subject=subject,
                prompt=src.replace(subject, "{}", 1) if subject else src,
                target_new=_str(rec, "alt", where),
                target_true=answers[0] if answers and isinstance(answers[0], str) else None,
                paraphrases=_str_list(rec, "rephrase", where),
                neighborhood=[loc + "?"] if loc else [],  # as the reference's loader
                neighborhood_answers=[_str(rec, "loc_ans", where)] if loc else [],
            )
        )
    return out


def parse_easyedit_counterfact(records: Sequence[dict]) -> list[EditRequest]:
    """EasyEdit's (and MEND's) reduced CounterFact: ``case_id, prompt, subject, target_new, ground_truth,
    rephrase_prompt, locality_prompt, locality_ground_truth``. The prompt is already filled: its template is
    the prompt with the subject's first occurrence replaced by ``{}``; the locality prompt is one of the
    case's neighbourhood prompts, whose answer is ``locality_ground_truth``."""
    out = []
    for i, rec in enumerate(records):
        where = _where(i, rec.get("case_id", i) if isinstance(rec, dict) else i)
        if not isinstance(rec, dict):
            raise _fail(where, "record", "expected an object")
        subject = _str(rec, "subject", where)
        prompt = _str(rec, "prompt", where)
        if not subject or subject not in prompt:
            raise _fail(where, "prompt", f"does not contain the subject {subject!r}: {prompt!r}")
        truth = _str(rec, "ground_truth", where, required=False)
        loc = _str(rec, "locality_prompt", where, required=False)
        loc_answer = _str(rec, "locality_ground_truth", where, required=False)
        if loc and loc_answer is None:
            raise _fail(where, "locality_ground_truth", "missing (the locality prompt's answer)")
        out.append(
            EditRequest(
                case_id=str(rec.get("case_id", i)),
                subject=subject,
                prompt=prompt.replace(subject, "{}", 1),
                target_new=_str(rec, "target_new", where),
                target_true=truth,
                paraphrases=_str_list(rec, "rephrase_prompt", where),
                neighborhood=[loc] if loc else [],
                # an answer of its own only where it is not the case's true object (as zsRE's loc_ans)
                neighborhood_answers=[loc_answer] if loc and loc_answer != truth else [],
            )
        )
    return out


def parse_simple(records: Sequence[dict]) -> list[EditRequest]:
    """The simple schema: ``{"subject", "prompt", "target_new"}`` (+ optional ``target_true``,
    ``paraphrases``, ``neighborhood``, ``case_id``, ``relation_id``, ``generation_prompts``)."""
    out = []
    for i, rec in enumerate(records):
        where = _where(i, rec.get("case_id", i) if isinstance(rec, dict) else i)
        if not isinstance(rec, dict):
            raise _fail(where, "record", "expected an object")
        out.append(
            EditRequest(
                case_id=str(rec.get("case_id", i)),
                subject=_str(rec, "subject", where),
                prompt=_str(rec, "prompt", where),
                target_new=_str(rec, "target_new", where),
                target_true=_str(rec, "target_true", where, required=False),
                relation_id=_str(rec, "relation_id", where, required=False),
                paraphrases=_str_list(rec, "paraphrases", where),
                neighborhood=_str_list(rec, "neighborhood", where),
                generation_prompts=_str_list(rec, "generation_prompts", where),
            )
        )
    return out


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped.startswith("{") and "\n{" in stripped.rstrip()):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EditFileError(f"{path}: line {lineno}: malformed JSON: {exc.msg}") from exc
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EditFileError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise EditFileError(f"{path}: expected a JSON list of records or JSON lines")
    return data


def detect_format(records: Sequence[dict]) -> str:
    """"counterfact", "zsre" or "simple", from the first record's keys."""
    first = records[0] if records else {}
    if not isinstance(first, dict):
        raise EditFileError("record 0: expected a JSON object")
    if "requested_rewrite" in first:
        return "counterfact"
    if "src" in first and "alt" in first:
        return "zsre"
    if "ground_truth" in first and "rephrase_prompt" in first:
        return "easyedit-counterfact"
    return "simple"


PARSERS = {"counterfact": parse_counterfact, "zsre": parse_zsre, "easyedit-counterfact": parse_easyedit_counterfact,
           "simple": parse_simple}


def drop_conflicts(requests: Sequence[EditRequest]) -> tuple[list[EditRequest], list[EditRequest]]:
    """(kept, dropped): the requests without those that conflict with an earlier one (same subject and prompt,
    another new object: Eqn. 5 cannot hold both), as the paper removes them before its scaling runs."""
    first: dict[tuple[str, str], str] = {}
    kept, dropped = [], []
    for r in requests:
        key = (r.subject, r.prompt)
        if key in first and first[key] != r.target_new:
            dropped.append(r)
            continue
        first.setdefault(key, r.target_new)
        kept.append(r)
    return kept, dropped


def drop_empty_targets(requests: Sequence[EditRequest]) -> tuple[list[EditRequest], list[EditRequest]]:
    """(kept, dropped): the requests without those whose new object is empty (two of the 1,000 zsRE records
    of MEND's training split have ``alt: ""``: there is nothing to write)."""
    kept = [r for r in requests if r.target_new.strip()]
    return kept, [r for r in requests if not r.target_new.strip()]


def load_edits(path: str | Path, fmt: str = "auto", tokenizer=None, limit: int | None = None,
               drop_conflicting: bool = False, drop_empty: bool = False) -> list[EditRequest]:
    """Read, parse and validate an edits file; ``limit`` keeps the first n records (after dropping, with
    ``drop_conflicting``, the records that conflict with an earlier one and, with ``drop_empty``, those
    with an empty new object; otherwise either is an error naming the record)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"edits file not found: {path}")
    records = _read_records(path)
    if not records:
        raise EditFileError(f"{path}: no records")
    dropping = drop_conflicting or drop_empty
    if limit is not None and not dropping:
        records = records[:limit]
    fmt = detect_format(records) if fmt == "auto" else fmt
    if fmt not in PARSERS:
        raise ValueError(f"unknown edits format {fmt!r}; expected auto, {', '.join(PARSERS)}")
    requests = PARSERS[fmt](records)
    log = logging.getLogger(__name__)
    if drop_empty:
        requests, dropped = drop_empty_targets(requests)
        if dropped:
            log.info("%s: dropped %d requests with an empty new object, e.g. case %s", path, len(dropped),
                     dropped[0].case_id)
    if drop_conflicting:
        requests, dropped = drop_conflicts(requests)
        if dropped:
            log.info("%s: dropped %d requests that conflict with an earlier one (same subject and prompt, "
                     "another new object), e.g. case %s", path, len(dropped), dropped[0].case_id)
    if dropping and limit is not None:
        requests = requests[:limit]
    validate(requests, tokenizer)
    return requests


def validate(requests: Sequence[EditRequest], tokenizer=None) -> None:
    """Check every request (and, with a tokenizer, that targets tokenise to something).

    Raises:
        EditFileError: naming the first bad record and field.
    """
    seen: dict[tuple[str, str], tuple[int, EditRequest]] = {}
    ids: dict[str, int] = {}
    for i, r in enumerate(requests):
        where = _where(i, r.case_id)
        if r.case_id in ids:
            raise _fail(where, "case_id", f"duplicate of record {ids[r.case_id]}")
        ids[r.case_id] = i
        if not r.subject.strip():
            raise _fail(where, "subject", "empty")
        if "{}" not in r.prompt:
            raise _fail(where, "prompt", f"has no '{{}}' placeholder for the subject: {r.prompt!r}")
        if not r.target_new.strip():
            raise _fail(where, "target_new", "empty")
        if tokenizer is not None:
            for fld in ("target_new", "target_true"):
                t = getattr(r, fld)
                if t is not None and t.strip() and not target_ids(tokenizer, t):
                    raise _fail(where, fld, f"{t!r} tokenises to nothing")
        key = (r.subject, r.prompt)
        if key in seen and seen[key][1].target_new != r.target_new:
            j, other = seen[key]
            raise _fail(
                where,
                "target_new",
                f"conflicts with record {j} (case_id {other.case_id}): same subject and prompt, "
                f"new objects {other.target_new!r} vs {r.target_new!r} (one fact cannot take both)",
            )
        seen.setdefault(key, (i, r))


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt: with one leading space, no special tokens."""
    text = target if target.startswith(" ") else " " + target
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def save_jsonl(requests: Sequence[EditRequest], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r.to_dict()) + "\n")
