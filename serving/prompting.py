"""Turning a parsed request into what the engine computes: token ids and preprocessed media.

Runs in the server's worker threads, off both the event loop and the engine thread, so that
decoding a large image or video never stalls streaming or the forward passes. It needs only the
tokenizer, the image processor config and a few model facts; it never touches the LLM's state.

Media sources (`MediaRef.url`):
  * `data:<mime>;base64,<data>`: the bytes, decoded here (invalid base64 is a 400);
  * a path or `file://` URL: read only inside `--allowed_media_dir` (symlinks resolved first;
    relative paths are taken from that folder); anything else is a 400;
  * a bare base64 string of 512+ characters (MindIE accepts base64 images this way);
  * `http://` / `https://`: refused with a 400; this server does not fetch URLs.

Chat messages are rendered with the tokenizer's chat template, parts in the order given (for one
user message of media then text this is exactly `modeling.prompt.build_prompt`, i.e. what
`LLM.generate` builds offline); each media pad is then expanded to its merged-patch count. As in
`LLM.prepare`, media controls are checked against the engine's `media_limits`, and videos that
would push a prompt over max_input_length are shrunk to fit (`engine.request.fit_videos`; the
response reports it in usage.media_adjustments). Videos are only planned here: the engine
decodes their frames chunk by chunk when it encodes them.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from PIL import Image

from engine.request import (
    DEFAULT_LIMITS,
    Media,
    MediaLimits,
    MediaOptionError,
    PreparedMedia,
    fit_videos,
    prepare_media,
)
from modeling.processing import ImageProcessorConfig
from modeling.prompt import expand_media_pads
from serving.protocol import APIError, ChatMessage, MediaRef

_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")
MAX_IMAGE_BYTES = 20 << 20     # MindIE's limits: 20 MB per image, 512 MB per video
MAX_VIDEO_BYTES = 512 << 20


def _media_error(ref: MediaRef, message: str, code: str = "invalid_media") -> APIError:
    return APIError(f"'{ref.param}': {message}", param=ref.param, code=code)


def _b64decode(ref: MediaRef, data: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if not raw:
        raise _media_error(ref, "invalid base64 data" if raw is None else "empty base64 data", "invalid_base64")
    return raw


def resolve_source(ref: MediaRef, allowed_dir: Path | None) -> str | bytes:
    """A file path (checked to lie inside allowed_dir) or the decoded bytes of a data URI."""
    url = ref.url.strip()
    lower = url[:16].lower()
    if lower.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise _media_error(ref, "a data URI must be data:<mime type>;base64,<data>", "invalid_base64")
        return _b64decode(ref, data)
    if lower.startswith(("http://", "https://")):
        raise _media_error(ref, "fetching media over http(s) is not supported by this server; send the file "
                                "as a data: URI (base64) or as a path under the server's --allowed_media_dir",
                           "unsupported_url")
    if lower.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _media_error(ref, f"file:// URL with host {parsed.netloc!r}: only local files are read",
                               "unsupported_url")
        path_text = urllib.parse.unquote(parsed.path)
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise _media_error(ref, f"unsupported URL scheme in {url[:40]!r}: use data:, file:// or a path",
                           "unsupported_url")
    elif len(url) >= 512 and _BASE64.match(url[:4096]) and not Path(url[:255]).exists():
        return _b64decode(ref, url)
    else:
        path_text = url
    if allowed_dir is None:
        raise _media_error(ref, "local files are not served: start the server with --allowed_media_dir DIR "
                                "to allow paths inside DIR, or send a data: URI", "local_media_disabled")
    path = Path(path_text)
    if not path.is_absolute():
        path = allowed_dir / path
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:
        raise _media_error(ref, f"cannot resolve path ({e})") from None
    if not real.is_relative_to(allowed_dir):
        raise _media_error(ref, "path is outside the server's --allowed_media_dir", "path_not_allowed")
    if real.is_dir():
        raise _media_error(ref, f"a directory, not a file: {path_text}", "file_not_found")
    if not real.is_file():
        raise _media_error(ref, f"no such file: {path_text}", "file_not_found")
    return str(real)


def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other
    bytes for code points 256 and up, in order. Maps a token piece's characters to its bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    decoder, extra = {}, 0
    for b in range(256):
        if b in printable:
            decoder[chr(b)] = b
        else:
            decoder[chr(256 + extra)] = b
            extra += 1
    return decoder


_BYTE_DECODER = _byte_level_decoder()


def _is_image(source: str | bytes) -> bool:
    """Whether PIL recognises the file / bytes as an image."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source):
            return True
    except (OSError, ValueError):
        return False


class Preparer:
    """Builds (token ids, prepared media) for a request. Thread-safe: tokenizer calls hold a lock;
    media decoding runs outside it."""

    def __init__(self, tokenizer: Any, image_cfg: ImageProcessorConfig, merge_size: int, image_token_id: int,
                 video_token_id: int, allowed_media_dir: str | Path | None, max_input_length: int | None = None,
                 limits: MediaLimits = DEFAULT_LIMITS):
        self.tokenizer = tokenizer
        self.max_input_length = max_input_length
        self.limits = limits
        self.image_cfg = image_cfg
        self.merge_size = merge_size
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.allowed_dir = Path(allowed_media_dir).resolve() if allowed_media_dir else None
        self.lock = threading.Lock()

    @classmethod
    def for_llm(cls, llm: Any, allowed_media_dir: str | Path | None) -> Preparer:
        """A Preparer with its own tokenizer (the engine thread keeps using the LLM's)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(llm.path), llm.image_cfg, llm.config.vision.spatial_merge_size,
                   llm.config.image_token_id, llm.config.video_token_id, allowed_media_dir, llm.max_input_length,
                   getattr(llm, "media_limits", DEFAULT_LIMITS))

    # ---------------------------------------------------------------------------- media

    def prepare_one(self, ref: MediaRef) -> PreparedMedia:
        """Resolve, size-check and prepare one media part; APIError (400) naming the part otherwise."""
        source = resolve_source(ref, self.allowed_dir)
        limit = MAX_IMAGE_BYTES if ref.kind == "image" else MAX_VIDEO_BYTES
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        if size > limit:
            raise _media_error(ref, f"{ref.kind} of {size} bytes is over the {limit >> 20} MB limit", "media_too_large")
        if ref.kind == "video" and _is_image(source):
            raise _media_error(ref, "this is an image, not a video: send it as an image_url part", "invalid_media")
        try:
            return prepare_media(Media(source, ref.kind, dict(ref.options)), self.image_cfg, self.limits)
        except MediaOptionError as e:
            raise _media_error(ref, str(e), "invalid_value") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault: a 400
            article = "an" if ref.kind == "image" else "a"
            raise _media_error(ref, f"cannot read it as {article} {ref.kind}: {e}"[:500], "invalid_media") from None

    # ---------------------------------------------------------------------------- prompts

    def _expand(self, ids: list[int], media: list[PreparedMedia], param: str) -> list[int]:
        try:
            return expand_media_pads(ids, [(m.kind, m.grid) for m in media], self.merge_size,
                                     self.image_token_id, self.video_token_id)
        except ValueError as e:  # e.g. the text itself contains <|image_pad|>
            raise APIError(f"prompt text and media do not match: {e}", param=param, code="invalid_value") from None

    def template_messages(self, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        """The chat-template input: media parts as {"type": "image"|"video"}, text as text parts
        (system messages as one string)."""
        out: list[dict[str, Any]] = []
        for m in messages:
            if m.role == "system":
                out.append({"role": "system", "content": "".join(p for p in m.parts if isinstance(p, str))})
                continue
            parts = [{"type": p.kind} if isinstance(p, MediaRef) else {"type": "text", "text": p}
                     for p in m.parts]
            out.append({"role": m.role, "content": parts})
        return out

    def prepare_chat(self, messages: list[ChatMessage]) -> tuple[list[int], list[PreparedMedia]]:
        """Token ids of the rendered conversation (generation prompt appended) and its media."""
        media = [self.prepare_one(p) for m in messages for p in m.parts if isinstance(p, MediaRef)]
        with self.lock:
            try:
                rendered = self.tokenizer.apply_chat_template(self.template_messages(messages), tokenize=False,
                                                              add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - templates raise their own errors for odd conversations
                raise APIError(f"the model's chat template cannot render these messages: {e}", param="messages",
                               code="invalid_value") from None
            ids = self.tokenizer.encode(rendered, add_special_tokens=False)
        expanded = self._expand(ids, media, "messages")
        limit = self.max_input_length
        if limit is not None and len(expanded) > limit and any(m.kind == "video" for m in media):
            text_tokens = len(expanded) - sum(m.num_tokens for m in media)
            try:
                changed = fit_videos(media, limit - text_tokens, f"max_input_token_len {limit}")
            except ValueError as e:
                raise APIError(str(e), param="messages", code="context_length_exceeded") from None
            if changed:
                expanded = self._expand(ids, media, "messages")
        return expanded, media

    def prepare_raw(self, text: str) -> tuple[list[int], list[PreparedMedia]]:
        """Token ids of raw prompt text (no chat template, no media)."""
        with self.lock:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise APIError("prompt is empty after tokenization", param="prompt", code="invalid_value")
        return self._expand(ids, [], "prompt"), []

    def decode_tokens(self, ids: list[int]) -> list[tuple[str, bytes]]:
        """Each token's own text and its exact bytes (logprobs' 'token' and 'bytes' fields; the
        text of a token holding part of a UTF-8 character is U+FFFD, its bytes are the real ones)."""
        with self.lock:
            texts = [self.tokenizer.decode([t]) for t in ids]
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            special = set(getattr(self.tokenizer, "added_tokens_decoder", {}))
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
