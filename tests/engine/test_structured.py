"""Structured outputs against the tiny checkpoint's tokenizer.

Noise decoding (random logits every step, greedy and sampled rows, the masks from fill_masks applied
by sample()) under random bounded JSON schemas, regexes, choices, json_object and a Lark grammar:
the text is valid whenever an end-of-sequence token came, and for bounded constraints one comes
within a budget derived from the constraint. Every mask allows the eos ids exactly when the
matcher is accepting and nothing past the tokenizer. Forced text (the rest of a choice, a literal)
whose encoding by the Hugging Face tokenizer does not round-trip (not in NFC; the text of an added
token): every token a mask allows is accepted, where llguidance's own tokenizer view fails (a
strict xfail documents that upstream bug). Also: a mixed batch leaves its unconstrained rows alone;
compile errors; validate(); the compiled-grammar cache; accept().
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.engine.sampling import SamplingParams, make_generator, sample
from qwen_vl_triton.engine.structured import Matcher, StructuredDecoder, StructuredOutput, llguidance_tokenizer_json
from qwen_vl_triton.modeling.config import load_config
from tests.engine.test_sampling import allowed_tokens


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    return load_config(tiny_checkpoint)


@pytest.fixture(scope="module")
def decoder(tokenizer, config) -> StructuredDecoder:
    return StructuredDecoder(tokenizer, config.text.vocab_size, config.eos_token_ids)


# ---------------------------------------------------------------- noise decoding


def _check_masks(masks: torch.Tensor, matchers: list[Matcher], decoder: StructuredDecoder, n_tokens: int) -> None:
    """Each constrained row allows something, the eos ids exactly when its matcher is accepting,
    only the eos ids once it is finished, and no id past the tokenizer (special tokens included);
    a closing row allows its forced token alone."""
    allowed = allowed_tokens(masks, decoder.vocab_size)
    eos = sorted(decoder.eos_ids)
    for row, matcher in zip(allowed, matchers, strict=True):
        forced = matcher.forced_token()  # the same answer as fill_masks had: nothing changed since
        if forced is not None:
            assert row.nonzero().squeeze(1).tolist() == [forced]
            continue
        assert row.any()
        assert not row[n_tokens:].any()
        assert row[eos].tolist() == [matcher._matcher.is_accepting()] * len(eos)
        if matcher.is_finished:
            assert row.nonzero().squeeze(1).tolist() == eos


def decode_noise(decoder: StructuredDecoder, tokenizer, constraint: StructuredOutput, params: list[SamplingParams],
                 seed: int, budget: int, bias: dict[int, float] | None = None, closing: bool = False
                 ) -> list[tuple[str, bool]]:
    """Decode len(params) rows of random logits (plus `bias` on some tokens) under `constraint`, as
    the engine would: masks, sample(), accept(); a row stops at an eos or after `budget` tokens
    (with `closing`, the matchers' max_tokens: they close the constraint within it).
    Returns each row's (text, ended with an eos)."""
    gen = torch.Generator().manual_seed(seed)
    gens = [make_generator(seed + i, "cpu") for i in range(len(params))]
    matchers = [decoder.matcher(constraint, budget if closing else None) for _ in params]
    outputs: list[list[int]] = [[] for _ in params]
    ended = [False] * len(params)
    offset = torch.zeros(decoder.vocab_size)
    for token, value in (bias or {}).items():
        offset[token] = value
    for _ in range(budget):
        live = [i for i in range(len(params)) if not ended[i]]
        if not live:
            break
        masks = decoder.fill_masks([matchers[i] for i in live])
        _check_masks(masks, [matchers[i] for i in live], decoder, len(tokenizer))
        logits = torch.randn(len(live), decoder.vocab_size, generator=gen) * 4 + offset
        out = sample(logits, [params[i] for i in live], [[]] * len(live), [outputs[i] for i in live],
                     [gens[i] for i in live], token_bitmask=masks)
        for i, token in zip(live, out.token_ids, strict=True):
            if token in decoder.eos_ids:
                ended[i] = True
            else:
                matchers[i].accept(token)
                outputs[i].append(token)
    return [(tokenizer.decode(o, skip_special_tokens=True), e) for o, e in zip(outputs, ended, strict=True)]


ROWS = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9), SamplingParams(temperature=0.0, repetition_penalty=1.3)]

_KEYS = st.sampled_from(["id", "name", "tags", "ok", "a", "b", "nested", "score", "é"])
_LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(st.integers(-50, 50), st.text("abcxyz ", max_size=4)), min_size=1, max_size=4,
             unique_by=json.dumps).map(lambda values: {"enum": values}),
    st.tuples(st.integers(-1000, 1000), st.integers(0, 1000)).map(
        lambda lo_span: {"type": "integer", "minimum": lo_span[0], "maximum": lo_span[0] + lo_span[1]}),
    st.tuples(st.integers(0, 3), st.integers(0, 4)).map(
        lambda lo_span: {"type": "string", "minLength": lo_span[0], "maxLength": lo_span[0] + lo_span[1]}),
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    arrays = st.tuples(children, st.integers(0, 1), st.integers(0, 2)).map(
        lambda c: {"type": "array", "items": c[0], "minItems": c[1], "maxItems": c[1] + c[2]})
    objects = st.dictionaries(_KEYS, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))
    return arrays | objects


SCHEMAS = st.recursive(_LEAVES, _containers, max_leaves=5)


def max_json_bytes(schema: dict) -> int:
    """An upper bound on the bytes of compact JSON valid under a bounded schema of SCHEMAS; each
    allowed token but eos has at least one byte, so it bounds the tokens before the eos too."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema["type"]
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "string":
        return 2 + 12 * schema["maxLength"]  # a surrogate pair's escape: 12 bytes for 1 character
    if kind == "array":
        return 2 + schema["maxItems"] * (max_json_bytes(schema["items"]) + 1)
    if kind == "object":  # each property: "key" (ASCII, or escaped as \\uXXXX), colon, value, comma
        return 2 + sum(6 * len(k) + 4 + max_json_bytes(v) for k, v in schema["properties"].items())
    return 5  # false, true, null


@settings(max_examples=40)
@given(schema=SCHEMAS.map(lambda s: s if s.get("type") == "object" else {
    "type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False}),
    seed=st.integers(0, 2**31 - 1))
def test_noise_under_json_schema_is_valid_and_ends(decoder, tokenizer, schema: dict, seed: int):
    budget = max_json_bytes(schema) + 1
    constraint = StructuredOutput("json_schema", json.dumps(schema))
    for text, ended in decode_noise(decoder, tokenizer, constraint, ROWS, seed, budget):
        assert ended, (text, budget)
        jsonschema.validate(json.loads(text), schema)


# [0-9], not \d: llguidance's \d is Rust's Unicode one, whose tables may be newer than Python's
REGEXES = [r"[a-z]{1,8}", r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}",
           r"[a-z]{1,5}@[a-z]{1,5}\.(com|org)", r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})?", r"[^\n\"]{0,6}!"]


@settings(max_examples=20)
@given(pattern=st.sampled_from(REGEXES), seed=st.integers(0, 2**31 - 1))
def test_noise_under_regex_fullmatches(decoder, tokenizer, pattern: str, seed: int):
    for text, ended in decode_noise(decoder, tokenizer, StructuredOutput("regex", pattern), ROWS, seed, 40):
        assert ended, text
        assert re.fullmatch(pattern, text), (pattern, text)


@settings(max_examples=30)
@given(choices=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5, unique=True),
       seed=st.integers(0, 2**31 - 1))
def test_noise_under_choice_is_one_of_them(decoder, tokenizer, choices: list[str], seed: int):
    """Any strings (unicode, quotes, control characters, prefixes of one another)."""
    budget = max(len(c.encode()) for c in choices) + 1
    for text, ended in decode_noise(decoder, tokenizer, StructuredOutput("choice", choices=tuple(choices)),
                                    ROWS, seed, budget):
        assert ended
        assert text in choices


# The input hypothesis found (the last choice ends in U+F93A, a CJK compatibility ideograph that NFC
# turns into U+9DFA): llguidance's mask forced the first token of the tokenizer's encoding of the NFC
# form (0xE9, token 165) where the grammar needs 0xEF, and accept() rejected the token.
NON_NFC_CHOICES = ("\U0005d701\xcbr\xae\xefY>\xed", "P\x116\U000ae970\x16\x7f\uf93a", "\xce\x18")


def test_noise_under_choice_not_in_nfc(decoder, tokenizer):
    budget = max(len(c.encode()) for c in NON_NFC_CHOICES) + 1
    rows = decode_noise(decoder, tokenizer, StructuredOutput("choice", choices=NON_NFC_CHOICES), ROWS, 193906, budget)
    assert rows == [("P\x116\U000ae970\x16\x7f\uf93a", True)] * 3 + [("\U0005d701\xcbr\xae\xefY>\xed", True)]


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1))
def test_noise_under_json_object_is_a_dict(decoder, tokenizer, seed: int):
    """Unbounded: closing tokens get a bias so that most rows end; those that end parse as objects."""
    closers = {tokenizer.convert_tokens_to_ids(t): 6.0 for t in ("}", "]", '"')}
    rows = decode_noise(decoder, tokenizer, StructuredOutput("json_object"), ROWS, seed, 200,
                        {**closers, **dict.fromkeys(decoder.eos_ids, 6.0)})
    assert any(ended for _, ended in rows)
    for text, ended in rows:
        if ended:
            assert isinstance(json.loads(text), dict), text


LARK = """
start: "(" item ("," item){0,3} ")"
item: NUMBER | "x"
NUMBER: /[0-9]{1,3}/
"""


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1))
def test_noise_under_lark_grammar(decoder, tokenizer, seed: int):
    for text, ended in decode_noise(decoder, tokenizer, StructuredOutput("grammar", LARK), ROWS, seed, 20):
        assert ended, text
        assert re.fullmatch(r"\((x|[0-9]{1,3})(,(x|[0-9]{1,3})){0,3}\)", text), text


# ---------------------------------------------------------------- forced text


def walk_masks(decoder: StructuredDecoder, matcher: Matcher, pick, limit: int = 64) -> list[int]:
    """Advance `matcher` by `pick(allowed non-eos tokens)` until it is finished, nothing but an eos is
    allowed, or `pick` returns None; at every step each token the mask allows must be accepted by
    the matcher (llguidance's validate_tokens, which leaves it as it is) and the eos ids allowed
    exactly when it is accepting. Returns the tokens taken."""
    taken: list[int] = []
    eos = sorted(decoder.eos_ids)
    for _ in range(limit):
        allowed = allowed_tokens(decoder.fill_masks([matcher]), decoder.vocab_size)[0]
        assert allowed[eos].tolist() == [matcher._matcher.is_accepting()] * len(eos), taken
        tokens = [t for t in allowed.nonzero().squeeze(1).tolist() if t not in decoder.eos_ids]
        rejected = [t for t in tokens if matcher._matcher.validate_tokens([t]) != 1]
        assert not rejected, (taken, rejected)
        token = pick(tokens) if tokens and not matcher.is_finished else None
        if token is None:
            return taken
        matcher.accept(token)
        taken.append(token)
    raise AssertionError(f"no end after {limit} tokens: {taken}")


# Text whose Hugging Face encoding does not decode to it: not in NFC (combining sequences, a
# singleton decomposition, compatibility ideographs, conjoining jamo), or the literal text of an added
# token (special or not, and the eos among them). llguidance forces the first token of that encoding.
FORCED_TEXTS = ["\uf93a", "x\uf93a", "e\u0301", "abc\u0301def", "A\u030a", "\u212b", "\u2126", "\u1100\u1161",
                "\u0958", "<tool_call>", "a<tool_call>b</tool_call>", "<|im_end|>", "x<|endoftext|>",
                "<|vision_pad|>", "caf\u00e9 \u4e2d\u6587"]


@pytest.mark.parametrize("text", FORCED_TEXTS, ids=ascii)
@pytest.mark.parametrize("kind", ["choice", "grammar"])
def test_forced_text_is_allowed_and_accepted(decoder, tokenizer, kind: str, text: str):
    """The mask forces tokens whose bytes are the text: the output decodes to it, byte for byte."""
    constraint = (StructuredOutput("choice", choices=(text,)) if kind == "choice"
                  else StructuredOutput("grammar", f"start: {json.dumps(text)}"))
    matcher = decoder.matcher(constraint)
    taken = walk_masks(decoder, matcher, lambda tokens: tokens[0])
    assert matcher.is_finished
    assert b"".join(decoder._tokenizer.decode_bytes([t]) for t in taken) == text.encode()
    assert tokenizer.decode(taken) == text


_UNSTABLE = st.sampled_from(["\u0301", "\u030a", "\u0323", "\u0308", "\uf93a", "\ufa70", "\u212b", "\u2126", "\u1100",
                             "\u1161", "\u11a8", "\u0344", "\u0958", "\u2000", "\u00c5", "e", "A"])
_CHOICE_TEXT = st.text(st.characters(codec="utf-8") | _UNSTABLE, min_size=1, max_size=8) | st.sampled_from(
    ["<tool_call>", "</tool_call>", "<|im_end|>", "<|endoftext|>", "<|vision_pad|>", "<|im_start|>user"])


@settings(max_examples=60)
@given(choices=st.lists(_CHOICE_TEXT, min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**31 - 1))
def test_every_allowed_token_is_accepted_under_choices(decoder, tokenizer, choices: list[str], seed: int):
    """Random walks through choices rich in characters that NFC changes and in the text of added
    tokens: every token every mask allows is accepted, and a complete walk decodes to a choice."""
    gen = torch.Generator().manual_seed(seed)
    matcher = decoder.matcher(StructuredOutput("choice", choices=tuple(choices)))
    taken = walk_masks(decoder, matcher, lambda tokens: tokens[torch.randint(len(tokens), (), generator=gen)])
    assert matcher.is_finished or matcher._matcher.is_accepting()
    assert tokenizer.decode(taken) in choices


@pytest.mark.xfail(strict=True, reason="llguidance bug (guidance-ai/llguidance#366, open in 1.9.1 and since 1.0): "
                   "its mask forces the first token of the tokenizer's encoding of the forced bytes without checking "
                   "that it decodes to them, and Qwen's NFC normalizer turns U+F93A into U+9DFA; engine.structured "
                   "gives llguidance a tokenizer whose encoding round-trips. An XPASS means llguidance fixed it.")
def test_llguidance_own_tokenizer_view_forces_tokens_it_rejects(tokenizer, config):
    """llguidance.hf.from_tokenizer's view, the stock path: a choice ending in U+F93A."""
    from llguidance.hf import from_tokenizer

    decoder = StructuredDecoder(tokenizer, config.text.vocab_size, config.eos_token_ids)
    decoder._tokenizer = from_tokenizer(tokenizer, n_vocab=decoder.vocab_size, eos_token=sorted(decoder.eos_ids))
    walk_masks(decoder, decoder.matcher(StructuredOutput("choice", choices=("x\uf93a",))), lambda tokens: tokens[0])


def test_tokenizer_view_changes_only_the_encoder(tokenizer, config):
    """llguidance sees the same bytes for every token (special ones included) as with its own
    from_tokenizer, and the same encoding of text in NFC without added tokens' text; every encoding
    decodes to its text."""
    from llguidance import LLTokenizer
    from llguidance.hf import from_tokenizer

    vocab, eos = config.text.vocab_size, sorted(config.eos_token_ids)
    stock = from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    ours = LLTokenizer(llguidance_tokenizer_json(tokenizer), n_vocab=vocab, eos_token=eos)
    assert (ours.vocab_size, ours.eos_tokens) == (stock.vocab_size, stock.eos_tokens)
    for token in range(vocab):
        assert ours.dbg_tokens([token]) == stock.dbg_tokens([token]), token
        assert ours.decode_bytes([token]) == stock.decode_bytes([token]), token
        assert ours.is_special_token(token) == stock.is_special_token(token), token
    for text in ["Hello, world!\n\t  x", '{"name": "f", "arguments": {"a": [1, 2.5, null]}}',
                 "na\u00efve caf\u00e9 \U0001f389", "\u4e2d\u6587 \u00c5", "x < y > z <|"]:
        assert ours.tokenize_str(text) == stock.tokenize_str(text) == tokenizer.encode(text, add_special_tokens=False)
    for text in FORCED_TEXTS:
        assert ours.decode_bytes(ours.tokenize_str(text)) == text.encode(), text


def test_grammars_still_name_special_tokens(decoder, tokenizer):
    """Added tokens are named (or numbered) in Lark, one token each; their quoted text is text, as
    llguidance has it (it treats added tokens spelled <...> as special)."""
    call, end, x = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>", "x"])
    for lark, expected in [('start: <tool_call> "x" </tool_call>', [call, x, end]),
                           (f'start: <[{call}]> "x"', [call, x])]:
        matcher = decoder.matcher(StructuredOutput("grammar", lark))
        assert walk_masks(decoder, matcher, lambda tokens: tokens[0]) == expected
        assert matcher.is_finished
    literal = decoder.matcher(StructuredOutput("grammar", 'start: "<tool_call>x"'))
    taken = walk_masks(decoder, literal, lambda tokens: tokens[0])
    assert call not in taken and tokenizer.decode(taken) == "<tool_call>x"


# ---------------------------------------------------------------- the batch


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), constrained=st.lists(st.booleans(), min_size=2, max_size=8))
def test_unconstrained_rows_of_a_mixed_batch_are_unchanged(decoder, tokenizer, seed: int, constrained: list[bool]):
    """Rows without a matcher sample what they would with no bitmask at all (same seeds); the
    constrained ones the only token an object may start with (compact JSON: no whitespace)."""
    batch = len(constrained)
    constraint = StructuredOutput("json_schema", '{"type": "object", "properties": {"n": {"type": "integer"}}}')
    masks = decoder.fill_masks([decoder.matcher(constraint) if c else None for c in constrained])
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, decoder.vocab_size, generator=gen) * 4
    params = [ROWS[i % len(ROWS)] for i in range(batch)]
    outputs = [torch.randint(decoder.vocab_size, (4,), generator=gen).tolist() for _ in range(batch)]

    def run(bitmask: torch.Tensor | None) -> list[int]:
        gens = [make_generator(seed + i, "cpu") for i in range(batch)]
        return sample(logits, params, [[]] * batch, outputs, gens, token_bitmask=bitmask).token_ids

    assert (masks is None) == (not any(constrained))
    masked, plain = run(masks), run(None)
    brace = tokenizer.convert_tokens_to_ids("{")
    for i, is_constrained in enumerate(constrained):
        assert masked[i] == (brace if is_constrained else plain[i])


def test_fill_masks_shape_and_unconstrained_batches(decoder, tokenizer):
    assert decoder.fill_masks([]) is None
    assert decoder.fill_masks([None, None]) is None
    masks = decoder.fill_masks([None, decoder.matcher(StructuredOutput("regex", "ab+")), None])
    assert masks.dtype == torch.int32 and masks.device.type == "cpu"
    assert masks.shape == (3, -(-decoder.vocab_size // 32))
    assert masks[[0, 2]].eq(-1).all()
    allowed = allowed_tokens(masks, decoder.vocab_size)[1].nonzero().squeeze(1).tolist()
    assert allowed == [tokenizer.convert_tokens_to_ids("a")]


@pytest.mark.parametrize("extra", [0, 5, 50])
def test_vocab_wider_than_the_tokenizer(tokenizer, config, extra: int):
    """Logits' vocabulary past the tokenizer (any width, multiple of 32 or not): never allowed."""
    vocab = len(tokenizer) + extra
    decoder = StructuredDecoder(tokenizer, vocab, config.eos_token_ids)
    masks = decoder.fill_masks([decoder.matcher(StructuredOutput("regex", "(?s:.{0,3})"))])
    assert masks.shape == (1, -(-vocab // 32))
    allowed = allowed_tokens(masks, vocab)[0]
    assert allowed[:len(tokenizer)].sum() > 100 and not allowed[len(tokenizer):].any()
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        StructuredDecoder(tokenizer, len(tokenizer) - 1, config.eos_token_ids)


# ---------------------------------------------------------------- errors, cache, matchers


@pytest.mark.parametrize("constraint, message", [
    (StructuredOutput("json_schema", '{"type": "foo"}'), "foo"),
    (StructuredOutput("json_schema", '{"type": "string", "pattern": "a(b"}'), "unclosed group"),
    (StructuredOutput("regex", "a(b"), "unclosed group"),
    (StructuredOutput("regex", "[z-a]"), "invalid character class range"),
    (StructuredOutput("grammar", "start: missing_rule"), "missing_rule"),
])
def test_check_raises_llguidance_error(decoder, constraint: StructuredOutput, message: str):
    with pytest.raises(ValueError, match=f"(?s){constraint.kind} does not compile: .*{re.escape(message)}"):
        decoder.check(constraint)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "xml"}, "kind must be one of"),
    ({"kind": "json_schema", "spec": "{'type': 1}"}, "not valid JSON"),
    ({"kind": "json_schema", "spec": ""}, "not valid JSON"),
    ({"kind": "json_schema", "spec": "[1]"}, "must be a JSON object, got list"),
    ({"kind": "json_schema", "spec": "true"}, "must be a JSON object, got bool"),
    ({"kind": "json_object", "spec": "{}"}, "takes no spec"),
    ({"kind": "regex"}, "needs a non-empty spec"),
    ({"kind": "grammar"}, "needs a non-empty spec"),
    ({"kind": "regex", "spec": "a", "choices": ("a",)}, "takes no choices"),
    ({"kind": "choice"}, "non-empty list of strings"),
    ({"kind": "choice", "choices": ("a", "")}, "non-empty strings"),
    ({"kind": "choice", "choices": ("a", 1)}, "non-empty strings"),
    ({"kind": "choice", "spec": "a", "choices": ("a",)}, "in choices, not spec"),
])
def test_validate_names_the_problem(decoder, kwargs: dict, message: str):
    constraint = StructuredOutput(**kwargs)
    with pytest.raises(ValueError, match=message):
        constraint.validate()
    with pytest.raises(ValueError, match=message):  # check() validates first
        decoder.check(constraint)


def test_choices_from_a_list_are_a_hashable_tuple():
    constraint = StructuredOutput("choice", choices=["a", "b"])
    assert constraint.choices == ("a", "b")
    assert hash(constraint) == hash(StructuredOutput("choice", choices=("a", "b")))


def _counting(decoder: StructuredDecoder, monkeypatch) -> list[StructuredOutput]:
    """The constraints `decoder` compiles from now on, in order."""
    compiled: list[StructuredOutput] = []
    original = decoder._compile

    def spy(constraint: StructuredOutput):
        compiled.append(constraint)
        return original(constraint)

    monkeypatch.setattr(decoder, "_compile", spy)
    return compiled


def test_a_repeated_constraint_compiles_once(tokenizer, config, monkeypatch):
    decoder = StructuredDecoder(tokenizer, config.text.vocab_size, config.eos_token_ids)
    compiled = _counting(decoder, monkeypatch)
    schema = '{"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}'
    decoder.check(StructuredOutput("json_schema", schema))
    decoder.check(StructuredOutput("json_schema", schema))  # an equal constraint of another request
    decoder.matcher(StructuredOutput("json_schema", schema))
    decoder.matcher(StructuredOutput("json_schema", schema))
    assert compiled == [StructuredOutput("json_schema", schema)]


def test_cache_evicts_the_least_recently_used(tokenizer, config, monkeypatch):
    decoder = StructuredDecoder(tokenizer, config.text.vocab_size, config.eos_token_ids, cache_size=2)
    compiled = _counting(decoder, monkeypatch)
    a, b, c = (StructuredOutput("regex", p) for p in ("a+", "b+", "c+"))
    for constraint in (a, b, a, c, a, b):  # c evicts b (a was used since); b then evicts c
        decoder.matcher(constraint)
    assert compiled == [a, b, c, b]
    with pytest.raises(ValueError, match="cache_size"):
        StructuredDecoder(tokenizer, config.text.vocab_size, config.eos_token_ids, cache_size=0)


def test_failed_compiles_are_not_cached(decoder, monkeypatch):
    compiled = _counting(decoder, monkeypatch)
    bad = StructuredOutput("regex", "(")
    for _ in range(2):
        with pytest.raises(ValueError):
            decoder.check(bad)
    assert compiled == [bad, bad]


def test_matchers_of_one_constraint_are_independent(decoder, tokenizer):
    constraint = StructuredOutput("choice", choices=("yes", "no"))
    first, second = decoder.matcher(constraint), decoder.matcher(constraint)
    for token in tokenizer.encode("yes"):
        first.accept(token)
    assert first.is_finished and not second.is_finished
    fresh = decoder.fill_masks([decoder.matcher(constraint)])
    assert torch.equal(decoder.fill_masks([second]), fresh)


def test_accept_ignores_eos_and_rejects_disallowed_tokens(decoder, tokenizer):
    """An eos changes nothing once the constraint is satisfied and raises before (the mask never
    allows it there: a grammar engine fault); a rejected token raises and leaves the matcher failed,
    with its error; then an eos is let through."""
    matcher = decoder.matcher(StructuredOutput("regex", "[0-9]+"))
    for eos in decoder.eos_ids:
        with pytest.raises(RuntimeError, match=f"end-of-sequence token {eos} before the constraint is complete"):
            matcher.accept(eos)
    assert matcher.error is None
    matcher.accept(tokenizer.convert_tokens_to_ids("7"))
    before = decoder.fill_masks([matcher])
    for eos in decoder.eos_ids:
        matcher.accept(eos)
    assert torch.equal(decoder.fill_masks([matcher]), before)
    assert not matcher.is_finished and matcher.error is None  # "7" may go on
    with pytest.raises(RuntimeError, match=f"token {tokenizer.convert_tokens_to_ids('x')} is not allowed"):
        matcher.accept(tokenizer.convert_tokens_to_ids("x"))
    assert "doesn't satisfy the grammar" in matcher.error
    assert matcher.is_finished  # a failed matcher allows only the eos ids
    assert allowed_tokens(decoder.fill_masks([matcher]), decoder.vocab_size)[0].nonzero().squeeze(1).tolist() == \
        sorted(decoder.eos_ids)
    for eos in decoder.eos_ids:
        matcher.accept(eos)


def test_eos_ids_default_to_the_tokenizers(tokenizer, config):
    decoder = StructuredDecoder(tokenizer, config.text.vocab_size, [])
    assert decoder.eos_ids == {tokenizer.eos_token_id}
    allowed = allowed_tokens(decoder.fill_masks([decoder.matcher(StructuredOutput("regex", "a?"))]), decoder.vocab_size)
    assert allowed[0, tokenizer.eos_token_id]


# ---------------------------------------------------------------- closing within max_tokens


def noise_prefix(decoder: StructuredDecoder, constraint: StructuredOutput, seed: int, steps: int
                 ) -> tuple[Matcher, list[int]]:
    """A matcher advanced by up to `steps` sampled tokens of random logits under its masks (fewer when
    it is finished first), and those tokens."""
    gen = torch.Generator().manual_seed(seed)
    matcher, tokens = decoder.matcher(constraint), []
    params = [SamplingParams(temperature=1.0)]
    for _ in range(steps):
        masks = decoder.fill_masks([matcher])
        token = sample(torch.randn(1, decoder.vocab_size, generator=gen) * 4, params, [[]], [tokens], [None],
                       token_bitmask=masks).token_ids[0]
        if token in decoder.eos_ids or matcher.is_finished:
            break
        matcher.accept(token)
        tokens.append(token)
    return matcher, tokens


@settings(max_examples=40)
@given(schema=SCHEMAS.map(lambda s: s if s.get("type") == "object" else {
    "type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False}),
    seed=st.integers(0, 2**31 - 1), steps=st.integers(0, 30))
def test_shortest_completion_of_noise_is_valid(decoder, tokenizer, schema: dict, seed: int, steps: int):
    """From wherever noise left a random schema's matcher, the completer finds a completion (or says
    its bounds ran out: its answer is never a wrong "nothing fits"); each of its tokens is allowed by
    the mask and accepted in turn, and the whole text is valid."""
    matcher, tokens = noise_prefix(decoder, StructuredOutput("json_schema", json.dumps(schema)), seed, steps)
    path = decoder.completer.shortest(matcher._matcher, 128)
    if path is None:
        assert decoder.completer.exhausted, tokenizer.decode(tokens)
        return
    check = matcher._matcher.deep_copy()
    for token in path:
        assert allowed_tokens(torch.frombuffer(bytearray(check.compute_bitmask()), dtype=torch.int32)[None],
                              decoder.vocab_size)[0, token]
        if token not in decoder.eos_ids:
            assert check.consume_token(token)
    assert check.is_stopped() or (path[-1] in decoder.eos_ids and check.is_accepting())
    jsonschema.validate(json.loads(tokenizer.decode(tokens + path, skip_special_tokens=True)), schema)


def test_shortest_completion_adds_required_fields(decoder, tokenizer):
    """The required key not yet written, four items for minItems, three characters for minLength."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 3},
                                               "values": {"type": "array", "items": {"type": "integer"},
                                                          "minItems": 4}},
              "required": ["name", "values"], "additionalProperties": False}
    matcher = decoder.matcher(StructuredOutput("json_schema", json.dumps(schema)))
    for token in tokenizer.encode('{"name":"a', add_special_tokens=False):
        matcher.accept(token)
    path = decoder.completer.shortest(matcher._matcher, 64)
    text = tokenizer.decode(path)
    assert re.fullmatch(r'..","values":\[0,0,0,0\]}', text), text
    assert decoder.completer.shortest(matcher._matcher, len(path) - 1) is None  # nothing shorter


def test_closing_rows_allow_their_forced_token_alone(decoder, tokenizer):
    """A row whose budget leaves no more room than its completion (and CLOSE_MARGIN) allows only the
    completion's next token, and keeps doing so as it accepts them; a row whose completion does not
    fit, or that has no budget, gets llguidance's mask as before."""
    schema = StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "string"}},
                                                         "required": ["a"]}))
    closing = decoder.matcher(StructuredOutput("json_object"), 2)  # "{}" takes 2 tokens
    too_small, free = decoder.matcher(schema, 1), decoder.matcher(schema)
    masks = decoder.fill_masks([closing, too_small, free, None])
    assert closing.closing and not too_small.closing and not free.closing
    assert torch.equal(masks[1], masks[2]) and allowed_tokens(masks, decoder.vocab_size)[3].all()
    text = []
    while (forced := closing.forced_token()) is not None:
        allowed = allowed_tokens(decoder.fill_masks([closing]), decoder.vocab_size)[0]
        assert allowed.nonzero().squeeze(1).tolist() == [forced]
        closing.accept(forced)
        text.append(forced)
    assert closing.is_finished and tokenizer.decode(text) == "{}"
    other = decoder.matcher(StructuredOutput("json_object"), 2)
    assert other.forced_token() == tokenizer.convert_tokens_to_ids("{")
    with pytest.raises(RuntimeError, match="forced"):
        other.accept(tokenizer.convert_tokens_to_ids("}"))


@settings(max_examples=25)
@given(schema=SCHEMAS.map(lambda s: {"type": "object", "properties": {"value": s, "note": {"type": "string"}},
                                     "required": ["value", "note"], "additionalProperties": False}),
       seed=st.integers(0, 2**31 - 1), budget=st.integers(1, 48))
def test_noise_with_a_budget_ends_valid_or_cut(decoder, tokenizer, schema: dict, seed: int, budget: int):
    """Each row's max_tokens is `budget` (the unbounded "note" string keeps noise going): a row is
    valid when it ends with an eos or is closed by the budget, else cut where its completion no longer
    fit (today's behaviour). Masks and acceptance are checked at every step by decode_noise."""
    constraint = StructuredOutput("json_schema", json.dumps(schema))
    for text, ended in decode_noise(decoder, tokenizer, constraint, ROWS, seed, budget, closing=True):
        if ended:
            jsonschema.validate(json.loads(text), schema)
        else:
            try:
                document = json.loads(text)
            except ValueError:
                continue  # cut: the budget was smaller than any completion by the time it searched
            jsonschema.validate(document, schema)
