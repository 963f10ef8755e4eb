"""The web UI in a real headless Chromium: streamed answers, clickable citations, the
citation side panel, refusals, upload → ask → delete, retrieval details and export.

Needs Debian's chromium (``make browser`` installs it); skipped loudly without it.
Screenshots go to test-artifacts/ (git-ignored).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, UI_UPLOAD_NAME, UI_UPLOAD_TEXT

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

# Gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
BOT = '#rag-chat [data-testid="bot"]'


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("!!! BROWSER TEST NOT RUN: /usr/bin/chromium is missing "
                    "(run `make browser` or apt-get install chromium fonts-wqy-microhei)")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, ui_app):
    _, url = ui_app
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="zh-CN", accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#rag-question textarea")
    yield page
    context.close()


def ask(page, question: str):
    """Send a question and wait for the finished (no longer streaming) answer; returns a
    locator of that answer (by position, so it stays valid after later questions).

    Also records whether an in-progress frame was ever rendered, to prove the answer streamed.
    """
    page.evaluate("""() => {
        window.__sawStreaming = false;
        const seen = () => { if (document.querySelector('#rag-chat .answer.streaming')) window.__sawStreaming = true; };
        new MutationObserver(seen).observe(document.body, {childList: true, subtree: true});
    }""")
    before = page.locator(BOT).count()
    page.fill("#rag-question textarea", question)
    page.press("#rag-question textarea", "Enter")
    page.wait_for_function(
        f"""() => document.querySelectorAll('{BOT}').length > {before}
                 && !document.querySelector('#rag-chat .answer.streaming')""")
    return page.locator(BOT).nth(before)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_streamed_answer_with_clickable_citation(page):
    answer = ask(page, "青石市共有多少辆新能源公交车？")
    expect(answer).to_contain_text("3200辆")
    assert page.evaluate("window.__sawStreaming"), "no streaming frame was rendered before the answer"

    answer.locator("a.cite").first.click()  # the [1] chip inside the sentence
    quote = page.locator("#rag-citation mark.quote").first
    expect(quote).to_contain_text("3200辆")
    panel = page.locator("#rag-citation")
    expect(panel).to_contain_text("新能源公交发展报告.txt")
    expect(panel.locator(".context")).to_contain_text("充电站58座")  # neighbouring text
    shot(page, "ui-01-citation-panel.png")

    page.click("#rag-open-full")
    focus = page.locator("#rag-fulldoc .rag-focus")
    expect(focus).to_contain_text("3200辆")
    expect(focus).to_be_in_viewport()
    shot(page, "ui-02-full-document.png")

    # A source in the list under the answer opens the panel too, with the section.
    answer = ask(page, "持有读者证每次最多可以借阅多少册图书？")
    expect(answer).to_contain_text("十五册")
    answer.locator("a.source").first.click()
    expect(page.locator("#rag-citation")).to_contain_text("借阅规则")
    expect(page.locator("#rag-citation mark.quote").first).to_contain_text("十五册")


def test_refusal_offers_closest_passages(page):
    answer = ask(page, "量子计算机最早是谁发明的？")
    expect(answer.locator(".refusal")).to_contain_text("文档中没有找到相关信息")
    closest = answer.locator(".closest a.source")
    assert closest.count() >= 1
    closest.first.click()
    expect(page.locator("#rag-citation mark.passage-only")).to_be_visible()
    shot(page, "ui-03-refusal.png")


def test_upload_ask_delete(page, tmp_path):
    page.get_by_role("tab", name="知识库").click()
    bad = tmp_path / "程序.exe"
    bad.write_bytes(b"MZ\x00\x00 not a document")
    page.set_input_files("#rag-upload input[type=file]", str(bad))
    expect(page.locator(".toast-body").last).to_contain_text("程序.exe")  # refused with the file named

    good = tmp_path / UI_UPLOAD_NAME
    good.write_text(UI_UPLOAD_TEXT, encoding="utf-8")
    page.set_input_files("#rag-upload input[type=file]", str(good))
    # staged: the file list shows its name (Gradio may render stem and extension as separate elements)
    expect(page.locator("#rag-upload")).to_contain_text(Path(UI_UPLOAD_NAME).stem)
    page.click("#rag-ingest")
    expect(page.locator("#rag-kb-status")).to_contain_text("已导入 1 个文件", timeout=60_000)
    expect(page.locator("#rag-docs")).to_contain_text(UI_UPLOAD_NAME)
    shot(page, "ui-04-uploaded.png")

    page.get_by_role("tab", name="对话").click()
    answer = ask(page, "青岚火山观测站有几名值守人员？")
    expect(answer).to_contain_text("7名")
    answer.locator("a.cite").first.click()
    expect(page.locator("#rag-citation")).to_contain_text(UI_UPLOAD_NAME)
    old_chip = answer.locator("a.cite").first

    page.get_by_role("tab", name="知识库").click()
    page.click("#rag-delete-pick input")
    page.get_by_role("option", name=UI_UPLOAD_NAME).click()
    page.click("#rag-delete")
    expect(page.locator("#rag-kb-status")).to_contain_text("已删除 1 个文档")
    expect(page.locator("#rag-docs")).not_to_contain_text(UI_UPLOAD_NAME)

    page.get_by_role("tab", name="对话").click()
    answer = ask(page, "青岚火山观测站有几名值守人员？")
    expect(answer).not_to_contain_text("7名")
    expect(answer).not_to_contain_text("青岚火山观测站简介")  # not even among the closest passages
    old_chip.click()  # the earlier citation now says its document is gone
    expect(page.locator("#rag-citation")).to_contain_text("已从知识库删除")
    shot(page, "ui-05-after-delete.png")


def test_retrieval_details_and_markdown_export(page):
    page.get_by_role("tab", name="设置").click()
    page.check("#rag-show-details input")
    page.get_by_role("tab", name="对话").click()
    ask(page, "白岭村茶叶合作社有多少户社员？")
    details = page.locator("#rag-details")
    expect(details).to_contain_text("检索用的问题")
    expect(details).to_contain_text("BM25")
    expect(details.locator("tbody tr").first).to_contain_text("#")  # ranks of both channels
    page.click("#rag-export")
    link = page.locator("#rag-export-file a").first
    with page.expect_download() as download:
        link.click()
    text = Path(download.value.path()).read_text(encoding="utf-8")
    assert "## 1. 白岭村茶叶合作社有多少户社员？" in text
    assert "186户" in text and "[1]" in text and "**来源**" in text
    shot(page, "ui-06-details-export.png")


def test_thumbs_down_with_a_correction_is_stored(page, ui_app):
    app, _ = ui_app
    before = len(app.service.feedback("测试库"))
    answer = ask(page, "城市图书馆每周几闭馆？")
    expect(answer).to_contain_text("每周一")
    # Gradio's own dislike button under the latest answer ("踩" in the zh-CN locale): stored at once.
    page.locator('#rag-chat button[aria-label="踩"]').last.click()
    expect(page.locator(".toast-body").last).to_contain_text("已记录反馈")
    page.locator("#rag-feedback").get_by_text("反馈 / feedback").click()  # open the accordion
    expect(page.locator("#rag-fb-target")).to_contain_text("城市图书馆每周几闭馆")
    expect(page.locator("#rag-fb-vote input[value=down]")).to_be_checked()
    page.fill("#rag-fb-comment textarea", "请写明闭馆原因")
    page.fill("#rag-fb-correction textarea", "城市图书馆每周一闭馆，用于设备维护和图书整理")
    page.click("#rag-fb-submit")
    expect(page.locator(".toast-body").last).to_contain_text("已记录反馈 / feedback saved")
    expect(page.locator("#rag-fb-correction textarea")).to_have_value("")
    shot(page, "ui-05-feedback.png")
    entries = app.service.feedback("测试库")
    assert len(entries) == before + 1  # the panel refined the entry the thumb stored
    assert (entries[-1].question, entries[-1].vote) == ("城市图书馆每周几闭馆？", -1)
    assert entries[-1].correction == "城市图书馆每周一闭馆，用于设备维护和图书整理"
    assert entries[-1].comment == "请写明闭馆原因" and entries[-1].citations


def test_two_kbs_in_one_question_and_a_metadata_filter(page, ui_app, tmp_path):
    """Last in the module: it adds a second KB to the shared app."""
    app, _ = ui_app
    docs = tmp_path / "第二库资料"
    docs.mkdir()
    (docs / "青石地铁建设.md").write_text(
        "---\ntitle: 青石市地铁建设进展\ndate: 2023-06-15\nsource: 青石日报\n---\n# 青石市地铁建设进展\n\n"
        "青石市已开通地铁线路5条，运营里程达到186公里。青石市地铁共有车站142座，其中换乘站18座。\n",
        encoding="utf-8")
    assert app.service.ingest("第二库", [docs], progress=False).ok
    page.reload()  # the multi-select offers the KBs there are when the page loads
    page.wait_for_selector("#rag-question textarea")
    page.click("#rag-search-kbs input")
    page.get_by_role("option", name="第二库").click()
    page.keyboard.press("Escape")
    answer = ask(page, "青石市共有多少辆新能源公交车？青石市开通了几条地铁线路？")
    expect(answer).to_contain_text("3200辆")
    expect(answer).to_contain_text("〔第二库〕《青石市地铁建设进展》")
    expect(answer).to_contain_text("检索了 2 个知识库：测试库、第二库")
    answer.locator("a.source", has_text="第二库").first.click()  # opens the document of ITS KB
    panel = page.locator("#rag-citation")
    expect(panel).to_contain_text("第二库")
    expect(panel.locator("mark.quote").first).to_contain_text("地铁线路5条")

    # A filter in the retrieval panel applies to the next question and is shown with its answer.
    page.locator("#rag-details-box").get_by_text("检索详情与过滤").click()
    page.fill("#rag-f-from textarea", "2023-01")
    page.fill("#rag-f-fields textarea", "source=青石日报")
    page.locator("#rag-f-fields textarea").blur()
    expect(page.locator("#rag-f-status")).to_contain_text("当前过滤（用于之后的提问）：2023-01-01 至 … · source=青石日报")
    answer = ask(page, "青石市开通了几条地铁线路？")
    expect(answer).to_contain_text("地铁线路5条")
    expect(answer).to_contain_text("过滤：2023-01-01 至 … · source=青石日报")
    ARTIFACTS.joinpath("ui-multi-kb.png").unlink(missing_ok=True)
    shot(page, "ui-multi-kb.png")

    page.fill("#rag-f-to textarea", "2023-13")  # a bad filter: its message, nothing answered
    answer = ask(page, "青石市开通了几条地铁线路？")
    expect(answer).to_contain_text("截止日期")
    page.click("#rag-f-clear")
    expect(page.locator("#rag-f-status")).to_contain_text("未设置过滤")
