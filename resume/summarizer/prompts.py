"""The summarizer prompt: one chat turn built from a template that lives in the config.

The code only knows *how* to fill the template (`{title}`, `{text}`), truncate the document
with the LLM's own tokenizer and apply the model's chat template; *what* the prompt says
is the config's business (`conf/summarizer/*.yaml`, key `prompt`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

_PLACEHOLDER = re.compile(r"\{(title|text)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """A system message (optional) and a user message with `{title}` and `{text}` placeholders.

    - `max_doc_tokens`: the document body is cut to this many LLM tokens before it is
      placed in the prompt (long documents would otherwise dominate the context and the
      memory of a GRPO step). The title is kept whole.
    - `enable_thinking`: passed to `apply_chat_template` when not None (Qwen3 templates
      read it; other templates ignore unknown variables).
    - `examples`: optional few-shot turns, each `{title, text, response}`: the example
      document goes through the same `user` template and `response` becomes an earlier
      assistant turn. Small models that ignore a written format copy a shown one. (Qwen3
      templates strip the reasoning out of earlier assistant turns: leave this empty there.)

    Placeholders are substituted in one pass, so a document containing `{text}` or other
    braces is inserted literally; the template itself needs no brace escaping.
    """

    user: str
    system: str | None = None
    max_doc_tokens: int = 512
    enable_thinking: bool | None = None
    examples: tuple[dict[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(dict(e) for e in self.examples or ()))
        for i, e in enumerate(self.examples):
            if set(e) != {"title", "text", "response"}:
                raise ValueError(
                    f"summarizer.prompt.examples[{i}] has keys {sorted(e)}; each example needs exactly "
                    "title, text and response"
                )
        if "{text}" not in self.user:
            raise ValueError(
                f"summarizer.prompt.user must contain the placeholder '{{text}}' (where the document goes); "
                f"got {self.user[:80]!r}..."
            )
        if self.max_doc_tokens < 1:
            raise ValueError(f"summarizer.prompt.max_doc_tokens ({self.max_doc_tokens}) must be >= 1")

    def truncate(self, tokenizer: Any, text: str) -> str:
        """`text` cut to its first `max_doc_tokens` tokens (the original characters, not a re-decoding)."""
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        ids = enc["input_ids"]
        if len(ids) <= self.max_doc_tokens:
            return text
        if tokenizer.is_fast:  # cut the original string at the end of the last kept token
            return text[: enc["offset_mapping"][self.max_doc_tokens - 1][1]]
        return tokenizer.decode(ids[: self.max_doc_tokens])

    def user_message(self, tokenizer: Any, title: str, text: str) -> str:
        values = {"title": title or "", "text": self.truncate(tokenizer, text)}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user)

    def messages(self, tokenizer: Any, title: str, text: str) -> list[dict[str, str]]:
        """The chat messages for one document: system (when set), few-shot turns, the document."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for e in self.examples:
            msgs.append({"role": "user", "content": self.user_message(tokenizer, e["title"], e["text"])})
            msgs.append({"role": "assistant", "content": e["response"]})
        return msgs + [{"role": "user", "content": self.user_message(tokenizer, title, text)}]

    def render(self, tokenizer: Any, title: str, text: str) -> str:
        """The prompt string, chat template applied, ending with the assistant's generation prompt.

        Tokenize it with `add_special_tokens=False`: the template already holds any BOS.
        """
        kwargs: dict[str, Any] = {}
        if self.enable_thinking is not None:
            kwargs["enable_thinking"] = self.enable_thinking
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no chat template; the summarizer needs an "
                "instruct/chat model (or set tokenizer.chat_template)"
            )
        return tokenizer.apply_chat_template(
            self.messages(tokenizer, title, text), tokenize=False, add_generation_prompt=True, **kwargs
        )

    def describe(self) -> dict[str, Any]:
        """Every field (part of the summarizer fingerprint and the cache's meta.json)."""
        out = asdict(self)
        out["examples"] = list(out["examples"])  # as JSON and YAML hold it
        return out
