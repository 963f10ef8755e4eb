"""The 评测 tab: run a question set (``rag eval`` formats) from the browser.

Pick a questions ``.jsonl``, search the selected KB or a KB built from an uploaded
corpus (``ensure_corpus_kb``), watch a progress bar, then read the metrics, the
hit@k plot and ``report.md``; clicking a worst miss shows what was retrieved for it.

Its 审核草稿 sub-tab (``ui.review_panel``) reviews drafted questions (``rag eval-gen``) and
hands the accepted ones to the run sub-tab.

Each run writes its own folder ``<home>/_eval_runs/<timestamp>`` (the ``_`` keeps it
out of the KB list); the folder of a session's last run travels in a ``gr.State``.
Its log and report quote retrieved passages, so deleting a document from a KB also
deletes the finished runs of that KB that quote it (``EvalHandlers.purge_runs``).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import gradio as gr

from rag.answer import make_answer_fn
from rag.evaluate import DEPTH, ensure_corpus_kb, load_questions, run_eval, worst_misses
from rag.feedback import export_questions
from rag.store import KnowledgeBase, KnowledgeBaseError
from ui.render import esc
from ui.review_panel import ReviewHandlers, build_review_tab
from rag.service import LLMChoice, RagService

log = logging.getLogger(__name__)

RUNS_DIR = "_eval_runs"
SOURCES = [("当前选中的知识库", "current"), ("上传语料 .jsonl（自动建立或复用评测知识库）", "corpus")]
MODES = [("混合检索 hybrid", "hybrid"), ("向量检索 dense", "dense"), ("关键词检索 BM25", "bm25")]
METRIC_HEADERS = ["指标", "数值"]
MISS_HEADERS = ["编号", "问题", "标准答案", "首个命中名次", f"recall@{DEPTH}"]
MISSES_SHOWN = 20
MISS_HINT = '<div class="muted">点击上表中的一行，在这里查看该问题检索到的段落和标准答案。</div>'
REPORT_FILES = ("report.json", "report.md", "hit_at_k.png")
_METRIC_NAMES = {  # report.json keys → what a Chinese reader sees; the key stays for cross-reference
    f"mrr@{DEPTH}": "平均倒数排名", f"recall@{DEPTH}": "召回率", f"all_groups@{DEPTH}": "证据组全部命中",
    "retrieve_p50_ms": "检索延迟 p50（毫秒）", "retrieve_p95_ms": "检索延迟 p95（毫秒）",
    "answer_p50_ms": "回答延迟 p50（毫秒）", "answer_p95_ms": "回答延迟 p95（毫秒）",
    "accuracy": "回答正确率", "refusal_rate": "无答案题的拒答率", "false_refusal_rate": "有答案题的误拒率",
    "n_answered": "回答题数", "errors": "回答出错数",
    "citation_precision": "引用准确率", "unsupported_sentence_rate": "无资料支持的句子比例",
    "first_token_p50_ms": "首字延迟 p50（毫秒）", "first_token_p95_ms": "首字延迟 p95（毫秒）",
    "latency_p50_ms": "回答耗时 p50（毫秒）", "latency_p95_ms": "回答耗时 p95（毫秒）",
}


def _fmt(value) -> str:
    return "–" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def metric_rows(report: dict) -> list[list[str]]:
    """The metrics table: question counts, retrieval, latency, answers (when run)."""
    rows = [["问题数", str(report["n"])], ["无答案题（不计入检索指标）", str(report["n_negative"])]]
    for section, prefix in (("retrieval", ""), ("latency", ""), ("answer", "回答 ")):
        for key, value in (report.get(section) or {}).items():
            if section == "answer" and key.startswith("latency"):
                continue  # already listed as answer_p50/p95 under latency
            name = _METRIC_NAMES.get(key) or (f"前 {key.split('@')[1]} 段命中率" if key.startswith("hit@") else key)
            rows.append([f"{prefix}{name} · {key}", _fmt(value)])
    return rows


def miss_rows(records: list[dict]) -> list[list]:
    return [[r["id"], r["question"], r["gold"], r.get("first_relevant_rank") or f">{DEPTH}",
             _fmt(r["metrics"].get(f"recall@{DEPTH}"))] for r in worst_misses(records, MISSES_SHOWN)]


def read_records(run_dir: Path) -> list[dict]:
    """The per-question log of a finished run (a fresh folder: every line is whole)."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _quotes(value, doc_ids: set[str]) -> bool:
    """Whether a log record (any nesting: retrieved hits, answer citations) names one of ``doc_ids``."""
    if isinstance(value, dict):
        doc_id = value.get("doc_id")
        if isinstance(doc_id, str) and doc_id in doc_ids:
            return True
        return any(_quotes(v, doc_ids) for v in value.values())
    if isinstance(value, list):
        return any(_quotes(v, doc_ids) for v in value)
    return False


def run_quotes(run_dir: Path, kb: str, doc_ids: set[str]) -> bool:
    """Whether an eval run folder is a run over ``kb`` whose ``log.jsonl`` quotes one of ``doc_ids``.

    A folder without a readable ``run.json`` (an unknown KB) is never claimed.
    """
    try:
        config = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    if config.get("kb") != kb:
        return False
    try:
        lines = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a torn last line: look for the id itself
            if any(doc_id in line for doc_id in doc_ids):
                return True
            continue
        if _quotes(record, doc_ids):
            return True
    return False


class EvalHandlers:
    """Callbacks of the 评测 tab.

    Args:
        service: the app's core service (searchers, embedder, chat models are shared).
        export_dir: where report copies are served from; Gradio only serves files from
            the working or temp directory, and ``settings.home`` may be neither.
    """

    def __init__(self, service: RagService, export_dir: Path):
        self.service = service
        self.export_dir = Path(export_dir)
        self._active: set[Path] = set()  # run folders being written (resolved paths)
        self._active_lock = threading.Lock()
        self.review = ReviewHandlers(service, export_dir)  # the 审核草稿 sub-tab

    @property
    def runs_root(self) -> Path:
        return self.service.home / RUNS_DIR

    def _new_run_dir(self) -> Path:
        """A fresh run folder, marked active until ``run`` is done with it."""
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() // 1_000_000 % 1000:03d}"
        run_dir = self.runs_root / stamp
        run_dir.mkdir(parents=True)  # exist_ok=False: two runs never share a log
        with self._active_lock:
            self._active.add(run_dir.resolve())
        return run_dir

    def purge_runs(self, kb: str, doc_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Delete the run folders of ``kb`` (and their served report copies) whose log quotes
        one of ``doc_ids``: their logs and reports keep snippets of those documents.

        Only folders directly under ``<home>/_eval_runs`` are touched (never a symlink), and only
        those whose ``run.json`` names ``kb``; a run still being written is left alone (it would
        fail half-way) and reported. Returns ``(removed, skipped)`` folder names.
        """
        wanted = {d for d in doc_ids if d}
        root = self.runs_root
        removed: list[str] = []
        skipped: list[str] = []
        if not wanted or not root.is_dir() or root.is_symlink():
            return removed, skipped
        for run in sorted(root.iterdir()):
            if run.is_symlink() or not run.is_dir() or not run_quotes(run, kb, wanted):
                continue
            with self._active_lock:
                active = run.resolve() in self._active
            if active:
                skipped.append(run.name)
                continue
            shutil.rmtree(run)
            served = self.export_dir / "eval" / run.name
            if served.is_dir() and not served.is_symlink():
                shutil.rmtree(served)
            removed.append(run.name)
        if removed:
            log.info("deleted %d eval run(s) of %s quoting %s: %s", len(removed), kb, sorted(wanted), removed)
        # Drafted and accepted questions quote the documents too (their gold quotes).
        removed += self.review.purge(kb, wanted)
        return removed, skipped

    def from_feedback(self, kb: str):
        """「用反馈生成题集」: the KB's stored feedback as a question set (``rag feedback export``),
        written to a fresh folder of the export dir. Returns (questions file, source, status)."""
        try:
            kb = self.service.require(kb)
            with closing(KnowledgeBase(self.service.home / kb)) as store:
                questions, counts = export_questions(store)
        except (KnowledgeBaseError, OSError) as exc:
            raise gr.Error(str(exc)) from exc
        if not questions:
            gr.Warning("没有可用的反馈生成问题 / no feedback to make questions from")
            return gr.skip(), gr.skip(), f"知识库 **{kb}**：{counts.summary()}"
        # An ASCII name: the plot title shows the file stem, and matplotlib may have no CJK font.
        path = Path(tempfile.mkdtemp(dir=self.export_dir, prefix="feedback-")) / "feedback-questions.jsonl"
        path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
        gr.Info(f"已用反馈生成 {counts.written} 个问题")
        return (str(path), "current",
                f"知识库 **{kb}** 的反馈已生成题集（已填入“问题集”，点“开始评测”运行）：{counts.summary()}")

    def _target(self, source: str, kb: str, corpus_file: str | None) -> tuple[str, dict]:
        """(KB name to search, extra report config); builds the corpus KB when asked."""
        if source != "corpus":
            kb = self.service.check_name(kb)
            if not self.service.exists(kb):
                raise KnowledgeBaseError(f"知识库不存在：{kb}（请先在“知识库”页上传文件）")
            return kb, {}
        if not corpus_file:
            raise gr.Error("请上传语料 .jsonl，或改选“当前选中的知识库”")
        corpus = Path(corpus_file)
        if corpus.suffix.lower() != ".jsonl":
            raise gr.Error(f"{corpus.name}：语料须为 .jsonl（每行 {{\"id\", \"title\", \"text\"}}）")
        # The name comes from the file, not Gradio's cache folder; short enough for a KB name.
        _, info = ensure_corpus_kb(corpus, self.service.settings, self.service.embedder(), name=corpus.stem[:40],
                                   progress=True, log=log.info)
        return info["kb"], {"corpus": corpus.name}

    def run(self, questions_file: str | None, source: str, kb: str, corpus_file: str | None,
            retrieval_only: bool, mode: str, k: float, limit: float | None, backend: str, base_url: str,
            api_key: str, model: str, progress=gr.Progress(track_tqdm=True)):
        """Evaluate; returns (status, metrics, plot, report.md, downloads, misses, run folder, miss detail)."""
        if not questions_file:
            raise gr.Error("请先上传问题文件（.jsonl）")
        k, limit = int(k), int(limit or 0) or None
        try:  # a malformed file fails here, before any KB is built
            n_questions = len(load_questions(Path(questions_file), limit))
        except (ValueError, KeyError) as exc:
            raise gr.Error(f"问题文件有误：{exc}") from exc
        if not n_questions:
            raise gr.Error("问题文件中没有问题")
        started = time.perf_counter()
        progress(0, desc="正在准备知识库…")
        try:
            kb, extra = self._target(source, kb, corpus_file)
            searcher = self.service.searcher(kb)
            answer_fn = None
            if not retrieval_only:
                choice = LLMChoice(backend or "extractive", (base_url or "").strip(), (api_key or "").strip(),
                                   (model or "").strip())
                progress(0, desc="正在加载回答模型…")
                answerer = self.service.answerer(kb, choice)
                if choice.backend != "extractive":  # fail now, not as a silent extractive fallback per question
                    answerer.chat_model(choice.backend)
                answer_fn = make_answer_fn(answerer, choice.backend, k)
        except (KnowledgeBaseError, RuntimeError, OSError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        run_dir = self._new_run_dir()
        try:
            # A copy next to the log: the run stays readable after Gradio clears its upload cache.
            questions = run_dir / "input" / Path(questions_file).name
            questions.parent.mkdir()
            shutil.copyfile(questions_file, questions)
            progress(0, desc=f"正在评测 {n_questions} 个问题…")
            report = run_eval(questions, self.service.settings_for(kb), run_dir, k=k, mode=mode or "hybrid",
                              limit=limit, answer_fn=answer_fn, searcher=searcher, progress=True,
                              extra_config=extra)
            records = read_records(run_dir)
            status = self._status(report, records, kb, run_dir, time.perf_counter() - started)
            served = self.export_dir / "eval" / run_dir.name
            served.mkdir(parents=True, exist_ok=True)
            for name in REPORT_FILES:
                shutil.copyfile(run_dir / name, served / name)
        finally:
            with self._active_lock:
                self._active.discard(run_dir.resolve())
        return (status, metric_rows(report), str(served / "hit_at_k.png"),
                (run_dir / "report.md").read_text(encoding="utf-8"),
                [str(served / "report.json"), str(served / "report.md")],
                miss_rows(records), str(run_dir), MISS_HINT)

    @staticmethod
    def _status(report: dict, records: list[dict], kb: str, run_dir: Path, seconds: float) -> str:
        r = report["retrieval"]
        lines = [f"✓ 评测完成：{report['n']} 个问题（{report['n_negative']} 个无答案）· 知识库 **{kb}** · "
                 f"用时 {seconds:.1f} 秒",
                 f"hit@1 {_fmt(r.get('hit@1'))} · hit@5 {_fmt(r.get('hit@5'))} · MRR {_fmt(r.get(f'mrr@{DEPTH}'))}",
                 f"结果保存在 `{run_dir}`"]
        if r.get(f"hit@{DEPTH}") == 0:
            lines.append(f"⚠ 没有一个问题在前 {DEPTH} 段中找到标准答案：问题集是否对应这个知识库？")
            gr.Warning("没有命中任何标准答案，请检查问题集与知识库是否对应")
        answers = [rec["answer"] for rec in records if "answer" in rec]
        fallback = [a for a in answers if a.get("notice") and "error" not in a]
        if fallback:  # the LLM failed mid-run: these answers are extractive, not the chosen model's
            lines.append(f"⚠ {len(fallback)} 个回答没有用所选模型：{fallback[0]['notice'][:120]}")
        return "\n\n".join(lines)

    # ------------------------------------------------------------ one miss
    def show_miss(self, run_dir: str | None, evt: gr.SelectData) -> str:
        """A click in the misses table: the row's first cell is the question id."""
        row = evt.row_value or []
        return self.miss_details(run_dir, str(row[0])) if row and run_dir else MISS_HINT

    def miss_details(self, run_dir: str | Path, question_id: str) -> str:
        """HTML: the question, its gold, and every retrieved passage in full, gold ones marked."""
        run_dir = Path(run_dir).resolve()
        if not run_dir.is_relative_to(self.runs_root.resolve()):  # the path came from a session state
            raise gr.Error("评测结果不存在")
        record = next((r for r in read_records(run_dir) if r["id"] == question_id), None)
        if record is None:
            return f'<div class="muted">没有找到问题 {esc(question_id)}</div>'
        kb = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["config"]["kb"]
        texts: dict[str, str] = {}
        items = []
        for rank, hit in enumerate(record["retrieved"], 1):
            doc_id = hit["doc_id"]
            if doc_id not in texts:
                found = self.service.document_text(kb, doc_id)
                texts[doc_id] = found[1] if found else ""
            # The log keeps an 80-character snippet; the KB has the whole passage (unless deleted since).
            text = texts[doc_id][hit["start"]:hit["end"]] or hit["snippet"]
            ranks = " / ".join(f"{name}第 {hit[key]} 名" for name, key in (("向量", "dense_rank"), ("BM25 ", "bm25_rank"))
                               if hit.get(key))
            gold = '<b style="color:#15803d">✓ 含标准答案</b> · ' if hit["gold"] else ""
            items.append(f'<li style="margin-bottom:8px"><div class="cite-meta">{gold}<b>{esc(doc_id)}</b> '
                         f'[{hit["start"]}:{hit["end"]}] · 分数 {hit["score"]:.4f}{" · " + ranks if ranks else ""}</div>'
                         f'<div class="passage" style="padding:4px 8px">{esc(text)}</div></li>')
        first = record.get("first_relevant_rank")
        head = (f'<div><b>{esc(record["id"])}</b> {esc(record["question"])}</div>'
                f'<div class="cite-meta">标准答案：{esc(record["gold"])} · 首个命中名次：{first or f"前 {DEPTH} 段未命中"}</div>')
        answer = record.get("answer")
        if answer:
            verdict = {True: "正确", False: "错误"}.get(answer.get("correct"), "拒答" if answer.get("refused") else "")
            head += (f'<div class="cite-meta">回答（{esc(verdict or "未判定")}）：'
                     f'{esc(answer.get("answer") or answer.get("error") or "")}</div>')
        body = f"<ol>{''.join(items)}</ol>" if items else '<div class="muted">没有检索到段落</div>'
        return f'<div class="eval-miss">{head}<div class="cite-meta">检索到的段落：</div>{body}</div>'


def build_eval_tab(handlers: EvalHandlers, kb: gr.Dropdown, llm: list[gr.components.Component]) -> None:
    """The 评测 tab, wired to ``handlers``.

    Args:
        kb: the app's KB picker (the "current KB" choice searches it).
        llm: the settings tab's (backend, base URL, API key, model): answers are
            evaluated with the model the user configured there.
    """
    s = handlers.service.settings
    with gr.Tab("评测", id="eval"), gr.Tabs() as tabs:
        with gr.Tab("运行评测 run", id="eval-run"):
            gr.Markdown("上传问题集（`.jsonl`，每行一个问题：`gold_ids` 或 `gold_docs` + `gold_quotes`，"
                        "格式见 eval/README.md），评测检索（可选：回答）的质量。")
            with gr.Row():
                questions = gr.File(label="问题集 .jsonl", file_types=[".jsonl"], type="filepath",
                                    elem_id="rag-eval-questions")
                corpus = gr.File(label="语料 .jsonl（选“上传语料”时使用）", file_types=[".jsonl"], type="filepath",
                                 elem_id="rag-eval-corpus")
            from_feedback = gr.Button("用反馈生成题集", size="sm", elem_id="rag-eval-from-feedback")
            source = gr.Radio(SOURCES, value="current", label="在哪个知识库上评测", elem_id="rag-eval-source")
            with gr.Row():
                retrieval_only = gr.Checkbox(value=True, label="只评测检索",
                                             info="取消勾选则同时评测回答，回答模型用“设置”页中的选择")
                mode = gr.Radio(MODES, value="hybrid", label="检索方式")
            with gr.Row():
                k = gr.Slider(1, 10, value=s.top_k, step=1, label="交给回答的段落数 k（检索指标总看前 10 段）")
                limit = gr.Number(value=0, precision=0, minimum=0, label="只评测前 N 个问题（0 = 全部）")
            start = gr.Button("开始评测", variant="primary", elem_id="rag-eval-run")
            status = gr.Markdown(elem_id="rag-eval-status")
            with gr.Row(equal_height=False):
                metrics = gr.Dataframe(headers=METRIC_HEADERS, interactive=False, wrap=True, label="指标",
                                       elem_id="rag-eval-metrics")
                plot = gr.Image(type="filepath", interactive=False, label="hit@k 曲线", elem_id="rag-eval-plot")
            files = gr.File(label="下载报告", file_count="multiple", interactive=False, elem_id="rag-eval-files")
            gr.Markdown("#### 最差的问题（点击一行查看检索到的段落）")
            misses = gr.Dataframe(headers=MISS_HEADERS, interactive=False, wrap=True, elem_id="rag-eval-misses")
            detail = gr.HTML(MISS_HINT, elem_id="rag-eval-detail")
            with gr.Accordion("报告全文 report.md", open=False):
                report_md = gr.Markdown(elem_id="rag-eval-report")
            run_dir = gr.State(None)
        build_review_tab(handlers.review, kb, questions, source, status, tabs)

        # One evaluation at a time: it keeps both cores busy, and two runs must not build
        # the same corpus KB at once. Chats have their own queue group and keep answering.
        start.click(handlers.run, [questions, source, kb, corpus, retrieval_only, mode, k, limit, *llm],
                    [status, metrics, plot, report_md, files, misses, run_dir, detail], api_name="evaluate",
                    concurrency_id="eval", concurrency_limit=1)
        from_feedback.click(handlers.from_feedback, [kb], [questions, source, status], api_visibility="private")
        misses.select(handlers.show_miss, [run_dir], [detail], api_visibility="private", concurrency_limit=None)
