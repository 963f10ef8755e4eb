"""The 评测 tab's 审核草稿 screen (``ui.review_panel``): the review rules as plain functions
(``ui.review_state``), then the handlers on the real UI app and KB — a drafts file written by
``rag.eval_drafts``' own writers is loaded, reviewed (accept / reject / edit), kept across a new
session, refused by the eval loader until reviewed, saved as the accepted set and run by the 评测
tab; drafting with the real local model; drafts dropped with a deleted document; and one pass in a
real browser.
"""
from __future__ import annotations

import json
import random
import time
from contextlib import closing
from pathlib import Path

import gradio as gr
import pytest

from conftest import PROJECT_ROOT, UI_UPLOAD_NAME, UI_UPLOAD_TEXT
from rag.eval_drafts import accepted_file, drafts_file, read_rows, survival, write_rows
from rag.eval_gen import Draft, as_rows, combine_two, sample_passages
from rag.eval_questions import UnreviewedDrafts, load_questions
from rag.store import KnowledgeBase
from ui.review_panel import ReviewHandlers
from ui.review_state import (ReviewError, accepted_rows, apply_edit, drop_documents, list_rows, next_id, set_status,
                             survival_line, survival_rows)

# Gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

KB = "测试库"
BUS = "资料/新能源公交发展报告.txt"
TEA = "资料/白岭村茶叶合作社.md"
LIB = "资料/城市图书馆服务指南.md"
DOCS = {BUS: "截至2024年底，青石市共有新能源公交车3200辆。青石市建成公交充电站58座，充电桩1260个。",
        TEA: "白岭村茶叶合作社成立于2016年，现有社员186户。"}
# (view) = status, survival table, draft list, current id, draft HTML, question, answers, quotes
STATUS, SURVIVAL, LISTING, CURRENT, HTML, QUESTION, ANSWERS, QUOTES = range(8)


def rows_fixture() -> list[dict]:
    s1 = Draft("gen-s001", "single", "青石市建成了多少座公交充电站？", ["58座"], ["青石市建成公交充电站58座"], [BUS], sources=[1])
    s2 = Draft("gen-s002", "single", "白岭村茶叶合作社成立于哪一年？", ["2016年"], ["白岭村茶叶合作社成立于2016年"], [TEA],
               sources=[2])
    neg = Draft("gen-n001", "negative", "孝感市建成了多少座公交充电站？", sources=[1], note="青石市→孝感市 (gen-s001)",
                source_docs=[BUS])
    return as_rows([s1, s2, combine_two(s1, s2, "gen-t001"), neg])


# ============================================================================ plain review rules
def test_review_rules():
    rows = rows_fixture()
    assert all(r["status"] == "draft" for r in rows)
    assert rows[3]["source_docs"] == [BUS] and rows[0]["source_docs"] == [BUS]
    assert next_id(rows, None) == "gen-s001"
    set_status(rows, "gen-s001", "accepted")
    set_status(rows, "gen-n001", "rejected")
    assert next_id(rows, "gen-s001", unreviewed=True) == "gen-s002"
    assert next_id(rows, "gen-n001", step=1) == "gen-s001"  # wraps
    with pytest.raises(ReviewError):
        set_status(rows, "nope", "accepted")
    with pytest.raises(ReviewError):
        set_status(rows, "gen-s002", "maybe")

    # An edit: the quote must be in a document, the answer in the quote; the first edit keeps the draft.
    row = rows[1]
    with pytest.raises(ReviewError, match="引文不在原文中"):
        apply_edit(row, "白岭村茶叶合作社有多少户社员？", "186户", "现有社员200户", DOCS)
    with pytest.raises(ReviewError, match="答案不在引文中"):
        apply_edit(row, "白岭村茶叶合作社有多少户社员？", "200户", "现有社员186户", DOCS)
    assert row["question"] == "白岭村茶叶合作社成立于哪一年？" and "edited" not in row  # unchanged after a refusal
    apply_edit(row, "白岭村茶叶合作社有多少户社员？", "186户｜186", "现有 社员186户", DOCS)  # whitespace ignored
    assert row["answers"] == ["186户", "186"] and row["gold_quotes"] == ["现有 社员186户"] and row["gold_docs"] == [TEA]
    assert row["edited"] and row["original"]["question"] == "白岭村茶叶合作社成立于哪一年？"
    with pytest.raises(ReviewError, match="两行"):
        apply_edit(rows[2], rows[2]["question"], "58座", "青石市建成公交充电站58座", DOCS)
    with pytest.raises(ReviewError, match="无答案题"):
        apply_edit(rows[3], rows[3]["question"], "58座", "", DOCS)
    apply_edit(rows[3], "孝感市一共建成了几座公交充电站？", "", "", DOCS)  # a negative's question may be reworded
    assert rows[3]["question"] == "孝感市一共建成了几座公交充电站？"
    set_status(rows, "gen-s002", "accepted")

    counts = survival(rows)
    assert (counts["all"]["drafted"], counts["all"]["reviewed"], counts["all"]["accepted"]) == (4, 3, 2)
    table = {r[0]: r[1:] for r in survival_rows(rows)}
    assert table["单事实 single"] == [2, 2, 2, 1, 0, "100%"]
    assert table["两问 two-part"] == [1, 0, 0, 0, 0, "–"]
    assert table["无答案 negative"] == [1, 1, 0, 0, 1, "0%"]
    assert table["合计 all"] == [4, 3, 2, 1, 1, "67%"]
    assert "2/3/4" in survival_line(rows) and "单事实 2/2/2" in survival_line(rows)
    assert list_rows(rows)[1][2] == "✓ 接受 accepted（已改 edited）"

    saved = accepted_rows(rows)
    assert [r["id"] for r in saved] == ["gen-s001", "gen-s002"]
    assert all(r["status"] == "accepted" and "original" not in r for r in saved)
    kept, dropped = drop_documents(rows, {TEA})
    assert dropped == 2 and [r["id"] for r in kept] == ["gen-s001", "gen-n001"]  # s002 and the pair quote TEA


def test_eval_loader_refuses_unreviewed_drafts(tmp_path):
    rows = rows_fixture()
    path = write_rows(tmp_path / "drafts.jsonl", rows)
    with pytest.raises(UnreviewedDrafts, match="4 条 status=draft"):
        load_questions(path)
    set_status(rows, "gen-s001", "accepted")
    set_status(rows, "gen-t001", "rejected")
    write_rows(path, rows)
    with pytest.raises(UnreviewedDrafts, match=r"2 条 status=draft.*1 条 status=rejected"):
        load_questions(path)
    write_rows(path, accepted_rows(rows))
    assert [q.id for q in load_questions(path)] == ["gen-s001"]
    plain = tmp_path / "plain.jsonl"  # sets without a status (hand-written, feedback export) load as before
    plain.write_text(json.dumps({"id": "a", "question": "甲？", "answers": ["乙"]}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert [q.id for q in load_questions(plain)] == ["a"]


# ============================================================================ on the real app and KB
def kb_drafts(app, tmp_path) -> Path:
    """A drafts file like ``rag eval-gen`` writes for the UI test KB: real chunk ids, the writers of
    ``rag.eval_gen`` and ``rag.eval_drafts``; one draft with a wrong answer (to be rejected or fixed)."""
    with closing(KnowledgeBase(app.service.home / KB)) as store:
        passages = sample_passages(store, random.Random(0))

    def chunk(doc: str, quote: str) -> int:
        return next(p.chunk_id for p in passages if p.doc_id == doc and quote in p.text)

    s1 = Draft("gen-s001", "single", "青石市建成了多少座公交充电站？", ["58座"], ["青石市建成公交充电站58座"], [BUS],
               sources=[chunk(BUS, "充电站58座")])
    s2 = Draft("gen-s002", "single", "白岭村茶叶合作社成立于哪一年？", ["2016年"], ["白岭村茶叶合作社成立于2016年"], [TEA],
               sources=[chunk(TEA, "成立于2016年")])
    s3 = Draft("gen-s003", "single", "城市图书馆每周几闭馆？", ["周二"], ["城市图书馆每周二至周日开放"], [LIB],
               sources=[chunk(LIB, "每周一闭馆")])
    neg = Draft("gen-n001", "negative", "孝感市建成了多少座公交充电站？", sources=list(s1.sources),
                note="青石市→孝感市 (gen-s001)", source_docs=[BUS])
    return write_rows(tmp_path / "eval-gen-测试库.jsonl", as_rows([s1, s2, s3, combine_two(s1, s2, "gen-t001"), neg]))


def test_load_review_save_and_run(ui_app, tmp_path, toasts):
    app, _ = ui_app
    review = app.eval_panel.review
    path = kb_drafts(app, tmp_path)

    # Unreviewed drafts never run: the 评测 tab refuses the raw file with the reason.
    with pytest.raises(gr.Error, match="问题文件有误.*未审核"):
        app.eval_panel.run(str(path), "current", KB, None, True, "hybrid", 3, 0, "extractive", "", "", "")

    view = review.load_file(KB, str(path))
    assert "已载入 5 条草稿" in view[STATUS] and "0/0/5" in view[STATUS]
    assert [r[0] for r in view[LISTING]] == ["gen-s001", "gen-s002", "gen-s003", "gen-t001", "gen-n001"]
    assert view[CURRENT] == "gen-s001" and view[QUESTION] == "青石市建成了多少座公交充电站？"
    assert view[ANSWERS] == "58座" and view[QUOTES] == "青石市建成公交充电站58座"
    html = view[HTML]
    assert '<mark class="quote">青石市建成公交充电站58座</mark>' in html  # the quote marked in its passage
    assert "3200辆" in html and BUS in html and "单事实 single" in html  # the rest of the source chunk

    view = review.decide(KB, "gen-s001", "accepted")
    assert view[CURRENT] == "gen-s002" and "已接受 gen-s001" in view[STATUS]  # moved on to the next draft
    view = review.decide(KB, "gen-s002", "accepted")
    # The wrong draft: fixed in the edit boxes (answer and quote from the document), then accepted.
    with pytest.raises(gr.Error, match="引文不在原文中"):
        review.edit(KB, "gen-s003", "城市图书馆每周哪一天闭馆？", "每周一", "城市图书馆每周一休息")
    view = review.edit(KB, "gen-s003", "城市图书馆每周哪一天闭馆？", "每周一", "城市图书馆每周一闭馆")
    assert "已修改并接受 gen-s003" in view[STATUS] and view[CURRENT] == "gen-t001"
    html = view[HTML]  # the two-part draft: both quotes marked, each in its own passage
    assert html.count('<mark class="quote">') >= 4 and BUS in html and TEA in html
    view = review.step(KB, "gen-t001", 1)
    assert view[CURRENT] == "gen-n001" and view[ANSWERS] == "" and view[QUOTES] == ""
    assert "无答案题" in view[HTML] and "孝感市" in view[HTML] and "知识库中出现 0 次" in view[HTML]
    assert '<mark class="quote">青石市</mark>' in view[HTML]  # the place it replaced, in the source passage
    review.decide(KB, "gen-n001", "rejected")

    # Everything is on disk: a fresh handler (another session, a reloaded page) sees the same review.
    fresh = ReviewHandlers(app.service, app.eval_panel.export_dir)
    view = fresh.open(KB, None)
    assert view[CURRENT] == "gen-t001"  # the one draft still to review
    table = {r[0]: r[1:] for r in view[SURVIVAL]}
    assert table["单事实 single"] == [3, 3, 3, 1, 0, "100%"] and table["无答案 negative"] == [1, 1, 0, 0, 1, "0%"]
    assert table["合计 all"] == [5, 4, 3, 1, 1, "75%"]
    stored = {r["id"]: r for r in read_rows(drafts_file(app.service.home / KB))}
    assert stored["gen-s003"]["answers"] == ["每周一"] and stored["gen-s003"]["original"]["answers"] == ["周二"]
    assert stored["gen-t001"]["status"] == "draft"

    # The review file itself still holds a draft and a rejection: refused as an eval set.
    with pytest.raises(UnreviewedDrafts):
        load_questions(drafts_file(app.service.home / KB))
    served, source, eval_status, status, _tabs = review.save_accepted(KB)
    assert source == "current" and "已保存 3 条" in eval_status and "还有 1 条待审" in eval_status
    assert ("info", "已保存 3 条已接受的题目 / accepted set saved") in toasts
    saved = read_rows(accepted_file(app.service.home / KB))
    assert [r["id"] for r in saved] == ["gen-s001", "gen-s002", "gen-s003"]
    assert all(r["status"] == "accepted" for r in saved)
    assert Path(served).read_text(encoding="utf-8") == accepted_file(app.service.home / KB).read_text(encoding="utf-8")

    # …and the 评测 tab runs it right away: every accepted quote is retrieved.
    status, metrics, *_ = app.eval_panel.run(served, source, KB, None, True, "hybrid", 3, 0, "extractive", "", "", "")
    assert "评测完成：3 个问题" in status
    assert ["前 1 段命中率 · hit@1", "1.000"] in metrics


def test_bad_drafts_file_and_unknown_documents(ui_app, tmp_path):
    app, _ = ui_app
    review = app.eval_panel.review
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "甲？", "status": "maybe"}\n', encoding="utf-8")
    with pytest.raises(gr.Error, match="草稿文件有误"):
        review.load_file(KB, str(bad))
    with pytest.raises(gr.Error, match="知识库不存在"):
        review.load_file("没有这个库", str(bad))
    other = write_rows(tmp_path / "other.jsonl", as_rows([Draft("gen-s001", "single", "甲市有几座桥？", ["3座"], ["甲市有3座桥"],
                                                             ["别的库/甲.txt"], sources=[999_999])]))
    view = review.load_file(KB, str(other))
    assert "不在知识库" in view[STATUS]  # drafts of another KB: said so, still reviewable
    assert "找不到这段原文" in view[HTML]


def test_generate_with_the_local_model(ui_app):
    """Drafting from the UI: the real local model, a progress callback, the KB's drafts replaced."""
    app, _ = ui_app
    review = app.eval_panel.review
    ticks = []

    def progress(value, desc=None, **_):
        ticks.append((value, desc))

    started = time.perf_counter()
    try:
        view = review.generate(KB, 1, 3, None, progress=progress, max_calls=3)
    except gr.Error as exc:  # the model wrote nothing that passed the checks in 3 calls
        assert "没有写出合格的草稿" in str(exc)
        pytest.skip(f"no draft passed in 3 calls: {exc}")
    print(f"generate: {time.perf_counter() - started:.1f}s", view[STATUS])
    assert "已生成" in view[STATUS] and "LLM calls" in view[STATUS]
    assert any(desc and "LLM 调用" in desc for _, desc in ticks) and all(0 <= v < 1 for v, _ in ticks)
    rows = read_rows(drafts_file(app.service.home / KB))
    assert rows and all(r["status"] == "draft" for r in rows) and view[CURRENT] == rows[0]["id"]
    if rows[0].get("gold_quotes"):
        assert '<mark class="quote">' in view[HTML]


def test_deleting_a_document_drops_its_drafts(ui_app, tmp_path):
    app, _ = ui_app
    upload = tmp_path / UI_UPLOAD_NAME
    upload.write_text(UI_UPLOAD_TEXT, encoding="utf-8")
    report = app.service.ingest(KB, [upload], progress=False)
    assert report.ok, report.summary()
    doc = UI_UPLOAD_NAME
    volcano = Draft("gen-s001", "single", "青岚火山观测站建于哪一年？", ["1998年"], ["建于1998年"], [doc], sources=[])
    bus = Draft("gen-s002", "single", "青石市建成了多少座公交充电站？", ["58座"], ["青石市建成公交充电站58座"], [BUS],
                sources=[])
    path = write_rows(tmp_path / "d.jsonl", as_rows([volcano, bus, Draft("gen-n001", "negative", "丽水的火山观测站建于哪一年？",
                                                                            source_docs=[doc])]))
    review = app.eval_panel.review
    review.load_file(KB, str(path))
    review.decide(KB, "gen-s001", "accepted")
    review.decide(KB, "gen-s002", "accepted")
    review.save_accepted(KB)

    _, _, _, status = app.kb_panel.delete(KB, [doc])
    assert "eval-drafts.jsonl（2 条题目 questions）" in status and "eval-accepted.jsonl（1 条题目 questions）" in status
    assert [r["id"] for r in read_rows(drafts_file(app.service.home / KB))] == ["gen-s002"]
    assert [r["id"] for r in read_rows(accepted_file(app.service.home / KB))] == ["gen-s002"]
    assert "青岚" not in drafts_file(app.service.home / KB).read_text(encoding="utf-8")


# ============================================================================ in a real browser
CHROMIUM = Path("/usr/bin/chromium")


def test_review_in_the_browser(ui_app, tmp_path):
    """Load a drafts file, accept one, reload the page: the decision is still there; save → 评测."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    expect = playwright_api.expect
    if not CHROMIUM.exists():
        pytest.skip("!!! BROWSER TEST NOT RUN: /usr/bin/chromium is missing (run `make browser`)")
    app, url = ui_app
    path = kb_drafts(app, tmp_path)
    artifacts = PROJECT_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="zh-CN").new_page()
            page.set_default_timeout(30_000)

            def open_review():
                page.goto(url)
                page.wait_for_selector("#rag-question textarea")
                page.get_by_role("tab", name="评测").click()
                page.get_by_role("tab", name="审核草稿 review").click()

            open_review()
            page.set_input_files("#rag-review-file input[type=file]", str(path))
            expect(page.locator("#rag-review-file")).to_contain_text("eval-gen")
            page.click("#rag-review-load")
            expect(page.locator("#rag-review-status")).to_contain_text("已载入 5 条草稿")
            expect(page.locator("#rag-review-draft mark.quote").first).to_contain_text("青石市建成公交充电站58座")
            page.click("#rag-review-accept")
            expect(page.locator("#rag-review-draft")).to_contain_text("gen-s002")
            expect(page.locator("#rag-review-survival")).to_contain_text("100%")
            page.screenshot(path=str(artifacts / "ui-review.png"), full_page=True)

            open_review()  # a reload: the review comes back from disk
            expect(page.locator("#rag-review-list")).to_contain_text("✓ 接受 accepted")
            expect(page.locator("#rag-review-draft")).to_contain_text("gen-s002")
            page.click("#rag-review-save")
            expect(page.locator("#rag-eval-status")).to_contain_text("已保存 1 条已接受的题目")
            expect(page.locator("#rag-eval-questions")).to_contain_text("reviewed-questions")
        finally:
            browser.close()
