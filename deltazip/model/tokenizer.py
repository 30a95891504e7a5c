"""Tokenizer from a HF folder (tokenizer.json + tokenizer_config.json): encode/decode, chat template,
EOS ids, streaming detokenization and stop-sequence handling."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPLACEMENT_CHAR = "\ufffd"


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores special tokens as a string or as {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs around it."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self.tok = tok
        self.chat_template = chat_template
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json; chat template and special tokens from tokenizer_config.json; EOS ids also
        from generation_config.json and config.json."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found: the model folder needs a fast-tokenizer tokenizer.json")
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
        cfg = _read_json(path / "tokenizer_config.json")
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        eos_ids: list[int] = []
        if eos is not None and tok.token_to_id(eos) is not None:
            eos_ids.append(tok.token_to_id(eos))
        for file in ("generation_config.json", "config.json"):
            value = _read_json(path / file).get("eos_token_id")
            eos_ids.extend(value if isinstance(value, list) else ([] if value is None else [value]))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, template, eos_ids, bos_token=bos, eos_token=eos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special-token strings in the text map to their ids."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render messages ([{role, content}]) with the model's chat template."""
        if self._template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json chat_template); send a prompt")
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template already contains any BOS."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def incremental_decoder(self, prompt_ids: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self.tok, prompt_ids)


class IncrementalDecoder:
    """Turns a token stream into text deltas without splitting a UTF-8 character.

    Decodes a sliding window and emits only text that is complete (no trailing U+FFFD); the window
    starts with a few prompt tokens so tokenizers that strip a leading space see the right context.
    """

    _CONTEXT_TOKENS = 5

    def __init__(self, tok: tokenizers.Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok = tok
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-self._CONTEXT_TOKENS :])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text (maybe empty while a character is incomplete)."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) <= len(emitted) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(emitted) :]

    def flush(self) -> str:
        """Whatever is still held back (invalid bytes come out as U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(emitted) :]


class StopChecker:
    """Cuts a text stream at the first stop sequence; never emits text that belongs to one.

    "First" is the stop sequence that is complete earliest in the stream (the shortest prefix of the text that
    contains a whole one; on a tie, the one starting earlier), so the output does not depend on how the text was
    split into pushes. Holds back the longest tail that could still start a stop sequence until it is decided.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        """Feed new text; returns the part that is safe to emit. Sets `stopped` at a stop sequence."""
        if self.stopped:
            return ""
        buf = self._held + text
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]  # (end, start)
        if hits:
            self.stopped, self._held = True, ""
            return buf[: min(hits)[1]]
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail, once the stream ends without a stop sequence."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
