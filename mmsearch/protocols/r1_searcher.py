"""`r1_searcher`: the protocol of R1-Searcher (Song et al., 2025), so its released checkpoints run as trained.

From RUCAIBox/R1-Searcher at 631167c, the instruct variant (its Llama-3.1-8B-Instruct stages pass
`--apply_chat_template`): the system prompt of `OpenRLHF-RAG/openrlhf/datasets/prompts_dataset.py`, the
bare question as the user turn, and the prompt ending in `<think>` after the assistant's header. The
policy searches inside its thinking with `<|begin_of_query|> keywords <|end_of_query|>` (plain text,
not special tokens); generation stops there, and the documents are written into the same assistant
message as `\n\n<|begin_of_documents|>\n(1)…\n(2)…\n<|end_of_documents|>\n\n`
(`experience_maker.py`, `_generate_vllm_with_retrieve`; top-k 3 in training, 5 in its eval). The
answer is the last `<answer> … </answer>`; its eval also stops at `</answer>`.

R1-Searcher ends a trajectory at an invalid action; here, as for every protocol, the policy reads an
error instead (`agent.max_invalid_streak=1` ends it at the first one, as the paper does). Queries are
cleaned as its training does: double quotes dropped, whitespace collapsed.
"""

from __future__ import annotations

import re

from mmsearch.protocols.base import Action, Protocol, answer_action, thinking_before

SYSTEM = (
    "You are a helpful assistant.\nGiven a question, you should answer it by first thinking about the reasoning "
    "process in the mind and then providing the final answer.\nThe output format of reasoning process and final "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., \"<think> "
    "reasoning process here </think>\n\n<answer> final answer here </answer>\".\nDuring the thinking process, "
    "**you can perform searching for uncertain knowledge** if necessary with the format of \"<|begin_of_query|> "
    "search query (only list keywords, such as **\"keyword_1 keyword_2 ...\"**)<|end_of_query|>\". **A query must "
    "involve only a single triple**.\nThen, the search system will provide you with the retrieval information with "
    "the format of \"<|begin_of_documents|> ...search results... <|end_of_documents|>\"."
)
QUERY_OPEN, QUERY_CLOSE = "<|begin_of_query|>", "<|end_of_query|>"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class R1Searcher(Protocol):
    name = "r1_searcher"
    tools = ("text_search",)
    inline = True
    stop_strings = (QUERY_CLOSE, "</answer>")
    generation_prefix = "<think>"
    passage_format = "({rank})Title: {title} Text: {text}\n"

    def system_prompt(self, tool_schemas: list[dict]) -> str | None:
        return SYSTEM

    def parse(self, text: str) -> Action:
        answers = list(_ANSWER.finditer(text))
        end = text.rfind(QUERY_CLOSE)
        if end >= 0 and text[end + len(QUERY_CLOSE):].strip() == "" and not answers:
            start = text.rfind(QUERY_OPEN, 0, end)
            thinking, has_think = thinking_before(text, max(start, 0))
            if start < 0:
                return Action("invalid", thinking=thinking, has_think=has_think, error=f"{QUERY_CLOSE} without {QUERY_OPEN}")
            query = " ".join(text[start + len(QUERY_OPEN):end].replace('"', "").split())
            return Action("tool_call", thinking=thinking, name="text_search", arguments={"query": query}, has_think=has_think)
        if answers:
            return answer_action(answers[-1].group(1).strip(), *thinking_before(text, answers[-1].start()))
        thinking, has_think = thinking_before(text, len(text))
        return Action("invalid", thinking=thinking, has_think=has_think,
                      error=f"no {QUERY_OPEN} query {QUERY_CLOSE} or <answer> answer </answer>")

    def format_action(self, action: Action) -> str:
        # The prompt opened <think>: a query is written inside it, the answer after closing it.
        thinking = f" {action.thinking}" if action.thinking else ""
        if action.kind == "answer":
            return f"{thinking} </think>\n\n<answer> {action.answer} </answer>"
        return f"{thinking} {QUERY_OPEN} {action.arguments['query']} {QUERY_CLOSE}"

    def wrap_result(self, tool: str | None, messages: list[dict]) -> tuple[str, str]:
        return ("\n\n<|begin_of_documents|>\n", "\n<|end_of_documents|>\n\n") if tool is not None else ("", "")

    def invalid_feedback(self, error: str) -> str:
        return (f"\nMy previous action is invalid ({error}). To search, I write {QUERY_OPEN} keywords {QUERY_CLOSE}; "
                "to answer, I write </think> and then <answer> answer </answer>.\n")
