"""CSS, the citation-click bridge and the theme of the web UI (kept as strings so an
installed package needs no data files)."""
from __future__ import annotations

import gradio as gr

# Runs once per page as the js_on_load of a tiny gr.HTML. The chatbot sanitiser strips
# data-* attributes and never runs scripts, so one document-level listener turns a click
# on any citation link (<a href="#cite-KEY">, in the chat or anywhere else) into that
# component's "cite" event, which carries the key to Python. Capture phase + preventDefault:
# the link must not navigate or open a tab.
BRIDGE_JS = """
window.__ragCite = (key) => trigger('cite', {key: key});
if (!window.__ragCiteBound) {
  window.__ragCiteBound = true;
  document.addEventListener('click', (ev) => {
    const link = ev.target.closest ? ev.target.closest('a[href^="#cite-"]') : null;
    if (!link) return;
    ev.preventDefault();
    ev.stopPropagation();
    document.querySelectorAll('a.cite-active').forEach((a) => a.classList.remove('cite-active'));
    link.classList.add('cite-active');
    window.__ragCite(link.getAttribute('href').slice('#cite-'.length));
  }, true);
}
"""

# After "打开全文" renders the document: bring the highlighted passage into view. The
# timeout lets the HTML component paint first.
SCROLL_TO_FOCUS_JS = """
() => {
  setTimeout(() => {
    const mark = document.querySelector('#rag-fulldoc .rag-focus');
    if (mark) mark.scrollIntoView({block: 'center'});
  }, 150);
}
"""

CSS = """
#rag-bridge { display: none; }
.cite { display: inline-block; margin: 0 1px; padding: 0 5px; border-radius: 9px; font-size: 0.8em;
        line-height: 1.5; vertical-align: 1px; background: #e0ecff; color: #1d4ed8 !important;
        text-decoration: none !important; cursor: pointer; font-weight: 600; }
.cite:hover, .cite.cite-active { background: #1d4ed8; color: #fff !important; }
.cite.pending { background: #eef0f3; color: #6b7280 !important; cursor: default; }
.sent.unsupported { text-decoration: underline wavy #f59e0b; text-underline-offset: 3px; background: #fff7e6; }
.sent .flag { font-size: 0.75em; color: #b45309; margin-left: 2px; }
.warn { margin-top: 6px; color: #b45309; font-size: 0.9em; }
.notice { margin-top: 6px; color: #6b7280; font-size: 0.85em; }
.status { color: #6b7280; font-size: 0.85em; margin-top: 4px; }
.refusal { font-weight: 600; color: #b91c1c; }
.sources { margin-top: 8px; padding-top: 6px; border-top: 1px dashed #d1d5db; font-size: 0.88em; }
.sources-title { color: #6b7280; margin-bottom: 2px; }
.sources ol { margin: 0; padding-left: 0; list-style: none; }
.sources li { margin: 2px 0; }
.source { text-decoration: none !important; color: inherit !important; cursor: pointer; display: block;
          padding: 2px 4px; border-radius: 6px; }
.source:hover, .source.cite-active { background: #eef4ff; }
.source .quote { color: #6b7280; margin-left: 6px; }
#rag-citation .cite-meta { font-size: 0.88em; margin: 4px 0 8px; }
#rag-citation .cite-meta .k { display: inline-block; width: 3.5em; color: #6b7280; }
#rag-citation .cite-kind { font-weight: 700; color: #1d4ed8; }
#rag-citation .cite-quote { font-size: 0.9em; margin-bottom: 6px; }
#rag-citation .context, #rag-fulldoc .fulldoc { line-height: 1.8; padding: 8px 10px; border-radius: 8px;
        background: #fafafa; border: 1px solid #e5e7eb; }
#rag-fulldoc .fulldoc { max-height: 460px; overflow-y: auto; }
#rag-fulldoc .fulldoc-title { font-weight: 600; margin: 4px 0; }
.passage { background: #e8f1ff; border-radius: 3px; }
mark.quote, mark.passage-only { background: #fde68a; padding: 0 1px; border-radius: 3px; }
.details table { font-size: 0.85em; border-collapse: collapse; margin-top: 6px; width: 100%; }
.details th, .details td { border-bottom: 1px solid #e5e7eb; padding: 2px 6px; text-align: left; }
.muted { color: #9ca3af; }
"""


def theme() -> gr.themes.Base:
    # System CJK fonts only: the app must not fetch web fonts (it runs offline).
    return gr.themes.Soft(
        font=["PingFang SC", "Microsoft YaHei", "Noto Sans CJK SC", "WenQuanYi Micro Hei", "sans-serif"],
        font_mono=["Menlo", "Consolas", "WenQuanYi Micro Hei Mono", "monospace"],
    )
