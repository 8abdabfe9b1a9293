"""The offline Wikipedia sample: the shortened English Wikipedia dump shipped in the gensim wheel, read
article by article from its bz2 XML and stripped of MediaWiki markup (references, tables, files,
categories, templates) with ``mwparserfromhell`` (the optional ``wikipedia`` extra)."""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

WIKIPEDIA_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wikipedia_sample_path() -> Path:
    """The Wikipedia dump inside the gensim wheel (located without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline Wikipedia sample ships in the gensim wheel: `pip install --no-deps gensim==4.4.0`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WIKIPEDIA_SAMPLE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed gensim wheel")
    return path


_DROP_TAGS = {
    "ref",
    "references",
    "gallery",
    "math",
    "table",
    "timeline",
    "imagemap",
    "score",
    "syntaxhighlight",
    "source",
    "pre",
    "nowiki",
    "chem",
    "ce",
    "hiero",
}
_DROP_NAMESPACES = {
    "category",
    "file",
    "image",
    "media",
    "wikipedia",
    "wp",
    "template",
    "help",
    "portal",
    "special",
    "user",
    "talk",
    "wikt",
    "wiktionary",
    "commons",
    "s",
    "q",
    "n",
    "b",
    "v",
}
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(-[a-z]+)?")
_RESIDUE = [
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I), ""),
    (re.compile(r"</?[a-zA-Z][^>\n]*>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"\[\[|\]\]|\{\{|\}\}"), ""),
    (re.compile(r"^\s*[{|!].*$", re.M), ""),  # left-over table rows
    (re.compile(r"\b(?:thumb|thumbnail|frame|frameless|left|right|center|upright(?:=[\d.]+)?|\d+px)\|"), ""),
]


def _drop_node(node) -> bool:
    from mwparserfromhell.nodes import Tag, Wikilink

    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in _DROP_TAGS
    if isinstance(node, Wikilink):
        title = str(node.title).strip().lstrip(":")
        if ":" not in title:
            return False
        prefix = title.split(":", 1)[0].strip().lower()
        return prefix in _DROP_NAMESPACES or _LANGUAGE_PREFIX.fullmatch(prefix) is not None
    return False


def strip_markup(wikitext: str) -> str:
    """Plain text of a MediaWiki article: references, tables, files, categories and templates dropped."""
    try:
        import mwparserfromhell as mw
    except ImportError as exc:
        raise ImportError("the Wikipedia sample corpus needs mwparserfromhell: pip install 'memit-pl[wikipedia]'") from exc

    code = mw.parse(wikitext)
    kept = mw.wikicode.Wikicode([n for n in code.nodes if not _drop_node(n)])
    text = kept.strip_code(normalize=True, collapse=True)
    for pattern, repl in _RESIDUE:
        text = pattern.sub(repl, text)
    text = "\n".join(line.strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def iter_wikipedia_articles(path: str | Path | None = None) -> Iterator[dict[str, str]]:
    """``{"title", "text"}`` of each article (namespace 0, not a redirect) of a MediaWiki XML dump
    (``.bz2`` or plain), markup stripped; read lazily."""
    path = Path(path) if path is not None else wikipedia_sample_path()
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns, title = el.findtext("{*}ns"), el.findtext("{*}title") or ""
            raw = el.findtext("{*}revision/{*}text") or ""
            redirect = el.find("{*}redirect") is not None or raw.lstrip().upper().startswith("#REDIRECT")
            el.clear()
            if ns == "0" and not redirect:
                text = strip_markup(raw)
                if text:
                    yield {"title": title, "text": text}


def wikipedia_rows(path: str) -> Iterator[dict[str, str]]:
    for article in iter_wikipedia_articles(path):
        yield {"text": article["text"]}
