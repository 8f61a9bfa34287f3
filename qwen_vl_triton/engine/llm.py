"""The LLM object: requests in, tokens out, over one paged KV cache and continuous batching.

    llm = LLM("path/to/Qwen2.5-VL-7B-Instruct", kv_cache_gb=8)
    outputs = llm.generate([Prompt("Describe it.", [Media("cat.jpg")])], SamplingParams(max_tokens=64))

The server drives the same object step by step: `add_request` (a PreparedRequest, made by the one
Preprocessor: engine/preprocess.py), `step` (one forward pass for all running sequences, returns
what changed) and `abort`.

Tensor parallel (`torchrun --nproc-per-node N ...`, `tp = parallel.init_from_env()`): every rank
builds the same LLM(..., tp=tp), holding its shards of the model and its kv heads' cache, and runs
the same schedule. Rank 0 is the driver: its add_request / abort calls take effect at once there
and are recorded; at the start of each step() it broadcasts the recorded commands (one
broadcast_object per step), and ranks > 0, inside `worker_loop()`, apply them and run the same
step. Commands are typed values (engine/commands.py); an Add carries the prepared request
(token ids, images' pixels, videos' plans), and the step's StepPlan carries what rank 0 chose from
its timings: the vision work (a video's frames as uint8 slices: only rank 0 reads media files)
and the prompt-token budget, so every rank schedules the same batch.
Logits are all-gathered, identical on every rank, and sampling is made identical too: a sampled
request without a seed gets one drawn on rank 0. `shutdown()` on rank 0 ends the workers' loops.
Faults end the world, never hang it: a step that fails on any rank, or a collective that fails
(a peer exited) or times out (tp.timeout_s), ends that rank with status 1 and a line naming it,
and its peers' next collectives fail in turn. An idle driver must still step every
tp.heartbeat_s (an empty step) so that the waiting ranks do not time out; the server does.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from qwen_vl_triton.engine.block_manager import BlockManager
from qwen_vl_triton.engine.commands import Abort, Add, Command, StepPlan, Stop
from qwen_vl_triton.engine.decode_graphs import DecodeGraphs, DecodeRow
from qwen_vl_triton.engine.encoder_cache import EncoderCache
from qwen_vl_triton.engine.errors import RequestFault, StepFailed
from qwen_vl_triton.engine.kv_budget import kv_cache_budget
from qwen_vl_triton.engine.media import DEFAULT_LIMITS, MediaLimits, PreparedMedia
from qwen_vl_triton.engine.media_encoder import EncodeWork, MediaEncoder
from qwen_vl_triton.engine.preprocess import PreparedRequest, Preprocessor, Prompt
from qwen_vl_triton.engine.sampling import SampleOutput, SamplingParams, find_stop, make_generator, sample
from qwen_vl_triton.engine.scheduler import Batch, Scheduler
from qwen_vl_triton.engine.sequence import Sequence
from qwen_vl_triton.engine.stats import EngineStats, StepCost
from qwen_vl_triton.engine.structured import StructuredDecoder
from qwen_vl_triton.modeling.attention_metadata import AttentionMetadata
from qwen_vl_triton.modeling.model import load_model
from qwen_vl_triton.modeling.processing import ImageProcessorConfig, MediaKind
from qwen_vl_triton.modeling.tokenizer import load_tokenizer
from qwen_vl_triton.parallel.comm import all_gather_object, broadcast_object, exit_rank
from qwen_vl_triton.parallel.group import SINGLE_PROCESS, TPGroup, detect_device_type
from qwen_vl_triton.parallel.sharding import local_kv_heads

__all__ = ["LLM", "Prompt", "RequestOutput"]  # Prompt: the offline input, from engine.preprocess

DECODE_REFRESH_STEPS = 8  # under prefill_step_share: at least one decode-only step in this many


@dataclass
class RequestOutput:
    """A request's state after a step (the whole output so far, not a delta)."""

    request_id: str
    prompt_tokens: int
    output_ids: list[int]
    output_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]
    text: str
    finished: bool
    finish_reason: str | None
    cached_prompt_tokens: int
    ttft_s: float | None
    latency_s: float
    token_times: list[float]
    media_adjustments: list[str] = field(default_factory=list)  # videos shrunk to fit the context
    error: BaseException | None = None  # why the request ended early (finish_reason "error"): engine/errors.py
    index: int = 0  # which of the request's params.n samples this is


def default_device() -> torch.device:
    """CUDA if present, then an Ascend NPU (torch_npu), else the CPU."""
    return torch.device(detect_device_type())


class LLM:
    """Qwen2-VL / Qwen2.5-VL / QVQ generation with a paged KV cache and continuous batching.

    kv_cache_gb (MindIE's npuMemSize) or num_kv_blocks sizes the cache; max_batch_size bounds the
    running sequences, max_prefill_tokens the prompt tokens computed per step (longer prompts are
    prefilled in chunks); max_input_length bounds a prompt's tokens (media included), max_seq_len
    prompt + output. Prefix caching shares the KV of equal prompt prefixes (media by content).

    media_limits: defaults and hard limits for requests' media controls (engine/media.py), applied
    by `self.preprocessor`, which makes the PreparedRequests that add_request takes;
    vision_chunk_patches: patches per vision-encoder call: videos are decoded and encoded that many
    temporal slices at a time, so the encoder's activations do not grow with a clip's length.
    vision_step_share: while other requests are running, each step's vision encoding is held to
    this share of a decode step's time (at least one image or temporal slice), so a long clip is
    encoded over many steps and the running streams keep their inter-token latency; videos are
    decoded ahead on background threads (engine/media_encoder.py).
    prefill_step_share: while requests are decoding, the prompt tokens of a step are held to what
    adds this share of a decode step's time (estimated from the steps seen; at least one token),
    so a long prompt is prefilled in chunks small enough for the decoding streams' inter-token
    latency. None (the default): only max_prefill_tokens bounds them (throughput first).

    compile: run the model's forward pass through torch.compile (inductor, dynamic shapes, so one
    compilation serves every batch; on the CPU the kernels' PyTorch references are what it fuses).
    The first steps pay the compilation.
    enforce_eager: never run decode steps as captured graphs. By default, on a CUDA or NPU device
    at world size 1, decode-only steps run on static buffers padded to batch buckets, each bucket
    captured as a graph the first time it runs and replayed after (engine/decode_graphs.py).

    quantization: a quantized checkpoint's format, 'ascend' (msModelSlim) or 'compressed-tensors';
    None (the default) detects it, and a name that does not match the checkpoint is an error
    (modeling/quantization.py says what is supported).

    tp: the tensor-parallel group (see the module docstring); its device is used when world_size
    > 1, and kv_cache_gb is then each rank's budget for its own kv heads.
    """

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", device: str | torch.device | None = None,
                 kv_cache_gb: float | None = None, num_kv_blocks: int | None = None, block_size: int = 16,
                 max_batch_size: int = 64, max_prefill_tokens: int = 8192, max_input_length: int | None = None,
                 max_seq_len: int | None = None, enable_prefix_caching: bool = True,
                 encoder_cache_gb: float = 1.0, media_limits: MediaLimits = DEFAULT_LIMITS,
                 vision_chunk_patches: int = 16384, vision_step_share: float = 0.25,
                 prefill_step_share: float | None = None, compile: bool = False, enforce_eager: bool = False,
                 quantization: str | None = None, tp: TPGroup = SINGLE_PROCESS):
        for name, value in (("block_size", block_size), ("max_batch_size", max_batch_size),
                            ("max_prefill_tokens", max_prefill_tokens), ("max_input_length", max_input_length),
                            ("max_seq_len", max_seq_len), ("num_kv_blocks", num_kv_blocks)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
        self.path = Path(model_path)
        self.tp = tp
        if tp.world_size > 1:
            if device is not None and torch.device(device).type != tp.device.type:
                raise ValueError(f"device {device} differs from the tensor-parallel group's {tp.device}")
            self.device = tp.device
        else:
            self.device = torch.device(device) if device is not None else default_device()
        self._pending: list[Command] = []  # rank 0: commands the other ranks apply before the next step
        self._stopped = False
        self._shutdown_lock = threading.Lock()  # the server's engine thread and main thread may both shut down
        self.model = load_model(self.path, dtype, self.device, tp, quantization)
        self.config = self.model.config
        self.tokenizer = load_tokenizer(self.path)  # transformers is not imported for Qwen's (~0.7 s)
        self.image_cfg = ImageProcessorConfig.from_pretrained(self.path)
        self.eos_ids = set(self.config.eos_token_ids)  # config.json + generation_config.json
        self.pad_ids = (self.config.image_token_id, self.config.video_token_id)

        self.max_seq_len = min(max_seq_len or self.config.text.max_position_embeddings,
                               self.config.text.max_position_embeddings)
        self.max_input_length = min(max_input_length or self.max_seq_len - 1, self.max_seq_len - 1)
        if vision_chunk_patches < 1:
            raise ValueError(f"vision_chunk_patches must be >= 1, got {vision_chunk_patches}")
        encoder_cache_bytes = int(encoder_cache_gb * (1 << 30))
        self.kv_budget_note = f"num_kv_blocks {num_kv_blocks}"  # how the cache was sized (for logs and errors)
        if num_kv_blocks is None:
            if kv_cache_gb is None:  # what the device has left beside the vision tower's peak and the encoder cache
                budget, self.kv_budget_note = kv_cache_budget(self.model, chunk_patches=vision_chunk_patches,
                                                              image_max_pixels=media_limits.image_max_pixels,
                                                              encoder_cache_bytes=encoder_cache_bytes)
            else:
                budget, self.kv_budget_note = kv_cache_gb * (1 << 30), f"kv_cache_gb {kv_cache_gb}"
            num_kv_blocks = self._blocks_for_budget(budget, block_size, max_batch_size)
        num_blocks = num_kv_blocks
        # Every rank schedules the same blocks: take the smallest cache any rank can hold.
        num_blocks = min(all_gather_object(num_blocks, tp))
        # A lone sequence must always fit, so that preemption can never deadlock.
        self.max_seq_len = min(self.max_seq_len, num_blocks * block_size)
        self.max_input_length = min(self.max_input_length, self.max_seq_len - 1)
        self.kv_caches = self.model.allocate_kv_cache(num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_batch_size, max_prefill_tokens)
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.preprocessor = Preprocessor(self.tokenizer, self.config, self.image_cfg, self.max_input_length,
                                         media_limits)
        for name, share in (("vision_step_share", vision_step_share), ("prefill_step_share", prefill_step_share)):
            if share is not None and not share > 0:
                raise ValueError(f"{name} must be > 0, got {share}")
        self.vision_step_share = vision_step_share
        self.prefill_step_share = prefill_step_share
        self.sequences: dict[str, Sequence] = {}  # each unfinished request's first sample (its group: all n)
        self._structured: StructuredDecoder | None = None  # built at the first constrained request
        self._next_seq_id = 0
        self.stats = EngineStats()
        self.encoder = MediaEncoder(self.model, self.encoder_cache, self.stats, chunk_patches=vision_chunk_patches,
                                    driver=tp.rank == 0, isolate_failures=tp.world_size == 1)
        self.step_cost = StepCost()  # what the vision and prefill shares are shares of
        self._model_forward = torch.compile(self.model.forward, dynamic=True) if compile else self.model.forward
        graphs = not enforce_eager and self.device.type in ("cuda", "npu") and tp.world_size == 1
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, self._model_forward, max_batch_size,
                                          -(-self.max_seq_len // block_size), capture=True) if graphs else None

    # ------------------------------------------------------------------ set-up

    def _blocks_for_budget(self, budget: float, block_size: int, max_batch_size: int) -> int:
        """KV blocks that `budget` bytes hold on this rank (its share of the kv heads), at most what
        every running sequence at full length could use."""
        t = self.config.text
        kv_heads = local_kv_heads(t.num_kv_heads, self.tp.world_size)  # this rank's share of the cache
        bytes_per_block = 2 * t.num_layers * block_size * kv_heads * t.head_dim * self.model.dtype.itemsize
        blocks = int(budget // bytes_per_block)
        useful = max_batch_size * -(-self.max_seq_len // block_size)
        blocks = min(blocks, useful)
        if blocks < 2:
            raise ValueError(f"KV cache budget {budget / (1 << 30):.3f} GiB ({self.kv_budget_note}) holds {blocks} "
                             f"blocks of {bytes_per_block} bytes; raise kv_cache_gb")
        return blocks

    @property
    def structured(self) -> StructuredDecoder:
        """Structured outputs: constraints compiled per schema (cached), token masks per step. Built
        when first needed: its view of a 150k-token vocabulary takes about a second."""
        if self._structured is None:
            self._structured = StructuredDecoder(self.tokenizer, self.config.text.vocab_size, self.eos_ids)
        return self._structured

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, request: PreparedRequest) -> None:
        """Queue a prepared request (see `self.preprocessor`). Raises ValueError for a request id in
        use or bad sampling parameters. Under tensor parallelism: rank 0 only."""
        self._check_driver("add_request")
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        request.params.validate(self.config.text.vocab_size)
        if request.params.structured is not None:
            self.structured.check(request.params.structured)  # compiled (cached) now: a bad schema is its error
        if len(request.ids) >= self.max_seq_len:  # the engine's own invariant, not the length policy (preprocess)
            raise ValueError(f"a prepared prompt of {len(request.ids)} tokens leaves no room for output under "
                             f"max_seq_len {self.max_seq_len}")
        if self.tp.world_size > 1:
            params = request.params
            if not params.greedy and params.seed is None:
                # Every rank must draw the same tokens: the request gets a seed (from rank 0's global
                # RNG, so torch.manual_seed on rank 0 still makes a run reproducible).
                params = dataclasses.replace(params, seed=int(torch.randint(0, 2**62, ()).item()))
            request = dataclasses.replace(request, params=params)
        self._record(Add(request_id, request))

    def _enqueue(self, request_id: str, request: PreparedRequest) -> None:
        """Make the sequence of a validated, prepared request and queue it (every rank)."""
        ids, media, params = request.ids, request.media, request.params
        images = [m.grid for m in media if m.kind == MediaKind.IMAGE]
        videos = [m for m in media if m.kind == MediaKind.VIDEO]
        positions, delta = self.model.rope_index(
            ids, torch.tensor(images) if images else None,
            torch.tensor([m.grid for m in videos]) if videos else None,
            [m.second_per_grid_t for m in videos] if videos else None)
        keys = self._content_keys(ids, media)
        group: list[Sequence] = []
        for index in range(params.n):  # sample k draws with seed + k: n samples, reproducible as a whole
            seed = None if params.seed is None else (params.seed + index) % 2**63
            group.append(Sequence(
                self._next_seq_id, request_id, list(ids), positions, delta, list(media), keys, params,
                generator=make_generator(seed, self.device), cache_salt=request.cache_salt, index=index,
                matcher=self.structured.matcher(params.structured) if params.structured is not None else None))
            self._next_seq_id += 1
        for member in group:
            member.group = group
        seq = group[0]
        seq.forks = group[1:]
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        if seq.media:
            self.encoder.add(seq)

    def _content_keys(self, ids: list[int], media: list[PreparedMedia]) -> list[int]:
        """Prefix-cache keys: token ids, with media pad j of medium m keyed by m's content hash
        (negative, so never equal to a token id): equal keys mean equal KV."""
        keys = list(ids)
        pads = iter(i for i, t in enumerate(ids) if t in self.pad_ids)
        for m in media:
            base = int(m.content_hash[:15], 16)
            for j in range(m.num_tokens):
                keys[next(pads)] = -1 - (base + j)
        return keys

    def abort(self, request_id: str) -> bool:
        """Stop a request and free everything it holds; False if it is unknown or already done.
        Under tensor parallelism: rank 0 only."""
        self._check_driver("abort")
        if request_id not in self.sequences:
            return False
        self._record(Abort(request_id))
        return True

    def _abort(self, request_id: str) -> None:
        for seq in self.sequences.pop(request_id).group:
            if not seq.is_finished:
                seq.finish_reason = seq.finish_reason or "abort"
                self.scheduler.finish(seq)
                self.encoder.discard(seq)

    # ------------------------------------------------------------------ tensor-parallel commands

    def _check_driver(self, what: str) -> None:
        if self.tp.rank != 0:
            raise RuntimeError(f"{what}() on rank {self.tp.rank}: under tensor parallelism rank 0 drives the "
                               f"LLM and the other ranks run worker_loop()")
        if self._stopped:
            raise RuntimeError(f"{what}() after shutdown()")

    def _record(self, command: Command) -> None:
        """Apply a command here and, with other ranks, keep it for the next step's broadcast."""
        self._apply(command)
        if self.tp.world_size > 1:
            if isinstance(command, Add):
                # The other ranks never read files: images travel as pixels, videos as their plans
                # (rank 0 ships their frames in the steps that encode them; its own copy keeps the file).
                peers = [m.for_peers() for m in command.request.media]
                command = Add(command.request_id, dataclasses.replace(command.request, media=peers))
            self._pending.append(command)

    def _apply(self, command: Command) -> None:
        if isinstance(command, Add):
            self._enqueue(command.request_id, command.request)
        elif isinstance(command, Abort):
            self._abort(command.request_id)
        else:
            raise TypeError(f"not an engine command to apply: {command!r}")

    def worker_loop(self, on_outputs: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """Ranks > 0: follow rank 0 until it calls shutdown().

        Each iteration receives the commands rank 0 recorded since its last step, applies them and
        runs the same step (its collectives pair with rank 0's). on_outputs, if given, gets each
        step's outputs (the same as rank 0's step() returns). If a step fails here, or rank 0
        exits or stops stepping for longer than the timeout (tp.timeout_s; an idle driver steps
        every tp.heartbeat_s), this process exits with status 1 (parallel.comm.exit_rank).
        """
        if self.tp.rank == 0:
            raise RuntimeError("worker_loop() runs on ranks > 0; rank 0 drives the LLM (add_request / step)")
        while True:
            commands: list[Command] = broadcast_object(None, self.tp)
            plan = StepPlan(EncodeWork(), None)
            try:
                for command in commands:
                    if isinstance(command, Stop):
                        self._stopped = True
                        self.encoder.close()
                        return
                    if isinstance(command, StepPlan):
                        plan = command
                    else:
                        self._apply(command)
                outputs = self._step(plan)
            except Exception as e:  # noqa: BLE001 - rank 0 has gone on: this rank is out of lockstep for good
                exit_rank(self.tp, f"following rank 0's step failed here: {type(e).__name__}: {e}", e)
            if on_outputs is not None:
                on_outputs(outputs)

    def shutdown(self) -> None:
        """Rank 0: end the other ranks' worker_loop() (no-op on one process, on workers, or twice).

        Safe from any thread: it holds the lock step() holds, so its broadcast falls between two
        steps, never inside one (their collectives would interleave); no step runs after it."""
        self.encoder.close()
        if self.tp.world_size == 1 or self.tp.rank != 0:
            return
        with self._shutdown_lock:
            if self._stopped:
                return
            self._stopped = True
            broadcast_object([*self._pending, Stop()], self.tp)
            self._pending = []

    def has_unfinished(self) -> bool:
        """Whether any request is still waiting or running."""
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """One forward pass over every scheduled sequence; outputs of those that changed.

        Under tensor parallelism (rank 0 only) the other ranks first get the commands recorded
        since the last step, then all run the same step; a step with nothing to run tells them
        rank 0 is alive (an idle driver steps every tp.heartbeat_s). One thread steps at a time,
        under the lock shutdown() holds. A step that fails ends this process (exit status 1): the
        other ranks may be inside collectives it left, and could never pair up with it again.
        """
        with self.stats.timed("step"):
            if self.tp.world_size == 1:
                with self.stats.timed("schedule"):
                    plan = self._plan_step()
                return self._step(plan)
            with self._shutdown_lock:  # the driver's lock: a shutdown() from another thread waits for this step
                self._check_driver("step")
                with self.stats.timed("schedule"):
                    plan = self._plan_step()
                    broadcast_object([*self._pending, plan], self.tp)
                self._pending = []
                try:
                    return self._step(plan)
                except Exception as e:  # noqa: BLE001 - StepFailed included: the others may be waiting inside it
                    exit_rank(self.tp, f"an engine step failed here: {type(e).__name__}: {e}", e)

    def _plan_step(self) -> StepPlan:
        """The driver's choices for this step, from its own timings (self.step_cost).

        While requests are decoding (their inter-token latency is what a step's other work
        delays): vision work of at most vision_step_share of a decode step's time (at least one
        image or slice), and prompt tokens within prefill_step_share of it (None: max_prefill_tokens
        alone). Otherwise a whole vision chunk, waiting briefly for decoded frames rather than
        spinning, and max_prefill_tokens."""
        decoding = any(s.media_ready and s.num_tokens - s.num_computed == 1 for s in self.scheduler.running)
        if not decoding:
            return StepPlan(self.encoder.plan(None, wait_s=0.05), None)
        decode_s = self.step_cost.decode_s or 0.0
        budget = None
        if self.prefill_step_share is not None:
            # One decode-only step in DECODE_REFRESH_STEPS keeps the decode time it is a share of current.
            refresh = self.step_cost.mixed_steps >= DECODE_REFRESH_STEPS
            budget = 0 if refresh else self.step_cost.prompt_tokens_within(self.prefill_step_share * decode_s)
        return StepPlan(self.encoder.plan(self.vision_step_share * decode_s), budget)

    def _step(self, plan: StepPlan) -> list[RequestOutput]:
        """The step itself, the same on every rank: the plan's vision work, then one forward pass
        over what the scheduler picks within the plan's prompt-token budget.

        A request that cannot go on ends alone, with an error on its output: one whose medium
        fails to decode or encode (RequestMediaError), or whose logits row is not finite
        (RequestFault). A forward pass that fails ends the requests in it and raises StepFailed
        with their outputs; the requests outside the step are untouched (on one process: under
        tensor parallelism step() ends the rank, since its peers' collectives no longer pair).
        """
        with self.stats.timed("vision"):
            results = [out for seq, error in self.encoder.run(plan.encode) for out in self._fail(seq, error)]
        with self.stats.timed("schedule"):
            batch = self.scheduler.schedule(plan.prompt_budget)
        if not batch.runs:
            return results
        started = time.perf_counter()
        try:
            rows, out = self._forward_and_sample(batch, results)
        except Exception as e:  # noqa: BLE001 - whatever failed, it ends only the requests in this step
            fault = RequestFault(f"the engine step this request was part of failed: {type(e).__name__}: {e}")
            raise StepFailed(results + [o for r in batch.runs for o in self._fail(r.seq, fault)], e) from e
        now = time.perf_counter()
        self.step_cost.record(now - started, batch.prompt_tokens)
        self.stats.record_step(now - started, batch.num_tokens, any(r.count > 1 for r in batch.runs),
                               self.blocks.num_used_blocks())

        for run in batch.runs:
            if not run.seq.is_finished:  # a request whose logits were not finite has ended
                run.seq.num_computed = run.start + run.count
                self.blocks.commit(run.seq.seq_id, run.seq.all_keys, run.seq.num_computed)
        self._fork([seq for seq in rows if seq.forks])
        for i, seq in enumerate(rows):
            token = out.token_ids[i]
            seq.output_ids.append(token)
            seq.output_logprobs.append(out.logprobs[i])
            seq.top_logprobs.append(out.top_logprobs[i])
            seq.token_times.append(now)
            seq.first_token_time = seq.first_token_time or now
            if seq.matcher is not None:
                try:
                    seq.matcher.accept(token)  # an end-of-sequence token is let through
                except RuntimeError as e:  # the mask allowed it: a grammar engine fault, this request's alone
                    results.extend(self._fail(seq, RequestFault(f"structured output: {e}")))
                    continue
                if seq.matcher.error is not None:  # e.g. a grammar over llguidance's limits: not a real "stop"
                    results.extend(self._fail(seq, RequestFault(f"structured output: {seq.matcher.error}")))
                    continue
            self._check_finished(seq, now)
            results.append(self.output_of(seq))
        return results

    def _fork(self, parents: list[Sequence]) -> None:
        """Start the other samples of requests whose first sample's prompt is now computed (they
        were sampled from its logits row this step): each shares the prompt's blocks, and a partly
        filled last block is copied. One that finds no block for the copy waits first in line, to
        recompute its prompt (mostly prefix-cache hits) like a preempted sequence."""
        copies = []
        for parent in parents:
            for child in parent.forks:
                child.media_embeds = parent.media_embeds
                child.num_cached_prompt_tokens = parent.num_computed
                if (self.blocks.fork_cost(parent.seq_id) > self.blocks.num_free_blocks
                        or len(self.scheduler.running) >= self.scheduler.max_batch_size):
                    self.scheduler.add_first(child)
                    continue
                copy = self.blocks.fork(parent.seq_id, child.seq_id)
                if copy is not None:
                    copies.append(copy)
                child.num_computed = parent.num_computed
                self.scheduler.add_running(child)
            parent.forks = []
        if copies:
            src, dst = (torch.tensor(c, device=self.device) for c in zip(*copies, strict=True))
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst] = k_cache[src]
                v_cache[dst] = v_cache[src]

    def _forward_and_sample(self, batch: Batch, results: list[RequestOutput]) -> tuple[list[Sequence], SampleOutput]:
        """The forward pass, then one token for each run that reaches its sequence's end, and for
        the samples waiting to fork off it (their first tokens come from the same logits row). A row
        of logits that is not finite ends its request (its output goes to `results`) and is not
        sampled. Structured outputs mask their rows: the masks depend only on the tokens accepted so
        far, so llguidance computes them on its own threads while the forward pass runs. Returns the
        sampled sequences and their tokens."""
        sampling_runs = [r for r in batch.runs if r.samples]
        candidates = [(i, seq) for i, r in enumerate(sampling_runs) for seq in (r.seq, *r.seq.forks)]
        matchers = [seq.matcher for _, seq in candidates]
        masks = self.structured.masks_async(matchers) if any(m is not None for m in matchers) else None
        try:
            logits = self._forward(batch)
            with self.stats.timed("forward"):
                # Logits are all-gathered: every rank agrees. The .tolist() waits for the device, which
                # the masks' threads overlap too.
                finite = torch.isfinite(logits).all(dim=-1).tolist()
        finally:
            with self.stats.timed("sampling"):
                bitmask = masks.result() if masks is not None else None  # never left computing past the step
        for run, ok in zip(sampling_runs, finite, strict=True):
            if not ok:
                results.extend(self._fail(run.seq, RequestFault(
                    "the model's logits for this request are not finite (NaN or inf)")))
        kept = [j for j, (i, _) in enumerate(candidates) if finite[i]]
        if not kept:
            return [], SampleOutput([], [], [])
        rows = [candidates[j][1] for j in kept]
        logit_rows = [candidates[j][0] for j in kept]
        if logit_rows != list(range(len(sampling_runs))):
            logits = logits[torch.tensor(logit_rows, device=logits.device)]
        if bitmask is not None and len(kept) != len(candidates):
            bitmask = bitmask[kept]
        with self.stats.timed("sampling"):
            return rows, sample(logits, [s.params for s in rows], [s.prompt_ids for s in rows],
                                [s.output_ids for s in rows], [s.generator for s in rows], token_bitmask=bitmask)

    def _fail(self, seq: Sequence, error: BaseException) -> list[RequestOutput]:
        """End a sequence that cannot go on (its blocks freed), with the samples still waiting to
        fork off it; their outputs carry the error."""
        failed = [seq, *seq.forks]
        seq.forks = []
        for s in failed:
            s.finish_reason = "error"
            s.finish_time = time.perf_counter()
            self.scheduler.finish(s)
            self._retire(s)
        self.encoder.discard(seq)
        return [dataclasses.replace(self.output_of(s), error=error) for s in failed]

    def _retire(self, seq: Sequence) -> None:
        """Forget a finished sample's request once all its samples have finished."""
        if all(s.is_finished for s in seq.group):
            self.sequences.pop(seq.request_id, None)

    def _forward(self, batch: Batch) -> torch.Tensor:
        """Run the model over the batch's runs; fp32 logits [n sampling runs, V]. A decode-only
        batch runs on the static buffers (and graphs) of self.decode_graphs when there is one."""
        if self.decode_graphs is not None and all(r.count == 1 and r.samples and r.start >= len(r.seq.prompt_ids)
                                                  for r in batch.runs):
            with self.stats.timed("inputs"):
                rows = self._decode_rows(batch)
            with self.stats.timed("forward"):
                return self.decode_graphs.run(rows)
        with self.stats.timed("inputs"):
            ids, positions, meta, media_at, media_embeds, logit_rows = self._inputs(batch)
        with self.stats.timed("forward"):
            embeds = self.model.embed(ids, media_at, media_embeds)
            hidden = self._model_forward(positions, meta, self.kv_caches, inputs_embeds=embeds)
            return self.model.compute_logits(hidden, logit_rows)

    def _decode_rows(self, batch: Batch) -> list[DecodeRow]:
        """The inputs of a decode-only batch (every run one generated token), one row per run."""
        bs = self.blocks.block_size
        rows = []
        for run in batch.runs:
            seq, at = run.seq, run.start
            table = self.blocks.block_table(seq.seq_id)
            position = at + seq.rope_delta  # the same on all three rope axes after the prompt
            rows.append(DecodeRow(seq.output_ids[at - len(seq.prompt_ids)], (position,) * 3,
                                  table[at // bs] * bs + at % bs, at + 1, table))
        return rows

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None,
                                              torch.Tensor | None, torch.Tensor]:
        """The forward pass's inputs for the batch's runs: token ids [T] (CPU), rope positions [3, T],
        attention metadata, the rows of media pads among the T tokens and their embeddings (or None),
        and the rows whose logits are sampled (on the device)."""
        bs = self.blocks.block_size
        ids, positions, slots, q_lens, ctx_lens, tables = [], [], [], [], [], []
        media_at, media_embeds = [], []  # rows among the step's tokens, and what goes there
        offset = 0
        for run in batch.runs:
            seq, start, end = run.seq, run.start, run.start + run.count
            ids.extend(seq.all_ids[start:end])
            positions.append(seq.positions_of(start, end))
            table = torch.tensor(self.blocks.block_table(seq.seq_id), dtype=torch.int64)
            index = torch.arange(start, end)
            slots.append(table[index // bs] * bs + index % bs)
            if seq.media and start < len(seq.prompt_ids):
                at, rows = seq.media_rows(start, end, self.pad_ids)
                media_at.append(at + offset)
                media_embeds.append(seq.media_embeds[rows.to(seq.media_embeds.device)])
            offset += run.count
            q_lens.append(run.count)
            ctx_lens.append(end)
            tables.append(table)
        ends = torch.tensor(q_lens).cumsum(0)  # end of each run among the step's tokens
        width = max(len(t) for t in tables)
        block_tables = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in tables])
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(self.device),
            block_tables=block_tables.to(self.device, torch.int32),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, *ends.tolist()], dtype=torch.int32, device=self.device),
            max_query_len=max(q_lens),
        )
        sampling = torch.tensor([r.samples for r in batch.runs])
        return (torch.tensor(ids), torch.cat(positions, dim=1), meta, torch.cat(media_at) if media_at else None,
                torch.cat(media_embeds) if media_embeds else None, (ends - 1)[sampling].to(self.device))

    def _check_finished(self, seq: Sequence, now: float) -> None:
        params, token = seq.params, seq.output_ids[-1]
        reason = None
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            reason = "length"
        elif seq.matcher is not None and seq.matcher.is_finished:  # only an end-of-sequence token could follow
            reason = "stop"
        with self.stats.timed("detokenize"):
            seq.text += self._new_text(seq)
            if reason is not None:  # the final text is exactly the whole output's decode
                seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        if params.stop:
            cut = find_stop(seq.text, params.stop)
            if cut is not None:
                seq.text = seq.text[:cut]
                reason = "stop"
        if reason is not None:
            seq.finish_reason = reason
            seq.finish_time = now
            self.scheduler.finish(seq)
            self._retire(seq)

    def _new_text(self, seq: Sequence) -> str:
        """Text the newest token adds, decoding only a few tokens (vLLM's incremental scheme): the
        tokens since prefix_offset, minus the text they had without the newest ones. Text that
        ends inside a multi-byte character (U+FFFD) waits for the next token."""
        ids = seq.output_ids
        before = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return after[len(before):]

    def output_of(self, seq: Sequence) -> RequestOutput:
        """A snapshot of a sequence's request as the caller sees it (whole output so far)."""
        end = seq.finish_time or time.perf_counter()
        return RequestOutput(
            request_id=seq.request_id, prompt_tokens=len(seq.prompt_ids), output_ids=list(seq.output_ids),
            output_logprobs=list(seq.output_logprobs), top_logprobs=list(seq.top_logprobs), text=seq.text,
            finished=seq.is_finished, finish_reason=seq.finish_reason,
            cached_prompt_tokens=seq.num_cached_prompt_tokens,
            ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
            latency_s=end - seq.arrival_time, token_times=[t - seq.arrival_time for t in seq.token_times],
            media_adjustments=[m.adjustment for m in seq.media if m.adjustment], index=seq.index)

    # ------------------------------------------------------------------ offline batches

    def generate(self, prompts: Seq[Prompt | str], params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False, errors: str = "raise") -> list[RequestOutput]:
        """Run a batch of prompts to completion; outputs in input order.

        errors: what a prompt that cannot be queued (unreadable media, over max_input_length, bad
        sampling values) does. "raise": its error is raised and nothing of the batch stays queued;
        "return": its output carries the error (finish_reason "error", no tokens) and the others run.
        A request that fails while running (a video whose frames do not decode, ...) always ends
        alone, its output carrying the error.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        params_list = list(params) if isinstance(params, Seq) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        if any(p.n != 1 for p in params_list):
            raise ValueError("LLM.generate gives one output per prompt: n must be 1 (add_request / step, as the "
                             "server drives them, give each of n samples its output)")
        batch = uuid.uuid4().hex[:12]  # ids no other request of this LLM holds
        ids = [f"offline-{batch}-{i}" for i in range(len(prompts))]
        finished: dict[str, RequestOutput] = {}
        queued: list[str] = []
        for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
            try:
                self.add_request(request_id, self.preprocessor.prepare(prompt, p))
                queued.append(request_id)
            except Exception as e:
                if errors == "raise":
                    for done in queued:  # nothing half-queued stays behind
                        self.abort(done)
                    raise
                finished[request_id] = RequestOutput(
                    request_id=request_id, prompt_tokens=0, output_ids=[], output_logprobs=[], top_logprobs=[],
                    text="", finished=True, finish_reason="error", cached_prompt_tokens=0, ttft_s=None,
                    latency_s=0.0, token_times=[], error=e)
        with tqdm(total=len(prompts), initial=len(finished), disable=not progress, desc="requests",
                  unit="req") as bar:
            while self.has_unfinished():
                try:
                    outputs = self.step()
                except StepFailed as e:  # its requests have ended with the error; the rest go on
                    outputs = e.outputs
                for out in outputs:
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in ids]

