"""Dataset readers for the benchmark and the accuracy evals: TextVQA, VideoBench, synthetic.

TextVQA (MindIE's layout): `textvqa_val.jsonl`, one object a line
    {"image": "/abs/or/relative.jpg", "question": "...", "question_id": 34602, "answer": "dakota"}
and, optionally beside it, `textvqa_val_annotations.json` in the VQA annotation format
    {"annotations": [{"question_id": 34602, "answers": [{"answer": "dakota"}, ... 10 of them]}]}
whose ten human answers, when present, score with the official VQA metric; otherwise the line's
"answer" (a string, or a list of strings) is used.

VideoBench (Video-Bench's Eval_QA layout; assumed from PKU-YuanGroup/Video-Bench's files):
a folder of `<Dataset>_QA_new.json` files, each {qid: {"vid_path": "...", "video_id": "...",
"question": "...", "choices": {"A": "...", "B": "...", ...}, "answer": "B"}}. "answer" is the
correct choice's letter (a choice's text is accepted too). Where the items carry no answer, an
`answer/ANSWER.json` beside them ({dataset: {qid: letter}}) is read (the layout of the
videobench_subset mirror). The dataset name is the file name before `_QA`.

Relative media paths are resolved against the data file's folder, then its parent (Video-Bench
writes `Eval_video/<Dataset>/x.mp4` relative to the repository root above Eval_QA/).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TEXTVQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
VIDEOBENCH_PROMPT = ("{question}\nOptions:\n{options}\n"
                     "Answer with the option's letter from the given choices directly.")


@dataclass
class Sample:
    """One question: its media ((kind, path or PNG bytes) in order), the text sent, the answers."""

    id: str
    text: str
    media: list[tuple[str, str | bytes]]
    subset: str
    question: str = ""
    answers: list[str] = field(default_factory=list)     # TextVQA: human answers (1 or 10)
    choices: dict[str, str] = field(default_factory=dict)  # VideoBench: letter -> text
    answer: str | None = None                             # VideoBench: the correct letter


def _resolve(path: str, *bases: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        return str(p)
    for base in bases:
        if (base / p).exists():
            return str((base / p).resolve())
    return str((bases[0] / p).resolve()) if bases else str(p)


def load_textvqa(path: str | Path, limit: int | None = None, prompt: str = TEXTVQA_PROMPT) -> list[Sample]:
    """TextVQA questions from textvqa_val.jsonl (or a folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "textvqa_val.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no TextVQA jsonl file")
    human: dict[str, list[str]] = {}
    annotations = path.parent / "textvqa_val_annotations.json"
    if annotations.is_file():
        doc = json.loads(annotations.read_text(encoding="utf-8"))
        items = doc.get("annotations", doc.get("data", [])) if isinstance(doc, dict) else doc
        for a in items:
            answers = a.get("answers", [])
            human[str(a["question_id"])] = [x["answer"] if isinstance(x, dict) else str(x) for x in answers]
    samples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                qid = str(item.get("question_id", line_no))
                question = item["question"]
                image = _resolve(item["image"], path.parent, path.parent.parent)
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}:{line_no}: not a TextVQA line ({e})") from None
            answers = human.get(qid)
            if answers is None:
                answer = item.get("answer", item.get("answers", []))
                answers = [answer] if isinstance(answer, str) else [str(a) for a in answer]
            samples.append(Sample(qid, prompt.format(question=question), [("image", image)], "textvqa",
                                  question=question, answers=answers))
            if limit is not None and len(samples) >= limit:
                break
    return samples


def subset_name(path: Path) -> str:
    """'ActivityNet_QA_new.json' -> 'ActivityNet'."""
    name = path.stem
    return name.split("_QA")[0] if "_QA" in name else name


def format_options(choices: dict[str, str]) -> str:
    """Multiple-choice options as '(A) text' lines, in letter order."""
    return "\n".join(f"({k}) {v}" for k, v in sorted(choices.items()))


def load_videobench(path: str | Path, limit: int | None = None, subsets: list[str] | None = None,
                    prompt: str = VIDEOBENCH_PROMPT) -> list[Sample]:
    """VideoBench questions from an Eval_QA folder (every *.json in it) or one json file."""
    path = Path(path)
    files = sorted(f for f in path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no VideoBench json files")
    root = path if path.is_dir() else path.parent
    answer_file = root / "answer" / "ANSWER.json"
    answer_map = json.loads(answer_file.read_text(encoding="utf-8")) if answer_file.is_file() else {}
    present = sorted(subset_name(f) for f in files)
    unknown = sorted(set(subsets or ()) - set(present))
    if unknown:
        raise ValueError(f"no VideoBench subset {', '.join(unknown)} in {path}; there are: {', '.join(present)}")
    samples = []
    for f in files:
        subset = subset_name(f)
        if subsets and subset not in subsets:
            continue
        doc = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError(f"{f}: expected {{qid: {{vid_path, question, choices, answer}}}}")
        for qid, item in doc.items():
            try:
                choices = {str(k): str(v) for k, v in item["choices"].items()}
                question = item["question"]
                video = _resolve(item["vid_path"], f.parent, f.parent.parent)
            except (KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"{f}: item {qid!r} is not a VideoBench question ({e})") from None
            answer = item.get("answer", answer_map.get(subset, {}).get(qid))
            if answer is not None and answer not in choices:  # the answer given as the choice's text
                answer = next((k for k, v in choices.items() if v.strip().lower() == str(answer).strip().lower()),
                              None)
            text = prompt.format(question=question, options=format_options(choices))
            samples.append(Sample(f"{subset}/{qid}", text, [("video", video)], subset, question=question,
                                  choices=choices, answer=answer))
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


def synthetic_image_png(height: int, width: int, seed: int) -> bytes:
    """A distinct synthetic picture per seed (smooth colour waves, a frequency and phase per channel
    drawn from the seed), PNG-encoded."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width, 1)
    freq_y, freq_x, phase = rng.uniform(1.0, 8.0, size=(3, 1, 1, 3))
    waves = np.sin(2 * np.pi * (freq_y * y[..., None] + freq_x * x[..., None]) + phase)
    frame = np.round(127.5 + 127.5 * waves).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_samples(n: int, image_size: tuple[int, int] = (224, 224), prompt: str = "Describe this image.",
                      seed: int = 0) -> list[Sample]:
    """n requests, each a distinct synthetic image (sent as base64) and a fixed instruction."""
    return [Sample(f"synthetic-{i}", prompt, [("image", synthetic_image_png(*image_size, seed + i))], "synthetic",
                   question=prompt) for i in range(n)]


def load_dataset(kind: str, path: str | Path | None, limit: int | None = None,
                 image_size: tuple[int, int] = (224, 224)) -> list[Sample]:
    """Samples of a dataset type: textvqa | videobench | synthetic (path unused, limit = count)."""
    if kind == "synthetic":
        return synthetic_samples(limit or 100, image_size)
    if path is None:
        raise ValueError(f"--dataset_path is required for {kind}")
    if kind == "textvqa":
        return load_textvqa(path, limit)
    if kind == "videobench":
        return load_videobench(path, limit)
    raise ValueError(f"unknown dataset type {kind!r}; expected textvqa, videobench or synthetic")
