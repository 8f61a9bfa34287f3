"""tools/benchmark.py and tools/eval.py against the live server (and eval in-process on the engine,
which must agree); the VQA metric, choice extraction and dataset readers on hand-made cases."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.cli import benchmark
from qwen_vl_triton.cli import eval as qvl_eval
from qwen_vl_triton.clients.datasets import Sample, load_textvqa, load_videobench
from qwen_vl_triton.clients.eval import (
    extract_choice,
    final_answer,
    normalize_answer,
    score_samples,
    textvqa_prediction,
    vqa_score,
)
from tests.serving.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------- the package


def test_clients_import_nothing_of_the_server_engine_or_model():
    layers = {"serving", "engine", "modeling", "kernels", "parallel", "cli", "testing", "benchmarks"}
    code = ("import sys, qwen_vl_triton.clients.benchmark, qwen_vl_triton.clients.eval; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('qwen_vl_triton.')} "
            f"& {layers!r} | {{m.split('.')[0] for m in sys.modules}} & {{'torch', 'triton'}}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=True)  # a hang guard only
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- the VQA metric

TEN = ["yes", "yes", "yes", "no", "no", "no", "no", "no", "no", "no"]

# (prediction, reference answers, hand-computed accuracy)
VQA_TABLE = [
    # 3 of 10 say yes: each leave-one-out subset without a "yes" has 3 matches (7 subsets: 1.0),
    # each without one has 2 (3 subsets: 2/3): (7 * 1 + 3 * 2/3) / 10 = 0.9
    ("yes", TEN, 0.9),
    ("No.", TEN, 1.0),              # 7 matches everywhere; the period is stripped
    ("maybe", TEN, 0.0),
    # 2 of 10 say "2": subsets without one of them have 1 match (2 subsets: 1/3), the other 8 have
    # 2 (2/3): (2/3 + 16/3) / 10 = 0.6; "two" normalises to "2"
    ("two", ["2", "2", "x", "x", "x", "x", "x", "x", "x", "x"], 0.6),
    ("The Dakota", ["dakota"] * 10, 1.0),      # articles and case
    # the one "dakota digital": 9 subsets contain it (1 match: 1/3), 1 does not (0): 9 / 3 / 10 = 0.3
    ("dakota digital", ["dakota"] * 9 + ["dakota digital"], 0.3),
    ("isnt", ["isn't"] * 10, 1.0),             # contractions restored
    ("1,000", ["1000"] * 10, 1.0),             # comma between digits removed
    ("red!", ["red"], 1.0),                    # one reference: exact match after normalisation
    ("Red", ["dark red"], 0.0),
]


@pytest.mark.parametrize("pred,answers,expected", VQA_TABLE)
def test_vqa_score_hand_computed(pred, answers, expected):
    assert vqa_score(pred, answers) == pytest.approx(expected)


def test_vqa_mean_over_a_table():
    mean = sum(vqa_score(p, a) for p, a, _ in VQA_TABLE) / len(VQA_TABLE)
    assert mean == pytest.approx((0.9 + 1 + 0 + 0.6 + 1 + 0.3 + 1 + 1 + 1 + 0) / 10)


def test_answer_normalisation():
    assert normalize_answer("  The Two dogs, isnt it?\n") == "2 dogs isn't it"
    assert normalize_answer("a-ok") == "ok"           # '-' becomes a space, then the article goes
    assert normalize_answer("3.5 apples.") == "3.5 apples"
    assert normalize_answer("one") == "1" and normalize_answer("none") == "0"


@pytest.mark.parametrize("output,expected", [
    ("B", "B"), ("(C) Up", "C"), ("B. No", "B"), ("Answer: D", "D"), ("The answer is A.", "A"),
    ("I pick (B) Right.", "B"), ("Right", "B"), ("down, clearly", "D"), ("A man walks", None),
    ("a dog", None), ("no idea", None), ("", None),
])
def test_extract_choice(output, expected):
    assert extract_choice(output, {"A": "Left", "B": "Right", "C": "Up", "D": "Down"}) == expected


QVQ_OUTPUT = r"""So, I need to read the sign. It could say "stop" or "go"; the letters are S-T-O-P.
A is wrong because the sign is red.

**Final Answer**

\[ \boxed{\text{Stop}} \]"""


@pytest.mark.parametrize("output,expected", [
    (QVQ_OUTPUT, "Stop"),
    ("Let me think... (A) looks wrong.\n\n**Final Answer**: (C) Up", "(C) Up"),
    (r"the count is \boxed{3}, no wait, \boxed{4}", "4"),
    ("B. No", "B. No"),  # no reasoning markers: unchanged
])
def test_final_answer_of_reasoning_outputs(output, expected):
    assert final_answer(output) == expected


def test_reasoning_outputs_are_scored_on_their_conclusion():
    assert textvqa_prediction(QVQ_OUTPUT) == "Stop" and vqa_score(textvqa_prediction(QVQ_OUTPUT), ["stop"]) == 1.0
    samples = [Sample(id="q1", text="?", media=[], subset="s", choices={"A": "Left", "C": "Up"}, answer="C")]
    (item,) = score_samples("videobench", samples, ["Maybe (A)? No.\n**Final Answer**: (C) Up"])
    assert item["prediction"] == "C" and item["score"] == 1.0


def test_extract_choice_prefers_the_longer_choice_text():
    assert extract_choice("Yes, clearly it is", {"A": "Yes", "B": "No", "C": "Yes, clearly"}) == "C"


# ------------------------------------------------------------------------------------- datasets


def test_dataset_readers(media_dir):
    tv = load_textvqa(media_dir / "textvqa")
    assert [s.id for s in tv] == ["1001", "1002", "1003", "1004", "1005", "1006"]
    assert len(tv[0].answers) == 10 and tv[4].answers == ["yes"]  # annotations file, else the line's answer
    assert tv[0].media[0][0] == "image" and tv[0].text.endswith("Answer the question using a single word or phrase.")
    vb = load_videobench(media_dir / "videobench" / "Eval_QA")
    assert {s.subset for s in vb} == {"Synthetic", "Driving-decision-making"}
    by_id = {s.id: s for s in vb}
    assert by_id["Synthetic/square_0"].answer == "B"
    assert by_id["Driving-decision-making/1"].answer == "C"  # given as the choice's text
    assert "(A) Left\n(B) Right" in by_id["Synthetic/square_0"].text
    assert all(s.media[0][0] == "video" and s.media[0][1].endswith(".mp4") for s in vb)
    assert {s.subset for s in load_videobench(media_dir / "videobench" / "Eval_QA", subsets=["Synthetic"])} == \
        {"Synthetic"}
    with pytest.raises(ValueError, match="no VideoBench subset ActivityNet .*there are: Driving-decision-making, "
                                         "Synthetic"):
        load_videobench(media_dir / "videobench" / "Eval_QA", subsets=["ActivityNet", "Synthetic"])


# ------------------------------------------------------------------------------------- the tools


def test_benchmark_against_the_server(server, media_dir, tmp_path):
    out = tmp_path / "bench"
    summary = benchmark.main(["--url", server.url, "--dataset_type", "textvqa", "--dataset_path",
                              str(media_dir / "textvqa" / "textvqa_val.jsonl"), "--num_prompts", "12",
                              "--concurrency", "4", "--request_rate", "50", "--max_output_len", "5",
                              "--ignore_eos", "--warmup", "1", "--save_path", str(out)])
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["output_tokens"] == 60 and summary["output_throughput_tps"] > 0
    assert set(summary["ttft_ms"]) == {"p50", "p90", "p99", "mean"}
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(r["success"] and r["output_tokens"] == 5 for r in records)
    assert json.loads((out / "summary.json").read_text())["completed"] == 12
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_and_eval_name_a_server_that_is_not_there(media_dir, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit, match=f"no model list from {dead}/v1/models .*is the server up"):
        benchmark.main(["--url", dead, "--dataset_type", "synthetic", "--num_prompts", "2"])
    with pytest.raises(SystemExit, match=f"no model list from {dead}/v1/models"):
        qvl_eval.main(["--task", "textvqa", "--dataset_path", str(media_dir / "textvqa"), "--url", dead,
                       "--save_path", str(tmp_path)])


def test_eval_takes_one_source(media_dir, tmp_path):
    common = ["--task", "textvqa", "--dataset_path", str(media_dir / "textvqa"), "--save_path", str(tmp_path)]
    for source in ([], ["--url", "http://127.0.0.1:1", "--model_path", "x"]):
        with pytest.raises(SystemExit, match="2"):  # argparse's usage error
            qvl_eval.main([*common, *source])


def test_benchmark_fails_when_every_request_fails(server):
    with pytest.raises(SystemExit, match="all 2 requests failed .*model"):
        benchmark.main(["--url", server.url, "--model", "no-such-model", "--dataset_type", "synthetic",
                        "--num_prompts", "2", "--warmup", "0", "--max_output_len", "2"])
    with pytest.raises(SystemExit, match="warmup request failed"):
        benchmark.main(["--url", server.url, "--model", "no-such-model", "--dataset_type", "synthetic",
                        "--num_prompts", "2", "--warmup", "1", "--max_output_len", "2"])


def test_eval_server_and_engine_agree(server, serving_ckpt, media_dir, tmp_path, monkeypatch):
    """VideoBench through the server and in-process give the same outputs (greedy), scored alike."""
    common = ["--task", "videobench", "--dataset_path", str(media_dir / "videobench" / "Eval_QA"), "--nframes", "4",
              "--max_pixels", str(16 * 28 * 28), "--max_output_len", "6"]
    via_server = qvl_eval.main([*common, "--url", server.url, "--save_path", str(tmp_path / "srv")])
    monkeypatch.setenv("QVL_KERNELS", "torch")  # the server's backend (the Triton path is tested elsewhere)
    in_process = qvl_eval.main([*common, "--model_path", str(serving_ckpt), "--kv_cache_gb", "0.02",
                                "--save_path", str(tmp_path / "eng")])
    assert via_server["samples"] == in_process["samples"] == 5
    srv = [json.loads(x) for x in (tmp_path / "srv" / "predictions.jsonl").read_text().splitlines()]
    eng = [json.loads(x) for x in (tmp_path / "eng" / "predictions.jsonl").read_text().splitlines()]
    assert [x["output"] for x in srv] == [x["output"] for x in eng]
    rows = list(csv.DictReader((tmp_path / "srv" / "results.csv").open()))
    assert [r["subset"] for r in rows] == ["Driving-decision-making", "Synthetic", "all"]
    assert float(rows[-1]["accuracy"]) == pytest.approx(sum(x["score"] for x in srv) / 5)


def test_eval_textvqa_scores_each_item(server, media_dir, tmp_path):
    summary = qvl_eval.main(["--task", "textvqa", "--dataset_path", str(media_dir / "textvqa"), "--url", server.url,
                             "--save_path", str(tmp_path), "--max_output_len", "4", "--num_samples", "4"])
    items = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(items) == 4 and summary["samples"] == 4
    for item in items:
        assert item["score"] == pytest.approx(vqa_score(item["prediction"], item["answers"]))


# ------------------------------------------------------------------------------------- SSE parsing

LINE_ENDS_OF_SPLITLINES = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(LINE_ENDS_OF_SPLITLINES),
                        max_size=12), min_size=1, max_size=6),
       st.integers(1, 7), st.booleans())
@settings(max_examples=60, deadline=None)
def test_sse_data_keeps_events_whole_whatever_their_text(pieces, chunk_size, crlf):
    """A server that leaves U+2028 and the like raw in its JSON (ensure_ascii=False) still gives
    one event per data line, however the body is chunked."""
    import asyncio

    import httpx

    from qwen_vl_triton.clients.client import sse_data

    end = "\r\n" if crlf else "\n"
    events = [json.dumps({"choices": [{"delta": {"content": p}}]}, ensure_ascii=False) for p in pieces]
    body = "".join(f"data: {e}{end}{end}" for e in [*events, "[DONE]"]).encode()

    async def chunks():
        for i in range(0, len(body), chunk_size):
            yield body[i:i + chunk_size]

    async def run() -> list[str]:
        resp = httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream; charset=utf-8"})
        return [d async for d in sse_data(resp)]

    got = asyncio.run(run())
    assert got[-1] == "[DONE]"
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in got[:-1]] == pieces
