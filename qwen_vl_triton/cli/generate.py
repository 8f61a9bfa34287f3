"""Generate with Qwen2-VL / Qwen2.5-VL / QVQ (flags follow MindIE's run_pa.py).

    python tools/generate.py --model_path CKPT --input_image cat.jpg --input_text "What is this?"
    python tools/generate.py --model_path CKPT --dataset_path images/ --max_batch_size 16
    python tools/generate.py --tensor_parallel_size 2 ...        # tensor parallel, on this machine
    torchrun --nproc-per-node 2 tools/generate.py ...          # tensor parallel, also across machines

Every rank loads its shards and runs the same engine steps; rank 0 reads the requests, prints and
writes --output_json, the other ranks follow it (LLM.worker_loop). With --tensor_parallel_size
this process is rank 0 and the engine starts the others; under torchrun the ranks are its.

Without --model_path a tiny random Qwen2.5-VL checkpoint is made once (under ~/.cache/qwen-vl-triton
or $QVL_CACHE) and used with the bundled sample image: a smoke test of the whole path, whose
text is random. --input_image takes images and videos (by extension) and may be repeated.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # start-up is timed from here, before the heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from qwen_vl_triton.engine.config import EngineConfig, add_engine_args  # noqa: E402
from qwen_vl_triton.engine.llm import LLM, Prompt  # noqa: E402
from qwen_vl_triton.engine.media import IMAGE_OPTIONS, VIDEO_OPTIONS, Media, PreparedMedia, prepare_media  # noqa: E402
from qwen_vl_triton.engine.report import format_summary, perf_summary  # noqa: E402
from qwen_vl_triton.engine.sampling import SamplingParams  # noqa: E402
from qwen_vl_triton.modeling.processing import (  # noqa: E402
    SAMPLE_IMAGE_PATH,
    ImageProcessorConfig,
    MediaError,
    media_kind,
    probe_media_kind,
)
from qwen_vl_triton.parallel import (  # noqa: E402
    TPGroup,
    TPSizeError,
    TPWorldError,
    barrier,
    destroy,
    end_process,
    exit_now,
    init_from_env,
)
from qwen_vl_triton.testing.tiny_checkpoint import cached_checkpoint  # noqa: E402

IMPORTS_S = time.perf_counter() - STARTED  # torch alone is most of it

DEFAULT_TEXT = "Describe this image."
DEFAULT_MAX_BATCH_SIZE = 16
# The sampling flags' defaults where the model's generation_config.json sets none: greedy, as run_pa.py
TOOL_DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}


def demo_checkpoint() -> Path:
    """The tiny random Qwen2.5-VL checkpoint of the demo, made on first use."""
    return cached_checkpoint("tiny-qwen2_5_vl", "qwen2_5_vl", seed=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add = p.add_argument
    add("--model_path", type=Path, help="HF-format checkpoint directory (default: the tiny demo checkpoint)")
    add("--input_text", default=DEFAULT_TEXT, help="the user's text, after the media (default: %(default)r)")
    add("--input_image", action="append", default=[], metavar="PATH",
        help="an image or video file for the prompt; repeat for several in one prompt")
    add("--dataset_path", type=Path,
        help="a folder: one request per image/video file in it (with --input_text), sorted by name")
    add("--num_copies", type=int,
        help="send N copies of each request (throughput tests; default: 1, or --max_batch_size when that is "
             "given for one --input_image/--input_text request, as MindIE's run_pa.py does: its performance runs "
             "repeat one input a batch's worth of times)")
    # Unset sampling flags take the model's defaults (--generation_config), then the tool's own.
    model = "the model's (generation_config.json, see --generation_config), else"
    add("--max_output_length", type=int,
        help=f"new tokens per request (default: {model} {TOOL_DEFAULTS['max_tokens']})")
    add("--temperature", type=float, help=f"0 = greedy (default: {model} {TOOL_DEFAULTS['temperature']})")
    add("--top_p", type=float, help=f"nucleus sampling mass (default: {model} {TOOL_DEFAULTS['top_p']})")
    add("--top_k", type=int, help=f"sample among the k most likely, -1: off (default: {model} off)")
    add("--repetition_penalty", type=float,
        help=f"HF-style repetition penalty, 1.0: off (default: {model} {TOOL_DEFAULTS['repetition_penalty']})")
    add("--seed", type=int, help="per-request sampling seed (reproducible sampling)")
    add("--ignore_eos", action="store_true", help="generate max_output_length tokens regardless of EOS")
    media = p.add_argument_group("media controls (qwen-vl-utils' names; applied to every image / video given)")
    media.add_argument("--min_pixels", type=int, help="smallest frame/image area in pixels (images: from "
                       "preprocessor_config.json; videos: 128*28*28)")
    media.add_argument("--max_pixels", type=int, help="largest frame/image area in pixels (images: from "
                       "preprocessor_config.json; videos: 768*28*28, lowered by --total_pixels)")
    media.add_argument("--resized_height", type=int, help="exact height (a multiple of 28), with --resized_width")
    media.add_argument("--resized_width", type=int, help="exact width (a multiple of 28), with --resized_height")
    media.add_argument("--fps", type=float, help="video frames sampled per second (default: 2)")
    media.add_argument("--nframes", type=int, help="exact number of video frames to sample (instead of --fps)")
    media.add_argument("--min_frames", type=int, help="fewest video frames sampled (default: 4)")
    media.add_argument("--max_frames", type=int, help="most video frames sampled (default: 768)")
    media.add_argument("--total_pixels", type=int, help="pixel budget over all frames of a video "
                       "(default: 90%% of a 128k-token context)")
    media.add_argument("--video_start", type=float, help="first second of each video to use")
    media.add_argument("--video_end", type=float, help="last second of each video to use")
    add("--output_json", "--results_save_path", type=Path, dest="output_json",
        help="write results and the perf summary here (--results_save_path: MindIE's name)")
    add("--shm_name_save_path", type=Path,
        help="MindIE's shared-memory file-name list: accepted for compatibility and unused (media are read "
             "in this process)")
    add("--quiet", action="store_true", help="print only the perf summary")
    add("--verbose", action="store_true", help="log what the engine reads and decides as it loads (a quantized "
                                               "checkpoint's format and its description's metadata, the sampling "
                                               "defaults in force, the KV cache's size)")
    add_engine_args(p, max_batch_size=DEFAULT_MAX_BATCH_SIZE)
    return p.parse_args(argv)


def media_of(path: str | Path, args: argparse.Namespace, kind: str | None = None) -> Media:
    """A Media with the media-control flags that apply to its kind (told from the file if not given;
    MediaError if it is neither an image nor a video)."""
    if kind is None and Path(path).exists():
        kind = media_kind(path)
    names = IMAGE_OPTIONS if kind == "image" else VIDEO_OPTIONS
    return Media(path, kind, {k: getattr(args, k) for k in names if getattr(args, k) is not None})


def build_prompts(args: argparse.Namespace, using_demo: bool) -> list[tuple[list[str], Prompt]]:
    """(media paths, prompt) per request, before --num_copies."""
    if args.dataset_path is not None:
        if not args.dataset_path.is_dir():
            raise SystemExit(f"--dataset_path {args.dataset_path}: not a directory")
        files = sorted(f for f in args.dataset_path.iterdir() if f.is_file() and not f.name.startswith("."))
        kinds = {f: probe_media_kind(f) for f in files}  # each file opened once
        skipped = [f.name for f in files if kinds[f] is None]
        if len(skipped) == len(files):
            raise SystemExit(f"--dataset_path {args.dataset_path}: no image or video files in it")
        if skipped:
            print(f"--dataset_path: skipping {len(skipped)} file(s) that are not images or videos: "
                  f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
        return [([str(f)], Prompt(args.input_text, [media_of(f, args, kinds[f])])) for f in files
                if kinds[f] is not None]
    paths = list(args.input_image) or ([_shown(SAMPLE_IMAGE_PATH)] if using_demo else [])
    try:
        media = [media_of(p, args) for p in paths]
    except MediaError as e:  # neither an image nor a video: said now, before the model loads
        raise SystemExit(f"error: --input_image {e}") from None
    return [(paths, Prompt(args.input_text, media))]


def sampling_params(args: argparse.Namespace, llm: LLM) -> SamplingParams:
    """The flags' sampling settings: each flag given, else the model's default, else TOOL_DEFAULTS."""
    given = {"max_tokens": args.max_output_length, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}
    values = {name: llm.sampling_defaults.get(name, value, TOOL_DEFAULTS[name]) for name, value in given.items()}
    return SamplingParams(**values, seed=args.seed, ignore_eos=args.ignore_eos)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (the demo run from a checkout
    prints qwen_vl_triton/modeling/assets/sample.png), else absolute."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def prefetch_media(prompts: list[Prompt], model_path: Path) -> dict[int, Future]:
    """Start reading and preprocessing the prompts' media on background threads (each medium once,
    however many copies of its prompt run), while the engine loads: decoding, resizing and
    patchifying mostly release the GIL, and loading is mostly one thread, so the other cores do it
    meanwhile. Returns each medium's future, by id(); each gives (the prepared medium, its start and
    end on the perf_counter clock)."""
    cfg = ImageProcessorConfig.from_pretrained(model_path)

    def timed(medium: Media) -> tuple[PreparedMedia, float, float]:
        began = time.perf_counter()
        return prepare_media(medium, cfg), began, time.perf_counter()

    pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="media-prefetch")
    futures = {}
    for prompt in prompts:
        for medium in prompt.media:
            if id(medium) not in futures:
                futures[id(medium)] = pool.submit(timed, medium)
    pool.shutdown(wait=False)  # the threads end after the last one
    return futures


def with_prefetched(prompts: list[Prompt], futures: dict[int, Future], since: float) -> tuple[list[Prompt], float]:
    """The prompts with their prefetched media, and the seconds of media preparation done before
    `since` (hidden behind the load). A medium that failed stays as given, so the engine prepares it
    again and reports its error for that prompt alone."""
    def medium(m: Media) -> Media | PreparedMedia:
        future = futures[id(m)]
        return m if future.exception() is not None else future.result()[0]

    ready = [Prompt(p.text, [medium(m) for m in p.media]) for p in prompts]
    done = (f.result() for f in futures.values() if f.exception() is None)
    return ready, sum(max(0.0, min(end, since) - began) for _, began, end in done)


def main(argv: list[str] | None = None) -> dict:
    """Run the requests the flags describe; returns the --output_json report ({} on ranks > 0)."""
    args = parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise SystemExit(f"error: --max_batch_size must be >= 1, got {args.max_batch_size}")
    if args.num_copies is None:  # MindIE's run_pa.py repeats its one input max_batch_size times
        single = args.dataset_path is None and args.max_batch_size is not None
        args.num_copies = args.max_batch_size if single else 1
    if args.num_copies < 1:
        raise SystemExit(f"error: --num_copies must be >= 1, got {args.num_copies}")
    if args.max_batch_size is None:
        args.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    tp = init_from_env(args.device)  # world size 1 unless launched by torchrun
    try:
        report = _run(args, tp)
    except TPSizeError as e:  # the same on every rank: rank 0 says it
        raise SystemExit(f"error: {e}" if tp.rank == 0 else 1) from None
    except TPWorldError as e:  # a worker this process started was lost (--tensor_parallel_size): it names it
        raise SystemExit(f"error: {e}") from None
    finally:
        destroy(tp)
    end_process(tp)  # tensor parallel: exit 0 here (parallel.group.end_process says why)
    return report


def _run(args: argparse.Namespace, tp: TPGroup) -> dict:
    using_demo = args.model_path is None
    if using_demo and tp.local_rank == 0:
        demo_checkpoint()  # one process per machine makes it; the others wait, then read it
    barrier(tp)
    model_path = demo_checkpoint() if using_demo else args.model_path
    requests, prefetched = [], {}
    if tp.rank == 0:  # only rank 0 reads the inputs
        requests = build_prompts(args, using_demo) * args.num_copies
        if (model_path / "config.json").is_file():  # a bad path is the engine's error to name
            prefetched = prefetch_media([prompt for _, prompt in requests], model_path)
    load_started = time.perf_counter()
    try:
        llm = LLM(model_path, EngineConfig.from_args(args), tp=tp)
    except (ValueError, OSError) as e:  # no or bad checkpoint, bad engine sizes
        for future in prefetched.values():  # the exit need not wait for media nobody will use
            future.cancel()
        raise SystemExit(f"error: {e}" if tp.rank == 0 else 1) from None
    if tp.rank != 0:
        llm.worker_loop()  # follow rank 0's requests and steps until it shuts down
        return {}
    try:
        return _generate(args, llm, requests, prefetched, time.perf_counter() - load_started)
    finally:
        llm.shutdown()


def _generate(args: argparse.Namespace, llm: LLM, requests: list[tuple[list[str], Prompt]],
              prefetched: dict[int, Future], load_s: float) -> dict:
    started = time.perf_counter()
    prompts, prefetched_s = with_prefetched([prompt for _, prompt in requests], prefetched, started)
    params = sampling_params(args, llm)
    # Over a dataset, one bad file fails only its own result (which says why); one prompt fails the run.
    errors = "return" if args.dataset_path is not None else "raise"
    try:
        outputs = llm.generate(prompts, params, progress=len(requests) > 1, errors=errors)
    except ValueError as e:  # bad media, prompt over the limit, bad sampling values
        raise SystemExit(f"error: {e}") from None
    perf = perf_summary(outputs, time.perf_counter() - started, llm)
    # From this script's first line to the first request: imports, the engine's load (weights,
    # tokenizer, KV cache), and the rest (demo checkpoint, prompts). The media prepared meanwhile by
    # the prefetch threads are work of the requests, hidden behind the load: wall_s does not hold it.
    perf["startup_s"] = {"imports": round(IMPORTS_S, 4), "load": round(load_s, 4),
                         "total": round(started - STARTED, 4), "media_prefetched": round(prefetched_s, 4)}
    results = [{"media": media, "prompt_tokens": o.prompt_tokens, "output_token_ids": s.token_ids,
                "output_logprobs": s.token_logprobs, "text": s.text, "ttft_s": o.ttft_s,
                "latency_s": o.latency_s, "finish_reason": s.finish_reason,
                "media_adjustments": o.media_adjustments, **({"error": str(s.error)} if s.error else {})}
               for (media, _), o in zip(requests, outputs, strict=True) for s in o.outputs[:1]]  # n is 1 here
    if not args.quiet:
        for (media, _), r in zip(requests, results, strict=True):
            notes = "".join(f"\n  note: {note}" for note in r["media_adjustments"])
            notes += f"\n  error: {r['error']}" if "error" in r else ""
            print(f"[{', '.join(media) or 'text'}] ({r['prompt_tokens']} prompt tokens, "
                  f"{len(r['output_token_ids'])} generated, {r['finish_reason']}){notes}\n{r['text']}\n")
    print(format_summary(perf))
    report = {"results": results, "perf": perf}
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.output_json}")
    return report


if __name__ == "__main__":
    main()
    exit_now()  # the run is over and its output written: no interpreter teardown (~0.5 s)
