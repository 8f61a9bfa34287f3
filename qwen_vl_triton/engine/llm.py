"""The LLM object: requests in, tokens out, over one paged KV cache and continuous batching.

    llm = LLM("path/to/Qwen2.5-VL-7B-Instruct", kv_cache_gb=8)
    outputs = llm.generate([Prompt("Describe it.", [Media("cat.jpg")])], SamplingParams(max_tokens=64))
    outputs = llm.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                     {"type": "text", "text": "Describe it."}]}])

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

Without a launcher, `LLM(path, tensor_parallel_size=N)` makes this process rank 0 of a world it
starts on this machine (parallel.local): N-1 spawned workers, each building its LLM(..., tp=tp)
and running worker_loop(). shutdown(), the LLM's garbage collection and the interpreter's exit
each end them. A fault there raises parallel.TPWorldError in this process instead of ending it
(the process is the user's): it names the worker lost, and every later call raises it again.

Its length is the request lifecycle as one reading: commands and tensor-parallel lockstep, the
step (vision work, scheduling, the runner's StepResult applied to sequences, forks, stop checks,
incremental detokenizing) and offline batches; the device side is engine/model_runner.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qwen_vl_triton.engine.block_manager import BlockManager
from qwen_vl_triton.engine.chat import local_media, parse_conversation
from qwen_vl_triton.engine.commands import Abort, Add, Command, StepPlan, Stop
from qwen_vl_triton.engine.config import EngineConfig
from qwen_vl_triton.engine.encoder_cache import EncoderCache
from qwen_vl_triton.engine.errors import RequestFault, StepFailed
from qwen_vl_triton.engine.media import PreparedMedia
from qwen_vl_triton.engine.media_encoder import EncodeWork, MediaEncoder
from qwen_vl_triton.engine.model_runner import ModelRunner
from qwen_vl_triton.engine.outputs import CompletionOutput, RequestOutput
from qwen_vl_triton.engine.preprocess import PreparedRequest, Preprocessor, Prompt
from qwen_vl_triton.engine.sampling import SamplingParams, find_stop, make_generator
from qwen_vl_triton.engine.sampling_defaults import SamplingDefaults, read_sampling_defaults
from qwen_vl_triton.engine.scheduler import Scheduler
from qwen_vl_triton.engine.sequence import Sequence
from qwen_vl_triton.engine.stats import EngineStats, StepCost
from qwen_vl_triton.engine.structured import StructuredDecoder
from qwen_vl_triton.modeling.processing import ImageProcessorConfig, MediaKind
from qwen_vl_triton.modeling.tokenizer import load_tokenizer
from qwen_vl_triton.parallel.comm import broadcast_object, exit_rank, fault
from qwen_vl_triton.parallel.group import SINGLE_PROCESS, TPGroup, check_world_size
from qwen_vl_triton.parallel.local import LocalWorld

# Prompt: the offline input (engine.preprocess); RequestOutput: what comes back (engine.outputs)
__all__ = ["LLM", "Prompt", "RequestOutput"]

log = logging.getLogger(__name__)

DECODE_REFRESH_STEPS = 8  # under prefill_step_share: at least one decode-only step in this many


def _follow(model_path: Path, config: EngineConfig, tp: TPGroup) -> None:
    """A worker that LLM(path, tensor_parallel_size=N) started (parallel.local): build this rank's
    engine and follow rank 0 until it shuts down."""
    LLM(model_path, config, tp=tp).worker_loop()


class LLM:
    """Qwen2-VL / Qwen2.5-VL / QVQ generation with a paged KV cache and continuous batching.

    Its settings are an EngineConfig (engine/config.py says what each one does, its default and its
    limits), given whole (`LLM(path, config)`), as keyword arguments (`LLM(path, kv_cache_gb=8)`),
    or both (the keywords replace the config's values).

    The LLM owns the requests: their lifecycle (add_request / step / abort), the scheduler's plan,
    the vision work spread over steps (engine/media_encoder.py) and the outputs. The device side of
    a step, its inputs, forward pass, decode graphs, sampling and KV copies, is the ModelRunner's
    (engine/model_runner.py): each step hands it the scheduled Batch and reads a StepResult.

    tp: the tensor-parallel group (see the module docstring); its device is used when world_size
    > 1, and kv_cache_gb is then each rank's budget for its own kv heads. Without one (a single
    process), tensor_parallel_size N > 1 starts the other N-1 ranks (see the module docstring).
    """

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None, *, tp: TPGroup = SINGLE_PROCESS,
                 **settings: Any):
        """`config` (default: EngineConfig()) with `settings` (EngineConfig fields) replacing its values.

        Raises ValueError if tensor_parallel_size differs from the world size of a launcher's `tp`,
        and TPWorldError if a worker this LLM started dies before the LLM is built."""
        cfg = dataclasses.replace(config or EngineConfig(), **settings)
        self._world: LocalWorld | None = None  # the workers this LLM started, if any
        if tp.world_size > 1:
            check_world_size(cfg.tensor_parallel_size, tp)
        elif (cfg.tensor_parallel_size or 1) > 1:
            self._world = LocalWorld(cfg.tensor_parallel_size, cfg.device,
                                     functools.partial(_follow, Path(model_path), cfg))
            tp = self._world.tp
        try:
            self._load(Path(model_path), cfg, tp)
        except BaseException:
            if self._world is not None:
                self._world.close()  # the workers may be anywhere in their own load: they are killed
            raise
        if self._world is not None:
            self._world.bind(self, [Stop()])

    def _load(self, model_path: Path, cfg: EngineConfig, tp: TPGroup) -> None:
        """Build this rank's engine: weights, tokenizer, KV cache, scheduler, preprocessor."""
        self.engine_config = cfg
        self.path = Path(model_path)
        self.tp = tp
        self._pending: list[Command] = []  # rank 0: commands the other ranks apply before the next step
        self._stopped = False
        self._shutdown_lock = threading.Lock()  # the server's engine thread and main thread may both shut down
        self.stats = EngineStats()
        # what a request leaves unset takes (--generation_config: the checkpoint's file by default);
        # read before the weights, so that a bad file fails at once
        self.sampling_defaults: SamplingDefaults = read_sampling_defaults(cfg.generation_config, self.path)
        self.runner = ModelRunner(self.path, cfg, tp, self.stats)
        self.device, self.model = self.runner.device, self.runner.model
        self.config = self.model.config
        self.tokenizer = load_tokenizer(self.path)  # transformers is not imported for Qwen's (~0.7 s)
        self.image_cfg = ImageProcessorConfig.from_pretrained(self.path)
        self.eos_ids = set(self.config.eos_token_ids)  # config.json + generation_config.json
        self.pad_ids = (self.config.image_token_id, self.config.video_token_id)

        model_len = self.config.text.max_position_embeddings
        max_seq_len = min(cfg.max_seq_len or model_len, model_len)
        num_blocks, self.kv_budget_note = self.runner.num_kv_blocks(max_seq_len)
        # A lone sequence must always fit, so that preemption can never deadlock.
        self.max_seq_len = min(max_seq_len, num_blocks * cfg.block_size)
        self.max_input_length = min(cfg.max_input_length or self.max_seq_len - 1, self.max_seq_len - 1)
        self.runner.allocate(num_blocks, self.max_seq_len)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_batch_size, cfg.max_prefill_tokens)
        self.encoder_cache = EncoderCache(cfg.encoder_cache_bytes)
        self.preprocessor = Preprocessor(self.tokenizer, self.config, self.image_cfg, self.max_input_length,
                                         cfg.media_limits, max_seq_len=self.max_seq_len,
                                         chat_template=cfg.chat_template)
        self.sequences: dict[str, Sequence] = {}  # each unfinished request's first sample (its group: all n)
        self._structured: StructuredDecoder | None = None  # built at the first constrained request
        self._next_seq_id = 0
        self.encoder = MediaEncoder(self.model, self.encoder_cache, self.stats, chunk_patches=cfg.vision_chunk_patches,
                                    driver=tp.rank == 0, isolate_failures=tp.world_size == 1)
        self.step_cost = StepCost()  # what the vision and prefill shares are shares of
        log.info("loaded %s: %d KV blocks of %d tokens (sized by %s); sampling defaults for unset fields: %s",
                 self.path, num_blocks, cfg.block_size, self.kv_budget_note, self.sampling_defaults.describe())

    # ------------------------------------------------------------------ set-up

    @property
    def structured(self) -> StructuredDecoder:
        """Structured outputs: constraints compiled per schema (cached), token masks per step. Built
        when first needed: its view of a 150k-token vocabulary takes about a second."""
        if self._structured is None:
            self._structured = StructuredDecoder(self.tokenizer, self.config.text.vocab_size, self.eos_ids)
        return self._structured

    def _start_masks(self, rows: list[Sequence]) -> Future | None:
        """The structured-output masks of the rows about to be sampled, computing on llguidance's
        threads (None when no row is constrained)."""
        matchers = [seq.matcher for seq in rows]
        return self.structured.masks_async(matchers) if any(m is not None for m in matchers) else None

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, request: PreparedRequest) -> None:
        """Queue a prepared request (see `self.preprocessor`). Raises ValueError for a request id in
        use or bad sampling parameters. Under tensor parallelism: rank 0 only."""
        self._check_driver("add_request")
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        request.params.validate(self.config.text.vocab_size)
        if request.params.max_tokens is None:
            raise ValueError("the request's max_tokens is unresolved: make the PreparedRequest with the "
                             "Preprocessor (llm.preprocessor.prepare / build), which sets the output budget")
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
                matcher=(self.structured.matcher(params.structured, params.max_tokens)
                         if params.structured is not None else None)))
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
        if self._world is not None:
            self._world.check()  # a world that broke: its TPWorldError again, at once
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
        Workers this LLM started (tensor_parallel_size) then exit: it waits for them (and kills
        any still running after parallel.local.CLOSE_GRACE_S) and leaves the process group.

        Safe from any thread: it holds the lock step() holds, so its broadcast falls between two
        steps, never inside one (their collectives would interleave); no step runs after it."""
        self.encoder.close()
        if self.tp.world_size == 1 or self.tp.rank != 0:
            return
        with self._shutdown_lock:
            if self._stopped:
                return
            self._stopped = True
            farewell: list[Command] = [*self._pending, Stop()]
            self._pending = []
            if self._world is not None:
                self._world.close(farewell)
            else:
                broadcast_object(farewell, self.tp)

    def has_unfinished(self) -> bool:
        """Whether any request is still waiting or running."""
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """One forward pass over every scheduled sequence; a RequestOutput for each request with a
        sample that changed (engine/outputs.py: every sample's whole output so far).

        Under tensor parallelism (rank 0 only) the other ranks first get the commands recorded
        since the last step, then all run the same step; a step with nothing to run tells them
        rank 0 is alive (an idle driver steps every tp.heartbeat_s). One thread steps at a time,
        under the lock shutdown() holds. A step that fails ends this process (exit status 1): the
        other ranks may be inside collectives it left, and could never pair up with it again; with
        workers this LLM started, it ends them instead and raises TPWorldError.
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
                    fault(self.tp, f"an engine step failed here: {type(e).__name__}: {e}", e)

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
        shares = self.engine_config
        if shares.prefill_step_share is not None:
            # One decode-only step in DECODE_REFRESH_STEPS keeps the decode time it is a share of current.
            refresh = self.step_cost.mixed_steps >= DECODE_REFRESH_STEPS
            budget = 0 if refresh else self.step_cost.prompt_tokens_within(shares.prefill_step_share * decode_s)
        return StepPlan(self.encoder.plan(shares.vision_step_share * decode_s), budget)

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
            changed = [s for seq, error in self.encoder.run(plan.encode) for s in self._fail(seq, error)]
        with self.stats.timed("schedule"):
            batch = self.scheduler.schedule(plan.prompt_budget)
        if not batch.runs:
            return self._outputs_of(changed)
        started = time.perf_counter()
        try:
            result = self.runner.execute(batch, self.blocks.block_table, self.pad_ids, self._start_masks)
        except Exception as e:  # noqa: BLE001 - whatever failed, it ends only the requests in this step
            fault = RequestFault(f"the engine step this request was part of failed: {type(e).__name__}: {e}")
            changed += [s for r in batch.runs for s in self._fail(r.seq, fault)]
            raise StepFailed(self._outputs_of(changed), e) from e
        now = time.perf_counter()
        self.step_cost.record(now - started, batch.prompt_tokens)
        self.stats.record_step(now - started, batch.num_tokens, any(r.count > 1 for r in batch.runs),
                               self.blocks.num_used_blocks())

        for run in batch.runs:
            if not run.seq.is_finished:  # a request whose logits were not finite has ended
                run.seq.num_computed = run.start + run.count
                self.blocks.commit(run.seq.seq_id, run.seq.all_keys, run.seq.num_computed)
        for seq in result.not_finite:
            changed.extend(self._fail(seq, RequestFault("the model's logits for this request are not finite "
                                                        "(NaN or inf)")))
        rows, out = result.sampled, result.output
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
                    changed.extend(self._fail(seq, RequestFault(f"structured output: {e}")))
                    continue
                if seq.matcher.error is not None:  # e.g. a grammar over llguidance's limits: not a real "stop"
                    changed.extend(self._fail(seq, RequestFault(f"structured output: {seq.matcher.error}")))
                    continue
            self._check_finished(seq, now)
            changed.append(seq)
        return self._outputs_of(changed)

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
        self.runner.copy_blocks(copies)

    def _fail(self, seq: Sequence, error: BaseException) -> list[Sequence]:
        """End a sequence that cannot go on (its blocks freed), with the samples still waiting to
        fork off it; their outputs carry the error. Returns the samples it ended."""
        failed = [seq, *seq.forks]
        seq.forks = []
        for s in failed:
            s.finish_reason = "error"
            s.error = error
            s.finish_time = time.perf_counter()
            self.scheduler.finish(s)
            self._retire(s)
        self.encoder.discard(seq)
        return failed

    def _retire(self, seq: Sequence) -> None:
        """Forget a finished sample's request once all its samples have finished."""
        if all(s.is_finished for s in seq.group):
            self.sequences.pop(seq.request_id, None)

    def _check_finished(self, seq: Sequence, now: float) -> None:
        params, token = seq.params, seq.output_ids[-1]
        reason = None
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            reason = "length"
        elif seq.matcher is not None and seq.matcher.is_finished:  # only an end-of-sequence token could follow
            reason = "stop"
        if reason == "stop" and seq.matcher is not None and seq.matcher.closing:  # the budget closed it early
            reason = "length"
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

    def _outputs_of(self, changed: list[Sequence]) -> list[RequestOutput]:
        """One output for each request with a changed sample, in the order they first changed."""
        samples: dict[str, Sequence] = {}
        for seq in changed:
            samples.setdefault(seq.request_id, seq)
        return [self.output_of(seq) for seq in samples.values()]

    def output_of(self, seq: Sequence) -> RequestOutput:
        """A snapshot of the request `seq` is a sample of, as the caller sees it: every sample's
        whole output so far."""
        group = seq.group
        first = group[0]
        done = all(s.is_finished for s in group)
        ends = [s.finish_time for s in group if s.finish_time is not None]
        end = max(ends) if done and ends else time.perf_counter()
        token_time = min((s.first_token_time for s in group if s.first_token_time is not None), default=None)
        samples = [CompletionOutput(
            index=s.index, text=s.text, token_ids=list(s.output_ids), token_logprobs=list(s.output_logprobs),
            top_logprobs=list(s.top_logprobs), finish_reason=s.finish_reason,
            token_times=[t - s.arrival_time for t in s.token_times], error=s.error) for s in group]
        return RequestOutput(
            request_id=first.request_id, prompt_tokens=len(first.prompt_ids),
            cached_prompt_tokens=first.num_cached_prompt_tokens, outputs=samples, finished=done,
            ttft_s=None if token_time is None else token_time - first.arrival_time,
            latency_s=end - first.arrival_time,
            media_adjustments=[m.adjustment for m in first.media if m.adjustment])

    # ------------------------------------------------------------------ offline batches

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams' defaults with the model's (`sampling_defaults`, from generation_config.json
        unless --generation_config says otherwise) over them: what `generate` uses without params."""
        return SamplingParams(**self.sampling_defaults.values())

    def generate(self, prompts: Prompt | str | dict[str, Any] | Seq[Prompt | str | dict[str, Any]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False, errors: str = "raise") -> list[RequestOutput]:
        """Run a batch of prompts to completion: one RequestOutput per prompt, in input order, its
        `outputs` the prompt's params.n samples (sample k drawn with seed + k, as on the server;
        params None: each takes `default_sampling_params()`). A prompt is a Prompt, a string (one
        user message), or one of vLLM's prompt dicts: {"prompt": chat-template text} or
        {"prompt_token_ids": [...]}, with "multi_modal_data", "mm_processor_kwargs" and
        "cache_salt" (Preprocessor.prepare); a lone prompt is a batch of one.

        errors: what a prompt that cannot be queued (unreadable media, over max_input_length, bad
        sampling values) does. "raise": its error is raised and nothing of the batch stays queued;
        "return": its output carries the error (finish_reason "error", no tokens) and the others run.
        A request that fails while running (a video whose frames do not decode, ...) always ends
        alone, its output carrying the error.
        """
        if isinstance(prompts, (Prompt, str, dict)):
            prompts = [prompts]
        params_list = self._params_list(params, len(prompts), "prompts")
        return self._run_batch([functools.partial(self.preprocessor.prepare, prompt, p)
                                for prompt, p in zip(prompts, params_list, strict=True)], params_list, progress, errors)

    def chat(self, messages: list[dict[str, Any]] | Seq[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None, progress: bool = False,
             errors: str = "raise") -> list[RequestOutput]:
        """Run conversations to completion, as vLLM's `LLM.chat`: `messages` is one conversation (a
        list of message dicts) or a list of them; one output per conversation, in input order
        (sampling_params None: `default_sampling_params()`; one, or one per conversation).

        Messages are what the server's /v1/chat/completions takes, through the same parser
        (engine/chat.py): system, user, assistant and tool turns, string or list content, parts
        `text`, OpenAI's `image_url` / `video_url` and the model card's `image` / `video`, media
        anywhere between text, each with its own controls (min_pixels, max_pixels, fps, nframes,
        ...). A medium is a local path, a file:// URL or a data: URI (http(s) URLs are refused:
        nothing is fetched offline), or an object: a PIL image, or a video as a list of frames (PIL
        images or uint8 [H, W, 3] arrays; a uint8 [T, H, W, 3] array), taken at 2 fps unless the
        part's `fps` (qwen-vl-utils' `sample_fps`) says otherwise. `mm_processor_kwargs` are
        controls for every medium (a part's own win); `chat_template`, `chat_template_kwargs`,
        `tools` and `add_generation_prompt` go to the chat template (Preprocessor.prepare_chat).

        A conversation that cannot be prepared raises an engine.chat.InputError (a ValueError
        naming the field: messages[0].content[1].image, mm_processor_kwargs, ...); `errors` as for
        `generate`."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        params_list = self._params_list(sampling_params, len(messages), "conversations")

        def prepare(conversation: Any, params: SamplingParams) -> PreparedRequest:
            parsed, objects = parse_conversation(conversation)
            return self.preprocessor.prepare_chat(
                parsed, params, resolve=functools.partial(local_media, objects=objects), tools=tools,
                chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
                add_generation_prompt=add_generation_prompt, mm_processor_kwargs=mm_processor_kwargs)

        return self._run_batch([functools.partial(prepare, c, p) for c, p in zip(messages, params_list, strict=True)],
                               params_list, progress, errors)

    def _params_list(self, params: SamplingParams | Seq[SamplingParams] | None, count: int,
                     what: str) -> list[SamplingParams]:
        """One SamplingParams per request of an offline batch (None: the defaults)."""
        params_list = list(params) if isinstance(params, Seq) else [params or self.default_sampling_params()] * count
        if len(params_list) != count:
            raise ValueError(f"{len(params_list)} sampling params for {count} {what}")
        return params_list

    def _run_batch(self, requests: list[Callable[[], PreparedRequest]], params_list: list[SamplingParams],
                   progress: bool, errors: str) -> list[RequestOutput]:
        """Prepare (each callable, in order), queue and run an offline batch to completion; outputs
        in input order (params_list: each request's, for the n of one that cannot be queued).
        `errors` as `generate` says."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        batch = uuid.uuid4().hex[:12]  # ids no other request of this LLM holds
        ids = [f"offline-{batch}-{i}" for i in range(len(requests))]
        finished: dict[str, RequestOutput] = {}
        queued: list[str] = []
        for request_id, prepare, params in zip(ids, requests, params_list, strict=True):
            try:
                self.add_request(request_id, prepare())
                queued.append(request_id)
            except Exception as e:
                if errors == "raise":
                    for done in queued:  # nothing half-queued stays behind
                        self.abort(done)
                    raise
                failed = [CompletionOutput(index=k, text="", token_ids=[], token_logprobs=[], top_logprobs=[],
                                           finish_reason="error", token_times=[], error=e) for k in range(params.n)]
                finished[request_id] = RequestOutput(request_id=request_id, prompt_tokens=0, cached_prompt_tokens=0,
                                                     outputs=failed, finished=True, ttft_s=None, latency_s=0.0)
        with tqdm(total=len(requests), initial=len(finished), disable=not progress, desc="requests",
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

