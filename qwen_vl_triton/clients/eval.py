"""Accuracy evals: TextVQA (the official VQA metric) and VideoBench (multiple choice).

TextVQA answers are normalised as the official VQA / TextVQA evaluation does (EvalAI's answer
processor, as in the TextVQA (m4c) evaluator): lower-case, drop ',' and '?', split "'s", strip
punctuation (removed when next to a space or in a number like 1,000, else replaced by a space),
drop periods not followed by a digit, number words to digits, drop articles, restore
contractions. A prediction scores

    acc = mean over the n leave-one-out subsets of min(1, #matching answers in the subset / 3)

(the 10-choose-9 average of the official metric when 10 human answers are given); with a single
reference answer it is an exact match after normalisation.

Reasoning models (QVQ) are scored on their conclusion: the last \\boxed{} answer, or what follows
"Final Answer" (see `final_answer`); give them a --max_output_len long enough to get there.

VideoBench: the chosen option is read from the output (a leading letter such as "B", "(B)",
"B." or "Answer: B"; else the one choice whose text appears in the output) and compared with the
answer letter; accuracy per dataset and overall.

Predictions come from a running server (`--url`), or, with tools/eval.py --model_path, from the
engine in that process; per-item outputs, a results CSV and a summary are written under --save_path.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from qwen_vl_triton.clients.benchmark import sample_content
from qwen_vl_triton.clients.client import RequestRecord, chat_payload, first_model, send_chat
from qwen_vl_triton.clients.datasets import Sample, load_textvqa, load_videobench

# Greedy outputs of the samples, in order.
Runner = Callable[[argparse.Namespace, list[Sample]], list[str]]

# ------------------------------------------------------------------------------------- VQA answers

NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATIONS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
# The official metric's pattern, kept as written: "(?!<=\d)" is a lookahead (not a lookbehind), so
# every period not followed by a digit goes; and re.UNICODE lands in sub()'s count (32 at most).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")

# The VQA evaluation's contraction table: the unpunctuated spelling -> the contraction.
_CONTRACTIONS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're
whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've
wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll
youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTIONS.replace("\n", "|").split("|") if pair.strip())


def process_punctuation(text: str) -> str:
    """The official VQA punctuation rule: strip or space out punctuation, periods only outside numbers."""
    out = text
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, 32)


def process_digit_article(text: str) -> str:
    """The official VQA rule: number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A VQA answer as the official evaluation compares it."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_score(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction against its reference answers (see the module doc)."""
    if not answers:
        raise ValueError("no reference answers")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    accs = []
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_FINAL_ANSWER = re.compile(r"final answer", re.IGNORECASE)


def final_answer(output: str) -> str:
    """The conclusion of a reasoning model's output (QVQ thinks step by step, then writes
    "**Final Answer** ... \\boxed{...}"): the last \\boxed{} content, else the text after the last
    "Final Answer", else the output unchanged (the answer of a model that does not reason aloud)."""
    boxed = _BOXED.findall(output)
    if boxed:
        return re.sub(r"\\(?:text|mathrm)\{([^{}]*)\}", r"\1", boxed[-1]).strip()  # \text{stop} -> stop
    marks = list(_FINAL_ANSWER.finditer(output))
    if marks:
        tail = output[marks[-1].end():].strip(" \t\n*:#")
        return tail.replace("\\[", "").replace("\\]", "").strip() or output
    return output


def textvqa_prediction(output: str) -> str:
    """The answer part of a model's output: the first non-empty line of its final answer, stripped."""
    for line in final_answer(output).strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# ------------------------------------------------------------------------------------- multiple choice


def extract_choice(output: str, choices: dict[str, str]) -> str | None:
    """The option letter an output picks, or None when it names none (or several by text)."""
    text = output.strip()
    letters = "".join(sorted(k for k in choices if len(k) == 1))
    if letters:
        # "B", "B.", "(B) Yes", "B: Yes", "Answer: B" at the start; not "A man ..."
        lead = re.match(rf"^\W*(?:(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*)?[(\[]?([{letters}])(?=$|[.):,\]\n])",
                        text)
        if lead:
            return lead.group(1)
        said = re.search(rf"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*[(\[]?([{letters}])(?![A-Za-z])", text)
        if said:
            return said.group(1)
        bracketed = re.findall(rf"\(([{letters}])\)", text)
        if len(set(bracketed)) == 1:
            return bracketed[0]
    lowered = text.lower()
    named = [k for k, v in choices.items() if v.strip() and v.strip().lower() in lowered]
    if len(named) > 1:  # keep the longest choice text when one contains another ("Yes" in "Yes, ...")
        longest = max(named, key=lambda k: len(choices[k]))
        named = [longest] if all(choices[k].lower() in choices[longest].lower() for k in named) else named
    return named[0] if len(named) == 1 else None


# ------------------------------------------------------------------------------------- running


def score_samples(kind: str, samples: list[Sample], outputs: list[str]) -> list[dict[str, Any]]:
    """Per-item records with the score of each output."""
    items = []
    for s, out in zip(samples, outputs, strict=True):
        item: dict[str, Any] = {"id": s.id, "subset": s.subset, "question": s.question,
                                "media": [str(m) for _, m in s.media], "output": out}
        if kind == "textvqa":
            item["prediction"] = textvqa_prediction(out)
            item["answers"] = s.answers
            item["score"] = vqa_score(item["prediction"], s.answers)
        else:
            item["choices"] = s.choices
            item["answer"] = s.answer
            item["prediction"] = extract_choice(final_answer(out), s.choices)
            item["score"] = float(item["prediction"] is not None and item["prediction"] == s.answer)
        items.append(item)
    return items


def results_table(kind: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy rows per subset, then overall (the mean over all items)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for item in items:
        groups[item["subset"]].append(item["score"])
    rows = [{"task": kind, "subset": name, "samples": len(scores), "score_sum": round(sum(scores), 4),
             "accuracy": round(sum(scores) / len(scores), 6)} for name, scores in sorted(groups.items())]
    if len(groups) > 1:
        every = [x["score"] for x in items]
        rows.append({"task": kind, "subset": "all", "samples": len(every), "score_sum": round(sum(every), 4),
                     "accuracy": round(sum(every) / len(every), 6)})
    return rows


def outputs_from_server(args: argparse.Namespace, samples: list[Sample]) -> list[str]:
    """Greedy outputs of each sample from the server at --url (non-streamed requests)."""
    return asyncio.run(_ask_server(args, samples))


async def _ask_server(args: argparse.Namespace, samples: list[Sample]) -> list[str]:
    """`outputs_from_server`'s requests, --concurrency in flight; RuntimeError on the first that fails."""
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
        model = args.model or await first_model(client, args.url)
        gate = asyncio.Semaphore(args.concurrency)
        bar = tqdm(total=len(samples), desc="eval", unit="q")

        async def one(i: int, s: Sample) -> str:
            async with gate:
                payload = chat_payload(model, sample_content(s, args), args.max_output_len, stream=False)
                record = await send_chat(client, args.url, payload, RequestRecord(i, s.id), args.timeout)
            bar.update(1)
            if not record.success:
                hint = " (send the media inline with --media_mode base64)" if "allowed_media_dir" in str(
                    record.error) else ""
                raise RuntimeError(f"question {s.id}: request failed: {record.error}{hint}")
            return record.text

        outputs = await asyncio.gather(*(one(i, s) for i, s in enumerate(samples)))
        bar.close()
    return list(outputs)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of an eval over HTTP (tools/eval.py adds --model_path and the engine's)."""
    add = p.add_argument
    add("--task", "--dataset_type", dest="task", choices=["textvqa", "videobench"], required=True,
        help="which accuracy to measure")
    add("--dataset_path", required=True,
        help="textvqa: textvqa_val.jsonl or its folder; videobench: the Eval_QA folder or one of its files")
    add("--url", help="a running server's base URL (requests go to /v1/chat/completions)")
    add("--model", help="model name sent to the server (default: the first /v1/models lists)")
    add("--num_samples", type=int, help="evaluate the first N questions only")
    add("--subsets", nargs="+", help="videobench: only these datasets (e.g. ActivityNet MSVD)")
    add("--max_output_len", type=int, default=20,
        help="max_tokens per answer (default: %(default)s, as MindIE; QVQ reasons first: give it ~2048)")
    add("--concurrency", type=int, default=16, help="server mode: requests in flight (default: %(default)s)")
    add("--media_mode", choices=["path", "base64"], default="path",
        help="server mode: send media as paths (inside the server's --allowed_media_dir) or base64")
    add("--max_pixels", type=int, help="per-request max_pixels for each image / video frame")
    add("--min_pixels", type=int, help="per-request min_pixels")
    add("--fps", type=float, help="videos: sampling rate")
    add("--nframes", type=int, help="videos: frame count")
    add("--timeout", type=float, default=600.0, help="server mode: seconds per request (default: %(default)s)")
    add("--save_path", type=Path, required=True, help="folder for predictions.jsonl, results.csv, summary.json")


def evaluate(args: argparse.Namespace, source: str, runner: Runner) -> dict[str, Any]:
    """Score the outputs `runner` gives (`outputs_from_server`, or the engine in-process that
    tools/eval.py --model_path hands in: this package imports no engine) from `source` (a URL or a
    checkpoint); print the accuracy table, write the files; returns the summary."""
    try:
        if args.task == "textvqa":
            samples = load_textvqa(args.dataset_path, args.num_samples)
        else:
            samples = load_videobench(args.dataset_path, args.num_samples, args.subsets)
            missing = [s.id for s in samples if s.answer is None]
            if missing:
                raise SystemExit(f"{len(missing)} VideoBench questions have no answer (e.g. {missing[0]})")
        if not samples:
            raise SystemExit("no questions to evaluate")
        started = time.perf_counter()
        outputs = runner(args, samples)
    except (OSError, ValueError, RuntimeError) as e:  # bad dataset path or file, a failed request
        raise SystemExit(f"error: {e}") from None
    items = score_samples(args.task, samples, outputs)
    rows = results_table(args.task, items)
    args.save_path.mkdir(parents=True, exist_ok=True)
    with (args.save_path / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    with (args.save_path / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"task": args.task, "source": source, "samples": len(items),
               "accuracy": rows[-1]["accuracy"], "results": rows, "wall_s": round(time.perf_counter() - started, 3)}
    (args.save_path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    width = max(len(r["subset"]) for r in rows)
    print(f"{'subset':<{width}}  samples  accuracy")
    for r in rows:
        print(f"{r['subset']:<{width}}  {r['samples']:>7}  {100 * r['accuracy']:7.2f}%")
    print(f"wrote {args.save_path / 'predictions.jsonl'}, results.csv, summary.json")
    return summary
