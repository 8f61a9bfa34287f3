"""Turning a parsed HTTP request into the engine's input: a `PreparedRequest`.

What is HTTP's lives here: where media come from (URLs, data URIs, the allowed folder, byte
limits) and how a failure is reported (an APIError naming the part). Rendering, media
preparation, fitting and the length check are the engine's one `Preprocessor`
(engine/preprocess.py), the same that offline generation uses.

Runs in the server's worker threads, off both the event loop and the engine thread, so that
decoding a large image or video never stalls streaming or the forward passes. It never touches
the LLM's state.

Media sources (`MediaRef.url`):
  * `data:<mime>;base64,<data>`: the bytes, decoded here (invalid base64 is a 400);
  * a path or `file://` URL: read only inside `--allowed_media_dir` (symlinks resolved first;
    relative paths are taken from that folder); anything else is a 400;
  * a bare base64 string of 512+ characters (MindIE accepts base64 images this way);
  * `http://` / `https://`: fetched by the server on its event loop before the request reaches
    these threads (serving/media_fetch.py: allowed hosts, public addresses only, timeouts, byte
    limits); the part arrives here as a FetchedRef holding the body, read like a data URI's bytes.

Work is bounded before it is done: the media count (max_media_per_prompt) is checked before any
medium is read, the text's length before it is tokenized (the Preprocessor's `check_text`), a
data URI's size before it is decoded and an image's or video frame's pixels from the file's header
before it is decoded (decode_max_pixels); each is a 400 naming the limit.

Chat messages (parsed by engine/chat.py, the parser `LLM.chat` uses too) go to the Preprocessor's
`prepare_chat` with `Preparer.resolve` as the way to read their media; its InputErrors come back
as 400s with the same message, param and code. They are rendered with the chat template (the
request's `chat_template`, else the server's), parts in the order given (for one
user message of media then text this is exactly what `LLM.generate` builds offline). Videos that
would push a prompt over max_input_token_len are shrunk to fit (the response reports it in
usage.media_adjustments). Videos are only planned here: the engine decodes their frames chunk by
chunk when it encodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen_vl_triton.engine.chat import ChatMessage, InputError, MediaRef, check_size, decode_base64, media_source
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.preprocess import ContextLengthError, PreparedRequest, Preprocessor
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.engine.structured import byte_level_chars
from qwen_vl_triton.modeling.processing import MediaKind
from qwen_vl_triton.serving.media_fetch import FetchedRef
from qwen_vl_triton.serving.protocol import APIError, api_error

MAX_IMAGE_BYTES = 20 << 20     # MindIE's limits: 20 MB per image, 512 MB per video
MAX_VIDEO_BYTES = 512 << 20


def _media_error(ref: MediaRef, message: str, code: str = "invalid_media") -> APIError:
    return APIError(f"'{ref.param}': {message}", param=ref.param, code=code)


def _max_bytes(ref: MediaRef) -> int:
    return MAX_IMAGE_BYTES if ref.kind == MediaKind.IMAGE else MAX_VIDEO_BYTES


def resolve_source(ref: MediaRef, allowed_dir: Path | None) -> str | bytes:
    """A file path (checked to lie inside allowed_dir), the decoded bytes of a data URI or the body
    the server fetched from an http(s) URL, within the byte limit of the part's kind (data URIs
    checked before they are decoded, fetched bodies as they were read). Which a url is, and how a
    data URI decodes, is the engine's (engine.chat.media_source), as offline."""
    if isinstance(ref, FetchedRef):
        return ref.data
    try:
        source = media_source(ref)
        if source.kind == "base64":
            return decode_base64(ref, source.value, _max_bytes(ref))
    except InputError as e:
        raise api_error(e) from None
    if source.kind == "http":  # only the HTTP server fetches (MediaFetcher), before this
        raise _media_error(ref, "http(s) URLs are fetched only by the HTTP server; send the file as a data: URI "
                                "(base64) or as a path under --allowed_media_dir", "unsupported_url")
    if allowed_dir is None:
        raise _media_error(ref, "local files are not served: start the server with --allowed_media_dir DIR "
                                "to allow paths inside DIR, or send a data: URI", "local_media_disabled")
    path_text = source.value
    path = Path(path_text)
    if not path.is_absolute():
        path = allowed_dir / path
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # ValueError: an embedded NUL
        raise _media_error(ref, f"cannot resolve path ({e})") from None
    if not real.is_relative_to(allowed_dir):
        raise _media_error(ref, "path is outside the server's --allowed_media_dir", "path_not_allowed")
    if real.is_dir():
        raise _media_error(ref, f"a directory, not a file: {path_text}", "file_not_found")
    if not real.is_file():
        raise _media_error(ref, f"no such file: {path_text}", "file_not_found")
    try:
        check_size(ref, real.stat().st_size, _max_bytes(ref))
    except InputError as e:
        raise api_error(e) from None
    return str(real)


_BYTE_DECODER = {c: b for b, c in byte_level_chars().items()}  # a token piece's characters -> its bytes


class Preparer:
    """Builds the PreparedRequest of an HTTP request. Thread-safe (the Preprocessor's tokenizer
    calls hold its lock; media decoding runs outside it)."""

    def __init__(self, preprocessor: Preprocessor, allowed_media_dir: str | Path | None):
        self.preprocessor = preprocessor
        self.allowed_dir = Path(allowed_media_dir).resolve() if allowed_media_dir else None

    @classmethod
    def for_llm(cls, llm: Any, allowed_media_dir: str | Path | None, max_output_tokens: int | None = None
                ) -> Preparer:
        """A Preparer whose Preprocessor has its own tokenizer (the engine thread keeps the LLM's),
        with the server's output cap (max_iter_times)."""
        return cls(llm.preprocessor.with_own_tokenizer(llm.path, "max_input_token_len", max_output_tokens),
                   allowed_media_dir)

    # ---------------------------------------------------------------------------- media

    def resolve(self, ref: MediaRef) -> Media:
        """A media part's Media, read the server's way (`resolve_source`: the allowed folder, data
        URIs, the bodies fetched from http(s) URLs, byte limits); APIError (400) naming the part."""
        return Media(resolve_source(ref, self.allowed_dir), ref.kind, dict(ref.options))

    # ---------------------------------------------------------------------------- prompts

    def prepare_chat(self, messages: list[ChatMessage], params: SamplingParams,
                     tools: list[dict[str, Any]] | None = None, cache_salt: str | None = None,
                     chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                     mm_processor_kwargs: dict[str, Any] | None = None) -> PreparedRequest:
        """The conversation as the engine's Preprocessor prepares it (`Preprocessor.prepare_chat`:
        generation prompt appended, `tools` offered in the template's system turn, the request's own
        `chat_template`, `chat_template_kwargs` and `mm_processor_kwargs`, vLLM's fields, if given),
        its media read by `resolve`; the Preprocessor's refusals as 400s naming the same params."""
        try:
            return self.preprocessor.prepare_chat(
                messages, params, resolve=self.resolve, tools=tools, chat_template=chat_template,
                chat_template_kwargs=chat_template_kwargs, mm_processor_kwargs=mm_processor_kwargs,
                cache_salt=cache_salt)
        except InputError as e:
            raise api_error(e) from None

    def prepare_raw(self, text: str, params: SamplingParams, cache_salt: str | None = None) -> PreparedRequest:
        """Raw prompt text (no chat template, no media); text that cannot fit is refused before it
        is tokenized."""
        try:
            ids = self.preprocessor.tokenize(text)
        except ContextLengthError as e:
            raise APIError(str(e), param="prompt", code="context_length_exceeded") from None
        if not ids:
            raise APIError("prompt is empty after tokenization", param="prompt", code="invalid_value")
        try:
            return self.preprocessor.build_checked(ids, [], params, "prompt", cache_salt)
        except InputError as e:
            raise api_error(e) from None

    def decode_tokens(self, ids: list[int]) -> list[tuple[str, bytes]]:
        """Each token's own text and its exact bytes (logprobs' 'token' and 'bytes' fields; the
        text of a token holding part of a UTF-8 character is U+FFFD, its bytes are the real ones)."""
        tokenizer = self.preprocessor.tokenizer
        with self.preprocessor.lock:
            texts = [tokenizer.decode([t]) for t in ids]
            pieces = tokenizer.convert_ids_to_tokens(ids)
            special = set(getattr(tokenizer, "added_tokens_decoder", {}))
        out = []
        for tid, text, piece in zip(ids, texts, pieces, strict=True):
            if piece is None:
                raw = b""
            elif tid not in special and all(c in _BYTE_DECODER for c in piece):
                raw = bytes(_BYTE_DECODER[c] for c in piece)  # byte-level BPE (Qwen2's tokenizer)
            else:
                raw = text.encode("utf-8")
            out.append((text, raw))
        return out
