"""Vision encoding spread over engine steps, so that a long clip never stalls the running streams.

A sequence with media is registered when it is queued (`add`): each distinct medium (by content
hash) becomes a job, shared by every sequence holding it, and answered at once from the encoder
cache when it is there. The driver (rank 0) starts a `FrameStream` for the first few video jobs at
once, so their frames are decoded on a background thread ahead of need, a bounded number of
slices each (engine/frame_stream.py).

Each step, before the forward pass, the driver `plan`s the step's vision work (an `EncodeWork`):
jobs of admitted sequences, in arrival order, up to a number of patches its time budget allows
(the engine gives a share of a forward pass's time while other requests are running; a whole
`chunk_patches` chunk when nothing else is); images whole, videos a few temporal slices of
decoded frames at a time. Every rank then `run`s the same work (under tensor parallelism the
work travels in the step's broadcast: a video as its uint8 frames, slice by slice, never as a
whole decoded clip). A sequence whose media are all encoded gets `media_embeds` and is ready
for its prefill; one whose medium fails to decode or encode is returned with why.

Vision attention never crosses temporal slices (nor Qwen2.5-VL's windows), so a video encoded a
few slices per step gives the embeddings of one call over the whole clip.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from qwen_vl_triton.engine.encoder_cache import EncoderCache
from qwen_vl_triton.engine.errors import RequestFault, RequestMediaError
from qwen_vl_triton.engine.frame_stream import FrameStream
from qwen_vl_triton.engine.media import PreparedMedia
from qwen_vl_triton.engine.sequence import Sequence, Status
from qwen_vl_triton.engine.stats import EngineStats
from qwen_vl_triton.modeling import processing
from qwen_vl_triton.modeling.model import QwenVLModel


@dataclass(frozen=True)
class VideoSlices:
    """Consecutive temporal slices of one video: uint8 frames [n * temporal_patch_size, H, W, 3]."""

    key: str
    frames: np.ndarray


@dataclass(frozen=True)
class EncodeWork:
    """One step's vision work, chosen by the driver and run by every rank.

    images: content hashes of images encoded together in one vision call; videos: one vision call
    each; failed: media that failed to decode on the driver, with why (their requests end).
    """

    images: tuple[str, ...] = ()
    videos: tuple[VideoSlices, ...] = ()
    failed: tuple[tuple[str, RequestMediaError], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.images or self.videos or self.failed)


@dataclass
class _Job:
    """One medium to encode. embeds [num_tokens, H] fill `rows` at a time (a video's slices in order)."""

    media: PreparedMedia
    seqs: list[Sequence] = field(default_factory=list)
    embeds: torch.Tensor | None = None
    rows: int = 0
    stream: FrameStream | None = None  # the driver's decoding thread (videos)

    @property
    def done(self) -> bool:
        return self.rows == self.media.num_tokens

    @property
    def admitted(self) -> bool:
        """Whether a sequence holding it is admitted: only then is it encoded (its embeddings are
        soon needed, and they take memory until then)."""
        return any(s.status == Status.RUNNING for s in self.seqs)


class MediaEncoder:
    """The vision work of an engine: jobs, their frame streams (driver), and the per-step work.

    chunk_patches: the most patches in one vision call (bounds the tower's activations) and in
    one step's work; prefetch_streams: videos decoded ahead at once (driver); prefetch_slices:
    decoded slices each may hold. driver: whether this rank plans (rank 0, or the one process).
    """

    def __init__(self, model: QwenVLModel, cache: EncoderCache, stats: EngineStats, *, chunk_patches: int,
                 driver: bool, isolate_failures: bool, prefetch_streams: int = 2, prefetch_slices: int = 8):
        self.model = model
        self.cache = cache
        self.stats = stats
        self.chunk_patches = chunk_patches
        self.driver = driver
        # One process can retry a failed call medium by medium; ranks cannot (their collectives must pair).
        self.isolate_failures = isolate_failures
        self.prefetch_streams = prefetch_streams
        self.prefetch_slices = prefetch_slices
        self.jobs: dict[str, _Job] = {}  # by content hash, in arrival order
        self.seconds_per_patch: float | None = None  # the driver's running estimate, for plan's budget

    # ------------------------------------------------------------------ sequences

    def add(self, seq: Sequence) -> None:
        """Register a queued sequence's media (every rank); ready at once if all are cached."""
        for m in seq.media:
            job = self.jobs.get(m.content_hash)
            if job is None:
                job = self.jobs[m.content_hash] = _Job(m)
                cached = self.cache.get(m.content_hash)
                if cached is not None:
                    job.embeds, job.rows = cached, m.num_tokens
            if seq not in job.seqs:
                job.seqs.append(seq)
        self._assemble(seq)
        self._start_streams()

    def discard(self, seq: Sequence) -> None:
        """Forget a sequence (aborted, failed); a job no other sequence holds is dropped."""
        for key in {m.content_hash for m in seq.media}:
            job = self.jobs.get(key)
            if job is not None and seq in job.seqs:
                job.seqs.remove(seq)
                if not job.seqs:
                    self._drop(key)
        self._start_streams()

    def _drop(self, key: str) -> None:
        job = self.jobs.pop(key)
        if job.stream is not None:
            job.stream.close()

    def _assemble(self, seq: Sequence) -> None:
        """Give a sequence its media_embeds [sum of media tokens, H] once all its jobs are done."""
        jobs = [self.jobs[m.content_hash] for m in seq.media]
        if not all(j.done for j in jobs):
            return
        seq.media_embeds = jobs[0].embeds if len(jobs) == 1 else torch.cat([j.embeds for j in jobs])
        for key in {m.content_hash for m in seq.media}:
            job = self.jobs[key]
            job.seqs.remove(seq)
            if not job.seqs:
                self._drop(key)

    def _start_streams(self) -> None:
        """Driver: keep frames decoding ahead for the first prefetch_streams videos still to encode."""
        if not self.driver:
            return
        videos = [j for j in self.jobs.values() if j.media.video_plan is not None and not j.done]
        for job in videos[:self.prefetch_streams]:
            if job.stream is None:
                job.stream = FrameStream(job.media, self.prefetch_slices)

    # ------------------------------------------------------------------ the step's work

    def plan(self, budget_s: float | None, wait_s: float = 0.0) -> EncodeWork:
        """Driver: this step's work. budget_s: seconds of vision work allowed (None: one whole
        chunk of chunk_patches); at least one image or slice is taken whatever the budget, so
        encoding always progresses. wait_s: how long to wait for a first decoded slice."""
        limit = self.chunk_patches
        if budget_s is not None:
            estimate = self.seconds_per_patch
            limit = 1 if estimate is None else max(1, min(limit, int(budget_s / estimate)))
        images: list[str] = []
        videos: list[VideoSlices] = []
        failed: list[tuple[str, RequestMediaError]] = []
        used = 0
        for key, job in self.jobs.items():
            if used >= limit:
                break
            if job.done or not job.admitted:
                continue
            t, h, w = job.media.grid
            if job.media.image_pixels is not None:
                if not images and not videos or used + t * h * w <= limit:
                    images.append(key)
                    used += t * h * w
                continue
            if job.stream is None:
                job.stream = FrameStream(job.media, self.prefetch_slices)
            first = not images and not videos
            slices = max(1 if first else 0, min(limit - used, self.chunk_patches) // (h * w))
            if slices == 0:
                break
            try:
                frames = job.stream.take(slices, timeout=wait_s if first else 0.0)
            except RequestMediaError as e:
                failed.append((key, e))
                continue
            if frames is not None:
                videos.append(VideoSlices(key, frames))
                used += frames.shape[0] // job.media.cfg.temporal_patch_size * h * w
        return EncodeWork(tuple(images), tuple(videos), tuple(failed))

    def run(self, work: EncodeWork) -> list[tuple[Sequence, BaseException]]:
        """Every rank: encode the step's work; the sequences whose media failed, with why (their
        embeddings are never set; the caller ends them). Sequences whose media are all encoded get
        their media_embeds."""
        if not work:
            return []
        started = time.perf_counter()
        errors: dict[str, BaseException] = dict(work.failed)
        patches = 0
        images = [k for k in work.images if k in self.jobs]
        if images:
            patches += sum(math.prod(self.jobs[k].media.grid) for k in images)
            encoded, image_errors = self._encode_images([self.jobs[k].media for k in images])
            errors.update(image_errors)
            for key, embeds in encoded.items():
                self.jobs[key].embeds, self.jobs[key].rows = embeds, len(embeds)
        for part in work.videos:
            job = self.jobs.get(part.key)
            if job is None or part.key in errors:
                continue
            pixel_values, grid = processing.patchify(part.frames, job.media.cfg)
            patches += len(pixel_values)
            try:
                self._write_video_rows(job, pixel_values, grid)
            except Exception as e:
                if not self.isolate_failures:
                    raise  # tensor parallel: a rank's own fault (out of memory, ...): the step fails
                errors[part.key] = _request_error(job.media, e)
        _synchronize(self.model.device)
        elapsed = time.perf_counter() - started
        self.stats.vision_s += elapsed
        if patches:
            measured = elapsed / patches
            self.seconds_per_patch = measured if self.seconds_per_patch is None else \
                0.5 * self.seconds_per_patch + 0.5 * measured
        return self._settle(errors)

    def _settle(self, errors: dict[str, BaseException]) -> list[tuple[Sequence, BaseException]]:
        """Cache finished jobs, assemble their sequences' embeddings; the failed jobs' sequences."""
        failed: list[tuple[Sequence, BaseException]] = []
        for key, error in errors.items():
            job = self.jobs.get(key)
            if job is not None:
                failed.extend((seq, error) for seq in job.seqs)
        for seq, _ in failed:
            self.discard(seq)
        for key, job in list(self.jobs.items()):
            if job.done and job.embeds is not None and key in self.jobs:
                self.cache.put(key, job.embeds)  # too large for the cache: used, not kept
                for seq in list(job.seqs):
                    self._assemble(seq)
        self._start_streams()
        return failed

    # ------------------------------------------------------------------ vision calls

    def _encode_images(self, media: list[PreparedMedia]) -> tuple[dict[str, torch.Tensor], dict[str, BaseException]]:
        """Images in one vision call; if that fails (one process), each alone, so that one bad image
        fails only the requests holding it. Embeddings and errors by content hash."""
        try:
            return {m.content_hash: e for m, e in zip(media, self._image_call(media), strict=True)}, {}
        except Exception as e:
            if not self.isolate_failures:
                raise
            if len(media) == 1:
                return {}, {media[0].content_hash: _request_error(media[0], e)}
        encoded: dict[str, torch.Tensor] = {}
        errors: dict[str, BaseException] = {}
        for m in media:
            try:
                encoded[m.content_hash] = self._image_call([m])[0]
            except Exception as e:  # noqa: BLE001 - reported on this image's requests only
                errors[m.content_hash] = _request_error(m, e)
        return encoded, errors

    def _image_call(self, media: list[PreparedMedia]) -> list[torch.Tensor]:
        pixel_values = torch.cat([m.image_pixels for m in media]).to(self.model.device)
        embeds = self.model.encode_media(pixel_values, torch.tensor([m.grid for m in media]))
        return list(embeds.split([m.num_tokens for m in media]))

    def _write_video_rows(self, job: _Job, pixel_values: torch.Tensor, grid: tuple[int, int, int]) -> None:
        """Encode consecutive slices of a video into the next rows of its embeddings."""
        if job.embeds is None:
            config = self.model.config
            job.embeds = torch.empty(job.media.num_tokens, config.text.hidden_size, dtype=self.model.dtype,
                                     device=self.model.device)
        chunk = self.model.encode_media(pixel_values.to(self.model.device), torch.tensor([grid]))
        job.embeds[job.rows:job.rows + len(chunk)] = chunk
        job.rows += len(chunk)

    def encode(self, media: list[PreparedMedia]) -> list[torch.Tensor]:
        """Embeddings [tokens, H] of each medium, now, on this thread (oracles and benchmarks; the
        engine spreads the same calls over steps): images in one call, videos chunk_patches at a time."""
        out: dict[int, torch.Tensor] = {}
        images = [i for i, m in enumerate(media) if m.image_pixels is not None]
        if images:
            out.update(zip(images, self._image_call([media[i] for i in images]), strict=True))
        for i, m in enumerate(media):
            if i not in out:
                job = _Job(m)
                _, h, w = m.grid
                for pixel_values, grid in m.pixel_chunks(max(1, self.chunk_patches // (h * w))):
                    self._write_video_rows(job, pixel_values, grid)
                out[i] = job.embeds
        return [out[i] for i in range(len(media))]

    def close(self) -> None:
        """Stop every decoding thread (the engine is shutting down)."""
        for job in self.jobs.values():
            if job.stream is not None:
                job.stream.close()


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the vision time measured is the work's own."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def _request_error(media: PreparedMedia, error: Exception) -> BaseException:
    """What a medium's failure is to its requests: its own RequestMediaError (it does not decode),
    else a RequestFault (the engine failed on it)."""
    if isinstance(error, RequestMediaError):
        return error
    return RequestFault(f"encoding {media.label or media.kind} failed: {type(error).__name__}: {error}")
