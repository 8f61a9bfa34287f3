"""OpenAI tool calls from Qwen2.5's (Hermes-style) output format, whole and streamed.

The format. Given tools, Qwen2.5 models write each call as a block in their text,

    <tool_call>
    {"name": "<function-name>", "arguments": {<args-json-object>}}
    </tool_call>

zero or more of them, with ordinary text before, between or after. Parsing rules (one scanner,
`_scan`, serves the whole and the streamed parse, so both always agree):

* a call is `<tool_call>`, optional whitespace, one JSON object, optional whitespace,
  `</tool_call>`. The object's end is found by matching brackets outside JSON strings, so nested
  braces, and a `<tool_call>` or `</tool_call>` inside a string value, belong to the arguments;
* the object must have a string "name"; "arguments" is an object, or a JSON string holding an
  object (some models encode it twice); a missing "arguments" is {}. Strings may hold raw control
  characters (models write raw newlines in code arguments): the object is read with strict=False;
  NaN and Infinity, which Python's json reads but JSON has not, make it no call;
* an open tag that does not begin such a call (invalid JSON, no name, text after the object, a
  block the output ends inside because max_tokens ran out) is ordinary text, and so is everything
  after it, which is scanned on for further calls: the block stays in the content as written;
* the content is all ordinary text joined, then stripped (None when nothing is left): the
  whitespace around calls inside the text is kept, "A\\n<tool_call>...</tool_call>\\nB" gives
  "A\\n\\nB".

Calls are OpenAI's `{"id": "call_<24 hex>", "type": "function", "function": {"name", "arguments"}}`
with the arguments as JSON text (`json.dumps(args, ensure_ascii=False)`).

What the server does per `tool_choice` (as vLLM does):
* "none": the tools are not given to the chat template; the output is plain content.
* "auto" (the default when tools are given): the template renders the tools; the output is parsed
  with `parse_tool_calls` (streamed: `ToolCallStream`); finish_reason is "tool_calls" when a call
  was made (`has_calls`).
* `{"type": "function", "function": {"name": f}}`: the output is constrained to the arguments JSON
  itself (`named_schema`) and becomes one call (`named_call`; streamed: `NamedCallStream`);
  finish_reason stays the engine's ("stop").
* "required": the output is constrained to a JSON array of `{"name", "arguments"}` objects
  (`required_schema`) and each becomes a call (`parse_required`; streamed: `RequiredCallStream`);
  finish_reason "tool_calls". An output that is not such an array (cut short by max_tokens) is
  answered as content.
Messages go to the template with their calls' arguments as objects, as Qwen2.5's template writes
them with `tojson` (engine/chat.py, `tool_call_arguments`).

What streaming sends: the server feeds a stream the whole text so far after each step (each text
extends the one before) and `finished=True` with the last; `update` returns OpenAI delta pieces,
`{"content": str}` and `{"tool_calls": [{"index": i, "id", "type", "function": {"name",
"arguments"}}]}`. `ToolCallStream` sends ordinary text as soon as it is decided: text that could
be the start of an open tag (`<tool_c` at the end) and everything after an open tag are held until
the block is decided, a call is sent whole when its close tag arrives, and whitespace that the
final strip could remove (at the start, and at the end so far) is held until text follows it. The
concatenated content pieces equal `parse_tool_calls`'s content ("" for None) and the calls equal
its calls (ids aside), with indexes 0, 1, ... in order.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, NamedTuple

from qwen_vl_triton.engine.chat import loads_json as _loads

OPEN = "<tool_call>"
CLOSE = "</tool_call>"

_JSON_WS = re.compile(r"[ \t\r\n]*")
# Characters of a JSON string up to its closing quote (or an escape the text ends inside).
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*', re.DOTALL)
# Characters JSON allows outside strings, brackets aside: whitespace, punctuation, numbers and
# the letters of true, false and null. Anything else (the `<` of a tag) ends any hope of an object.
_BARE = re.compile(r"[ \t\r\n:,0-9+\-.eEtrufalsn]*")
_CLOSERS = {"{": "}", "[": "]"}
_NOT_JSON = -1


class _Call(NamedTuple):
    """A parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def _new_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _openai_call(name: str, arguments: str) -> dict[str, Any]:
    """OpenAI's tool call object with a fresh id."""
    return {"id": _new_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_from_object(obj: Any) -> _Call | None:
    """The call `obj` (a decoded `{"name", "arguments"}`) stands for, or None when it is none."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = _loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return _Call(obj["name"], json.dumps(args, ensure_ascii=False))


class _ObjectScan:
    """Bracket matching of the JSON object that opens at `body` ("{"), outside strings. It is
    resumable: a stream keeps the scan of its undecided block and goes on from where the last text
    ended, so a call whose long arguments arrive over many steps is scanned once, not once a step."""

    def __init__(self, body: int) -> None:
        self.body = body
        self.pos = body          # the next character to read
        self.stack: list[str] = []  # the closers owed
        self.in_string = False
        self.found: int | None = None  # the end, once found (the close tag may come later)

    def end(self, text: str) -> int | None:
        """Where the object ends (exclusive) in `text` (which extends the texts scanned before);
        None when the text ends first (more text may close it); _NOT_JSON when the text can no
        longer be a JSON value whatever follows (a mismatched bracket, a character JSON never has
        outside strings)."""
        if self.found is not None:
            return self.found
        i = self.pos
        while i < len(text):
            if self.in_string:
                i = _STRING_BODY.match(text, i).end()
                if i == len(text) or text[i] == "\\":  # ran out, maybe in the middle of an escape
                    break
                self.in_string = False  # text[i] is the closing quote
                i += 1
                continue
            ch = text[i]
            if ch == '"':
                self.in_string = True
                i += 1
            elif ch in _CLOSERS:
                self.stack.append(_CLOSERS[ch])
                i += 1
            elif ch in "}]":
                if self.stack.pop() != ch:
                    return _NOT_JSON
                if not self.stack:
                    self.found = i + 1
                    return self.found
                i += 1
            else:
                bare = _BARE.match(text, i).end()
                if bare == i:
                    return _NOT_JSON
                i = bare
        self.pos = i
        return None


def _block(text: str, start: int, final: bool, scan: _ObjectScan | None) -> tuple[_Call | None, int] | _ObjectScan:
    """The open tag at `start`, decided: (the call, the end of its close tag), or (None, the end
    of the tag) when the tag is ordinary text. While undecided (only when not `final`): the scan of
    its object, to resume with the next text (`scan`, when it is that object's, is resumed here)."""
    as_text = None, start + len(OPEN)
    body = _JSON_WS.match(text, start + len(OPEN)).end()
    if body == len(text):  # nothing but whitespace after the tag yet
        return as_text if final else _ObjectScan(body)
    if text[body] != "{":
        return as_text
    if scan is None or scan.body != body:
        scan = _ObjectScan(body)
    end = scan.end(text)
    if end is None:
        return as_text if final else scan
    if end == _NOT_JSON:
        return as_text
    close = _JSON_WS.match(text, end).end()
    if text.startswith(CLOSE, close):
        try:
            call = _call_from_object(_loads(text[body:end]))
        except ValueError:
            call = None
        return (call, close + len(CLOSE)) if call else as_text
    if not final and CLOSE.startswith(text[close:]):  # the close tag may be arriving
        return scan
    return as_text


def _held_tail(text: str, pos: int) -> int:
    """Length of the longest end of text[pos:] that is a proper start of OPEN (held back: it may
    become a tag)."""
    for n in range(min(len(OPEN) - 1, len(text) - pos), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


def _scan(text: str, pos: int, final: bool,
          scan: _ObjectScan | None = None) -> tuple[list[str | _Call], int, _ObjectScan | None]:
    """The decided pieces of text[pos:] (ordinary text and calls, in order), where the undecided
    rest begins (len(text) when `final`) and, when that rest is an open block, the scan of its
    object (pass it back with the next, longer text). What is decided never changes as the text
    grows, so scanning a prefix and then the rest from the returned position gives the pieces of
    scanning the whole."""
    pieces: list[str | _Call] = []
    while pos < len(text):
        start = text.find(OPEN, pos)
        if start < 0:
            end = len(text) - (0 if final else _held_tail(text, pos))
            if end > pos:
                pieces.append(text[pos:end])
            return pieces, end, None
        if start > pos:
            pieces.append(text[pos:start])
        decided = _block(text, start, final, scan)
        if isinstance(decided, _ObjectScan):
            return pieces, start, decided
        call, pos = decided
        pieces.append(call or OPEN)  # a tag that is ordinary text: scanning goes on after it
    return pieces, pos, None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a whole model output: the ordinary text joined and stripped (None if
    empty) and OpenAI tool call objects, in order. See the module docstring for the rules."""
    pieces, _, _ = _scan(text, 0, final=True)
    content = "".join(p for p in pieces if isinstance(p, str)).strip()
    calls = [_openai_call(p.name, p.arguments) for p in pieces if isinstance(p, _Call)]
    return content or None, calls


class ToolCallStream:
    """`parse_tool_calls` as OpenAI streaming deltas, for tool_choice "auto" (module docstring)."""

    def __init__(self) -> None:
        self._pos = 0            # text before it has been scanned and its pieces sent or dropped
        self._scan: _ObjectScan | None = None  # the open block's object, scanned so far
        self._held_ws = ""       # whitespace sent only if more content follows
        self._content_started = False
        self._calls = 0

    @property
    def has_calls(self) -> bool:
        """Whether a call has been sent (finish_reason is then "tool_calls")."""
        return self._calls > 0

    def update(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The delta pieces that `text` (the whole output so far, extending the last one) decides;
        with `finished`, everything still held is decided."""
        pieces, self._pos, self._scan = _scan(text, self._pos, finished, self._scan)
        out: list[dict[str, Any]] = []
        for piece in pieces:
            if isinstance(piece, _Call):
                call = {"index": self._calls, **_openai_call(piece.name, piece.arguments)}
                out.append({"tool_calls": [call]})
                self._calls += 1
                continue
            content = self._content(piece)
            if content and out and "content" in out[-1]:
                out[-1]["content"] += content
            elif content:
                out.append({"content": content})
        return out

    def _content(self, piece: str) -> str:
        """What of an ordinary text piece can be sent now, so that all sent content is the joined
        text stripped: leading whitespace is dropped, trailing whitespace held for the next piece."""
        piece = self._held_ws + piece
        if not self._content_started:
            piece = piece.lstrip()
        body = piece.rstrip()
        self._held_ws = piece[len(body):]
        self._content_started = self._content_started or bool(body)
        return body


# ------------------------------------------------------------------------------- forced calls


def named_schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The JSON schema a named tool_choice constrains the output to: that function's parameters,
    or {"type": "object"} when it declares none. ValueError when no tool has that name."""
    for tool in tools:
        function = tool.get("function") or {}
        if function.get("name") == name:
            return function.get("parameters") or {"type": "object"}
    raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")


def named_call(name: str, text: str) -> dict[str, Any]:
    """The call a named tool_choice's output makes: the output is its arguments."""
    return _openai_call(name, text)


class NamedCallStream:
    """A named tool_choice's output as OpenAI streaming deltas: the call's head (index 0, id, type,
    name, arguments "") first, then the arguments as they grow; nothing is held back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sent: int | None = None  # characters of arguments sent; None before the head

    def update(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The pieces for `text`, the whole output so far. `finished` changes nothing (nothing is
        held); it is taken so that every stream is driven alike."""
        out: list[dict[str, Any]] = []
        if self._sent is None:
            out.append({"tool_calls": [{"index": 0, **_openai_call(self.name, "")}]})
            self._sent = 0
        if len(text) > self._sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": text[self._sent:]}}]})
            self._sent = len(text)
        return out


def required_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """The JSON schema tool_choice "required" constrains the output to: a non-empty array of
    `{"name": <a tool's name>, "arguments": <its parameters>}` objects; of exactly one when not
    `parallel` (the request's parallel_tool_calls: false)."""
    items = []
    for tool in tools:
        function = tool["function"]
        items.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    return schema if parallel else {**schema, "maxItems": 1}


def parse_required(text: str) -> list[dict[str, Any]]:
    """The calls of a "required" output (a JSON array of {"name", "arguments"} objects, arguments
    as in `parse_tool_calls`). ValueError when the text is not such a non-empty array (an output
    cut short by max_tokens): the server then answers it as content."""
    try:
        items = _loads(text)
    except ValueError:
        raise ValueError("the output is not JSON") from None
    if not isinstance(items, list) or not items:
        raise ValueError("the output is not a non-empty JSON array")
    calls = [_call_from_object(item) for item in items]
    if None in calls:
        raise ValueError("an item of the output is not a {\"name\", \"arguments\"} object")
    return [_openai_call(c.name, c.arguments) for c in calls]


class RequiredCallStream:
    """A "required" output as OpenAI streaming deltas: nothing until finished, then one piece per
    call (or, when the output is not a call array, one content piece of it)."""

    def __init__(self) -> None:
        self._calls = 0

    @property
    def has_calls(self) -> bool:
        """Whether calls were sent (finish_reason "tool_calls"); False after a content fallback."""
        return self._calls > 0

    def update(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """[] until `finished`; then the calls of the whole output `text`."""
        if not finished:
            return []
        try:
            calls = parse_required(text)
        except ValueError:
            return [{"content": text}] if text else []
        self._calls = len(calls)
        return [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
