"""How one request fails without failing the others.

The engine ends a request that cannot go on with one of these on its samples' outputs
(CompletionOutput.error, finish_reason "error"; RequestOutput.error: the first) and keeps stepping
the rest. The server answers content errors (a medium
that does not decode) with a 400 naming the part, and the engine's own faults with a 500, for
that request only.
"""

from __future__ import annotations

from qwen_vl_triton.modeling.processing import MediaError


class RequestMediaError(MediaError):
    """A medium of the request failed while the engine decoded or encoded it (a video whose
    header reads but whose frames do not). `label` names the medium as its request named it
    (the server's part path, or the file)."""

    def __init__(self, message: str, label: str | None = None):
        super().__init__(message)
        self.label = label


class RequestFault(RuntimeError):
    """The engine could not compute this request (non-finite logits in its row, or a failed
    forward pass it was part of): an internal fault, not the request's content."""


class StepFailed(RuntimeError):
    """A forward pass failed. The requests in it have ended (`outputs`, each with a RequestFault);
    the others are untouched and the engine can step on."""

    def __init__(self, outputs: list, cause: BaseException):
        super().__init__(f"an engine step failed: {type(cause).__name__}: {cause}")
        self.outputs = outputs
        self.cause = cause
