"""One request's failure is that request's alone: a video whose frames do not decode, a row of
non-finite logits or a failed forward pass ends only the requests it concerns, and every other
request runs to its full length with the tokens it would have had without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwen_vl_triton.engine.errors import RequestFault, RequestMediaError, StepFailed
from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.testing.media import write_synthetic_video
from tests.engine.conftest import SMALL_VIDEO, mixed_requests


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def undecodable_video(path: Path, codec: str, seed: int) -> Path:
    """A clip whose header (moov) reads but whose frame data (mdat) is random bytes: it plans, then
    fails only when the engine decodes its frames."""
    clip = write_synthetic_video(path.with_suffix(".ok.mp4"), 3.0, 10, 64, 48, codec)
    data = bytearray(clip.read_bytes())
    clip.unlink()
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    start, end = mdat + 24, moov - 8 if moov > mdat else len(data)
    data[start:end] = np.random.default_rng(seed).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def alone(tiny_checkpoint) -> dict[str, list[int]]:
    """The mixed requests' tokens in a batch with nothing failing."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128)
    outs = llm.generate([p for p, _ in mixed_requests()], [greedy(m) for _, m in mixed_requests()])
    return {p.text: o.outputs[0].token_ids for (p, _), o in zip(mixed_requests(), outs, strict=True)}


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_a_video_that_does_not_decode_fails_alone(tiny_checkpoint, alone, tmp_path, codec):
    bad = undecodable_video(tmp_path / "bad.mp4", codec, seed=len(codec))
    requests = mixed_requests()
    prompts = [p for p, _ in requests] + [Prompt("What happens?", [Media(bad, options=SMALL_VIDEO)])]
    params = [greedy(m) for _, m in requests] + [greedy(8)]
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128)
    outs = llm.generate(prompts, params)
    *good, failed = outs
    assert failed.outputs[0].finish_reason == "error" and isinstance(failed.error, RequestMediaError)
    assert "bad.mp4" in str(failed.error) and "decode" in str(failed.error) and failed.outputs[0].token_ids == []
    for (prompt, max_tokens), out in zip(requests, good, strict=True):
        tokens = out.outputs[0].token_ids
        assert out.error is None and tokens == alone[prompt.text] and len(tokens) == max_tokens
    assert llm.blocks.num_used_blocks() == 0 and not llm.has_unfinished()


def test_non_finite_logits_end_only_their_request(tiny_checkpoint, alone, monkeypatch):
    requests = mixed_requests()[:4]
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128)
    real = llm.runner.forward

    def forward(batch, *context):
        logits = real(batch, *context)  # a row per run that samples, in run order
        for row, run in enumerate(r for r in batch.runs if r.samples):
            if run.seq.request_id.endswith("-1") and run.seq.output_ids:  # the second prompt, after 1 token
                logits[row, 3] = float("nan")
        return logits

    monkeypatch.setattr(llm.runner, "forward", forward)
    outs = llm.generate([p for p, _ in requests], [greedy(m) for _, m in requests])
    for i, ((prompt, max_tokens), out) in enumerate(zip(requests, outs, strict=True)):
        if i == 1:
            assert out.outputs[0].finish_reason == "error" and isinstance(out.error, RequestFault)
            assert "not finite" in str(out.error) and out.outputs[0].token_ids == alone[prompt.text][:1]
        else:
            tokens = out.outputs[0].token_ids
            assert out.error is None and tokens == alone[prompt.text] and len(tokens) == max_tokens
    assert llm.blocks.num_used_blocks() == 0


def test_a_failed_forward_ends_the_requests_in_it_only(tiny_checkpoint, alone, monkeypatch):
    """The first step (only the first request is admitted: a batch of one) fails; the step raises
    StepFailed with that request's output, the request queued behind it runs as if nothing happened."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128, max_batch_size=1)
    (first, _), (second, tokens) = mixed_requests()[0], mixed_requests()[3]
    llm.add_request("first", llm.preprocessor.prepare(first, greedy(4)))
    llm.add_request("second", llm.preprocessor.prepare(second, greedy(tokens)))
    real = llm.runner.forward
    calls = []

    def forward(batch, *context):
        calls.append([r.seq.request_id for r in batch.runs])
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(batch, *context)

    monkeypatch.setattr(llm.runner, "forward", forward)
    with pytest.raises(StepFailed, match="injected fault") as failed:
        llm.step()
    (out,) = failed.value.outputs
    assert calls == [["first"]] and out.request_id == "first" and out.outputs[0].finish_reason == "error"
    assert isinstance(out.error, RequestFault) and "injected fault" in str(out.error)
    finished = {}
    while llm.has_unfinished():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
    assert finished["second"].outputs[0].token_ids == alone[second.text]
    assert llm.blocks.num_used_blocks() == 0


def test_generate_returns_errors_when_asked(tiny_checkpoint, alone, tmp_path):
    """errors="return": a prompt that cannot be prepared gets an output saying why; the rest run.
    The default still raises. Offline ids never collide with a request already queued."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128)
    (text, tokens) = mixed_requests()[0]
    llm.add_request("offline-0", llm.preprocessor.prepare(text, greedy(2)))
    missing = Prompt("Look.", [Media(tmp_path / "missing.png")])
    outs = llm.generate([missing, text], [greedy(1), greedy(tokens)], errors="return")
    (failed,) = outs[0].outputs
    assert failed.finish_reason == "error" and "missing.png" in str(outs[0].error) and failed.token_ids == []
    assert outs[1].outputs[0].token_ids == alone[text.text]
    assert "offline-0" not in llm.sequences  # ran to its end alongside, not aborted or replaced
    with pytest.raises(ValueError, match="missing.png"):
        llm.generate([text, missing], greedy(1))
    assert not llm.has_unfinished()
