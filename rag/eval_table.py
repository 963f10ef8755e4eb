"""Answer metrics of several ``rag eval`` runs side by side (``rag eval --table RUN_DIR ...``).

Trust needs both sides at once: refusals on the unanswerable sets and accuracy without
false refusals on the answerable ones. One table, one row per question set, read from
each run directory's ``report.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("answerable", lambda r: r["n"] - r["n_negative"]),
    ("unanswerable", lambda r: r["n_negative"]),
    ("accuracy", lambda r: r["answer"].get("accuracy")),
    ("refusal (unanswerable)", lambda r: r["answer"].get("refusal_rate")),
    ("false refusal", lambda r: r["answer"].get("false_refusal_rate")),
    ("citation precision", lambda r: r["answer"].get("citation_precision")),
    ("unsupported sentences", lambda r: r["answer"].get("unsupported_sentence_rate")),
    ("first token p50 ms", lambda r: r["answer"].get("first_token_p50_ms")),
]


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value <= 1.0:
        return f"{value:.3f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def answers_table(run_dirs: list[Path]) -> str:
    """A Markdown table of the answer metrics of each run (runs without answers are skipped).

    Args:
        run_dirs: ``rag eval`` run directories (or their ``report.json`` files).
    """
    lines = ["| set | " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for run in run_dirs:
        path = Path(run) / "report.json" if Path(run).is_dir() else Path(run)
        report = json.loads(path.read_text(encoding="utf-8"))
        if not report.get("answer"):
            continue
        name = path.parent.name
        lines.append(f"| {name} | " + " | ".join(_cell(get(report)) for _, get in COLUMNS) + " |")
    return "\n".join(lines)
