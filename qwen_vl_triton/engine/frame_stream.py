"""A video's frames decoded and resized on a background thread, ahead of the vision encoder.

Decoding a clip (PyAV) and resizing its sampled frames (PIL) is the slow, request-sized part of
video work; done on the engine thread it would stall every running stream for as long as it
takes. A `FrameStream` runs it on its own thread, below the engine thread's priority (on Linux),
one temporal slice (temporal_patch_size frames, uint8 [tp, H, W, 3]) at a time, into a queue of
at most `max_slices` slices: the engine takes slices as the vision tower is ready for them, and
the thread waits while the queue is full (`waiting_for_room` says so), so a stream holds at most
max_slices slices of frames, plus the one decoded slice waiting for room, however long the clip.

A failure to decode (a corrupt file) is the request's: `take` raises it as RequestMediaError.
`close` stops the thread (an aborted request, a finished one) and drops what it held.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading

import numpy as np

from qwen_vl_triton.engine.errors import RequestMediaError
from qwen_vl_triton.engine.media import PreparedMedia

_END = object()  # the queue's last item after the final slice
DECODE_NICENESS = 10  # the decoding thread's nice value


class FrameStream:
    """The planned frames of one video, produced by a background thread.

    media: a video PreparedMedia (with its plan); max_slices: how many decoded slices may wait
    for the encoder (the memory bound: max_slices * tp * H * W * 3 bytes).
    """

    def __init__(self, media: PreparedMedia, max_slices: int):
        if media.video_plan is None:
            raise ValueError("a FrameStream decodes videos; this medium holds its pixels already")
        if max_slices < 1:
            raise ValueError(f"max_slices must be >= 1, got {max_slices}")
        self.media = media
        self.slices_left = media.grid[0]  # temporal slices not yet taken
        self._queue: queue.Queue = queue.Queue(maxsize=max_slices)
        self._closed = threading.Event()
        # Set while the thread holds its next item and the queue has no room for it: decoding is as
        # far ahead of the encoder as the stream allows, and stays there until a slice is taken.
        self.waiting_for_room = threading.Event()
        self._thread = threading.Thread(target=self._decode, name=f"qvl-frames-{media.content_hash[:8]}",
                                        daemon=True)
        self._thread.start()

    def _decode(self) -> None:
        # Background work: below the engine thread's priority (on Linux a thread's nice value is its
        # own, and the decoder's own threads, started from here, inherit it).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
        try:
            for frames in self.media.frame_slices(1):
                if not self._put(frames):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the engine, which fails this request with it
            # A new error carrying only the message: the original's traceback holds the decoder's
            # frames (container, frames), which must not outlive the stream in a request's output.
            self._put(RequestMediaError(str(e) or type(e).__name__, self.media.label))

    def _put(self, item: object) -> bool:
        """Queue an item, waiting while the queue is full (waiting_for_room set meanwhile); False
        once the stream is closed."""
        try:
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    self.waiting_for_room.set()
            return False
        finally:
            self.waiting_for_room.clear()

    def take(self, max_slices: int, timeout: float = 0.0) -> np.ndarray | None:
        """Up to max_slices decoded slices, in order, as uint8 frames [n * tp, H, W, 3]; waits up to
        `timeout` seconds for the first one, then takes only what is ready. None when none is ready
        (or the clip is done). Raises RequestMediaError when the clip failed to decode."""
        taken: list[np.ndarray] = []
        while len(taken) < min(max_slices, self.slices_left):
            try:
                item = self._queue.get(timeout=timeout) if not taken and timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, RequestMediaError):
                self.close()
                raise item
            if item is _END:
                self.close()
                raise RequestMediaError(f"{self.media.label or 'video'}: the clip ended "
                                        f"{self.slices_left} temporal slices early", self.media.label)
            taken.append(item)
        self.slices_left -= len(taken)
        if not taken:
            return None
        return taken[0] if len(taken) == 1 else np.concatenate(taken)

    def close(self) -> None:
        """Stop decoding and drop the queued frames (idempotent); the thread ends within ~0.1 s of
        finishing the frame it is on."""
        self._closed.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the decoding thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
