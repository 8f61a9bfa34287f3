"""Quantized checkpoints end to end, as users run them: tools/generate.py and tools/serve.py on an
msModelSlim W8A8 and a compressed-tensors W8A8 checkpoint of both architectures (made by
tools/quantize.py), in one process and over 2 gloo ranks, give the greedy tokens of the same
checkpoint's dequantized float reference (modeling.linear.dequantized) at the same world size.

Kernels run as their PyTorch references here (QVL_KERNELS=torch): the int8 Triton kernels are
proven equal to the references in tests/kernels and on the whole model in
tests/modeling/test_quantization.py. The reference is taken at each world size because per-token
(dynamic) activation scales are each rank's own in row-parallel layers (each rank quantizes its
share of a token); with msModelSlim's static per-tensor scales the world sizes agree with each other too.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from qwen_vl_triton.cli import generate
from qwen_vl_triton.cli.quantize import quantize_checkpoint
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.parallel.launch import ROOT, run_ranks
from tests.parallel.quant_script import CHAT_TEXT, IMAGE_TEXT, TOKENS, reference_tokens
from tests.parallel.test_tp_engine import TIMEOUT_S, TP_SIZES
from tests.serving.conftest import REQUEST_TIMEOUT_S, start_server, stop_server
from tests.serving.test_tp import kill_all, post_while_running, start_two_rank_server, stop_two_rank_server

SCRIPT = Path(__file__).with_name("quant_script.py")
COMBOS = [("qwen2_vl", "ascend-w8a8"), ("qwen2_5_vl", "ascend-w8a8"), ("qwen2_vl", "compressed-tensors-w8a8"),
          ("qwen2_5_vl", "compressed-tensors-w8a8")]
METHOD = {"ascend-w8a8": "ascend", "compressed-tensors-w8a8": "compressed-tensors"}
DESCRIBED = {"ascend-w8a8": "ascend (msModelSlim) W8A8",
             "compressed-tensors-w8a8": "compressed-tensors int8 W8A8 dynamic"}
ENV = {"QVL_KERNELS": "torch"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpq")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, fmt: str) -> Path:
        if (arch, fmt) not in made:
            src = root / f"float-{arch}"
            if not src.exists():
                make_tiny_checkpoint(src, arch, seed=11, **TP_SIZES)
            made[arch, fmt] = quantize_checkpoint(src, root / f"{arch}-{fmt}", fmt, calib_prompts=2)
        return made[arch, fmt]

    return get


def references(ckpt: Path, tmp_path: Path, monkeypatch) -> dict[int, dict[str, list[int]]]:
    """The dequantized reference's tokens per request, at world sizes 1 (here) and 2 (two ranks)."""
    monkeypatch.setenv("QVL_KERNELS", "torch")
    one = reference_tokens(ckpt, "dequantized")
    out = tmp_path / "ref2"
    run_ranks(SCRIPT, [str(ckpt), str(out), "dequantized"], 2, out, TIMEOUT_S, env=ENV)
    return {1: one, 2: json.loads((out / "outputs.json").read_text())}


def generate_args(ckpt: Path, fmt: str, out_json: Path) -> list[str]:
    return ["--model_path", str(ckpt), "--input_image", str(SAMPLE_IMAGE_PATH), "--input_text", IMAGE_TEXT,
            "--max_output_length", str(TOKENS), "--ignore_eos", "--device", "cpu", "--kv_cache_gb", "0.05",
            "--quantization", METHOD[fmt], "--output_json", str(out_json)]


@pytest.mark.parametrize(("arch", "fmt"), COMBOS)
def test_generate_and_serve_give_the_dequantized_reference_tokens(arch, fmt, quantized, tmp_path, monkeypatch,
                                                                  capsys):
    ckpt = quantized(arch, fmt)
    refs = references(ckpt, tmp_path, monkeypatch)
    if fmt == "ascend-w8a8":  # static per-tensor scales: the world size changes only float rounding
        assert refs[1] == refs[2]

    report = generate.main(generate_args(ckpt, fmt, tmp_path / "tp1.json"))
    assert report["results"][0]["output_token_ids"] == refs[1]["image"]
    assert report["perf"]["quantization"] == DESCRIBED[fmt]
    assert f"per rank (quantization: {DESCRIBED[fmt]})" in capsys.readouterr().out
    out = tmp_path / "gen2"
    run_ranks(ROOT / "tools" / "generate.py", generate_args(ckpt, fmt, out / "tp2.json"), 2, out, TIMEOUT_S, env=ENV)
    assert json.loads((out / "tp2.json").read_text())["results"][0]["output_token_ids"] == refs[2]["image"]

    # the server: one process for the first two combinations, two ranks for the others
    body = {"messages": [{"role": "user", "content": CHAT_TEXT}], "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    if COMBOS.index((arch, fmt)) < 2:
        server = start_server(ckpt, tmp_path, tmp_path / "serve.log")
        try:
            answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S).json()
        finally:
            assert stop_server(server) == 0
        assert answer["choices"][0]["token_ids"] == refs[1]["text"]
    else:
        url, procs, tails = start_two_rank_server(ckpt, tmp_path)
        try:
            answer = post_while_running(url + "/v1/chat/completions", body, procs, tails)
            stop_two_rank_server(procs, tails)
        finally:
            kill_all(procs)
        assert answer["choices"][0]["token_ids"] == refs[2]["text"]
