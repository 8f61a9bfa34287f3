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


class Matcher:
    """One sequence's position in its constraint: which tokens may come next."""

    def __init__(self, matcher: LLMatcher, eos_ids: frozenset[int]):
        self._matcher = matcher
        self._eos_ids = eos_ids

    def accept(self, token_id: int) -> None:
        """Advance by the sampled token. An eos token is ignored (the sequence ends there; the mask
        only allows it once the constraint is satisfied, or once the matcher failed: see `error`).
        RuntimeError if the grammar rejects the token, or for an eos while the constraint is
        incomplete, which a token sampled under this matcher's mask cannot be (a fault of the grammar
        engine: the caller ends this sequence with the error); a rejected token leaves the matcher in
        error."""
        if token_id in self._eos_ids:
            if not self._matcher.is_accepting() and not self._matcher.is_error():
                raise RuntimeError(f"end-of-sequence token {token_id} before the constraint is complete")
            return
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} is not allowed by the constraint: {self._matcher.get_error()}")

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
        self._compiled: OrderedDict[StructuredOutput, LLMatcher] = OrderedDict()
        self._executor: LLExecutor | None = None  # its thread pool starts with the first constrained batch
        self._pool: ThreadPoolExecutor | None = None  # masks_async's thread

    def check(self, constraint: StructuredOutput) -> None:
        """Compile `constraint` (cached); ValueError naming the problem when it does not compile."""
        self._initial(constraint)

    def matcher(self, constraint: StructuredOutput) -> Matcher:
        """A fresh matcher for one sequence, from the cached compiled grammar."""
        return Matcher(self._initial(constraint).deep_copy(), self.eos_ids)

    def fill_masks(self, matchers: Sequence[Matcher | None]) -> torch.Tensor | None:
        """The allowed next tokens of each row: int32 [B, ceil(vocab_size / 32)] on the CPU, bit j of
        word w set when token 32 w + j is allowed; rows whose matcher is None allow every token.
        None when no row has a matcher. The constrained rows are computed together on
        llguidance's threads, without the GIL."""
        rows = [(m._matcher, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._executor is None:
            self._executor = LLExecutor()
        masks = torch.full((len(matchers), self.mask_words), -1, dtype=torch.int32)
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
