"""Decode throughput with structured outputs: 32 greedy text requests, none or half constrained, at
two vocabulary sizes; and what closing constraints within max_tokens costs.

32 short text prompts, 64 output tokens each (ignore_eos: the unconstrained requests run to the
full length), greedy, all admitted at once. Run (a): no constraints. Run (b): 16 of the 32 requests
constrained by a JSON schema (an object with a string of 40..80 characters and 4..12 integers, so
that the constrained requests do not finish at once; a constrained request may still end before 64
tokens when its object is complete, so throughput counts the tokens actually generated). The
constrained requests pay for llguidance's mask of each of their rows every step (on its thread
pool, while the forward pass runs), the host-to-device copy of those rows and their unpacking in
the sampler. Those the model leaves unfinished near the 64-token budget are closed (the engine's
default, engine/structured.py's "Budget": the searches for the shortest completion, then its forced
tokens). Run (c): run (b) without closing (StructuredDecoder.close_window 0), as before it existed:
those requests are cut at 64 tokens, not valid. Each run says how many of its 16 constrained outputs
are valid and how many max_tokens ended; (b) against (c) is the cost of closing.

Medians over 3 repetitions of output tokens per second (wall time of LLM.generate over all 32);
(a), (b) and (c) alternate. Both go against (a): tok/s, which also falls when constrained requests end
early (fewer tokens in the same 64 steps, which the unconstrained requests take), and the wall time,
which changes only by what the steps cost. The model has the e2e family's cpu-small sizes (float32, random weights) on
any device, as the itl family uses: a small model's short steps show the per-step cost of the masks
at its largest. Both costs grow with the vocabulary, so it runs at two:
- "tiny": the e2e family's cpu-small checkpoint itself, whose tokenizer is the tiny test tokenizer
  (~530 tokens, logits 576 wide);
- "qwen-sized": the same sizes with a stand-in for Qwen's tokenizer: a byte-level BPE of Qwen2's
  151,643 entries (Qwen's pre-tokenizer, special tokens, tool tokens and chat template, as the tiny
  checkpoint has them) trained on a generated multi-script text, and logits 151,936 wide
  (Qwen2.5-VL-7B's padded embedding). Built once (about a minute) and cached beside the others.

Then, at each vocabulary, the two costs alone: StructuredDecoder.fill_masks for the 16 constrained
rows of a 32-row batch, per step of a document the schema accepts (median, mean and max over its
steps: object syntax, the string's body and the integers cost differently; with the Qwen-sized
vocabulary a few steps late in the string's body cost most), sampling.mask_disallowed
on [32, V] logits with 16 constrained rows (median of 20), and Completer.shortest (one search for
the shortest completion within 64 tokens) from each step of that document (median, mean, max).

    python benchmarks/bench_structured.py [REPEATS]     # prints the tables
"""

from __future__ import annotations

import gc
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REQUESTS = 32
CONSTRAINED = 16
MAX_TOKENS = 64
REPEATS = 3
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 40, "maxLength": 80},
        "values": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 12},
    },
    "required": ["title", "values"],
    "additionalProperties": False,
}
RUNS = ("none constrained", f"{CONSTRAINED} of {REQUESTS} constrained",
        f"{CONSTRAINED} of {REQUESTS} constrained, not closed")
# What the direct timings step the matchers through: a compact document SCHEMA accepts.
SAMPLE_DOCUMENT = json.dumps({"title": "A small red house beside a river, with two tall trees and a bridge.",
                              "values": [12, 345, 6789, 1, 23, 456]}, separators=(",", ":"))

# Qwen2's byte-level BPE has 151,643 entries (ids 0..151642, its special tokens follow); Qwen2.5-VL-7B's
# logits are 151,936 wide.
QWEN_BPE_ENTRIES = 151_643
QWEN_LOGITS = 151_936
# Part of the cached stand-in's name: its manifest records the sizes but not the text its tokenizer
# was trained on, so a change to `qwen_sized_corpus` must raise this to have it made again.
CORPUS_VERSION = 1


# --------------------------------------------------------------------------------------------
# the Qwen-sized stand-in


def _lexicon(rng: random.Random, letters: Sequence[str], count: int, min_len: int, max_len: int) -> list[str]:
    """`count` distinct words of `letters`, min_len..max_len letters each; sorted, so that the order
    does not depend on set iteration."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choices(letters, k=rng.randint(min_len, max_len))))
    return sorted(words)


def _latin_lexicon(rng: random.Random, count: int) -> list[str]:
    """`count` distinct pronounceable Latin-script words of 1..4 syllables: their pieces recur the
    way stems and endings do, so BPE finds merges of every length, not only of whole random strings."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "z",
              "st", "tr", "pl", "ch", "sh", "th", "br", "gr"]
    vowels = ["a", "e", "i", "o", "u", "y", "ea", "ou", "ai", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "ck", "x"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _zipf(rng: random.Random, words: Sequence[str]) -> Callable[[int], list[str]]:
    """A sampler of k words with weights 1 / (rank + 10): a few words common, most rare, as in text."""
    cum = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(words))))
    return lambda k: rng.choices(words, cum_weights=cum, k=k)


def _json_line(rng: random.Random, word: Callable[[int], list[str]]) -> str:
    """One JSON object of 2..5 keys (words, some snake_case) with string, number, bool, null and list
    values, compact or spaced: the punctuation runs (`{"`, `":"`, `","`, `":[`) JSON outputs are made of."""
    obj: dict[str, object] = {}
    for _ in range(rng.randint(2, 5)):
        key = "_".join(word(rng.randint(1, 2)))
        kind = rng.randrange(5)
        if kind == 0:
            obj[key] = " ".join(word(rng.randint(1, 6)))
        elif kind == 1:
            obj[key] = rng.randint(0, 10 ** rng.randint(1, 6))
        elif kind == 2:
            obj[key] = round(rng.uniform(-100, 100), rng.randint(1, 4))
        elif kind == 3:
            obj[key] = rng.choice([True, False, None])
        else:
            obj[key] = [rng.randint(0, 999) for _ in range(rng.randint(1, 5))]
    return json.dumps(obj, separators=rng.choice([(",", ":"), (", ", ": ")]), ensure_ascii=False)


def _code_line(rng: random.Random, word: Callable[[int], list[str]]) -> str:
    """One line of Python-, C- or JS-like code, indented 0..12 spaces: identifiers, operators,
    brackets and indentation runs."""
    a, b, c, d = word(4)
    n = rng.randint(0, 4096)
    template = rng.choice([
        f"def {a}_{b}({c}, {d}={n}):",
        f"return self.{a}({b}) + {c}[{n}]",
        f"if ({a} == {b}) {{ {c}.{d}({n}); }}",
        f"for {a} in range({n}):",
        f"{a}[{b}] = {c}.get(\"{d}\", {n})",
        f"const {a.capitalize()}{b.capitalize()} = ({c}) => {d}.{a} * {n};",
        f"{a}->{b} += {n}; // {c} {d}",
        f"#include <{a}/{b}.h>",
        f"assert {a} is not None, f\"{b} {{{c}!r}}\"",
    ])
    return " " * rng.choice([0, 0, 4, 8, 12, 2]) + template


def qwen_sized_corpus(seed: int = 0) -> str:
    """Deterministic training text with enough distinct pieces for a 151,643-entry byte-level BPE:
    prose lines over a Zipf-weighted lexicon in each of seven scripts (Latin, Cyrillic, Greek, Han,
    Hangul, kana, Arabic; every lexicon word at least once, ~260k words), plus JSON and code lines.
    Numbers add little: Qwen's pre-tokenizer splits digits one by one. About 16 MB, in ~3 s."""
    rng = random.Random(seed)
    latin = _latin_lexicon(rng, 120_000)
    scripts = {  # name: (lexicon, word separator)
        "latin": (latin, " "),
        "cyrillic": (_lexicon(rng, [chr(c) for c in range(0x430, 0x450)], 40_000, 2, 9), " "),
        "greek": (_lexicon(rng, [chr(c) for c in range(0x3B1, 0x3CA)], 15_000, 2, 8), " "),
        "han": (_lexicon(rng, [chr(c) for c in range(0x4E00, 0x4E00 + 6000)], 40_000, 1, 3), ""),
        "hangul": (_lexicon(rng, [chr(c) for c in range(0xAC00, 0xAC00 + 2000)], 15_000, 1, 3), " "),
        "kana": (_lexicon(rng, [chr(c) for c in [*range(0x3041, 0x3097), *range(0x30A1, 0x30FB)]], 15_000, 2, 6),
                 ""),
        "arabic": (_lexicon(rng, [chr(c) for c in range(0x628, 0x64B)], 15_000, 2, 8), " "),
    }
    lines: list[str] = []
    for name, (words, sep) in scripts.items():
        sample = words + _zipf(rng, words)(3 * len(words))
        rng.shuffle(sample)
        for i in range(0, len(sample), 12):
            chunk = sample[i:i + 12]
            if name == "latin":  # capitalised words are other tokens
                chunk = [w.capitalize() if rng.random() < 0.15 else w for w in chunk]
            lines.append(sep.join(chunk) + rng.choice([".", ",", "!", "?", ";", ":", "", "。"]))
    latin_word = _zipf(rng, latin)
    lines += [_json_line(rng, latin_word) for _ in range(40_000)]
    lines += [_code_line(rng, latin_word) for _ in range(40_000)]
    rng.shuffle(lines)
    return "\n".join(lines)


def qwen_sized_checkpoint() -> Path:
    """The cpu-small random checkpoint (float32) with the Qwen-sized tokenizer and 151,936-wide
    logits, made once under testing.tiny_checkpoint's cache_dir() and reused while it is `checkpoint_complete`.

    testing.tiny_checkpoint writes everything: make_tiny_checkpoint with bpe_vocab_size=151,643
    (its tokenizer builder appends the special and tool tokens, checks their ids and sets the chat
    template) and TinySizes.extra's text-config override vocab_size=151,936 (the embedding and
    lm_head get that many rows; the config's token ids are the tokenizer's). Its tokenizer is trained
    on `qwen_sized_corpus` (the built-in text holds ~500 merges' worth)."""
    from qwen_vl_triton.benchmarks.workloads import PRESETS
    from qwen_vl_triton.testing import tiny_checkpoint

    name = f"bench-cpu-small-qwen-vocab-c{CORPUS_VERSION}-float32"
    kwargs = dict(seed=0, dtype="float32", bpe_vocab_size=QWEN_BPE_ENTRIES, extra={"vocab_size": QWEN_LOGITS},
                  **PRESETS["cpu-small"])
    path = tiny_checkpoint.cache_dir() / name
    if tiny_checkpoint.checkpoint_complete(path):
        return path
    started = time.perf_counter()
    corpus = qwen_sized_corpus()
    generated = time.perf_counter()
    path = tiny_checkpoint.cached_checkpoint(name, "qwen2_5_vl", corpus=corpus, **kwargs)
    print(f"Qwen-sized checkpoint: corpus {generated - started:.1f} s ({len(corpus) / 1e6:.1f} MB), tokenizer "
          f"training and weights {time.perf_counter() - generated:.1f} s", file=sys.stderr, flush=True)
    return path


def vocabularies() -> dict[str, Callable[[], Path]]:
    """Each vocabulary's name and how to get its checkpoint."""
    from qwen_vl_triton.benchmarks.workloads import checkpoint_for

    return {"tiny": lambda: checkpoint_for("cpu-small", "float32"), "qwen-sized": qwen_sized_checkpoint}


# --------------------------------------------------------------------------------------------
# measurements


def _valid(text: str) -> bool:
    """Whether `text` is a document SCHEMA accepts (compact JSON under the constraint: checking the
    parse, the lengths and the required keys is enough)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return 40 <= len(doc["title"]) <= 80 and 4 <= len(doc["values"]) <= 12


def run_once(llm, constrained: int, closing: bool = True) -> dict:
    """One LLM.generate of REQUESTS prompts, the first `constrained` of them under SCHEMA; without
    `closing`, those that reach MAX_TOKENS are cut there, as before closing existed."""
    from qwen_vl_triton.engine.sampling import SamplingParams
    from qwen_vl_triton.engine.structured import CLOSE_WINDOW, StructuredOutput

    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    schema = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                            structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    prompts = [f"Describe item number {i} as a JSON object." for i in range(REQUESTS)]
    params = [schema] * constrained + [plain] * (REQUESTS - constrained)
    llm.structured.close_window = CLOSE_WINDOW if closing else 0
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - started
    llm.structured.close_window = CLOSE_WINDOW
    tokens = sum(o.completion_tokens for o in outputs)
    samples = [o.outputs[0] for o in outputs[:constrained]]  # n is 1 here
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "constrained_mean_tokens": statistics.mean(len(s.token_ids) for s in samples) if constrained else 0.0,
            "valid": sum(_valid(s.text) for s in samples),
            "length": sum(s.finish_reason == "length" for s in samples)}


def throughput(llm, repeats: int) -> dict[str, dict[str, float]]:
    """The three runs, `repeats` times each, alternating; medians of their statistics."""
    run_once(llm, CONSTRAINED)  # warm-up, llguidance's view of the tokenizer, the schema's compilation
    runs: dict[str, list[dict]] = {name: [] for name in RUNS}
    for _ in range(repeats):
        runs[RUNS[0]].append(run_once(llm, 0))
        runs[RUNS[1]].append(run_once(llm, CONSTRAINED))
        runs[RUNS[2]].append(run_once(llm, CONSTRAINED, closing=False))
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def mask_costs(llm, device: str, passes: int = 3) -> dict[str, float]:
    """The two per-step costs alone, in ms: `fill_masks` for CONSTRAINED matchers in a REQUESTS-row
    batch at each step of SAMPLE_DOCUMENT (all rows at one position; `passes` passes; median, mean
    and max over the steps), and `mask_disallowed` on random [REQUESTS, V] logits on `device` with the
    first step's masks (median of 20; its cost does not depend on which tokens are allowed)."""
    import torch

    from qwen_vl_triton.benchmarks.common import median_ms
    from qwen_vl_triton.engine.sampling import mask_disallowed
    from qwen_vl_triton.engine.structured import StructuredOutput

    decoder = llm.structured
    constraint = StructuredOutput("json_schema", json.dumps(SCHEMA))
    tokens = llm.tokenizer.encode(SAMPLE_DOCUMENT, add_special_tokens=False)
    fill_ms: list[float] = []
    first_masks = None
    for _ in range(passes):
        matchers = [decoder.matcher(constraint) for _ in range(CONSTRAINED)]
        rows = [*matchers, *[None] * (REQUESTS - CONSTRAINED)]
        for token in tokens:
            started = time.perf_counter()
            masks = decoder.fill_masks(rows)
            fill_ms.append((time.perf_counter() - started) * 1e3)
            if first_masks is None:
                first_masks = masks
            for m in matchers:
                m.accept(token)
    logits = torch.randn(REQUESTS, llm.config.text.vocab_size, device=device)
    unpack_ms = median_ms(lambda: mask_disallowed(logits, first_masks), torch.device(device))
    decoder.completer.shortest(decoder.matcher(constraint)._matcher, MAX_TOKENS)  # its candidates, built once
    search_ms: list[float] = []
    matcher = decoder.matcher(constraint)
    for token in tokens:
        started = time.perf_counter()
        decoder.completer.shortest(matcher._matcher, MAX_TOKENS)
        search_ms.append((time.perf_counter() - started) * 1e3)
        matcher.accept(token)
    return {"fill_median_ms": statistics.median(fill_ms), "fill_mean_ms": statistics.mean(fill_ms),
            "fill_max_ms": max(fill_ms),
            "steps": len(tokens), "mask_disallowed_ms": unpack_ms, "search_median_ms": statistics.median(search_ms),
            "search_mean_ms": statistics.mean(search_ms), "search_max_ms": max(search_ms)}


def measure(device: str, repeats: int = REPEATS) -> dict[str, dict]:
    """Per vocabulary: its logits width, the throughput runs and the direct mask costs."""
    from qwen_vl_triton.engine.llm import LLM

    results = {}
    for name, checkpoint in vocabularies().items():
        llm = LLM(checkpoint(), device=device, kv_cache_gb=1.0, enable_prefix_caching=False,
                  max_batch_size=REQUESTS)
        results[name] = {"vocab": llm.config.text.vocab_size, "runs": throughput(llm, repeats),
                         "masks": mask_costs(llm, device)}
        del llm
        gc.collect()  # the first model's weights go before the next one's load
    return results


def run(ctx) -> None:
    """`make bench` entry."""
    for name, result in measure(ctx.device.type).items():
        shape = f"cpu-small, {name} vocabulary ({result['vocab']} logits)"
        base = result["runs"][RUNS[0]]
        for run_name, r in result["runs"].items():
            ms = 1e3 / r["tok_s"]
            ctx.record("structured", "ms per output token, 32 greedy requests x 64 tokens", shape, "float32",
                       run_name, ms, baseline_ms=1e3 / base["tok_s"],
                       note=f"{r['tok_s']:.1f} tok/s, {r['tokens']:.0f} tokens in {r['wall_s']:.2f} s "
                            f"({r['wall_s'] / base['wall_s']:.3f} x none constrained's wall)"
                            + (f", constrained requests {r['constrained_mean_tokens']:.1f} tokens on average, "
                               f"{r['valid']:.0f} of {CONSTRAINED} valid, {r['length']:.0f} ended by max_tokens"
                               if r["constrained_mean_tokens"] else ""))
        m = result["masks"]
        ctx.record("structured", f"StructuredDecoder.fill_masks, {CONSTRAINED} of {REQUESTS} rows, per step", shape,
                   "int32", "llguidance", m["fill_median_ms"],
                   note=f"median over {m['steps']} steps of a schema-valid document; mean {m['fill_mean_ms']:.3f} ms, "
                        f"max {m['fill_max_ms']:.3f} ms")
        ctx.record("structured", f"sampling.mask_disallowed, {CONSTRAINED} constrained of {REQUESTS} rows", shape,
                   "float32", "torch", m["mask_disallowed_ms"])
        ctx.record("structured", f"Completer.shortest, one row, within {MAX_TOKENS} tokens", shape, "int32",
                   "llguidance", m["search_median_ms"],
                   note=f"median over {m['steps']} steps of a schema-valid document; "
                        f"mean {m['search_mean_ms']:.3f} ms, max {m['search_max_ms']:.3f} ms")


def main() -> None:
    import torch

    from qwen_vl_triton.parallel.group import detect_device_type

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else REPEATS
    device = detect_device_type()
    print(f"device {device}, {torch.get_num_threads()} torch threads, {repeats} repetitions")
    results = measure(device, repeats)
    print("| vocabulary (logits) | run | output tok/s | tokens | wall (s) | constrained requests' mean tokens "
          "| valid / ended by max_tokens | tok/s / none constrained | wall / none constrained |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        base = result["runs"][RUNS[0]]
        for run_name, r in result["runs"].items():
            print(f"| {name} ({result['vocab']}) | {run_name} | {r['tok_s']:.1f} | {r['tokens']:.0f} | "
                  f"{r['wall_s']:.2f} | {r['constrained_mean_tokens']:.1f} | {r['valid']:.0f} / {r['length']:.0f} | "
                  f"{r['tok_s'] / base['tok_s']:.3f} | {r['wall_s'] / base['wall_s']:.3f} |")
    print()
    print(f"| vocabulary (logits) | fill_masks, {CONSTRAINED} of {REQUESTS} rows: median / mean / max per step (ms) "
          f"| mask_disallowed [{REQUESTS}, V] (ms) | Completer.shortest, one row: median / mean / max (ms) |")
    print("|---|---|---|---|")
    for name, result in results.items():
        m = result["masks"]
        print(f"| {name} ({result['vocab']}) | {m['fill_median_ms']:.3f} / {m['fill_mean_ms']:.3f} / "
              f"{m['fill_max_ms']:.3f} ({m['steps']} steps) | {m['mask_disallowed_ms']:.3f} | "
              f"{m['search_median_ms']:.3f} / {m['search_mean_ms']:.3f} / {m['search_max_ms']:.3f} |")


if __name__ == "__main__":
    main()
