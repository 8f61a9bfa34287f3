"""tools/generate.py end to end against transformers' own pipeline on a save_pretrained checkpoint:
same prompt token count, same greedy tokens, logprobs within 2e-3 (the issue's acceptance line)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen_vl_triton.cli import generate
from qwen_vl_triton.engine.stats import STEP_PHASES
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH, SAMPLE_VIDEO_PATH
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint

STEPS = 10
TEXT = "What is shown here?"


def transformers_reference(checkpoint, steps: int) -> tuple[int, list[int], list[float]]:
    """Prompt length, greedy tokens and their logprobs from transformers alone: its tokenizer's chat
    template, its PIL image processor, its model's generate (with mm_token_type_ids)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    image = processor(images=[Image.open(SAMPLE_IMAGE_PATH)], return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pads = int(image["image_grid_thw"].prod()) // processor.merge_size**2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * pads)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    image_token = model.config.image_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                             mm_token_type_ids=(ids == image_token).long()[None], pixel_values=image["pixel_values"],
                             image_grid_thw=image["image_grid_thw"], max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [float(torch.log_softmax(step[0].double(), -1)[t]) for step, t in zip(out.logits, tokens, strict=True)]
    return len(ids), tokens, logprobs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2_5_vl", seed=5)


def test_generate_matches_transformers(checkpoint, tmp_path, capsys):
    out_json = tmp_path / "out.json"
    generate.main(["--model_path", str(checkpoint), "--input_image", str(SAMPLE_IMAGE_PATH), "--input_text", TEXT,
                   "--temperature", "0", "--ignore_eos", "--max_output_length", str(STEPS),
                   "--output_json", str(out_json), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "time to first token" in printed and "decode" in printed
    report = json.loads(out_json.read_text())
    (result,) = report["results"]
    assert set(result) >= {"media", "prompt_tokens", "output_token_ids", "output_logprobs", "text", "ttft_s",
                           "latency_s"}
    assert result["media"] == [str(SAMPLE_IMAGE_PATH)]
    prompt_tokens, tokens, logprobs = transformers_reference(checkpoint, STEPS)
    assert result["prompt_tokens"] == prompt_tokens
    assert result["output_token_ids"] == tokens
    assert max(abs(a - b) for a, b in zip(result["output_logprobs"], logprobs, strict=True)) < 2e-3
    assert report["perf"]["output_tokens"] == STEPS
    # where the steps' host time went: every phase measured, together within the run's wall time
    profile = report["perf"]["step_profile_s"]
    assert set(profile) == {*STEP_PHASES, "other"} and min(profile.values()) >= 0
    assert profile["vision"] > 0 and profile["forward"] > 0 and profile["sampling"] > 0 and profile["detokenize"] > 0
    assert sum(profile.values()) <= report["perf"]["wall_s"]
    assert "step profile (host s): schedule" in printed
    startup = report["perf"]["startup_s"]  # from the script's first line to the first request
    assert startup["imports"] > 0 and startup["load"] > 0 and startup["total"] >= startup["imports"] + startup["load"]
    assert "start-up" in printed


def test_generate_reports_bad_input_clearly(checkpoint, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(SystemExit, match="broken.png"):
        generate.main(["--model_path", str(checkpoint), "--input_image", str(broken), "--device", "cpu"])
    with pytest.raises(SystemExit, match="no such file"):
        generate.main(["--model_path", str(checkpoint), "--input_image", str(tmp_path / "missing.jpg"),
                       "--device", "cpu"])


@pytest.mark.parametrize("name,content", [("script.py", "print('not media')\n"), ("notes.txt", "just words\n")])
def test_generate_names_a_file_that_is_neither_image_nor_video(checkpoint, tmp_path, name, content):
    """It was reported as "cannot open video" (PyAV's try at it); refused before the model loads."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        generate.main(["--model_path", str(checkpoint), "--input_image", str(SAMPLE_IMAGE_PATH), "--input_image",
                       str(path), "--device", "cpu"])
    message = str(e.value.code)
    assert message.startswith(f"error: --input_image {path}: neither an image nor a video")
    assert "supported: images" in message and "cannot open video" not in message


def test_dataset_path_runs_each_image_and_video_and_skips_other_files(checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for asset in (SAMPLE_IMAGE_PATH, SAMPLE_VIDEO_PATH):
        (data / asset.name).write_bytes(asset.read_bytes())
    (data / "notes.txt").write_text("not media\n")
    (data / "labels.json").write_text('{"sample.png": "a picture"}\n')
    out_json = tmp_path / "out.json"
    generate.main(["--model_path", str(checkpoint), "--dataset_path", str(data), "--max_output_length", "2",
                   "--ignore_eos", "--num_copies", "2", "--output_json", str(out_json), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "skipping 2 file(s)" in err and "notes.txt" in err and "labels.json" in err
    results = json.loads(out_json.read_text())["results"]
    media = sorted(str(data / asset.name) for asset in (SAMPLE_IMAGE_PATH, SAMPLE_VIDEO_PATH))
    assert sorted(r["media"][0] for r in results) == sorted(media * 2)
    assert all(len(r["output_token_ids"]) == 2 for r in results)

    only_notes = tmp_path / "notes"
    only_notes.mkdir()
    (only_notes / "readme.txt").write_text("nothing to see\n")
    with pytest.raises(SystemExit, match="no image or video files"):
        generate.main(["--model_path", str(checkpoint), "--dataset_path", str(only_notes), "--device", "cpu"])


def test_mindie_run_pa_flags(checkpoint, tmp_path):
    """MindIE's performance run: one input, --max_batch_size N -> N copies; its file flags accepted."""
    saved = tmp_path / "results.json"
    generate.main(["--model_path", str(checkpoint), "--input_image", str(SAMPLE_IMAGE_PATH), "--max_batch_size", "3",
                   "--max_output_length", "2", "--ignore_eos", "--results_save_path", str(saved),
                   "--shm_name_save_path", str(tmp_path / "shm_names.txt"), "--quiet", "--device", "cpu"])
    results = json.loads(saved.read_text())["results"]
    assert len(results) == 3 and len({tuple(r["output_token_ids"]) for r in results}) == 1
    report = generate.main(["--model_path", str(checkpoint), "--max_batch_size", "3", "--num_copies", "1",
                            "--max_output_length", "2", "--quiet", "--device", "cpu"])
    assert len(report["results"]) == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--block_size", "0"], "block_size must be >= 1, got 0"),
    (["--max_batch_size", "-1"], "--max_batch_size must be >= 1, got -1"),
    (["--max_input_length", "0"], "max_input_length must be >= 1, got 0"),
    (["--kv_cache_gb", "0"], "kv_cache_gb must be > 0, got 0.0"),
])
def test_bad_engine_flags_are_named(checkpoint, flags, message):
    with pytest.raises(SystemExit, match=message):
        generate.main(["--model_path", str(checkpoint), *flags, "--device", "cpu"])


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        generate.main(["--model_path", str(tmp_path / "nowhere"), "--device", "cpu"])


def test_dataset_path_with_bad_files_reports_them_and_produces_the_rest(checkpoint, tmp_path):
    """A corrupt PNG (fails while prepared) and a video whose frames do not decode (fails while the
    engine encodes it): each one's result says why; the good files are produced in full."""
    from tests.engine.test_isolation import undecodable_video

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE_IMAGE_PATH, data / "a_good.png")
    shutil.copy(SAMPLE_VIDEO_PATH, data / "b_good.mp4")
    png = bytearray(SAMPLE_IMAGE_PATH.read_bytes())
    png[60:] = bytes(len(png) - 60)  # the header reads, the pixel data (IDAT) is zeros
    (data / "c_corrupt.png").write_bytes(bytes(png))
    undecodable_video(data / "d_garbled.mp4", "mpeg4", seed=1)
    out_json = tmp_path / "out.json"
    generate.main(["--model_path", str(checkpoint), "--dataset_path", str(data), "--max_output_length", "3",
                   "--ignore_eos", "--output_json", str(out_json), "--device", "cpu", "--nframes", "4",
                   "--max_pixels", str(16 * 28 * 28)])
    results = {Path(r["media"][0]).name: r for r in json.loads(out_json.read_text())["results"]}
    assert set(results) == {"a_good.png", "b_good.mp4", "c_corrupt.png", "d_garbled.mp4"}
    for good in ("a_good.png", "b_good.mp4"):
        assert "error" not in results[good] and len(results[good]["output_token_ids"]) == 3, results[good]
    for bad in ("c_corrupt.png", "d_garbled.mp4"):
        assert results[bad]["finish_reason"] == "error" and bad in results[bad]["error"], results[bad]
        assert results[bad]["output_token_ids"] == []
