"""``rag ask`` and ``rag chat``: answers with numbered, verified sources."""
from __future__ import annotations

import json
import sys

from rag.answer_types import Answered, Probing, Token


def question_error(question: str, settings) -> str | None:
    """Why ``question`` is refused (longer than ``settings.max_question_chars``), or None."""
    size, limit = len(question.strip()), settings.max_question_chars
    if size <= limit:
        return None
    return (f"问题太长（{size} 字，最多 {limit} 字），请缩短问题（上限 RAG_MAX_QUESTION_CHARS）/ "
            f"question too long ({size} characters, at most {limit}): ask a shorter one")


def check_question(question: str, settings) -> None:
    """Refuse a question longer than ``max_question_chars`` before any model is loaded:
    ``ValueError``, which ``rag.cli.main`` prints as one line and exits with 2."""
    error = question_error(question, settings)
    if error:
        raise ValueError(error)


def _settings_for(args):
    from rag.cli import _settings

    settings = _settings(args)
    if args.llm:
        settings.llm_backend = args.llm
    return settings


def _answerer(settings):
    from rag.service import RagService

    return RagService(settings).answerer(settings.kb)


def _print_result(result) -> None:
    if result.notice:
        print(f"\n注意 notice: {result.notice}", file=sys.stderr)
    if result.refused:
        print("\n最接近的段落 closest passages:")
        for p in result.passages[:3]:
            print(f"  [{p['number']}] {p['title'] or p['doc_id']} {p['section']}\n      {p['text'][:120]}…")
        return
    if result.unsupported_sentences:
        print(f"\n⚠ {result.unsupported_sentences} 句没有找到资料支持 / sentence(s) not supported by the passages")
    if result.citations:
        print("\n来源 sources:")
        print(result.sources_text())


def _run(answerer, question: str, history, backend: str, as_json: bool, where=None):
    result = None
    streamed = ""
    for event in answerer.stream(question, history, backend, where=where):
        if isinstance(event, Probing) and not as_json:
            print(f"（问题包含 {len(event.parts)} 个部分，正在预读各部分的答案… / "
                  f"reading the {len(event.parts)} parts' answers first…）", file=sys.stderr, flush=True)
        elif isinstance(event, Token) and not as_json:
            print(event.text, end="", flush=True)
            streamed += event.text
        elif isinstance(event, Answered):
            result = event.result
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return result
    if streamed:
        print()
    if result.refused and streamed.strip() != result.answer:
        print(result.answer)
    elif not result.refused and streamed.strip() != result.answer:
        # Citations were re-pointed or dropped by the verifier: show the corrected text.
        print(f"\n核对后的回答 verified answer:\n{result.answer}")
    _print_result(result)
    return result


def cmd_ask(args) -> int:
    from rag.filters import Where

    settings = _settings_for(args)
    check_question(args.question, settings)
    where = Where.parse(args.where)
    answerer = _answerer(settings)
    result = _run(answerer, args.question, [], answerer.settings.llm_backend, args.json, where)
    return 0 if result is not None else 1


def cmd_chat(args) -> int:
    from rag.filters import Where

    where = Where.parse(args.where)
    answerer = _answerer(_settings_for(args))
    backend = answerer.settings.llm_backend
    history: list[dict] = []
    shown = f" · 过滤 {where.describe()}" if where else ""
    print(f"知识库 {'、'.join(answerer.searcher.names)} · 模型 {backend}{shown} · 输入问题，空行或 Ctrl-D 退出 / empty line to quit")
    while True:
        try:
            question = input("\n问> ").strip()
        except EOFError:
            print()
            return 0
        if not question:
            return 0
        error = question_error(question, answerer.settings)
        if error:  # one too-long line must not end the conversation
            print(error, file=sys.stderr)
            continue
        result = _run(answerer, question, history, backend, False, where)
        if result.query != question:
            print(f"\n(检索用的问题 rewritten query: {result.query})")
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": result.answer}]


def cmd_prepare_llm(args) -> int:
    from rag.cli import _settings
    from rag.llm import ensure_default_gguf

    path = ensure_default_gguf(_settings(args), progress=True)
    print(f"本地模型已就绪并通过校验 / local model ready and verified: {path}")
    return 0


def register(sub, common) -> None:
    from rag.cli import add_where_arg

    p = sub.add_parser("prepare-llm", parents=[common], help="拼接并校验本地模型 assemble + verify the local GGUF")
    p.set_defaults(func=cmd_prepare_llm)
    p = sub.add_parser("ask", parents=[common], help="提问 ask one question")
    p.add_argument("question")
    p.add_argument("--llm", choices=["local", "openai", "extractive"], help="default: RAG_LLM_BACKEND or local")
    p.add_argument("--json", action="store_true", help="print the typed result as JSON")
    add_where_arg(p)
    p.set_defaults(func=cmd_ask)
    p = sub.add_parser("chat", parents=[common], help="多轮对话 multi-turn chat")
    p.add_argument("--llm", choices=["local", "openai", "extractive"])
    add_where_arg(p)
    p.set_defaults(func=cmd_chat)
