"""Draft evaluation questions from a KB's own passages (``rag eval-gen``).

Three kinds of :class:`Draft`, every one ``status="draft"`` until a person reviews it:

- ``single``: the local chat model reads one sampled passage (``prompts/eval_gen.txt``) and writes
  one question, its answer and the exact passage span that states it. A draft is kept only when
  that quote is a substring of the passage's original text (all whitespace removed, as
  ``rag.eval_questions.Judge`` compares), the answer lies inside the quote, and neither the quote
  nor the answer is written in the question.
- ``two-part``: two kept single drafts from different passages joined by rule (no LLM); gold is
  both quotes, one answer part each (「A，和B？」).
- ``negative``: a single draft whose question names a place (``rag.frame.question_frame``) with
  that place replaced by another gazetteer place (``rag.places.place_names``) found nowhere in
  the KB's documents: the same fact asked about an entity the KB lacks (``"type": "negative"``).

Deterministic for a seed: the seed orders the passages and picks replacement places; the
model runs at temperature 0.

The drafts files (reading, writing, review statuses and survival counts) are ``rag.eval_drafts``;
they are reviewed in the 评测 tab's 审核草稿 screen (``ui.review_panel``).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

from rag import zh

Kind = Literal["single", "two-part", "negative"]
KINDS: tuple[str, ...] = ("single", "two-part", "negative")
SHARE = {"two-part": 0.2, "negative": 0.2}  # of n; single drafts fill the rest
MIN_PASSAGE_CHARS = 40
MAX_PASSAGE_CHARS = 350  # what the 1.5B model reads per call (CPU prompt time dominates)
MAX_QUOTE_CHARS = 80
MAX_TOKENS = 160
_WS = re.compile(r"\s+")
_LINE = {key: re.compile(rf"^\s*{key}\s*[:：]\s*(.+?)\s*$", re.M) for key in ("问题", "答案", "原文")}
_WRAP = "「」『』“”\"'‘’《》【】 "
_END = "？?。．.!！;；，, "

REJECT_REASONS = {
    "format": "输出不合格式 output not in the three-line format",
    "quote_not_in_passage": "引文不在原文中 quote is not a substring of the passage",
    "quote_too_long": f"引文过长 quote longer than {MAX_QUOTE_CHARS} characters",
    "answer_not_in_quote": "答案不在引文中 answer not inside the quote",
    "question_contains_quote": "问题包含引文 question contains the quote",
    "question_contains_answer": "问题包含答案 question contains the answer",
    "duplicate": "重复问题 duplicate question",
}


@dataclass
class Draft:
    """One drafted evaluation question (the gold-by-quote format of ``rag eval``)."""

    id: str
    kind: Kind
    question: str
    answers: list[str] = field(default_factory=list)
    gold_quotes: list[str] = field(default_factory=list)
    gold_docs: list[str] = field(default_factory=list)
    status: str = "draft"
    sources: list[int] = field(default_factory=list)  # chunk ids the draft was written from
    note: str = ""  # e.g. the place a negative replaced: "宜昌市→孝感市"
    source_docs: list[str] = field(default_factory=list)  # default: gold_docs

    def to_question(self) -> dict:
        """The ``rag eval`` question line (unknown keys such as ``status`` are ignored by it)."""
        row = {"id": self.id, "question": self.question, "type": self.kind, "status": self.status}
        if self.kind == "negative":
            row["answers"] = []
        elif self.kind == "two-part":
            row["answers"] = list(self.answers)
            row["answer_parts"] = [[a] for a in self.answers]
        else:
            row["answers"] = list(self.answers)
        if self.kind != "negative":
            row["gold_docs"] = list(dict.fromkeys(self.gold_docs))
            row["gold_quotes"] = list(self.gold_quotes)
        row["sources"] = list(self.sources)
        # the documents the draft was written from (a negative has no gold_docs): review shows
        # their passages, and deleting one of them drops the draft
        row["source_docs"] = list(dict.fromkeys(self.source_docs or self.gold_docs))
        if self.note:
            row["note"] = self.note
        return row


@dataclass
class GenStats:
    """What happened while drafting: LLM calls, rejections per reason, kinds written."""

    llm_calls: int = 0
    rejected: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    shortfall: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = ["草稿 drafts: " + ", ".join(f"{k} {self.kept.get(k, 0)}" for k in KINDS)
                 + f"  (LLM calls {self.llm_calls})"]
        total = sum(self.rejected.values())
        lines.append(f"LLM 草稿被检查拒绝 rejected by the checks: {total}")
        for reason, count in self.rejected.most_common():
            lines.append(f"  {count:3d}  {reason}: {REJECT_REASONS.get(reason, reason)}")
        for kind, missing in self.shortfall.items():
            if missing:
                lines.append(f"  不足 short of {kind}: {missing}")
        return "\n".join(lines)


@dataclass
class Passage:
    chunk_id: int
    doc_id: str
    title: str
    text: str  # the document's original text [start:end]


def squash(text: str) -> str:
    """All whitespace removed: how ``rag eval`` compares a gold quote with a chunk's span."""
    return _WS.sub("", text)


def quotas(n: int, kinds: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Drafts wanted per kind: two-part and negative a fifth of ``n`` each, single the rest."""
    kinds = [k for k in KINDS if k in kinds]
    if not kinds:
        raise ValueError(f"kinds must be among {KINDS}")
    want = {k: round(n * SHARE[k]) for k in kinds if k != "single"}
    if "single" in kinds:
        want["single"] = max(0, n - sum(want.values()))
    elif want:  # no singles asked for: share n among the others
        per, extra = divmod(n, len(want))
        want = {k: per + (i < extra) for i, k in enumerate(want)}
    return want


# ----------------------------------------------------------------------------- passages
def sample_passages(kb, rng: random.Random) -> list[Passage]:
    """The KB's chunks as passages of their documents' original text, shuffled with ``rng`` and
    interleaved across documents (one passage per document in turn)."""
    indexes = kb.load_indexes()
    ids = sorted(int(i) for i in (indexes.bm25_rows.tolist() if indexes is not None else []))
    chunks = kb.chunks(ids)
    texts: dict[str, str] = {}
    per_doc: dict[str, list[Passage]] = {}
    for cid in ids:
        chunk = chunks.get(cid)
        if chunk is None:
            continue
        if chunk.doc_id not in texts:
            found = kb.document_text(chunk.doc_id)
            texts[chunk.doc_id] = found[1] if found else ""
        span = texts[chunk.doc_id][chunk.start:chunk.end]
        if len(squash(span)) < MIN_PASSAGE_CHARS:
            continue
        per_doc.setdefault(chunk.doc_id, []).append(Passage(cid, chunk.doc_id, chunk.title, span))
    docs = sorted(per_doc)
    rng.shuffle(docs)
    for doc in docs:
        rng.shuffle(per_doc[doc])
    out = []
    while any(per_doc.values()):
        for doc in docs:
            if per_doc[doc]:
                out.append(per_doc[doc].pop())
    return out


# ----------------------------------------------------------------------------- single
def parse_reply(reply: str) -> tuple[str, str, str] | None:
    """``(question, answer, quote)`` from the model's three lines, or None."""
    found = {}
    for key, pattern in _LINE.items():
        m = pattern.search(reply or "")
        if not m:
            return None
        found[key] = m.group(1).strip()
    question = found["问题"].strip(_WRAP)
    answer = found["答案"].strip(_WRAP).rstrip(_END)
    quote = found["原文"].strip(_WRAP).rstrip("。．.;；，, ")
    if not (question and answer and quote):
        return None
    return question, answer, quote


def check_single(question: str, answer: str, quote: str, passage: str) -> str | None:
    """None when the draft passes, else the rejection reason (a key of ``REJECT_REASONS``)."""
    if not squash(quote) or squash(quote) not in squash(passage):
        return "quote_not_in_passage"
    if len(squash(quote)) > MAX_QUOTE_CHARS:
        return "quote_too_long"
    if zh.normalise(answer) not in zh.normalise(quote) or not zh.normalise(answer):
        return "answer_not_in_quote"
    q = zh.normalise(question)
    if zh.normalise(quote) in q:
        return "question_contains_quote"
    if zh.normalise(answer) in q:
        return "question_contains_answer"
    return None


def _exact_quote(quote: str, passage: str) -> str:
    """The quote as the passage writes it (the model's copy may differ in whitespace only)."""
    target = squash(quote)
    chars = [(i, c) for i, c in enumerate(passage) if not c.isspace()]
    flat = "".join(c for _, c in chars)
    at = flat.find(target)
    if at < 0:
        return quote
    return passage[chars[at][0]:chars[at + len(target) - 1][0] + 1]


def draft_single(model, passage: Passage, prompt: str, stats: GenStats) -> tuple[str, str, str] | str:
    """Ask the model for one question on ``passage``: ``(question, answer, quote)`` or a rejection reason."""
    text = passage.text.strip()[:MAX_PASSAGE_CHARS]
    stats.llm_calls += 1
    reply = model.invoke(prompt.format(title=passage.title or "", passage=text))
    parsed = parse_reply(getattr(reply, "content", reply))
    if parsed is None:
        return "format"
    question, answer, quote = parsed
    reason = check_single(question, answer, quote, text)
    if reason:
        return reason
    if not question.endswith(("？", "?")):
        question += "？"
    return question, answer, _exact_quote(quote, text)


# ----------------------------------------------------------------------------- two-part
def combine_two(a: Draft, b: Draft, draft_id: str) -> Draft:
    """One question asking both, joined by rule: 「A，和B？」 (``rag.decompose`` splits it back into
    the two parts; a bare 「A和B？」 stays one part, and 「…分别是多少」 repeats a part)."""
    qa, qb = a.question.rstrip(_END), b.question.rstrip(_END)
    question = f"{qa}，和{qb}？"
    return Draft(draft_id, "two-part", question, answers=[a.answers[0], b.answers[0]],
                 gold_quotes=[a.gold_quotes[0], b.gold_quotes[0]], gold_docs=[a.gold_docs[0], b.gold_docs[0]],
                 sources=[*a.sources, *b.sources], note=f"{a.id} + {b.id}")


# ----------------------------------------------------------------------------- negative
_SUFFIXES = ("自治州", "自治县", "特别行政区", "省", "市", "县", "区", "州", "盟", "旗")


def _suffix(name: str) -> str:
    return next((s for s in _SUFFIXES if name.endswith(s)), "")


def kb_text(kb) -> str:
    """All documents' original text (titles included), normalised for presence tests."""
    parts = []
    for doc in kb.documents():
        found = kb.document_text(doc.doc_id)
        if found:
            parts.extend(found)
        parts.append(doc.doc_id)
    return zh.normalise("\n".join(parts))


def _bare(name: str) -> str:
    suffix = _suffix(name)
    return name[: -len(suffix)] if suffix and len(name) - len(suffix) >= 2 else name


def make_negative(draft: Draft, corpus: str, rng: random.Random, draft_id: str) -> Draft | None:
    """The draft's question with its first place swapped for a gazetteer place of the same kind
    (suffix and length) that the KB never mentions, or None when the question names no place."""
    from rag.frame import question_frame
    from rag.places import place_names

    places = [c for c in question_frame(draft.question).constraints if c.kind == "place" and c.text in draft.question]
    if not places:
        return None
    old = places[0].text
    suffix = _suffix(old)
    names = sorted(place_names())
    pool = [p for p in names if _suffix(p) == suffix and len(p) == len(old) and p != old]
    if len(pool) < 20:
        pool = [p for p in names if _suffix(p) == suffix and p != old and len(p) >= 2]
    rng.shuffle(pool)
    for new in pool:
        if zh.normalise(new) in corpus or zh.normalise(_bare(new)) in corpus:
            continue
        if _bare(new) in draft.question or new in draft.question:
            continue
        question = draft.question.replace(old, new, 1)
        return Draft(draft_id, "negative", question, sources=list(draft.sources), note=f"{old}→{new} ({draft.id})",
                     source_docs=list(draft.gold_docs))
    return None


# ----------------------------------------------------------------------------- all kinds
def draft_questions(service, kb: str, n: int, kinds=KINDS, seed: int = 0, model=None,
                    stats: GenStats | None = None, progress: Callable[[str], None] | None = None,
                    max_calls: int | None = None,
                    on_call: Callable[[int, int, int, int], None] | None = None) -> list[Draft]:
    """Draft ``n`` questions (shared among ``kinds`` by :func:`quotas`) from the KB ``kb``.

    Args:
        service: a ``rag.service.RagService``; its KB ``kb`` is read and, unless ``model`` is given,
            its local chat model (``settings.llm_model_path``) writes the single drafts.
        model: a LangChain chat model to use instead (``invoke(str)`` returning ``.content``).
        stats: filled with the LLM calls, rejections per reason and kept drafts per kind.
        max_calls: LLM calls at most (default ``3 * n + 6``).
        on_call: after each LLM call, ``on_call(calls, max_calls, singles kept, singles needed)``
            (a progress bar: drafting ends at ``max_calls`` or once enough singles are kept).
    """
    from rag.templates import load_prompt

    stats = stats if stats is not None else GenStats()
    want = quotas(n, kinds)
    rng = random.Random(seed)
    store = service.searcher(kb).kb
    passages = sample_passages(store, rng)
    if model is None:
        model = service.chat_models(service.settings_for(kb), "local")
    model = model.bind(max_tokens=MAX_TOKENS)
    prompt = load_prompt("eval_gen")
    corpus = kb_text(store) if want.get("negative") else ""
    max_calls = max_calls if max_calls is not None else 3 * n + 6

    singles: list[Draft] = []
    negatives: list[Draft] = []
    seen: set[str] = set()
    need_pairs = want.get("two-part", 0)

    def enough() -> bool:
        docs_or_passages = len({d.sources[0] for d in singles})
        return (len(singles) >= want.get("single", 0)
                and (not need_pairs or (docs_or_passages >= 2 and len(singles) >= 2 * need_pairs))
                and len(negatives) >= want.get("negative", 0))

    for passage in passages:
        if enough() or stats.llm_calls >= max_calls:
            break
        result = draft_single(model, passage, prompt, stats)
        if on_call:
            need = max(want.get("single", 0), 2 * need_pairs)
            on_call(stats.llm_calls, max_calls, len(singles) + (not isinstance(result, str)), need)
        if isinstance(result, str):
            stats.rejected[result] += 1
            continue
        question, answer, quote = result
        if zh.normalise(question) in seen:
            stats.rejected["duplicate"] += 1
            continue
        seen.add(zh.normalise(question))
        d = Draft(f"gen-s{len(singles) + 1:03d}", "single", question, answers=[answer],
                  gold_quotes=[quote], gold_docs=[passage.doc_id], sources=[passage.chunk_id])
        singles.append(d)
        if progress:
            progress(f"{d.id} {question}")
        if len(negatives) < want.get("negative", 0):
            neg = make_negative(d, corpus, rng, f"gen-n{len(negatives) + 1:03d}")
            if neg is not None:
                negatives.append(neg)

    out: list[Draft] = singles[: want.get("single", 0)]
    if need_pairs:
        # pair drafts from different passages, preferring different documents; singles not
        # written as such are used first
        order = singles[want.get("single", 0):] + singles[: want.get("single", 0)]
        used: set[str] = set()
        pairs: list[Draft] = []
        for a in order:
            if len(pairs) >= need_pairs:
                break
            if a.id in used:
                continue
            partners = [b for b in order if b.id not in used and b.id != a.id and b.sources[0] != a.sources[0]]
            partners.sort(key=lambda b: b.gold_docs[0] == a.gold_docs[0])
            if partners:
                b = partners[0]
                used.update((a.id, b.id))
                pairs.append(combine_two(a, b, f"gen-t{len(pairs) + 1:03d}"))
        out.extend(pairs)
    out.extend(negatives[: want.get("negative", 0)])
    stats.kept = Counter(d.kind for d in out)
    stats.shortfall = {k: max(0, v - stats.kept.get(k, 0)) for k, v in want.items()}
    return out


def as_rows(drafts: list[Draft]) -> list[dict]:
    return [d.to_question() for d in drafts]


__all__ = ["Draft", "GenStats", "KINDS", "draft_questions", "quotas", "check_single", "parse_reply",
           "combine_two", "make_negative", "kb_text", "sample_passages", "squash", "as_rows", "asdict"]
