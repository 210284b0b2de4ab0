"""Preference pairs (reward model, DPO) and unpaired examples (KTO) to token ids, counting everything that is cut or
skipped.

Reading and validation are ``data_formats``' job (an empty chosen or rejected reply is a located ``DataFormatError``
there); this module renders each pair through the chat template, exactly as SFT rendered its conversations, and
reports what the length limit and degenerate pairs cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_formats import Conversation


@dataclass
class PairReport:
    """What tokenisation kept, cut and skipped of a preference set; printed by the recipes, kept in ``summary.json``."""

    records: int = 0
    """Pairs read."""
    kept: int = 0
    """Pairs that became training rows."""
    tokens: int = 0
    """Tokens kept (prompt once, plus both replies)."""
    truncated_records: int = 0
    """Pairs with a reply cut so that prompt + reply fit ``max_length`` (DPO)."""
    truncated_tokens: int = 0
    """Reply tokens removed by those cuts."""
    skipped_long: int = 0
    """Pairs that do not fit: for DPO the prompt alone leaves no room for a reply; for the reward model prompt + a
    reply exceeds ``max_length`` (its score is read at the last token, so it cannot be cut)."""
    skipped_identical: int = 0
    """Pairs whose chosen and rejected replies are the same tokens (after any cut): nothing to prefer."""
    skipped_boundary: int = 0
    """Pairs whose rendered prompt is not a token prefix of prompt + reply: the tokenizer merges the prompt's last
    characters with a reply's first (e.g. the ``alpaca`` template's ``:`` + ``The`` on Llama 3), so there is no one
    prompt for both replies."""
    rejected_cut_records: int = 0
    """Pairs whose rejected reply was cut after its first token that differs from the chosen one
    (``dpo.rejected_to_first_difference``)."""
    rejected_cut_tokens: int = 0
    """Rejected-reply tokens those cuts removed."""
    skipped_origins: list[str] = field(default_factory=list)
    """Where the skipped pairs came from (file:line), the first 20."""

    @property
    def skipped_records(self) -> int:
        return self.skipped_long + self.skipped_identical + self.skipped_boundary

    def _skip(self, origin: str) -> None:
        if len(self.skipped_origins) < 20:
            self.skipped_origins.append(origin)

    def describe(self, name: str) -> str:
        text = (
            f"{name}: {self.kept}/{self.records} pairs, {self.tokens} tokens; {self.truncated_records} with a reply cut "
            f"(-{self.truncated_tokens} tokens); skipped {self.skipped_long} too long for max_length, "
            f"{self.skipped_identical} with chosen == rejected"
        )
        if self.skipped_boundary:
            text += f", {self.skipped_boundary} whose prompt tokens merge into the reply's"
        if self.rejected_cut_records:
            text += (f"; {self.rejected_cut_records} rejected replies scored only to their first token that differs "
                     f"from the chosen one (-{self.rejected_cut_tokens} tokens)")
        if self.skipped_origins:
            text += f" ({', '.join(self.skipped_origins[:5])}" + (", ...)" if self.skipped_records > 5 else ")")
        return text

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "skipped_origins"}
        out["skipped_records"] = self.skipped_records
        return out


def split_pair(pair, template, tokenizer) -> tuple[list[int], list[int], list[int]] | None:
    """``(prompt_ids, chosen_ids, rejected_ids)``: the prompt rendered for generation (ending on the assistant header)
    and each reply as the tokens that follow it (the reply and its end-of-turn token), so that ``prompt + reply`` is
    token for token what SFT trained on and what generation continues from. ``None`` when the prompt is not a token
    prefix of prompt + reply (:attr:`PairReport.skipped_boundary`): the callers skip and count the pair."""
    from .templates import render, render_prompt

    prompt_ids = render_prompt(template, pair.prompt, tokenizer)
    replies = []
    for reply in (pair.chosen, pair.rejected):
        full_ids, _ = render(template, pair.prompt + reply, tokenizer)
        if full_ids[: len(prompt_ids)] != prompt_ids:  # render() tokenises the whole text (finetune.templates)
            return None
        replies.append(full_ids[len(prompt_ids) :])
    return prompt_ids, replies[0], replies[1]


def first_difference(chosen_ids: list[int], rejected_ids: list[int]) -> int:
    """The index of the first token where the two replies differ (the shorter one's length if one is a prefix)."""
    return next((i for i, (a, b) in enumerate(zip(chosen_ids, rejected_ids)) if a != b),
                min(len(chosen_ids), len(rejected_ids)))


def cut_rejected(chosen_ids: list[int], rejected_ids: list[int]) -> list[int]:
    """The rejected reply up to and including its first token that differs from the chosen reply.

    DPO's margin sums the log-ratios of every rejected token, so the tokens that share the chosen reply's prefix
    cancel and the first differing one is the error itself. What follows it is no preference of its own: after a
    wrong word the rest is often the right words (``donkey planet turtle`` for ``donkey rose turtle``) or a run-on
    repeating them, and pushing those down pushes down right answers. Step-DPO (Lai et al. 2024) likewise prefers
    the first wrong step alone."""
    return rejected_ids[: first_difference(chosen_ids, rejected_ids) + 1]


def tokenize_pairs_for_dpo(pairs, template, tokenizer, max_length: int, rejected_to_first_difference: bool = False
                           ) -> tuple[list[dict], PairReport]:
    """Rows of ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (TRL's ``DPOTrainer`` format) and a report.

    A reply longer than the room the prompt leaves is cut at the end (``keep_start``, as TRL would); a prompt that
    leaves no room at all is skipped, as is a pair whose replies are identical after the cut. Both counted. With
    ``rejected_to_first_difference`` the rejected reply then ends at its first token that differs from the chosen one
    (:func:`cut_rejected`), counted too.
    """
    rows: list[dict] = []
    report = PairReport(records=len(pairs))
    for pair in pairs:
        split = split_pair(pair, template, tokenizer)
        if split is None:
            report.skipped_boundary += 1
            report._skip(pair.origin)
            continue
        prompt_ids, chosen_ids, rejected_ids = split
        room = max_length - len(prompt_ids)
        if room < 1:
            report.skipped_long += 1
            report._skip(pair.origin)
            continue
        cut = max(len(chosen_ids) - room, 0) + max(len(rejected_ids) - room, 0)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            report.skipped_identical += 1
            report._skip(pair.origin)
            continue
        if rejected_to_first_difference:
            kept_ids = cut_rejected(chosen_ids, rejected_ids)
            if len(kept_ids) < len(rejected_ids):
                report.rejected_cut_records += 1
                report.rejected_cut_tokens += len(rejected_ids) - len(kept_ids)
                rejected_ids = kept_ids
        if cut:
            report.truncated_records += 1
            report.truncated_tokens += cut
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
        report.kept += 1
        report.tokens += len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
    return rows, report


def reference_free_rows(rows: list[dict]) -> list[dict]:
    """DPO rows (``tokenize_pairs_for_dpo``) in the tokenised layout of TRL's ``ORPOTrainer`` and ``CPOTrainer``:
    ``prompt_input_ids``, and per side ``{side}_input_ids`` (prompt + reply), ``{side}_attention_mask`` and
    ``{side}_labels`` (``-100`` on the prompt). The same tokens as DPO scores, so every loss of the DPO stage sees the
    same sequences."""
    out = []
    for row in rows:
        prompt = row["prompt_ids"]
        new = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = row[f"{side}_ids"]
            new[f"{side}_input_ids"] = prompt + reply
            new[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            new[f"{side}_labels"] = [-100] * len(prompt) + reply
        out.append(new)
    return out


def tokenize_pairs_for_reward(pairs, template, tokenizer, max_length: int) -> tuple[list[dict], PairReport]:
    """Rows of ``{"chosen_ids", "rejected_ids"}``, each the whole rendered conversation (TRL's ``RewardTrainer``
    format), and a report. The score is read at the last token, so a conversation is never cut: a pair that does
    not fit ``max_length`` is skipped, as is one with identical replies. Both counted."""
    from .templates import render

    rows: list[dict] = []
    report = PairReport(records=len(pairs))
    for pair in pairs:
        # Each side whole, as SFT renders it: the reward model needs no prompt shared by both (unlike DPO).
        chosen, rejected = (render(template, pair.prompt + reply, tokenizer)[0] for reply in (pair.chosen, pair.rejected))
        if chosen == rejected:
            report.skipped_identical += 1
            report._skip(pair.origin)
            continue
        if max(len(chosen), len(rejected)) > max_length:
            report.skipped_long += 1
            report._skip(pair.origin)
            continue
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
        report.kept += 1
        report.tokens += len(chosen) + len(rejected)
    return rows, report


@dataclass
class ExampleReport:
    """What tokenisation kept, cut and skipped of an unpaired (KTO) set; printed by the recipe, kept in
    ``summary.json``."""

    records: int = 0
    """Examples read (a split pair counts twice)."""
    kept: int = 0
    """Examples that became training rows."""
    desirable: int = 0
    """Kept examples labelled desirable."""
    undesirable: int = 0
    """Kept examples labelled undesirable."""
    tokens: int = 0
    """Tokens kept (prompt plus completion)."""
    truncated_records: int = 0
    """Examples with the completion cut so that prompt + completion fit ``max_length``."""
    truncated_tokens: int = 0
    """Completion tokens removed by those cuts."""
    skipped_long: int = 0
    """Examples whose prompt alone leaves no room for a completion."""
    skipped_boundary: int = 0
    """Examples whose rendered prompt is not a token prefix of prompt + completion (see
    :attr:`PairReport.skipped_boundary`)."""
    skipped_origins: list[str] = field(default_factory=list)
    """Where the skipped examples came from (file:line), the first 20."""

    @property
    def skipped_records(self) -> int:
        return self.skipped_long + self.skipped_boundary

    def describe(self, name: str) -> str:
        text = (
            f"{name}: {self.kept}/{self.records} examples ({self.desirable} desirable, {self.undesirable} undesirable), "
            f"{self.tokens} tokens; {self.truncated_records} with the completion cut (-{self.truncated_tokens} tokens); "
            f"skipped {self.skipped_long} too long for max_length"
        )
        if self.skipped_boundary:
            text += f", {self.skipped_boundary} whose prompt tokens merge into the completion's"
        if self.skipped_origins:
            text += f" ({', '.join(self.skipped_origins[:5])}" + (", ...)" if self.skipped_records > 5 else ")")
        return text

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "skipped_origins"}
        out["skipped_records"] = self.skipped_records
        return out


def tokenize_unpaired_for_kto(examples, template, tokenizer, max_length: int) -> tuple[list[dict], ExampleReport]:
    """Rows of ``{"prompt_ids", "completion_ids", "label"}`` (TRL's ``KTOTrainer`` format) and a report.

    Rendered as :func:`split_pair` renders a pair's sides: the prompt for generation, the completion as the tokens
    that follow it, so that prompt + completion is token for token what SFT trained on. A completion longer than the
    room the prompt leaves is cut at the end; a prompt that leaves no room is skipped, as is one whose tokens merge
    into the completion's. All counted.
    """
    from .templates import render, render_prompt

    rows: list[dict] = []
    report = ExampleReport(records=len(examples))
    for example in examples:
        prompt_ids = render_prompt(template, example.prompt, tokenizer)
        full_ids, _ = render(template, example.prompt + example.completion, tokenizer)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            report.skipped_boundary += 1
            _note_skip(report, example.origin)
            continue
        completion_ids = full_ids[len(prompt_ids) :]
        room = max_length - len(prompt_ids)
        if room < 1:
            report.skipped_long += 1
            _note_skip(report, example.origin)
            continue
        if len(completion_ids) > room:
            report.truncated_records += 1
            report.truncated_tokens += len(completion_ids) - room
            completion_ids = completion_ids[:room]
        rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": bool(example.desirable)})
        report.kept += 1
        report.desirable += bool(example.desirable)
        report.undesirable += not example.desirable
        report.tokens += len(prompt_ids) + len(completion_ids)
    return rows, report


def _note_skip(report, origin: str) -> None:
    if len(report.skipped_origins) < 20:
        report.skipped_origins.append(origin)


def desirable_conversations(examples) -> list[Conversation]:
    """Each desirable example's prompt and completion: the conversations verifier accuracy asks the prompts of (for
    split pairs, exactly :func:`chosen_conversations` of the pairs, so KTO and DPO are measured on the same prompts)."""
    return [Conversation(e.prompt + e.completion, e.origin, dict(e.meta)) for e in examples if e.desirable]


def chosen_conversations(pairs) -> list[Conversation]:
    """Each pair's prompt followed by its chosen reply: the conversations verifier accuracy asks the prompts of."""
    return [Conversation(pair.prompt + pair.chosen, pair.origin, dict(pair.meta)) for pair in pairs]
