"""The alpaca prompt of the original KnowTuning code (LLaMA-Factory 0.5.3) and prompt/response tokenization.

Style "llamafactory-0.5.3" (default) reproduces the text bytes of LLaMA-Factory 0.5.3's `alpaca` template
(`src/llmtuner/data/template.py`): the default system string is joined to the user slot with no separator, so the
prompt reads "...completes the request.### Instruction:\\n{query}\\n\\n### Response:\\n". LLaMA-Factory 0.7.x added
"\\n\\n" after the system string: style "llamafactory-0.7".

`encode_prompt(tok, prompt, add_bos=...)` is the ONE place a prompt becomes token ids: training (`encode_pair`, so the
loader), fact scoring and reference log-probs (`inference.scoring`) and generation (`inference.sampling`) all call it,
each with the `add_bos` of its config, so the four paths give the same prompt ids.

`question_text(instruction, input)` is the ONE place the question text is built: the instruction, plus "\\n" + input
when the input is non-empty (LLaMA-Factory's aligner joins the non-empty parts with "\\n"; a whitespace-only input
is non-empty there too). The training prompt, the scoring prompt (`prompt_text`) and the question the knowledge
backends see are all built from it.

Differences from LLaMA-Factory 0.5.3's token ids, on purpose: (1) 0.5.3 put no BOS on alpaca prompts (its alpaca
template has no bos slot and it encodes with add_special_tokens=False); `encode_prompt` adds BOS once when the
tokenizer has one (`add_bos=False` gives 0.5.3's ids). (2) 0.5.3 tokenized the system string and the user slot
as two pieces; here the prompt is one piece. (3) 0.5.3 tokenized the response with SentencePiece's dummy-prefix
"▁" (so "Paris" trained as " Paris"); here the response is tokenized as a continuation of the prompt, so
decode(prompt_ids + response_ids) == prompt + response exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kt_jax.data.tokenizer import Tokenizer, encode_continuation
from kt_jax.errors import ConfigError

_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_STYLES: dict[str, tuple[str, str]] = {
    # style: (system text, user slot with {query})
    "llamafactory-0.5.3": (_SYSTEM, "### Instruction:\n{query}\n\n### Response:\n"),
    "llamafactory-0.7": (_SYSTEM + "\n\n", "### Instruction:\n{query}\n\n### Response:\n"),
}


def question_text(instruction: str, input: str = "") -> str:
    """The question text: the instruction, plus the input on its own line when the input is non-empty."""
    return instruction + "\n" + input if input else instruction


def alpaca_prompt(instruction: str, input: str = "", style: str = "llamafactory-0.5.3") -> str:
    """The alpaca prompt text for one question (the response follows it directly)."""
    if style not in ALPACA_STYLES:
        raise ConfigError(f"template style {style!r} is unknown (choose from {sorted(ALPACA_STYLES)})")
    system, user = ALPACA_STYLES[style]
    return system + user.replace("{query}", question_text(instruction, input))


def prompt_text(instruction: str, input: str = "", *, template: str = "alpaca",
                style: str = "llamafactory-0.5.3") -> str:
    """The prompt a question is scored under: the alpaca prompt, or the bare question text (`template="raw"`)."""
    if template == "alpaca":
        return alpaca_prompt(instruction, input, style)
    if template == "raw":
        return question_text(instruction, input)
    raise ConfigError(f"template={template!r}; choose 'alpaca' or 'raw'")


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one prompt/response pair; `truncated` is True when the response was cut to fit."""

    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool

    @property
    def length(self) -> int:
        """Total number of tokens."""
        return len(self.prompt_ids) + len(self.response_ids)


def encode_prompt(tok: Tokenizer, prompt: str, *, add_bos: bool = True) -> list[int]:
    """Prompt ids: BOS (when `add_bos` and the tokenizer has one), then the prompt text; no EOS."""
    return ([tok.bos_id] if add_bos and tok.bos_id is not None else []) + list(tok.encode(prompt))


def encode_pair(tok: Tokenizer, prompt: str, response: str, max_len: int, add_eos: bool = True, *,
                add_bos: bool = True) -> EncodedPair:
    """Tokenize prompt and response separately: BOS once before the prompt, EOS once after the response.

    When the pair is longer than `max_len`, the prompt is kept and the response is cut (its EOS goes first);
    a prompt that leaves no room for any response token gives empty `response_ids` (callers apply their
    over-length policy to it).
    """
    prompt_ids = encode_prompt(tok, prompt, add_bos=add_bos)
    response_ids = encode_continuation(tok, response) + ([tok.eos_id] if add_eos else [])
    room = max(max_len - len(prompt_ids), 0)
    truncated = len(response_ids) > room
    if truncated:
        response_ids = response_ids[:room]
    return EncodedPair(prompt_ids, response_ids, truncated)


def prompt_prefix(tok: Tokenizer, style: str, max_len: int, *, add_bos: bool = True) -> tuple[int, ...]:
    """Ids every alpaca prompt of `style` starts with (BOS and the preamble): the common prefix of two unrelated
    prompts' ids less its last token, so that no merge across the preamble's end is assumed (`packing.PrefixRows`
    still checks every example against it)."""
    a, b = (encode_pair(tok, alpaca_prompt(q, i, style), "x", max_len, add_bos=add_bos).prompt_ids
            for q, i in (("Name a colour.", ""), ("Why is the sky blue?", "Explain briefly.")))
    n = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return tuple(a[: max(n - 1, 0)])
