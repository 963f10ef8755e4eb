#!/usr/bin/env bash
# `make eval`: rag eval on every shared set (hybrid retrieval; answers too once rag.answer
# provides make_answer_fn and EVAL_LLM is set, e.g. EVAL_LLM=extractive make eval).
# Evaluation KBs are built once under index/ (eval-<set>-<hash8>) and reused; runs go to
# eval/runs/<set>/ and resume when interrupted. Exits non-zero when a set falls below
# its floor (the measured numbers in eval/README.md, minus a small margin).
set -u
cd "$(dirname "$0")/.."
RAG=${RAG:-.venv/bin/rag}
SHARED=${SHARED:-../shared}
MODE=${EVAL_MODE:-hybrid}
ANSWERS=(--retrieval-only)
[ -n "${EVAL_LLM:-}" ] && ANSWERS=(--llm "$EVAL_LLM")
status=0

run() {  # name questions corpus floors...
  local name=$1 questions=$2 corpus=$3
  shift 3
  local floors=()
  for f in "$@"; do floors+=(--fail-under "$f"); done
  echo "== $name"
  if [ ! -f "$questions" ]; then echo "   skipped: $questions not found"; return; fi
  "$RAG" eval "$questions" --corpus "$corpus" --mode "$MODE" --out "eval/runs/$name-$MODE" \
    "${ANSWERS[@]}" "${floors[@]}" ${EVAL_ARGS:-} || status=1
}

run seeds      "$SHARED/corpus/seeds_eval/dev.jsonl"        "$SHARED/corpus/seeds"                 hit@5=1.0
run cmrc2018   "$SHARED/evaldata/cmrc2018/questions.jsonl"  "$SHARED/evaldata/cmrc2018/corpus.jsonl"   hit@1=0.94
run drcd       "$SHARED/evaldata/drcd/questions.jsonl"      "$SHARED/evaldata/drcd/corpus.jsonl"       hit@1=0.92
run rgb_zh     "$SHARED/evaldata/rgb_zh/questions.jsonl"    "$SHARED/evaldata/rgb_zh/corpus.jsonl"     hit@1=0.77 hit@5=0.98
run rgb_zh_int "$SHARED/evaldata/rgb_zh_int/questions.jsonl" "$SHARED/evaldata/rgb_zh_int/corpus.jsonl" recall@10=0.27
exit $status
