"""The tiny checkpoint: transformers loads every variant and they all compute the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from qwen_vl_triton.cli import make_tiny_checkpoint as make_tiny_checkpoint_cli
from qwen_vl_triton.engine.media import Media, prepare_media
from qwen_vl_triton.modeling.processing import (
    SAMPLE_IMAGE_PATH,
    SAMPLE_VIDEO_PATH,
    ImageProcessorConfig,
    process_image,
)
from qwen_vl_triton.testing import tiny_checkpoint
from qwen_vl_triton.testing.tiny_checkpoint import (
    CHAT_TEMPLATE,
    CHECKPOINT_VERSION,
    MANIFEST,
    SPECIAL_TOKENS,
    TOOL_TOKENS,
    TOOLS_CHAT_TEMPLATE,
    cached_checkpoint,
    checkpoint_complete,
    make_tiny_checkpoint,
    mrope_section_for,
    rename_weights,
    special_token_ids,
    tool_token_ids,
)
from tests.modeling.prompts import mm_token_type_ids, prompt_ids

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ARCH_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
VARIANTS = {
    "flat-legacy": dict(layout="flat", weight_names="legacy"),
    "language_model-sharded": dict(weight_names="language_model", sharded=True, num_shards=3),
    "bf16": dict(dtype="bfloat16"),
}


def _load(path: Path, arch: str):
    cls = getattr(transformers, ARCH_CLASSES[arch])
    model, info = cls.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _tensor_names(path: Path) -> list[str]:
    names = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names.extend(st.keys())
    return sorted(names)


@pytest.fixture(scope="module", params=list(ARCH_CLASSES))
def base(request, tmp_path_factory):
    """(arch, checkpoint dir, model, inputs with an image, reference logits)."""
    arch = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch)
    model, info = _load(path, arch)
    assert not any(info.values()), info
    cfg = ImageProcessorConfig.from_pretrained(path)
    pixel_values, grid = process_image(SAMPLE_IMAGE_PATH, cfg)
    config = json.loads((path / "config.json").read_text())
    ids = prompt_ids(path, [("image", grid)], "Describe the picture.")
    inputs = dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=pixel_values,
        image_grid_thw=torch.tensor([grid]),
        mm_token_type_ids=torch.tensor([mm_token_type_ids(ids, config["image_token_id"],
                                                          config["video_token_id"])]),
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    return arch, path, model, inputs, logits


def test_default_layout_is_what_transformers_writes(base):
    arch, path, _, _, logits = base
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch and "text_config" in config and "vision_config" in config
    text = config["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert text["rope_parameters"]["mrope_section"] == mrope_section_for(head_dim)
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim
    if arch == "qwen2_5_vl":
        v = config["vision_config"]
        assert v["tokens_per_second"] == 2 and v["window_size"] == 112
        assert v["fullatt_block_indexes"] == [1, 3]
    ids = special_token_ids(512)
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["vision_end_token_id"] == ids["<|vision_end|>"]
    assert text["eos_token_id"] == ids["<|im_end|>"] and text["bos_token_id"] == ids["<|endoftext|>"]
    assert text["vocab_size"] >= len(SPECIAL_TOKENS) + 512
    # transformers 5.x saves the classic tensor names
    names = _tensor_names(path)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert any(n.startswith("visual.blocks.0.") for n in names)
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_load_and_match(base, variant, tmp_path):
    arch, _, _, inputs, ref = base
    kw = VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path / variant, arch, **kw)
    model, info = _load(path, arch)
    assert not any(info.values()), info
    config = json.loads((path / "config.json").read_text())
    names = _tensor_names(path)
    if kw.get("layout") == "flat":
        assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"
        assert config["hidden_size"] == 128 and config["vision_config"]["in_chans"] == 3
    if kw.get("weight_names") == "legacy":
        assert any(n.startswith("model.layers.") for n in names)
        assert any(n.startswith("visual.") for n in names)
    if kw.get("weight_names") == "language_model":
        assert any(n.startswith("model.language_model.layers.") for n in names)
        assert any(n.startswith("model.visual.") for n in names) and "lm_head.weight" in names
    if kw.get("sharded"):
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert sorted(index["weight_map"]) == names and not (path / "model.safetensors").exists()
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    if kw.get("dtype") == "bfloat16":
        assert model.dtype == torch.bfloat16
        torch.testing.assert_close(logits, ref, atol=0.5, rtol=0.1)
    else:
        torch.testing.assert_close(logits, ref, atol=0, rtol=0)


def test_greedy_decoding_is_not_degenerate(base):
    _, _, model, inputs, _ = base
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == 16 and len(set(new)) >= 4, new


def test_transformers_runs_our_video_and_image_inputs(base):
    """Our pads, patches and grids are what transformers' model consumes (it checks that the pad
    count equals the number of merged features)."""
    arch, path, model, _, _ = base
    cfg = ImageProcessorConfig.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    video = prepare_media(Media(SAMPLE_VIDEO_PATH, options=dict(nframes=4, min_pixels=28 * 28 * 4,
                                                                max_pixels=28 * 28 * 16)), cfg)
    vid_pixels, vid_grid, second_per_grid_t = video.pixel_values, video.grid, video.second_per_grid_t
    img_pixels, img_grid = process_image(SAMPLE_IMAGE_PATH, cfg)
    media = [("video", vid_grid), ("image", img_grid)]
    ids = prompt_ids(path, media, "What moves?")
    kw = dict(
        input_ids=torch.tensor([ids]),
        pixel_values=img_pixels, image_grid_thw=torch.tensor([img_grid]),
        pixel_values_videos=vid_pixels, video_grid_thw=torch.tensor([vid_grid]),
        mm_token_type_ids=torch.tensor([mm_token_type_ids(ids, config["image_token_id"],
                                                          config["video_token_id"])]),
    )
    if arch == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor([second_per_grid_t])
    with torch.no_grad():
        logits = model(**kw).logits
    assert logits.shape == (1, len(ids), model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_seed_changes_weights(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", "qwen2_vl", seed=0)
    b = make_tiny_checkpoint(tmp_path / "b", "qwen2_vl", seed=0)
    c = make_tiny_checkpoint(tmp_path / "c", "qwen2_vl", seed=1)
    ta, tb, tc = ({k: f.get_tensor(k) for k in f.keys()} for f in  # noqa: SIM118 (not a dict)
                  (safe_open(str(p / "model.safetensors"), "pt") for p in (a, b, c)))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["model.embed_tokens.weight"], tc["model.embed_tokens.weight"])


def test_tokenizer_roundtrip_and_special_ids(base):
    arch, path, _, _, _ = base
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = special_token_ids(512)
    for t, i in ids.items():
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i]
    tools = arch == "qwen2_5_vl"  # only Qwen2.5's vocabulary has the tool call tags
    assert len(tok) == 512 + len(SPECIAL_TOKENS) + (len(TOOL_TOKENS) if tools else 0)
    # both vocabularies pad to the same embedding
    assert json.loads((path / "config.json").read_text())["text_config"]["vocab_size"] == 576
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ["Describe this image.", "  spaces\tand\nnewlines  ", "Zahlen 12345, ünïcödé — 中文!",
                 "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What?"]:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc) == text
    # trained merges: ordinary words are fewer tokens than bytes
    words = "Describe the picture"
    assert len(tok.encode(words, add_special_tokens=False)) < len(words) // 2


def test_chat_template_renders_qwen_markers(base):
    arch, path, _, _, _ = base
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == (TOOLS_CHAT_TEMPLATE if arch == "qwen2_5_vl" else CHAT_TEMPLATE)
    parts = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi?"}]
    msgs = [{"role": "user", "content": parts}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n")
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}]
    text = tok.apply_chat_template(sys_msgs, tokenize=False, add_generation_prompt=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                    "<|im_start|>assistant\nHi.<|im_end|>\n")
    text = tok.apply_chat_template(msgs, tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|>" in text
    assert "Video 1: <|vision_start|><|video_pad|>" in text


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city (°C).",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather here, and the time?"}]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "assistant", "content": "21 °C at noon."},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "rain"},
]


def test_tools_render_as_qwen2_5_does(base):
    """The Qwen2.5-VL tokenizer renders tools, calls and tool responses in Qwen2.5's format; the
    Qwen2-VL one (whose released template has no tools) renders the same text with or without
    them, which is how the server tells that a checkpoint cannot take tools."""
    arch, path, _, _, _ = base
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(TOOL_CONVERSATION, tokenize=False, add_generation_prompt=True)
    if arch == "qwen2_vl":
        assert text == without
        return
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city (°C).", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        '{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Weather here, and the time?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        "<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n21 °C at noon.<|im_end|>\n"
        "<|im_start|>user\nAnd tomorrow?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert text != without
    # no system message: the default one heads the tools
    text = tok.apply_chat_template(TOOL_CONVERSATION[1:2], tools=TOOLS[1:], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n")
    assert text.endswith('<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>'
                         "Weather here, and the time?<|im_end|>\n")
    # the tags are one token each, and decoding without special tokens keeps them
    ids = tok.encode(text, add_special_tokens=False)
    tags = tool_token_ids(512)
    assert ids.count(tags["<tool_call>"]) == 2 and ids.count(tags["</tool_call>"]) == 2  # in the tools prompt
    assert tok.decode(ids, skip_special_tokens=True).count("<tool_call>") == 2


def test_preprocessor_config_loads_in_transformers(base):
    _, path, _, _, _ = base
    hf = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
    cfg = ImageProcessorConfig.from_pretrained(path)
    assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == (cfg.min_pixels, cfg.max_pixels)
    assert (hf.patch_size, hf.temporal_patch_size, hf.merge_size) == (14, 2, 2)
    assert list(hf.image_mean) == list(cfg.image_mean) and list(hf.image_std) == list(cfg.image_std)


def test_rename_weights_both_ways():
    names = ["model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.attn.qkv.weight",
             "lm_head.weight", "model.language_model.embed_tokens.weight"]
    legacy = rename_weights(names, "legacy")
    assert list(legacy.values()) == ["model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight",
                                     "lm_head.weight", "model.embed_tokens.weight"]
    back = rename_weights(list(legacy.values()), "language_model")
    assert list(back.values()) == names


def test_cli_writes_a_checkpoint(tmp_path):
    out = make_tiny_checkpoint_cli.main([str(tmp_path / "ck"), "--arch", "qwen2_5_vl", "--layout", "flat", "--sharded",
                    "--weight_names", "legacy", "--seed", "3", "--dtype", "bfloat16"])
    meta = json.loads((out / "tiny_checkpoint.json").read_text())
    assert meta["arch"] == "qwen2_5_vl" and meta["layout"] == "flat" and meta["sharded"] and meta["seed"] == 3
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "model.safetensors.index.json").exists()
    with pytest.raises(SystemExit):
        make_tiny_checkpoint_cli.parse_args([str(tmp_path), "--arch", "llama"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_tiny_checkpoint(tmp_path, "qwen3_vl")
    with pytest.raises(TypeError, match="hidden"):
        make_tiny_checkpoint(tmp_path, "qwen2_vl", hiddn_size=64)


def test_cached_checkpoint_is_installed_whole(tmp_path, monkeypatch):
    """A half-written folder counts as absent; an interrupted write leaves nothing behind; a copy a
    concurrent writer installed first is kept."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QVL_CACHE", str(cache))
    real_make = tiny_checkpoint.make_tiny_checkpoint

    half = cache / "ck"  # what an interrupted run of the old in-place writer left
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert not checkpoint_complete(half)
    path = cached_checkpoint("ck", "qwen2_vl", sharded=True, num_shards=2)
    assert path == half and checkpoint_complete(path)
    assert json.loads((path / "tiny_checkpoint.json").read_text())["arch"] == "qwen2_vl"
    assert sorted(p.name for p in cache.iterdir()) == ["ck"]  # no partial or stale folder left

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete cached checkpoint was made again")

    monkeypatch.setattr(tiny_checkpoint, "make_tiny_checkpoint", must_not_run)
    assert cached_checkpoint("ck", "qwen2_vl") == path
    next(path.glob("model-00002-*.safetensors")).unlink()  # a lost shard: made again
    monkeypatch.setattr(tiny_checkpoint, "make_tiny_checkpoint", real_make)
    assert checkpoint_complete(cached_checkpoint("ck", "qwen2_vl", sharded=True, num_shards=2))

    def interrupted(out, *args, **kwargs):
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_checkpoint, "make_tiny_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_checkpoint("gone", "qwen2_vl")
    assert sorted(p.name for p in cache.iterdir()) == ["ck"]

    def beaten(out, *args, **kwargs):  # another process installs its copy while this one writes
        real_make(out, *args, **kwargs)
        shutil.copytree(out, cache / "race")
        (cache / "race" / "theirs").touch()

    monkeypatch.setattr(tiny_checkpoint, "make_tiny_checkpoint", beaten)
    race = cached_checkpoint("race", "qwen2_vl")
    assert checkpoint_complete(race) and (race / "theirs").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["ck", "race"]


@pytest.mark.parametrize("manifest", [
    lambda m: {k: v for k, v in m.items() if k != "version"},      # written before versions
    lambda m: {**m, "version": CHECKPOINT_VERSION - 1},
    lambda m: [m],                                                 # not a manifest at all
])
def test_a_cached_checkpoint_of_an_older_version_is_made_again(tmp_path, monkeypatch, manifest):
    monkeypatch.setenv("QVL_CACHE", str(tmp_path))
    path = cached_checkpoint("ck", "qwen2_vl")
    meta = json.loads((path / MANIFEST).read_text())
    assert meta["version"] == CHECKPOINT_VERSION and checkpoint_complete(path)
    (path / MANIFEST).write_text(json.dumps(manifest(meta)))
    (path / "old").touch()
    assert not checkpoint_complete(path)
    assert cached_checkpoint("ck", "qwen2_vl") == path
    assert checkpoint_complete(path) and not (path / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
