"""Checks of DESIGN.md's trajectory invariants shared by the protocol and text-only policy tests."""

from __future__ import annotations

import re

from mmsearch.trajectory import assistant_turn_ids


def masked_runs(traj, value: int = 1) -> list[list[int]]:
    """The trajectory's runs of consecutive tokens whose loss mask is `value`, in order."""
    runs, current = [], []
    for token, m in zip(traj.token_ids, traj.loss_mask):
        if m == value:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def assert_token_exact(protocol, builder, turns, traj):
    """DESIGN.md invariants 1-3 for a rollout of scripted `turns` in `protocol` (also used for text-only policies)."""
    tok = builder.tokenizer
    # The loss mask is 1 exactly on what the policy wrote, turn by turn (inline queries end at their stop string).
    assert masked_runs(traj, 1) == [assistant_turn_ids(tok, t, builder.end_of_turn_id, protocol.stop_strings) for t in turns]
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs)
    rendered = builder.render(traj.messages, add_generation_prompt=False)
    if not protocol.inline:
        # Chat turns meet at special tokens: the ids are the template's rendering, tokenized whole.
        expected = builder.processor(text=[rendered], images=traj.images or None, return_tensors="pt")["input_ids"][0].tolist()
        assert traj.token_ids == expected[: len(traj.token_ids)]
        assert tok.decode(expected[len(traj.token_ids):]) == "\n"
        return
    # Inline: the same text, and every piece the loop inserted is its own tokenization, as the papers
    # build it (tokenizing the whole text at once could merge tokens across a piece's edge).
    assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tok.decode(traj.token_ids)) == rendered
    assert rendered.startswith(builder.render(traj.messages[:2], True)) and protocol.generation_prefix in rendered
    inserted = masked_runs(traj, 0)[1:]
    results = [m for m in traj.messages if m["role"] == "tool"]
    assert len(inserted) == len(results)
    for ids, message in zip(inserted, results):
        before, after = protocol.wrap_result(message["name"], traj.messages)
        text = "".join(p["text"] for p in message["content"])
        assert ids == tok(before + text + after, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).startswith(before) and before.strip()
