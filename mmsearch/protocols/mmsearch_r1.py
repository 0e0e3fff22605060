"""`mmsearch_r1`: the protocol of MMSearch-R1 (Wu et al., 2025), so its released checkpoints run as trained.

From EvolvingLMMs-Lab/multimodal-search-r1 at 583c6b4 (the training rollout's wording, which its demo
script departs from): no system prompt; the first user turn is `round_1_user_prompt_qwenvl` with the
image at its end and the question after it; reasoning in `<reason>…</reason>`; the turn ends with one
action, `<search><img></search>` (image search on the whole question image: no crop),
`<text_search>query</text_search>`, or `<answer>…</answer>` (`vllm_rollout_spmd.py`, the search tag
must end the turn). Results come back as a user turn: `Searched results: <information>…</information>`,
the original question, and the after-image-search or after-text-search prompt.

What differs from the paper: its tools (Google Lens and Google Search with summaries through
SerpAPI and JINA) are not released; here the same actions call this stack's image_search and
text_search, whose results are written in its own layout (thumbnails after the titles, when
`tools.image_thumbnails` is on, instead of interleaved). MMSearch-R1 takes any turn without a search
tag as final; here, as for every protocol, a turn without an action is an error the policy reads
(`agent.max_invalid_streak=1` ends the trajectory there instead).
"""

from __future__ import annotations

import re

from mmsearch.protocols.base import Action, Protocol, ProtocolError, thinking_before

FIRST_PROMPT = (
    "Answer the user's question based on the provided image. Examine the image carefully and identify any "
    "recognizable entities, such as faces, objects, locations, events, logos, or text. Determine whether you have "
    "sufficient knowledge to confidently recognize the main visual element and answer the user's question. If so, "
    "first explain your reasoning, then provide a clear and direct answer.\nIf you are unable to confidently identify "
    "the visual element, stop and invoke the image search tool by appending the string <search><img></search> at the "
    "end of your response. This will trigger a Google Lens search using the original image to retrieve relevant "
    "information that can help you confirm the visual content.\nOnce you have sufficient visual understanding, "
    "combine it with the user's question and assess whether you can confidently answer. If so, answer the question "
    "directly using your own knowledge. If not, invoke the text search tool by generating a concise and specific "
    "query, and output it in the format <text_search>your query here</text_search> at the end of your response. "
    "Carefully craft your query to accurately retrieve the information needed to help answer the question. The text "
    "search tool will then use Google Search to return relevant information based on your query.\nYou must include "
    "your reasoning inside <reason>...</reason> before taking any action, whether it is calling the image search "
    "tool, generating a text search query, or providing a final answer. The reasoning may involve analysis of the "
    "original image and question, interpretation of search results, or logical steps leading to the final answer.\n"
    "All search results will be placed inside <information> and </information> and returned to you. When you are "
    "ready to answer the question, wrap your final answer between <answer> and </answer>, without detailed "
    "illustrations. For example: <answer>Titanic</answer>.\nHere is the image and the question:\n"
)
AFTER_IMAGE_SEARCH = (
    "Please extract the visual element relevant to the user's question (such as faces, objects, locations, events, "
    "logos, or text) from the search results. Then, combine this information with the user's question and perform "
    "reasoning to determine whether a Google text search is needed to retrieve additional information to answer the "
    "question.\nIf a text search is needed, output the string <text_search>your query here</text_search> at the end "
    "of your response. Please generate a well-crafted query based on the visual element that will help retrieve the "
    "most relevant information.\nIf a text search is not needed, use your own knowledge to directly answer the user's "
    "question.\nYou must conduct your reasoning inside <reason> and </reason> before taking any action, whether it's "
    "generating a text search query or providing a final answer. If you decide to give the final answer, place it "
    "inside <answer> and </answer>, without detailed explanation or illustration.\nFor example: "
    "<answer>Titanic</answer>"
)
AFTER_TEXT_SEARCH = (
    "Please analyze the search results and the user's question and continue reasoning inside <reason> and </reason>."
    "\nIf you determine that additional knowledge is still required to answer the user's question, stop responding to "
    "the question and instead report a warning by outputting the string 'Unable to answer due to lack of relevant "
    "information' at the end of your response.\nIf no further external information is needed, you should provide the "
    "final answer by placing it within <answer> and </answer>. The answer must be concise, clear, and to the point, "
    "without any additional explanation or elaboration."
)
RESULT_HEADERS = {
    "image_search": ("[Image Search Results] The result of the image search consists of web page information related "
                     "to the image from the user's original question. Each result includes the main image from the web "
                     "page and its title, ranked in descending order of search relevance, as demonstrated below:\n"),
    "text_search": ("[Text Search Results] Below are the text summaries of the most relevant webpages related to your "
                    "query, ranked in descending order of relevance:\n"),
}
IMAGE_SEARCH = "<search><img></search>"
REASON = ("<reason>", "</reason>")
_TEXT_SEARCH = re.compile(r"<text_search>(.*?)</text_search>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class MMSearchR1(Protocol):
    name = "mmsearch_r1"
    tools = ("image_search", "text_search")
    passage_format = "{rank}. ({title}) {text}\n"

    def user_content(self, question: str, n_images: int) -> list[dict]:
        images = [{"type": "image", "image": i} for i in range(n_images)]
        return [{"type": "text", "text": FIRST_PROMPT}, *images, {"type": "text", "text": " " + question}]

    def parse(self, text: str) -> Action:
        body = text.rstrip()
        if body.endswith(IMAGE_SEARCH):
            thinking, has_think = thinking_before(body, len(body) - len(IMAGE_SEARCH), REASON)
            return Action("tool_call", thinking=thinking, name="image_search", arguments={"image": 0}, has_think=has_think)
        queries = list(_TEXT_SEARCH.finditer(body))
        if queries and queries[-1].end() == len(body):
            thinking, has_think = thinking_before(body, queries[-1].start(), REASON)
            return Action("tool_call", thinking=thinking, name="text_search",
                          arguments={"query": queries[-1].group(1).strip()}, has_think=has_think)
        answers = list(_ANSWER.finditer(body))
        if answers and answers[-1].group(1).strip():
            thinking, has_think = thinking_before(body, answers[-1].start(), REASON)
            return Action("answer", thinking=thinking, answer=answers[-1].group(1).strip(), has_think=has_think)
        thinking, has_think = thinking_before(body, len(body), REASON)
        return Action("invalid", thinking=thinking, has_think=has_think,
                      error=f"end the turn with {IMAGE_SEARCH}, <text_search>query</text_search> or <answer>answer</answer>")

    def format_action(self, action: Action) -> str:
        reason = f"<reason>{action.thinking}</reason>\n"
        if action.kind == "answer":
            return f"{reason}<answer>{action.answer}</answer>"
        if action.name == "image_search":
            if action.arguments.get("image", 0) != 0:
                raise ProtocolError(f"{self.name} searches the question's whole image, not image {action.arguments['image']}")
            return reason + IMAGE_SEARCH
        return f"{reason}<text_search>{action.arguments['query']}</text_search>"

    def wrap_result(self, tool: str | None, messages: list[dict]) -> tuple[str, str]:
        if tool is None:
            return "", ""
        question = _question(messages)
        after = AFTER_IMAGE_SEARCH if tool == "image_search" else AFTER_TEXT_SEARCH
        return (f"Searched results: <information>{RESULT_HEADERS.get(tool, '')}",
                f"</information>\nOriginal user's question: {question}\n{after}")

    def invalid_feedback(self, error: str) -> str:
        return f"Your previous response has no action: {error}."


def _question(messages: list[dict]) -> str:
    """The question, recovered from the first user turn (its last text part), as MMSearch-R1 restates it."""
    user = next(m for m in messages if m["role"] == "user")
    texts = [p["text"] for p in user["content"] if p["type"] == "text"] if not isinstance(user["content"], str) else [user["content"]]
    return texts[-1].strip()
