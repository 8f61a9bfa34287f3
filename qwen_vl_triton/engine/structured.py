"""Structured outputs: constrain a request's text to a JSON schema, a regex, a choice or a grammar.

The grammar work is llguidance's (an Earley parser over a lazily built lexer DFA, matched against
the tokenizer's token trie); this module adapts it to the engine.

What is compiled when:
- `StructuredDecoder.__init__` (once per LLM) builds llguidance's view of the tokenizer: the bytes
  of every token, padded to the logits' width `vocab_size` (the model config's; ids past the
  tokenizer's own vocabulary have no bytes and are never allowed), with the engine's eos ids as its
  end-of-sequence tokens. It is llguidance.hf.from_tokenizer's view with two changes to the text
  encoder it is given (see "Forced tokens" below); the token bytes, the special tokens and the masks
  are the same. Measured on 2 busy CPU cores: 1.5 - 1.7 s for Qwen's 151,936 ids (from_tokenizer:
  1.1 s; the difference is the tokenizer JSON's parse and rewrite here), 7 ms for the tests' 576.
- `check(constraint)`, when a request is added, turns the constraint into an llguidance grammar and
  builds a matcher for it (under 1 ms for small schemas; llguidance quotes 100 ms - 1 s for
  extremely complex grammars, with the GIL released); a constraint that does not compile raises
  ValueError with llguidance's message (the request's 400). That initial-state matcher is kept in
  an LRU keyed by the StructuredOutput, so a repeated schema is compiled once.
- `matcher(constraint)` gives each sequence (each of a request's n samples) a deep copy of the
  cached initial matcher (~1 us), which it then advances with `accept` on every sampled token.
  Nothing here is thread-safe: the engine thread is the only caller, except that `masks_async`
  runs `fill_masks` on a worker thread while the engine thread runs the forward pass and touches no
  matcher until it takes the result. Under tensor parallelism every rank runs the same matchers over
  the same tokens, so their masks agree.

Where masks are applied: `fill_masks` writes one int32 bitmask row per batch row (bit j of word w
allows token 32 w + j), the constrained rows together on llguidance's thread pool (the GIL is
released), the others all ones. The engine asks for them (`masks_async`) before the forward pass
and takes them after it: a mask depends only on the tokens accepted so far, so its cost hides behind
the model's. `engine.sampling.sample` sets the disallowed logits to -inf before
penalties, temperature, top-k / top-p, the argmax and the draw; the reported logprobs stay those
of the raw distribution.

End of sequence: the models stop on several eos ids (<|im_end|>, <|endoftext|>); llguidance is
given all of them, and its mask allows every one exactly when the matcher is accepting (the text
so far satisfies the constraint) and none before. Once the matcher is stopped (`is_finished`: the
constraint is complete, e.g. a JSON object's closing brace) the mask allows only the eos ids, so
the engine can end the sequence there. The engine does not feed an eos to the matcher; `accept`
ignores one anyway. A matcher that fails inside llguidance (a resource limit while computing a mask)
also allows only the eos ids: its `error` says so, and the sequence should end as an error, not as
a complete output.

Whitespace: JSON schemas (and json_object) compile with compact separators ("," and ":") and no
optional whitespace, overriding any "x-guidance" options in the schema. With llguidance's default
(flexible whitespace) a model, or random weights' noise, could emit spaces and newlines between
tokens for ever without the output ever becoming invalid or complete; compact JSON is also fewer
tokens. Strings and unbounded structures can still run to max_tokens, which bounds them.

Budget (closing within max_tokens): a matcher made with the sequence's max_tokens closes its
constraint before the budget cuts it. When CLOSE_WINDOW (64) tokens remain, or fewer, it searches
for the constraint's shortest completion in tokens (`Completer.shortest`: a breadth-first search by
token count over llguidance's matcher, from a copy, over the tokens llguidance forces and a few
candidates, each step checked by the matcher). A completion of L tokens with R remaining and
R - L > CLOSE_MARGIN (3): the model goes on, and the next search comes halfway to the point where
it would not (a few searches a request, each step's growth of L absorbed by the margin). Otherwise
the matcher is `closing`: `fill_masks` gives its row only the completion's next token (an eos last
where the constraint is accepting but not stopped), so the sampler picks it whatever the logits,
and logprobs, n, streaming and decode graphs see an ordinary masked token; `accept` checks it. The
output ends up to CLOSE_MARGIN tokens early and valid, and the engine reports finish_reason
"length": the budget, not the model, ended it. Where no completion fits (max_tokens 1 for a schema
that needs more; one model token that lengthened L past R, as a new key does whose name is many
tokens) or the search's bounds find none, the output is cut at the budget as before. The search is
deterministic (its bounds are counts), so the ranks of a tensor-parallel group, which run the same
matchers, agree. `StructuredDecoder.close_window` 0 turns closing off for the matchers made after.
The searches run in `accept`, on the engine thread (on masks_async's thread their many short
Python calls held the GIL against the forward pass's); a request makes a few to a few tens of them,
each ~5 - 10 ms at the tiny and Qwen-sized vocabularies (benchmarks/bench_structured.py), nothing
before its last CLOSE_WINDOW tokens.

Forced tokens: where the grammar forces bytes (the rest of a choice, a JSON key, a literal),
llguidance encodes them with the tokenizer and its mask allows only the first token of that encoding
(the tokenization the model knows), without checking that the encoding decodes to those bytes; its
matcher checks the bytes, so a token whose bytes differ is allowed by the mask and then rejected by
`accept` (llguidance 1.0 - 1.9.1; upstream issue guidance-ai/llguidance#366). Hugging Face's encoder
does not round-trip in two ways: (1) the Qwen tokenizers' NFC normalizer rewrites text that is not in
NFC ("e\u0301" -> "\u00e9", the compatibility ideograph U+F93A -> U+9DFA), so the mask allowed only
a token of the normalized text and the matcher rejected it (no allowed token is then valid: the
request could only fail); (2) it cuts the literal text of an added token ("<tool_call>",
"<|im_end|>") out as that token, which llguidance treats as special (its bytes are not the text), so
the mask allowed a token the matcher rejects, or only an eos before the output is complete. The text
encoder given to llguidance therefore has no Unicode normalization (text in NFC encodes as before)
and, for byte-level BPE, its added tokens that llguidance treats as special (special, or spelled
<...>) live in the BPE vocabulary under their llguidance bytes (0xFF then the name), which no text
encodes to: every forced encoding decodes to the forced bytes, and grammars still name special tokens
(<tool_call>, <|im_end|>, <[526]>) as before. Should the mask and the matcher disagree anyway,
`accept` raises RuntimeError (an eos while the constraint is incomplete too) and the engine ends
that request alone with the error.

Cost: nothing for a batch without constraints (`fill_masks` returns None). Otherwise one mask
computation per constrained row per step (on llguidance's threads; it quotes ~50 us for a 128k
vocabulary, ~10 us here for the tests' tokenizer), a [B, ceil(V / 32)] int32 host tensor (~19 KB a
row for V = 151936), and in the sampler one copy of the constrained rows' words to the logits'
device plus a vectorised unpack ([R, V] int32 temporaries for R constrained rows).
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher, LLParserLimits, LLTokenizer, grammar_from

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

# Compact JSON: no whitespace between tokens (see the module docstring). Overrides, not defaults, so
# a schema's own "x-guidance" options cannot turn unbounded whitespace back on.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# A rejected token's error names the token and the byte, without llguidance's dump of the parser
# state and the whole grammar (which could be a large schema) into the request's error.
_LIMITS = LLParserLimits(verbose_errors=False)
# Normalizers that rewrite Unicode text: forced bytes must encode to tokens of exactly those bytes.
_UNICODE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
# llguidance's first byte of a special token's bytes (TokTrie::SPECIAL_TOKEN_MARKER): no UTF-8 text has it.
_SPECIAL_MARKER = b"\xff"

# Closing within max_tokens (see "Budget" in the module docstring). A budgeted matcher first
# searches for its shortest completion when this many tokens remain (or fewer: from its first
# token for a smaller max_tokens)...
CLOSE_WINDOW = 64
# ...and forces that completion once it leaves this many spare tokens or fewer: one model token can
# lengthen the shortest completion (a key's closing quote adds its colon and a value), and up to
# this much growth between two searches still fits.
CLOSE_MARGIN = 3
# The search's bounds, in counts (never time, so tensor-parallel ranks agree): nodes expanded per
# depth, allowed candidates tried per node, candidates checked one by one before a node's whole mask
# is computed instead (a mask costs ~50 - 150 us at Qwen's vocabulary, a check ~3 us), nodes
# expanded in all.
_BEAM = 6
_TRIED = 8
_SCAN = 24
_EXPANSIONS = 128
# The bytes whose acceptance (with the forced bytes and whether the constraint is accepting) tells
# sibling states apart: siblings alike in all of them are taken for one state (a string's body).
_PROBE_BYTES = b'"}],:0a\\'
# Candidate tokens, in the order tried: the closing quote; then the vocabulary's tokens of 2..8 of
# these bytes (a JSON closing run: `"}`, `]}`, `":`, `","`), longest first; then single bytes:
# closers, separators and a number, the other digits, punctuation (what ends a run of letters in a
# regex), letters, and every other byte (UTF-8 continuations, controls).
_RUN_BYTES = frozenset(b'"}]:,0')
_SINGLE_ORDER = (b'}]0,:[{' + b"123456789-." + bytes(c for c in range(0x20, 0x7F) if not chr(c).isalnum())
                 + bytes(range(ord("a"), ord("z") + 1)) + bytes(range(ord("A"), ord("Z") + 1)))


def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character that spells each byte in a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return chars


def _without_unicode_normalization(normalizer: dict | None) -> dict | None:
    if normalizer is None or normalizer.get("type") in _UNICODE_NORMALIZERS:
        return None
    if normalizer.get("type") == "Sequence":
        kept = [n for n in map(_without_unicode_normalization, normalizer["normalizers"]) if n is not None]
        return {**normalizer, "normalizers": kept} if kept else None
    return normalizer


def _is_byte_level(decoder: dict | None) -> bool:
    if decoder is None:
        return False
    if decoder.get("type") == "Sequence":
        return any(map(_is_byte_level, decoder["decoders"]))
    return decoder.get("type") == "ByteLevel"


def llguidance_tokenizer_json(tokenizer: PreTrainedTokenizerFast) -> str:
    """The tokenizer.json that llguidance.hf.from_tokenizer would hand llguidance, changed so that
    encoding any UTF-8 text gives tokens whose bytes are that text (see "Forced tokens" in the module
    docstring): no Unicode normalization; for byte-level BPE, the added tokens that llguidance treats
    as special (special, or spelled <...>) moved into the BPE vocabulary, keeping their ids, spelled
    as their llguidance bytes (0xFF then the name: what llguidance gives them anyway), which no text
    encodes to since no merge makes them. Other added tokens (plain text) stay: they are their text."""
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    spec["normalizer"] = _without_unicode_normalization(spec.get("normalizer"))
    model = spec["model"]
    if _is_byte_level(spec.get("decoder")) and model.get("type") == "BPE" and isinstance(model.get("vocab"), dict):
        chars = byte_level_chars()
        kept = []
        for added in spec.get("added_tokens") or []:
            content = added["content"]
            spelled = "".join(chars[b] for b in _SPECIAL_MARKER + content.encode())
            special = added["special"] or (content.startswith("<") and content.endswith(">"))
            if special and spelled not in model["vocab"]:
                model["vocab"][spelled] = added["id"]
            else:
                kept.append(added)
        spec["added_tokens"] = kept
    return json.dumps(spec, ensure_ascii=False)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output text (OpenAI response_format / vLLM guided_*).

    kind: "json_schema" (spec: the JSON schema as JSON text), "json_object" (spec "": any JSON object),
    "regex" (spec: the pattern, Rust regex syntax, matched against the whole output), "choice"
    (choices: the output is exactly one of these strings), "grammar" (spec: a Lark grammar in
    llguidance's dialect). Hashable: it is the key of the compiled-grammar cache.
    """

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.choices, list):  # a list from a request's JSON would make the key unhashable
            object.__setattr__(self, "choices", tuple(self.choices))

    def validate(self) -> None:
        """Raise ValueError naming the problem; the cheap checks only (check() compiles)."""
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"structured output spec must be a string, got {type(self.spec).__name__}")
        if self.kind == "choice":
            self._validate_choices()
        elif self.choices:
            raise ValueError(f"structured output kind {self.kind!r} takes no choices")
        if self.kind == "json_schema":
            self._validate_schema()
        elif self.kind == "json_object" and self.spec:
            raise ValueError("structured output kind 'json_object' takes no spec (it allows any JSON object)")
        elif self.kind in ("regex", "grammar") and not self.spec:
            raise ValueError(f"structured output kind {self.kind!r} needs a non-empty spec")

    def _validate_choices(self) -> None:
        if self.spec:
            raise ValueError("structured output kind 'choice' takes its strings in choices, not spec")
        if not isinstance(self.choices, tuple) or not self.choices:
            raise ValueError("structured output choices must be a non-empty list of strings")
        if any(not isinstance(c, str) or not c for c in self.choices):
            raise ValueError("structured output choices must all be non-empty strings")

    def _validate_schema(self) -> None:
        try:
            schema = json.loads(self.spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured output json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"structured output json_schema must be a JSON object, got {type(schema).__name__}")

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint (not yet checked: the matcher does that)."""
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec, overrides=_JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=_JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return grammar_from("choice", json.dumps(list(self.choices)))
        return LLMatcher.grammar_from_lark(self.spec)


class Completer:
    """Shortest completions of constraints, in tokens, found by llguidance's matcher.

    A breadth-first search by token count from a matcher's state over a few candidate tokens
    (`_candidates`): a node's children are the first `_TRIED` candidates it allows, or the tokens
    llguidance forces there (compute_ff_tokens: a required key, the rest of a literal) as one step
    of their length; siblings alike in the few tokens they accept (`_signature`) are one state (the
    letters of a string's body) and only the first is kept; each depth expands its first `_BEAM`
    nodes (children of the deepest parents first, in candidate order: closers first). A node that
    is stopped ends the search; one that is accepting ends it with an eos token. Every path is
    consumed by a copy of the matcher, so a completion found is valid by construction; the bounds
    make it the shortest among the paths searched, not always the shortest there is.

    tokenizer: llguidance's view of the tokenizer; vocab_size: the masks' width; eos_id: the
    token that ends an accepting, unstopped constraint.
    """

    def __init__(self, tokenizer: LLTokenizer, vocab_size: int, eos_id: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_id = eos_id
        self._ids: np.ndarray | None = None  # candidate ids [C] int64, built at the first search
        self._probes: list[int] = []  # the single-byte tokens of _PROBE_BYTES
        self.exhausted = False  # the last search's bounds ran out before its limit

    def _candidates(self) -> np.ndarray:
        """The candidate token ids [C] int64 in the order tried (see _RUN_BYTES): one pass over the
        vocabulary (about 0.3 s at Qwen's size), done once."""
        if self._ids is None:
            singles: dict[int, int] = {}
            runs: list[tuple[int, int]] = []
            for token in range(self._vocab_size):
                if self._tokenizer.is_special_token(token):
                    continue
                text = self._tokenizer.decode_bytes([token])
                if len(text) == 1:
                    singles.setdefault(text[0], token)
                elif 2 <= len(text) <= 8 and _RUN_BYTES.issuperset(text):
                    runs.append((-len(text), token))
            bytes_after = dict.fromkeys([*_SINGLE_ORDER, *range(256)])  # in order, each once
            del bytes_after[ord('"')]
            ids = [singles[b] for b in [ord('"')] if b in singles] + [t for _, t in sorted(runs)]
            ids += [singles[b] for b in bytes_after if b in singles]
            self._probes = [singles[b] for b in _PROBE_BYTES if b in singles]
            self._ids = np.array(ids, dtype=np.int64)
        return self._ids

    def _allowed(self, node: LLMatcher, ids: np.ndarray) -> list[int]:
        """The first _TRIED candidates `node` allows: checked one by one among the first _SCAN (the
        usual case: a closer, a separator or a string's letters are among them), else from its mask."""
        allowed = [t for t in ids[:_SCAN].tolist() if node.validate_tokens([t]) == 1][:_TRIED]
        if len(allowed) < _TRIED and len(ids) > _SCAN:
            words = np.frombuffer(node.compute_bitmask(), dtype=np.uint32)
            allowed = ids[words[ids >> 5] >> (ids & 31) & 1 == 1][:_TRIED].tolist()
        return allowed

    def _signature(self, node: LLMatcher) -> tuple[bool, bytes, tuple[int, ...]]:
        """What tells sibling states apart (see _PROBE_BYTES), far cheaper than their masks."""
        return node.is_accepting(), node.compute_ff_bytes(), tuple(node.validate_tokens([p]) for p in self._probes)

    def shortest(self, matcher: LLMatcher, limit: int) -> list[int] | None:
        """The shortest completion found from `matcher`'s state (left as it is): token ids, an eos
        last where the constraint is accepting without being stopped; None when none of at most
        `limit` tokens is found within the search's bounds (`exhausted` then says whether the
        bounds, not the limit, ended the search)."""
        ids = self._candidates()
        self.exhausted = False
        # per depth: (-its parent's depth, node, path), in the order made
        buckets: dict[int, list[tuple[int, LLMatcher, list[int]]]] = {0: [(0, matcher.deep_copy(), [])]}
        best: list[int] | None = None  # an accepting node's path and its eos
        expanded = 0
        for depth in range(limit + 1):
            if best is not None and len(best) <= depth:
                break
            # Children of the deepest parents first: a node reached by a long forced step from far back
            # is most often the same state as a shallower one (the string was closed one letter later)
            layer = sorted(buckets.pop(depth, []), key=lambda entry: entry[0])
            for _, node, path in layer:  # the beam bounds what is expanded, not what is seen
                if node.is_stopped():  # complete at this depth: nothing shorter was found
                    return path
                if best is None and node.is_accepting():
                    best = [*path, self._eos_id]
            self.exhausted |= len(layer) > _BEAM
            for _, node, path in layer[:_BEAM]:
                if node.is_accepting():  # its eos completes it: longer paths from it need not be searched
                    continue
                if expanded == _EXPANSIONS:
                    self.exhausted = True
                    break
                expanded += 1
                forced = node.compute_ff_tokens()
                steps = [forced] if forced else [[t] for t in self._allowed(node, ids)]
                siblings: set[tuple[bool, bytes, tuple[int, ...]]] = set()
                for step in steps:
                    if depth + len(step) > limit:
                        continue
                    child = node.deep_copy()
                    if not child.consume_tokens(step):
                        continue
                    signature = self._signature(child)
                    if signature not in siblings:
                        siblings.add(signature)
                        buckets.setdefault(depth + len(step), []).append((-depth, child, [*path, *step]))
        return best if best is not None and len(best) <= limit else None


class Matcher:
    """One sequence's position in its constraint: which tokens may come next.

    With a budget (the request's max_tokens) and a completer, it closes the constraint before the
    budget runs out (see "Budget" in the module docstring): `forced_token` names the token the
    mask must allow alone, `closing` says the budget, not the model, ends the sequence.
    """

    def __init__(self, matcher: LLMatcher, eos_ids: frozenset[int], budget: int | None = None,
                 completer: Completer | None = None, close_window: int = CLOSE_WINDOW):
        self._matcher = matcher
        self._eos_ids = eos_ids
        self._budget = budget
        self._completer = completer
        self._emitted = 0  # tokens accepted so far, eos included: the budget counts them all
        self._search_at = close_window  # search when this many tokens remain or fewer; -1: never again
        self._closing: list[int] | None = None  # the completion's tokens still to come once closing

    @property
    def closing(self) -> bool:
        """The budget is ending this sequence: its mask allows only the next token of the shortest
        completion found, so the output ends before max_tokens, and valid; the sequence's
        finish_reason is still "length"."""
        return self._closing is not None

    def forced_token(self) -> int | None:
        """The one token the mask must allow next while closing, None while the model chooses.

        Without a budget, or once a search finds that no completion fits in the tokens that
        remain, never any. Otherwise the search runs when `_search_at` tokens remain or fewer: a
        completion of L tokens with R remaining starts closing when R - L <= CLOSE_MARGIN; with more
        to spare the next search comes halfway to that point (one token rarely lengthens the
        completion by more than one or two). Called by accept (the engine thread: a search due runs
        there) and by fill_masks (the first token's search, then only the answer)."""
        if self._closing:
            return self._closing[0]
        if self._closing is not None or self._budget is None or self._completer is None:
            return None
        remaining = self._budget - self._emitted
        if remaining > self._search_at or remaining < 1 or self._matcher.is_stopped():
            return None
        path = self._completer.shortest(self._matcher, remaining)
        if path is None:
            # Nothing fits: the budget cuts the output where it is, as without closing. The search's
            # bounds ran out first: again a quarter of the way on (the model's tokens may shorten it).
            self._search_at = remaining - max(1, remaining // 4) if self._completer.exhausted else -1
            return None
        spare = remaining - len(path)
        if spare > CLOSE_MARGIN:
            self._search_at = remaining - max(1, (spare - CLOSE_MARGIN) // 2)
            return None
        self._closing = path
        return path[0]

    def accept(self, token_id: int) -> None:
        """Advance by the sampled token. An eos token is ignored (the sequence ends there; the mask
        only allows it once the constraint is satisfied, or once the matcher failed: see `error`).
        RuntimeError if the grammar rejects the token, or for an eos while the constraint is
        incomplete, which a token sampled under this matcher's mask cannot be (a fault of the grammar
        engine: the caller ends this sequence with the error); a rejected token leaves the matcher in
        error. While closing, RuntimeError for any token but the forced one (its mask allowed no other)."""
        if self._closing:
            if token_id != self._closing[0]:
                raise RuntimeError(f"token {token_id} sampled where the budget forced token {self._closing[0]}")
            self._closing.pop(0)
        self._emitted += 1
        if token_id in self._eos_ids:
            if not self._matcher.is_accepting() and not self._matcher.is_error():
                raise RuntimeError(f"end-of-sequence token {token_id} before the constraint is complete")
            return
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} is not allowed by the constraint: {self._matcher.get_error()}")
        # A search due now runs here, on the caller's (engine) thread, not inside the next fill_masks:
        # on masks_async's thread its many short Python calls would hold the GIL against the forward
        # pass's (a convoy that cost the CPU benchmark far more than the searches themselves).
        self.forced_token()

    @property
    def is_finished(self) -> bool:
        """The constraint is complete: only an end-of-sequence token may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher failed (llguidance's message: a rejected token, a resource limit hit while
        computing a mask), None while it is fine. A failed matcher only allows the eos ids."""
        return self._matcher.get_error() if self._matcher.is_error() else None


class StructuredDecoder:
    """One per LLM: compiles constraints for this tokenizer (cached per constraint) and computes the
    per-row token masks.

    tokenizer: a Hugging Face fast tokenizer (the LLM's); vocab_size: the logits' width, at least
    len(tokenizer); eos_ids: the ids that end a sequence (the tokenizer's own eos when empty);
    cache_size: how many compiled constraints are kept (least recently used goes first).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, vocab_size: int, eos_ids: Iterable[int],
                 cache_size: int = 256):
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids) or frozenset({tokenizer.eos_token_id} - {None})
        if not self.eos_ids:
            raise ValueError("no eos ids given and the tokenizer has no eos token")
        self.mask_words = (vocab_size + 31) // 32
        self.cache_size = cache_size
        self._tokenizer: LLTokenizer = LLTokenizer(llguidance_tokenizer_json(tokenizer), n_vocab=vocab_size,
                                                   eos_token=sorted(self.eos_ids))
        self.completer = Completer(self._tokenizer, vocab_size, min(self.eos_ids))  # shared by the matchers
        # CLOSE_WINDOW for the matchers made from now on; 0: they never close (the benchmark's "before")
        self.close_window = CLOSE_WINDOW
        self._compiled: OrderedDict[StructuredOutput, LLMatcher] = OrderedDict()
        self._executor: LLExecutor | None = None  # its thread pool starts with the first constrained batch
        self._pool: ThreadPoolExecutor | None = None  # masks_async's thread

    def check(self, constraint: StructuredOutput) -> None:
        """Compile `constraint` (cached); ValueError naming the problem when it does not compile."""
        self._initial(constraint)

    def matcher(self, constraint: StructuredOutput, max_tokens: int | None = None) -> Matcher:
        """A fresh matcher for one sequence, from the cached compiled grammar; with `max_tokens` (the
        sequence's output budget) it closes the constraint before the budget runs out."""
        return Matcher(self._initial(constraint).deep_copy(), self.eos_ids, max_tokens, self.completer,
                       self.close_window)

    def fill_masks(self, matchers: Sequence[Matcher | None]) -> torch.Tensor | None:
        """The allowed next tokens of each row: int32 [B, ceil(vocab_size / 32)] on the CPU, bit j of
        word w set when token 32 w + j is allowed; rows whose matcher is None allow every token, a
        closing row (Matcher.forced_token, which searches when due) only its forced token. None when
        no row has a matcher.
        The other constrained rows are computed together on llguidance's threads, without the GIL."""
        if all(m is None for m in matchers):
            return None
        masks = torch.full((len(matchers), self.mask_words), -1, dtype=torch.int32)
        rows = []
        for i, m in enumerate(matchers):
            forced = None if m is None else m.forced_token()
            if forced is not None:
                masks[i] = 0
                masks[i, forced >> 5] = 1 << (forced & 31) if forced & 31 < 31 else -(1 << 31)  # int32's sign bit
            elif m is not None:
                rows.append((m._matcher, i))
        if rows:
            if self._executor is None:
                self._executor = LLExecutor()
            # what llguidance.torch.fill_next_token_bitmask_par does, without importing llguidance.torch
            # (whose import pulls in torch._dynamo: ~2 s)
            self._executor.unsafe_compute_mask_ptr(rows, masks.data_ptr(), self.mask_words * 4, len(matchers))
        return masks

    def masks_async(self, matchers: Sequence[Matcher | None]) -> Future[torch.Tensor | None]:
        """fill_masks on a worker thread, so the caller can run the forward pass meanwhile (the
        masks depend only on the tokens accepted so far). The matchers must not change until the
        result is taken."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qvl-masks")
        return self._pool.submit(self.fill_masks, matchers)

    def _initial(self, constraint: StructuredOutput) -> LLMatcher:
        """The constraint's matcher in its initial state, compiled on first use (LRU-cached)."""
        matcher = self._compiled.get(constraint)
        if matcher is not None:
            self._compiled.move_to_end(constraint)
            return matcher
        matcher = self._compile(constraint)
        self._compiled[constraint] = matcher
        if len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return matcher

    def _compile(self, constraint: StructuredOutput) -> LLMatcher:
        """Build the matcher of a validated constraint; ValueError with llguidance's error if it fails."""
        constraint.validate()
        try:
            grammar = constraint.grammar()
        except ValueError as e:  # the schema text is not a JSON object (validate() catches most)
            raise ValueError(f"structured output {constraint.kind}: {e}") from None
        # log_level 0: errors surface as exceptions here and in accept(), not as lines on stderr
        matcher = LLMatcher(self._tokenizer, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise ValueError(f"structured output {constraint.kind} does not compile: {matcher.get_error()}")
        return matcher
