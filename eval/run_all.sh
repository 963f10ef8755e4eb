#!/usr/bin/env bash
# `make eval`: rag eval on every shared set and on the project's own sets in eval/sets/
# (hybrid retrieval; answers too when EVAL_LLM is set, e.g. EVAL_LLM=local make eval: then
# cmrc2018, drcd and rgb_zh run their first 100 questions, ~1 hour with the local model).
# Evaluation KBs are built once under index/ (eval-<set>-<hash8>) and reused; runs go to
# eval/runs/<set>-<mode>/ and resume when interrupted. Exits non-zero when a set falls below
# its floor (the measured numbers in eval/README.md, minus a small margin). With answers,
# the answer metrics of every set are printed side by side at the end (rag eval --table).
set -u
cd "$(dirname "$0")/.."
RAG=${RAG:-.venv/bin/rag}
SHARED=${SHARED:-../shared}
MODE=${EVAL_MODE:-hybrid}
ANSWERS=(--retrieval-only)
[ -n "${EVAL_LLM:-}" ] && ANSWERS=(--llm "$EVAL_LLM")
status=0
runs=()

run() {  # name questions corpus [answers-limit=N] floors...
  local name=$1 questions=$2 corpus=$3
  shift 3
  local extra=()
  for f in "$@"; do
    case $f in
      answers-limit=*) [ -n "${EVAL_LLM:-}" ] && extra+=(--limit "${f#answers-limit=}") ;;
      answer.*) [ -n "${EVAL_LLM:-}" ] && extra+=(--fail-under "$f") ;;
      *) extra+=(--fail-under "$f") ;;
    esac
  done
  echo "== $name"
  if [ ! -f "$questions" ]; then echo "   skipped: $questions not found"; return; fi
  "$RAG" eval "$questions" --corpus "$corpus" --mode "$MODE" --out "eval/runs/$name-$MODE" \
    "${ANSWERS[@]}" "${extra[@]}" ${EVAL_ARGS:-} || status=1
  runs+=("eval/runs/$name-$MODE")
}

# rgb_zh_neg without the questions hand-checked as still answerable (eval/sets/rgb_zh_neg_excluded.txt)
NEG=eval/runs/rgb_zh_neg-checked.jsonl
if [ -f "$SHARED/evaldata/rgb_zh_neg/questions.jsonl" ]; then
  mkdir -p eval/runs
  grep -v -F -f <(grep -o '^rgbzh-q[0-9]*-neg' eval/sets/rgb_zh_neg_excluded.txt | sed 's/.*/"&"/') \
    "$SHARED/evaldata/rgb_zh_neg/questions.jsonl" > "$NEG"
fi

run seeds        "$SHARED/corpus/seeds_eval/dev.jsonl"        "$SHARED/corpus/seeds"                 hit@5=1.0 answer.refusal_rate=0.9
run seeds_conf   eval/sets/seeds_confusable.jsonl             "$SHARED/corpus/seeds"                 answer.refusal_rate=0.9
run seeds_fu     eval/sets/seeds_followups.jsonl              "$SHARED/corpus/seeds"                 answer.refusal_rate=0.9
run seeds_twopart eval/sets/seeds_twopart.jsonl               "$SHARED/corpus/seeds"                 hit@5=1.0 all_groups@10=1.0
run rgb_zh_neg   "$NEG"                                       "$SHARED/evaldata/rgb_zh_neg/corpus.jsonl" answer.refusal_rate=0.9
run cmrc2018     "$SHARED/evaldata/cmrc2018/questions.jsonl"  "$SHARED/evaldata/cmrc2018/corpus.jsonl"   hit@1=0.94 answers-limit=100
run drcd         "$SHARED/evaldata/drcd/questions.jsonl"      "$SHARED/evaldata/drcd/corpus.jsonl"       hit@1=0.92 answers-limit=100
run rgb_zh       "$SHARED/evaldata/rgb_zh/questions.jsonl"    "$SHARED/evaldata/rgb_zh/corpus.jsonl"     hit@1=0.77 hit@5=0.98 answers-limit=100
run rgb_zh_int   "$SHARED/evaldata/rgb_zh_int/questions.jsonl" "$SHARED/evaldata/rgb_zh_int/corpus.jsonl" recall@10=0.27
if [ -n "${EVAL_LLM:-}" ] && [ ${#runs[@]} -gt 0 ]; then
  echo; "$RAG" eval --table "${runs[@]}"
fi
exit $status
