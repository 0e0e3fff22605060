"""`search_r1`: the protocol of Search-R1 (Jin et al., 2025), so its released checkpoints run as trained.

From PeterGriffinJin/Search-R1 at a14dc3a: the user-turn prompt of `scripts/data_process/nq_search.py`
(no system prompt; the chat template adds its default one), `<search> query </search>` and
`<answer> … </answer>` parsed as `search_r1/llm_agent/generation.py` does (the first of either), results
written back into the same assistant message as `\n\n<information>…</information>\n\n` with each passage
`Doc i(Title: "T") text` (`_passages2string`, top-k 3 in its scripts), and its invalid-action message.

Search-R1 cuts each response after the first `</search>` or `</answer>` and re-tokenizes the kept
text; here generation stops at those strings and the generated tokens are kept as they are.
"""

from __future__ import annotations

import re

from mmsearch.protocols.base import Action, Protocol, answer_action, thinking_before

PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge needed, "
    "you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)
INVALID = ("\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
           "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
           "Let me try again.\n")
_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


class SearchR1(Protocol):
    name = "search_r1"
    tools = ("text_search",)
    inline = True
    stop_strings = ("</search>", "</answer>")
    passage_format = 'Doc {rank}(Title: "{title}") {text}\n'

    def user_content(self, question: str, n_images: int) -> list[dict]:
        question = question.strip()
        if not question.endswith("?"):  # as its data scripts prepare every question
            question += "?"
        return super().user_content(PROMPT.format(question=question), n_images)

    def parse(self, text: str) -> Action:
        match = _ACTION.search(text)
        if match is None:
            thinking, has_think = thinking_before(text, len(text))
            return Action("invalid", thinking=thinking, has_think=has_think,
                          error="no <search> query </search> or <answer> answer </answer>")
        thinking, has_think = thinking_before(text, match.start())
        inner = match.group(2).strip()
        if match.group(1) == "answer":
            return answer_action(inner, thinking, has_think)
        return Action("tool_call", thinking=thinking, name="text_search", arguments={"query": inner}, has_think=has_think)

    def format_action(self, action: Action) -> str:
        think = f"<think> {action.thinking} </think>\n" if action.thinking else ""
        if action.kind == "answer":
            return f"{think}<answer> {action.answer} </answer>"
        return f"{think}<search> {action.arguments['query']} </search>"

    def wrap_result(self, tool: str | None, messages: list[dict]) -> tuple[str, str]:
        return ("\n\n<information>", "</information>\n\n") if tool is not None else ("", "")

    def invalid_feedback(self, error: str) -> str:
        return INVALID
