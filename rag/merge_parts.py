"""Compound questions in retrieval: each part's ranking checked (``check_part``) and the parts'
rankings merged with the whole question's (``merge_parts``), so that every part keeps its best
chunks in the top k. ``rag.retrieve.PartSearch.search_parts`` runs them.

Measured on rgb_zh_int and left out (recall@10 / all_groups@10; kept: .362 / .75): promoting in
each part's top 20 the chunks holding the answer most of them agree on (numbers, dates, names
near the asked-for word) .39–.41 / .69–.74; dense (Rocchio) or BM25 (RM3) feedback from the top
3–5 ≤ .365 / ≤ .74; MMR over dense vectors for list questions (主演有哪些) .361 / .76, no better than
reordering them by dense score alone (λ = 1) and −.007 recall@10 on rgb_zh. Recall@10 ≥ .45 is
out of reach by reordering: the gold in the lists the merge draws from (top 10 of the question
and of each part) allows .445, top 20 .61 (bench/results.md, "Bound").
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rag.retrieve import Hit

FAIR_TURNS = 2  # turns every part has before parts holding their probed answer go first
PART_DEPTH = 20  # chunks of each part's ranking that check_part reorders before the merge
# BM25's weight in a part's own z-score fusion (the whole question keeps ``settings.bm25_weight``).
# A part is short and names one thing, so its rare words (a year, a name) weigh more in BM25 than
# in the question. Measured on rgb_zh_int (bench/results.md): 0.55 → 0.45 recall@10 .337 → .358.
PART_BM25_WEIGHT = 0.45


def merge_parts(whole: list[Hit], per_part: list[list[Hit]], k: int,
                held: list[frozenset[tuple[str, int]] | None] | None = None) -> list[Hit]:
    """Merge the whole question's ranking with each part's so that every part keeps its best
    chunks: the whole question's best chunk first (a compound question keeps its top-1), then
    in turn the part served least so far takes its best chunk not yet taken (the first chunk
    counts for the part that ranks it best); the whole question's list fills what is left.

    Measured on rgb_zh_int (hybrid, all_groups@10 / recall@10; one query: .53 / .313): turns
    over the parts with the whole question's list as one more turn .65 / .326; turns over the
    parts .70 / .335 (the least-served order puts each part's best chunk in the top 3: seeds
    two-part set, all parts in the top 3 .95 → 1.0); the union ordered by summed fused score
    .66 / .328, by the best fused score .70 / .329 (and loses the top-1).

    ``held`` (from the answer probe, ``rag.answer_probe``): per part, the chunks that hold the
    answer the LLM read for it (None: a part that keeps its turns, its answer being unknown or
    possibly incomplete). Then, once every part has had ``FAIR_TURNS`` turns, the turns go to
    the parts whose next chunk holds their answer, and to those that keep their turns, before
    the others: a part with ten passages holding its answer should not give up slots to
    another's passages that hold none. Measured on rgb_zh_int's 81 split questions with the local
    LLM's answers (bench/results.md): recall@10 .362 → .450, all_groups@10 .864 → .840; reordering
    each part by its answer without these turns .425 / .73 over all 100 questions (README).

    ``Hit.parts`` of a merged chunk lists the parts whose own top ``k`` holds it, and the part it
    was taken for (``[]``: only the whole question found it); its score is the fused score of
    the list it was taken from.
    """
    serves: dict[tuple[str, int], list[int]] = {}
    for i, hits in enumerate(per_part):
        for hit in hits[:k]:
            serves.setdefault(hit.chunk.key, []).append(i)
    merged: list[Hit] = []
    taken: set[tuple[str, int]] = set()

    def take(hit: Hit, part: int | None = None) -> None:
        taken.add(hit.chunk.key)
        hit.parts = sorted(set(serves.get(hit.chunk.key, [])) | ({part} if part is not None else set()))
        merged.append(hit)

    turns = [0] * len(per_part)  # chunks taken for each part
    if whole:
        take(whole[0])
        ranks = [next((r for r, hit in enumerate(hits) if hit.chunk.key == whole[0].chunk.key), None)
                 for hits in per_part]
        found = [(r, i) for i, r in enumerate(ranks) if r is not None]
        if found:
            turns[min(found)[1]] += 1  # it counts for the part that ranks it best
    queues = [list(hits) for hits in per_part]

    def turn(may_go) -> bool:
        """Give the next slot to the least-served part that ``may_go``; False when none may."""
        for queue in queues:
            while queue and queue[0].chunk.key in taken:
                queue.pop(0)
        waiting = [i for i, queue in enumerate(queues) if queue and may_go(i)]
        if not waiting:
            return False
        part = min(waiting, key=lambda i: (turns[i], i))  # the part served least so far goes next
        take(queues[part].pop(0), part)
        turns[part] += 1
        return True

    if held:
        while len(merged) < k and turn(lambda i: turns[i] < FAIR_TURNS):
            pass
        while len(merged) < k and turn(lambda i: held[i] is None or queues[i][0].chunk.key in held[i]):
            pass
    while len(merged) < k and turn(lambda i: True):
        pass
    for hit in whole[1:]:
        if len(merged) >= k:
            break
        if hit.chunk.key not in taken:
            take(hit)
    return merged


def check_part(part: str, hits: list[Hit], depth: int = PART_DEPTH) -> list[Hit]:
    """Reorder one part's top ``depth`` hits (stable) so that chunks about what the part names
    come first, then those holding an answer of the kind it asks.

    1. Fewer of the part's constraints missing (its places, years, names, quoted titles:
       ``rag.align.missing_constraints``), read in the chunk's document title, section heading
       and text: the part "2021年澳门的GDP增长率" wants 澳门 and 2021年, not a 香港 report. A place
       counts as missing only when the chunk names another place: a report's paragraph says
       全县 and names its county in a heading far above (without this rule, seeds two-part set,
       both parts' quotes in the top 3: 1.0 → .90);
    2. for an amount, a number in a sentence that names the asked-for thing
       (``rag.align.target_named``); for a time, a date.

    Measured on rgb_zh_int (bench/results.md): the answer shape alone hit@5 .88 → .91, recall@10
    .332 → .337; with the constraints first all_groups@10 .72 → .74, recall@10 .358 → .360,
    hit@5 .91 → .93; seeds two-part set unchanged (1.0). Cost: ~13 ms per two-part seeds question
    (jieba over 40 chunks), less when the chunks were seen before (``_places_in``). Only compound
    questions' parts are checked.
    """
    from rag.align import missing_constraints, question_frame, target_named
    from rag.zh import split_sentences

    frame = question_frame(part)
    if frame.asks == "quantity":
        def shaped(text: str) -> bool:
            return any(_DIGIT.search(s) and target_named(frame, s) for s in split_sentences(text))
    elif frame.asks == "time":
        def shaped(text: str) -> bool:
            return bool(_DATE.search(text))
    else:
        def shaped(text: str) -> bool:
            return True

    places = {c.text for c in frame.constraints if c.kind == "place"}
    asked = {form for c in frame.constraints if c.kind == "place" for form in c.forms}

    def off(text: str) -> int:
        """Constraint groups the chunk misses; a place only when the chunk names another one
        (a report's paragraphs say 全市, 全县 and name their city in a heading far above)."""
        missing = missing_constraints(frame, text)
        if missing and places and all(name in asked or core in asked for name, core in _places_in(text)):
            missing = [m for m in missing if not set(m.split(" / ")) <= places]
        return len(missing)

    def key(item: tuple[int, Hit]) -> tuple[int, bool, int]:
        rank, hit = item
        about = "\n".join(t for t in (hit.chunk.title, hit.chunk.section, hit.chunk.text) if t)
        return off(about), not shaped(hit.chunk.text), rank

    ranked = sorted(enumerate(hits[:depth]), key=key)
    return [hit for _, hit in ranked] + hits[depth:]


@lru_cache(maxsize=4096)
def _places_in(text: str) -> frozenset[tuple[str, str]]:
    """The place names ``text`` mentions (normalised, and without 市/县/…): as
    ``rag.places.names_other_place`` reads them, but without jieba's HMM (every place name is a
    dictionary word of ``pos_tagger``; the HMM, for unknown words, took 90% of the time), and
    remembered: the parts of one question and the next questions meet the same chunks."""
    from rag.places import PLACE_SUFFIX, place_names, pos_tagger
    from rag.zh import normalise, simplified

    names = place_names()
    return frozenset((normalise(w.word), PLACE_SUFFIX.sub("", normalise(w.word)))
                     for w in pos_tagger().cut(simplified(text), HMM=False) if w.flag == "ns" and w.word in names)


_DIGIT = re.compile(r"\d")
_DATE = re.compile(r"\d{1,2}\s*月(?:\s*\d{1,2}\s*[日号])?|\d{4}\s*年\s*\d{1,2}")
