"""Text in and out: a model folder's tokenizer, its chat template and its stop tokens.

A folder exported for kvcl (``tools/export_real_model.sh``) or by ``transformers`` holds
``tokenizer.json`` (read by the ``tokenizers`` package), ``tokenizer_config.json`` (special
tokens; often the chat template), maybe ``chat_template.jinja`` (transformers >= 4.43 writes the
template there), and ``generation_config.json`` / ``config.json`` (``eos_token_id``).
:class:`Tokenizer` reads them; the chat template is rendered with jinja2 in a sandbox, with the
same variables transformers passes (``messages``, ``add_generation_prompt``, the special tokens,
``raise_exception``). :class:`IncrementalDecoder` turns a growing list of ids into text deltas
that never split a multi-byte character.

No onnxruntime and no device here: the scheduler and server layers use it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InvalidArgument

__all__ = ["Tokenizer", "IncrementalDecoder", "find_tokenizer", "stop_token_ids"]

_TOKENIZER_FILE = "tokenizer.json"


def _folder(path: "str | os.PathLike") -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def find_tokenizer(model_path: "str | os.PathLike") -> "Path | None":
    """The folder holding ``tokenizer.json`` beside ``model_path`` (a model file or folder), or None."""
    folder = _folder(model_path)
    return folder if (folder / _TOKENIZER_FILE).is_file() else None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: cannot read it as JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    if isinstance(value, int) and not isinstance(value, bool):
        return [int(value)]
    return []


def stop_token_ids(model_path: "str | os.PathLike") -> list[int]:
    """End-of-sequence ids of the model at ``model_path``: ``eos_token_id`` of
    ``generation_config.json``, else of ``config.json`` (an int or a list); [] if neither says."""
    folder = _folder(model_path)
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.is_file():
            ids = _ids(_read_json(p).get("eos_token_id"))
            if ids:
                return ids
    return []


def _token_text(value: Any) -> "str | None":
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """The tokenizer of a model folder.

    Parameters
    ----------
    path : str or Path
        A folder with ``tokenizer.json`` (or the file itself, or a model file beside it).

    Attributes
    ----------
    chat_template : str or None
        The jinja2 template of :meth:`apply_chat_template` (``chat_template.jinja``, else
        ``tokenizer_config.json``'s ``chat_template``).
    stop_ids : list of int
        The model's end-of-sequence ids (:func:`stop_token_ids`), plus the tokenizer's
        ``eos_token`` when it is a known token.
    """

    def __init__(self, path: "str | os.PathLike"):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:  # pragma: no cover - an extra
            raise ImportError("kvcl.tokenizer needs the tokenizers package: pip install 'kvcl[onnx]'") from exc
        p = Path(path)
        file = p if p.is_file() and p.name.endswith(".json") else _folder(p) / _TOKENIZER_FILE
        if not file.is_file():
            raise InvalidArgument(f"tokenizer: no {_TOKENIZER_FILE} at {p} (give --tokenizer FOLDER)")
        self.folder = file.parent
        try:
            self._tok = _HF.from_file(str(file))
        except Exception as exc:
            raise InvalidArgument(f"tokenizer: {file} is not a tokenizers file ({exc})") from None
        cfg_path = self.folder / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        self.special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template_file = self.folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else cfg.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: "str | None" = template if isinstance(template, str) else None
        self._compiled = None
        stops = stop_token_ids(self.folder)
        eos = self.special.get("eos_token")
        eos_id = self._tok.token_to_id(eos) if eos else None
        if eos_id is not None and eos_id not in stops:
            stops.append(int(eos_id))
        self.stop_ids: list[int] = stops

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are recognised)."""
        if not isinstance(text, str):
            raise InvalidArgument(f"text: expected a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> "int | None":
        return self._tok.token_to_id(token)

    # ---- chat --------------------------------------------------------------------------

    def _template(self):
        if self._compiled is None:
            if self.chat_template is None:
                raise InvalidArgument(f"messages: the tokenizer at {self.folder} has no chat template")
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled

    def render_chat(self, messages: Iterable[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of ``messages`` ([{"role", "content"}, ...])."""
        msgs = check_messages(messages)
        from jinja2.exceptions import TemplateError
        try:
            return self._template().render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                           **{k: v for k, v in self.special.items() if v is not None})
        except TemplateError as exc:
            raise InvalidArgument(f"messages: the chat template refused them: {exc}") from None

    def apply_chat_template(self, messages: Iterable[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat prompt (the template writes the special tokens itself)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)

    def __repr__(self) -> str:
        return (f"<kvcl.Tokenizer {self.folder} vocab {self.vocab_size}, stop ids {self.stop_ids}, "
                f"chat template {'yes' if self.chat_template else 'no'}>")


def check_messages(messages: Any) -> list[dict]:
    """Chat messages as a list of {"role": str, "content": str}; refuse anything else by index."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgument("messages: expected a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}]: expected an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidArgument(f"messages[{i}].role: expected a non-empty string, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        out.append({**m, "role": role, "content": content})
    return out


class IncrementalDecoder:
    """Text deltas of a growing token list, never ending inside a multi-byte character.

    Decodes a short window of the latest ids (so each call costs O(window), not O(length)) and
    holds text back while it ends in U+FFFD (an incomplete UTF-8 sequence)::

        dec = IncrementalDecoder(tok)
        for t in new_ids: print(dec.push(t), end="")
        print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0   # window start
        self._read = 0     # ids already turned into text

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read], skip_special_tokens=self.skip)
        now = dec(self.ids[self._prefix:], skip_special_tokens=self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever text is still held back (at the end of generation)."""
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read], skip_special_tokens=self.skip)
        now = dec(self.ids[self._prefix:], skip_special_tokens=self.skip)
        self._prefix = self._read = len(self.ids)
        return now[len(before):]
