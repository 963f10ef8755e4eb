"""Event handlers of the knowledge-base panel: pick, create, upload, list, delete, re-index.

Writes run in their own queue group (one at a time), so the chat keeps answering
while a file is being indexed; a finished write bumps the KB generation and every
shared ``Searcher`` reloads on its next query.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from rag.multi_kb import split_kbs
from rag.store import DocumentInfo, KnowledgeBaseError
from rag.service import RagService, UploadError

log = logging.getLogger(__name__)
# 日期: what date filters compare (front matter / jsonl ``date``, else the file's mtime);
# 元数据: the other fields a "字段=值" filter can test.
DOC_HEADERS = ["文件", "标题", "日期", "元数据", "片段数", "加入时间"]
META_CHARS = 80  # the 元数据 cell is clipped to this


def meta_text(doc: DocumentInfo) -> str:
    """A document's metadata fields as ``key=value; …`` (date and title have their own columns)."""
    fields = [f"{k}={v}" for k, v in (doc.meta or {}).items()
              if k not in ("date", "title", "id", "text") and v not in (None, "", [], {})]
    text = "; ".join(fields)
    return text if len(text) <= META_CHARS else text[:META_CHARS] + "…"


def _forget_uploads(files: list[str]) -> None:
    """Delete Gradio's copies of uploaded files once indexed: the KB keeps the text, and a
    document deleted from the KB must not live on in the upload cache."""
    cache = Path(gr.utils.get_upload_folder()).resolve()
    for name in files:
        path = Path(name).resolve()
        if path.is_relative_to(cache):  # never touch a file the server did not receive as an upload
            path.unlink(missing_ok=True)


class KBHandlers:
    """Callbacks of the 知识库 tab.

    Args:
        service: the app's core service (knowledge bases, writers).
        purge: ``(kb, doc_ids) -> (removed, skipped)``, called after documents are deleted to
            delete what else quotes them (the eval runs, ``EvalHandlers.purge_runs``).
    """

    def __init__(self, service: RagService,
                 purge: Callable[[str, list[str]], tuple[list[str], list[str]]] | None = None):
        self.service = service
        self.purge = purge

    def choices(self, selected: str | None = None) -> list[str]:
        # The configured KB is offered even before it exists: the first upload creates it.
        return sorted(set(self.service.names()) | {self.service.settings.kb} | ({selected} if selected else set()))

    def view(self, kb: str):
        """(document table, delete choices, summary) of one KB."""
        docs = self.service.documents(kb)
        rows = [[d.doc_id, d.title, d.date or "", meta_text(d), d.chunks,
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(d.added_at))] for d in docs]
        summary = (f"知识库 **{kb}**：{len(docs)} 个文档 · {sum(d.chunks for d in docs)} 个片段" if docs
                   else f"知识库 **{kb}** 还没有文档，请上传文件。")
        return rows, gr.update(choices=[d.doc_id for d in docs], value=[]), summary

    def scope(self, kb: str, selected: list[str] | str | None):
        """The chat's "KBs to search" multi-select after the current KB changed (or on load, or
        after a KB was created): every KB offered; the selection follows the current KB when it
        was one KB or none (the default); a choice of several is the user's and stays as it is."""
        kb = (kb or self.service.settings.kb or "").strip()
        selected = split_kbs(selected or [])
        value = selected if len(selected) > 1 else [kb]
        choices = sorted(set(self.choices(kb)) | set(value))
        return gr.update(choices=choices, value=[name for name in value if name])

    def load(self, kb: str):
        kb = kb or self.service.settings.kb
        return (gr.update(choices=self.choices(kb), value=kb), *self.view(kb))

    def create(self, name: str):
        try:
            kb = self.service.create(name)
        except KnowledgeBaseError as exc:
            raise gr.Error(str(exc)) from exc
        return (gr.update(choices=self.choices(kb), value=kb), *self.view(kb), f"✓ 已新建知识库 {kb}", "")

    def upload(self, kb: str, files: list[str] | None, progress=gr.Progress(track_tqdm=True)):
        """Check and index uploaded files. Returns (*view, status, cleared upload box)."""
        if not files:
            raise gr.Error("请先选择要上传的文件")
        limit = self.service.settings.max_upload_files
        if len(files) > limit:
            _forget_uploads(files)
            raise gr.Error(f"一次最多上传 {limit} 个文件（这次 {len(files)} 个），请分批上传 / "
                           f"at most {limit} files per upload (RAG_MAX_UPLOAD_FILES)")
        accepted, lines = [], []
        for name in files:
            path = Path(name)
            try:
                self.service.check_upload(path)
                accepted.append(path)
            except UploadError as exc:
                lines.append(f"✕ {exc}")
        if accepted:
            progress(0, desc=f"正在索引 {len(accepted)} 个文件…")
            try:
                report = self.service.ingest(kb, accepted)
            except Exception as exc:  # a bad KB (e.g. other embedder) must not kill the session
                log.exception("ingest failed")
                lines.append(f"✕ 导入失败：{exc}")
            else:
                done = report.added + report.updated
                if done:
                    lines.insert(0, f"✓ 已导入 {len(done)} 个文件：{'、'.join(done)}")
                elif not report.failed:
                    lines.insert(0, "没有新内容（文件未变化）")
                lines += [f"✕ {message}" for _, message in report.failed]  # unreadable, no text, ...
                lines.append("```\n" + report.summary() + "\n```")
        _forget_uploads(files)
        if any(line.startswith("✕") for line in lines):
            gr.Warning("部分文件没有导入，详见知识库面板")
        return (*self.view(kb), "\n\n".join(lines), None)

    def delete(self, kb: str, doc_ids: list[str] | None):
        if not doc_ids:
            raise gr.Error("请先选择要删除的文档")
        try:
            missing = self.service.remove(kb, list(doc_ids))
        except KnowledgeBaseError as exc:
            raise gr.Error(str(exc)) from exc
        removed = [d for d in doc_ids if d not in missing]
        status = f"✓ 已删除 {len(removed)} 个文档：{'、'.join(removed)}（之后的回答不会再引用它们）"
        if missing:
            status += f"\n\n未找到：{'、'.join(missing)}"
        if removed and self.purge is not None:
            status += self._purge(self.service.check_name(kb), removed)
        return (*self.view(kb), status)

    def _purge(self, kb: str, removed: list[str]) -> str:
        """Delete the eval runs quoting the deleted documents; the status line about it."""
        try:
            runs, running = self.purge(kb, removed)
        except OSError as exc:  # the documents are gone already; say what is left
            log.exception("purging eval runs failed")
            return f"\n\n⚠ 引用这些文档的评测记录没有全部删除 / eval runs not fully deleted: {exc}"
        lines = ""
        if runs:
            lines += f"\n\n✓ 同时删除了引用这些文档的 {len(runs)} 条评测记录：{'、'.join(runs)}"
        if running:
            lines += (f"\n\n⚠ 正在进行的评测 {'、'.join(running)} 引用了这些文档，没有删除；结束后请手动删除"
                      f"知识库目录下的 _eval_runs/{running[0]} / a running eval quotes these documents: "
                      f"delete its folder when it is done")
        return lines

    def reindex(self, kb: str, progress=gr.Progress()):
        progress(0, desc="正在重建索引…")
        try:
            generation = self.service.reindex(kb)
        except KnowledgeBaseError as exc:
            raise gr.Error(str(exc)) from exc
        return (*self.view(kb), f"✓ 已重建索引（第 {generation} 代）")
