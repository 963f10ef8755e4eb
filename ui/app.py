"""The web UI: chat with clickable citations, a citation side panel, knowledge-base
management and settings, built by ``create_app(settings)``.

Nothing lives at module level: the shared knowledge bases belong to the ``RagApp``
the factory returns, each browser session keeps its conversation in a ``gr.State``.

Usage::

    app = create_app(Settings(kb="demo"))
    app.launch(host="127.0.0.1", port=7860)

The server only answers requests whose ``Host`` header ``rag.netguard`` allows for its
bind address (loopback bind: loopback names with its port), so a web page cannot drive
it through DNS rebinding.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from rag.config import Settings
from rag.filters import HELP as FILTER_HELP
from rag.load import SUPPORTED_SUFFIXES
from rag.netguard import HostGuard, parse_allowed_hosts
from ui.assets import BRIDGE_JS, CSS, SCROLL_TO_FOCUS_JS, theme
from ui.bind import AUTH_USER, check_bind
from ui.chat import FEEDBACK_TARGET_HINT, NO_FILTER, VOTES, ChatHandlers, new_votes
from ui.eval_panel import EvalHandlers, build_eval_tab
from ui.kb_panel import DOC_HEADERS, KBHandlers
from rag.service import RagService

# Enough parallel answers that one slow LLM answer never queues a quick extractive one
# behind it; the local model itself is serialised by the lock in rag.llm.
DEFAULT_CHAT_CONCURRENCY = 8
CITATION_HINT = '<div class="muted">点击回答中的 [1] [2] 或下方“来源”，在这里查看原文出处。</div>'
# Next to the API key field: the operator's key never follows a URL typed in the browser.
KEY_NOTE = ("留空时：只有接口地址与服务端配置的 RAG_LLM_BASE_URL 相同，才使用服务端的 RAG_LLM_API_KEY；"
            "改成其他地址时，服务端密钥不会发送，请填写你自己的密钥（否则不发送密钥）。"
            " / Empty: the server's RAG_LLM_API_KEY is used only for the server's RAG_LLM_BASE_URL; it is "
            "never sent to any other URL — enter your own key for it (otherwise no key is sent).")
# Next to the delete button: what else keeps text of a deleted document.
DELETE_NOTE = ("删除文档时，本界面“评测”页中引用它的评测记录（知识库目录下 `_eval_runs/`）会一并删除；"
               "`rag eval` 命令行的运行目录（默认 `eval/runs/`）里的片段不会自动删除，请手动删除。"
               " / Deleting a document also deletes this UI's eval runs that quote it; `rag eval` run folders "
               "(default `eval/runs/`) keep snippets until you delete them.")
BACKENDS = [("抽取式（不用大模型，最快）", "extractive"), ("本地模型（Qwen 1.5B，llama.cpp）", "local"),
            ("OpenAI 兼容接口", "openai")]


class RagApp:
    """The Gradio app and the knowledge bases it serves.

    Args:
        settings: base configuration; ``settings.kb`` is the pre-selected KB and
            ``settings.llm_backend`` the pre-selected backend.
        chat_concurrency: answers computed at the same time.
    """

    def __init__(self, settings: Settings, chat_concurrency: int = DEFAULT_CHAT_CONCURRENCY):
        self.settings = settings
        self.service = RagService(settings)
        self._export_dir = tempfile.TemporaryDirectory(prefix="rag-export-")
        self.chat = ChatHandlers(self.service, Path(self._export_dir.name))
        self.eval_panel = EvalHandlers(self.service, Path(self._export_dir.name))
        # Deleting a document also deletes the eval runs whose logs quote it.
        self.kb_panel = KBHandlers(self.service, purge=self.eval_panel.purge_runs)
        self.blocks = self._build()
        self.blocks.queue(default_concurrency_limit=chat_concurrency)

    def _build(self) -> gr.Blocks:
        s = self.settings
        # delete_cache: Gradio's copies of exports and uploads are removed after an hour.
        with gr.Blocks(title="中文文档问答", analytics_enabled=False, fill_width=True,
                       delete_cache=(1800, 3600)) as blocks:
            turns = gr.State([])
            votes = gr.State(new_votes())  # this session's 👍/👎 (ui.chat.new_votes)
            selected = gr.State(None)
            bridge = gr.HTML("", js_on_load=BRIDGE_JS, elem_id="rag-bridge")
            gr.Markdown("## 中文文档问答 · 回答只来自你的文档，每句话都标出处")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    # Custom values allowed: KBs created after start-up (and API callers) must pass
                    # validation; the name is checked by RagService anyway.
                    kb = gr.Dropdown(label="知识库", choices=self.kb_panel.choices(), value=s.kb,
                                     allow_custom_value=True, elem_id="rag-kb")
                    with gr.Tabs():
                        with gr.Tab("对话", id="chat"):
                            # Several KBs in one question; the 知识库 dropdown above stays the one managed.
                            # Empty until the page loads (then the current KB, KBHandlers.scope): an API
                            # caller that leaves it out searches the `kb` it passes.
                            search_kbs = gr.Dropdown(
                                label="检索的知识库（可多选） / knowledge bases to search",
                                choices=self.kb_panel.choices(), value=[], multiselect=True,
                                allow_custom_value=True, elem_id="rag-search-kbs",
                                info="默认（或留空时）只检索上方的当前知识库；可同时选择多个（嵌入模型须相同），来源会标明所属知识库。")
                            chatbot = gr.Chatbot(
                                label="对话", height=520, elem_id="rag-chat", render_markdown=False,
                                sanitize_html=True, buttons=["copy"], feedback_options=("Like", "Dislike"), latex_delimiters=[],
                                placeholder="向知识库提问，例如：这份文件规定了什么？回答中的 [1] [2] 可以点击查看原文。")
                            with gr.Row():
                                question = gr.Textbox(placeholder="输入问题，回车发送", show_label=False, scale=5,
                                                      elem_id="rag-question", autofocus=True)
                                send = gr.Button("发送", variant="primary", scale=1, elem_id="rag-send")
                            with gr.Row():
                                clear = gr.Button("清空对话", size="sm")
                                export = gr.Button("导出 Markdown", size="sm", elem_id="rag-export")
                            export_file = gr.File(label="导出的对话", visible=False, interactive=False,
                                                  elem_id="rag-export-file")
                            with gr.Accordion("反馈 / feedback", open=False, elem_id="rag-feedback"):
                                fb_target = gr.Markdown(FEEDBACK_TARGET_HINT, elem_id="rag-fb-target")
                                fb_vote = gr.Radio(VOTES, value=None, label="评价", elem_id="rag-fb-vote")
                                fb_comment = gr.Textbox(label="意见（可选）", lines=1, elem_id="rag-fb-comment")
                                fb_correction = gr.Textbox(label="正确答案（可选，用于“有问题”的回答）", lines=2,
                                                           elem_id="rag-fb-correction")
                                fb_refuse = gr.Checkbox(label="应当拒答（文档中没有答案）", elem_id="rag-fb-refuse")
                                fb_submit = gr.Button("提交反馈", size="sm", elem_id="rag-fb-submit")
                            with gr.Accordion("检索详情与过滤 / retrieval details & filters", open=False,
                                              elem_id="rag-details-box") as details_box:
                                gr.Markdown("**按文档元数据过滤**（用于之后的提问）。" + FILTER_HELP,
                                            elem_classes=["muted"])
                                with gr.Row():
                                    f_path = gr.Textbox(label="路径前缀或通配", placeholder="news/ 或 *.pdf，多个用逗号分隔",
                                                        elem_id="rag-f-path")
                                    f_title = gr.Textbox(label="标题包含", placeholder="如 十堰", elem_id="rag-f-title")
                                with gr.Row():
                                    f_from = gr.Textbox(label="日期从", placeholder="2024-01-01 / 2024-05 / 2024",
                                                        elem_id="rag-f-from")
                                    f_to = gr.Textbox(label="日期到", placeholder="2024-06-30 / 2024-06 / 2024",
                                                      elem_id="rag-f-to")
                                f_fields = gr.Textbox(label="其他条件（字段=值，多个用 ; 分隔）",
                                                      placeholder="source=人民网; category=政策", elem_id="rag-f-fields")
                                with gr.Row():
                                    f_status = gr.Markdown(NO_FILTER, elem_id="rag-f-status")
                                    f_clear = gr.Button("清除过滤", size="sm", scale=0, elem_id="rag-f-clear")
                                details = gr.HTML(elem_id="rag-details", visible=False)
                        with gr.Tab("知识库", id="kb"):
                            kb_summary = gr.Markdown(elem_id="rag-kb-summary")
                            docs = gr.Dataframe(headers=DOC_HEADERS, interactive=False, wrap=True, elem_id="rag-docs")
                            upload = gr.File(
                                label=f"上传文件（{' '.join(sorted(SUPPORTED_SUFFIXES))}，每个不超过 {s.max_file_mb:g} MB）",
                                file_count="multiple", file_types=sorted(SUPPORTED_SUFFIXES), type="filepath",
                                elem_id="rag-upload")
                            ingest = gr.Button("导入到知识库", variant="primary", elem_id="rag-ingest")
                            kb_status = gr.Markdown(elem_id="rag-kb-status")
                            with gr.Row():
                                to_delete = gr.Dropdown(label="选择要删除的文档", multiselect=True, choices=[], scale=3,
                                                        allow_custom_value=True, elem_id="rag-delete-pick")
                                delete = gr.Button("删除所选文档", variant="stop", scale=1, elem_id="rag-delete")
                            gr.Markdown(DELETE_NOTE, elem_classes=["muted"], elem_id="rag-delete-note")
                            with gr.Row():
                                new_kb = gr.Textbox(label="新知识库名称", scale=3, elem_id="rag-new-kb")
                                create = gr.Button("新建知识库", scale=1, elem_id="rag-create")
                            reindex = gr.Button("重建索引", size="sm", elem_id="rag-reindex")
                        with gr.Tab("设置", id="settings"):
                            backend = gr.Radio(BACKENDS, value=s.llm_backend, label="回答模型", elem_id="rag-backend")
                            with gr.Group(visible=s.llm_backend == "openai") as openai_box:
                                base_url = gr.Textbox(label="接口地址 Base URL", value=s.llm_base_url)
                                api_key = gr.Textbox(label="API Key", value="", type="password",
                                                     placeholder="你的密钥 / your key", info=KEY_NOTE,
                                                     elem_id="rag-api-key")
                                model = gr.Textbox(label="模型名称", value=s.llm_model)
                            top_k = gr.Slider(1, 10, value=s.top_k, step=1, label="检索段落数 top-k")
                            show_details = gr.Checkbox(label="显示检索详情（改写后的问题、每段的 BM25 与向量分数）",
                                                       elem_id="rag-show-details")
                        build_eval_tab(self.eval_panel, kb, [backend, base_url, api_key, model])
                with gr.Column(scale=2, elem_id="rag-side"):
                    gr.Markdown("### 引用原文")
                    citation = gr.HTML(CITATION_HINT, elem_id="rag-citation")
                    open_full = gr.Button("打开全文并定位", size="sm", elem_id="rag-open-full")
                    fulldoc = gr.HTML(visible=False, elem_id="rag-fulldoc")

            # ---- chat: its own concurrency group, streamed
            gr.on([question.submit, send.click], self.chat.respond,
                  [question, turns, kb, backend, top_k, base_url, api_key, model, show_details, search_kbs,
                   f_path, f_title, f_from, f_to, f_fields],
                  [chatbot, turns, question, details], api_name="chat", concurrency_id="chat",
                  show_progress="hidden")
            bridge.cite(self.chat.cite, [turns], [citation, selected, fulldoc], api_visibility="private",
                        concurrency_limit=None, show_progress="hidden")
            open_full.click(self.chat.open_full, [selected], [fulldoc], api_visibility="private",
                            concurrency_limit=None).then(None, js=SCROLL_TO_FOCUS_JS)
            # ---- feedback: short SQLite writes, never queued behind answers
            feedback = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
            chatbot.like(self.chat.vote, [turns, votes], [votes, fb_vote, fb_target], **feedback)
            fb_submit.click(self.chat.submit_feedback,
                            [turns, votes, fb_vote, fb_comment, fb_correction, fb_refuse],
                            [votes, fb_vote, fb_comment, fb_correction, fb_refuse, fb_target], **feedback)
            filters = [f_path, f_title, f_from, f_to, f_fields]
            gr.on([e for box in filters for e in (box.blur, box.submit)], self.chat.filter_status, filters,
                  [f_status], api_visibility="private", concurrency_limit=None, show_progress="hidden",
                  trigger_mode="always_last")
            f_clear.click(lambda: ("",) * len(filters) + (NO_FILTER,), None, [*filters, f_status],
                          api_visibility="private", show_progress="hidden")
            show_details.change(self.chat.details, [turns, show_details], [details_box, details],
                                api_visibility="private")
            backend.change(lambda b: gr.update(visible=b == "openai"), [backend], [openai_box],
                           api_visibility="private")
            clear.click(lambda: ([], [], CITATION_HINT, None, gr.update(value="", visible=False),
                                 gr.update(value=None, visible=False), new_votes(), None, FEEDBACK_TARGET_HINT),
                        None, [chatbot, turns, citation, selected, fulldoc, export_file, votes, fb_vote, fb_target],
                        api_visibility="private")
            export.click(self.chat.export, [turns], [export_file], api_visibility="private")

            # ---- knowledge bases: writes one at a time, apart from the chat
            view = [docs, to_delete, kb_summary]
            blocks.load(self.kb_panel.load, [kb], [kb, *view], api_visibility="private").then(
                self.kb_panel.scope, [kb, search_kbs], [search_kbs], api_visibility="private")
            kb.change(self.kb_panel.view, [kb], view, api_visibility="private")
            kb.change(self.kb_panel.scope, [kb, search_kbs], [search_kbs], api_visibility="private",
                      show_progress="hidden")
            write = dict(concurrency_id="kb-write", concurrency_limit=1)
            ingest.click(self.kb_panel.upload, [kb, upload], [*view, kb_status, upload], api_name="ingest", **write)
            delete.click(self.kb_panel.delete, [kb, to_delete], [*view, kb_status], api_name="remove_documents",
                         **write)
            reindex.click(self.kb_panel.reindex, [kb], [*view, kb_status], api_name="reindex", **write)
            create.click(self.kb_panel.create, [new_kb], [kb, *view, kb_status, new_kb], api_name="create_kb",
                         **write)
        return blocks

    def launch(self, host: str = "127.0.0.1", port: int | None = 7860, password: str | None = None,
               allowed_hosts: list[str] | str | None = None, **kwargs):
        """Start the server (``prevent_thread_lock=True`` in kwargs to return at once).

        Every request first passes ``rag.netguard.HostGuard``: bound to loopback, only
        ``Host`` headers naming loopback with this port (or in ``allowed_hosts``) are
        answered, others get 403; bound elsewhere (password required), any Host unless
        ``allowed_hosts`` lists them. The guard is middleware of Gradio's FastAPI app
        (``app_kwargs={"middleware": ...}``), in front of every route: pages, API, queue,
        files, login (only Gradio's own CORS and compression layers run before it; a CORS
        preflight is answered there, without data). SSR (a Node front proxy) and static file workers (other ports) would
        answer without it, so both are off whatever ``GRADIO_SSR_MODE``/``GRADIO_NUM_WORKERS`` say.

        Raises:
            BindError: ``host`` is not a loopback address and no password was given.
            ValueError: an ``allowed_hosts`` entry is not ``name`` or ``name:port``.
        """
        check_bind(host, password)
        # The port Gradio really listens on (it picks one when ``port`` is None).
        listening = port if port is not None else (lambda: getattr(self.blocks, "server_port", None))
        guard = Middleware(HostGuard, bind=host, port=listening, allowed=parse_allowed_hosts(allowed_hosts))
        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [guard, *app_kwargs.get("middleware", [])]
        return self.blocks.launch(
            server_name=host, server_port=port, auth=(AUTH_USER, password) if password else None,
            auth_message=f"请输入访问密码（用户名 {AUTH_USER}）", css=CSS, theme=theme(),
            max_file_size=int(self.settings.max_file_mb * 1e6), show_error=True, app_kwargs=app_kwargs,
            ssr_mode=False, num_workers=0, **kwargs)

    def close(self) -> None:
        self.blocks.close()
        self.service.close()
        self._export_dir.cleanup()


def create_app(settings: Settings | None = None, chat_concurrency: int = DEFAULT_CHAT_CONCURRENCY) -> RagApp:
    """Build the UI for the knowledge bases under ``settings.home``."""
    return RagApp(settings or Settings(), chat_concurrency)
