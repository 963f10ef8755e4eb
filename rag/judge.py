"""Step 8b — judge: the LLM's own yes/no on whether its answer is backed by the passages.

The verifier (``rag.cite`` + ``rag.align``) checks words, numbers and the question's
frame. The judge adds the model's reading: after its answer, the same conversation gets
one more user turn (``prompts/judge.txt``: is the answer stated by the passages, about
the very place, time and thing asked?) and the probability of 「是」 against 「否」 is read
from the next-token distribution — one forward pass over ~60 new tokens, since
llama.cpp reuses the KV cache of the answer. OpenAI-compatible servers are asked for
``logprobs`` of a one-token reply; a server without them gives no judgement (None).
"""
from __future__ import annotations

import math

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

YES, NO = "是", "否"


def support_probability(model, messages: list[BaseMessage], answer: str, prompt: str) -> float | None:
    """P(是) / (P(是) + P(否)) for the judge question after ``answer``; None when the backend
    cannot say (no logprobs).

    Args:
        model: the chat model that answered (``LlamaCppChat`` or ``ChatOpenAI``).
        messages: the answer prompt (system + passages + question).
        answer: the model's answer text.
        prompt: the judge question (``prompts/judge.txt``).
    """
    conversation = [*messages, AIMessage(content=answer), HumanMessage(content=prompt)]
    if hasattr(model, "next_token_probabilities"):
        return model.next_token_probabilities(conversation, [YES, NO])[YES]
    try:
        reply = model.bind(logprobs=True, top_logprobs=10, max_tokens=1).invoke(conversation)
        top = reply.response_metadata["logprobs"]["content"][0]["top_logprobs"]
    except Exception:  # the server does not return logprobs
        return None
    p = {YES: 0.0, NO: 0.0}
    for entry in top:
        token = str(entry.get("token", "")).strip()
        if token in p:
            p[token] += math.exp(entry["logprob"])
    total = p[YES] + p[NO]
    return p[YES] / total if total else None
