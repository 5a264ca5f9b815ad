"""The Gradio API takes the files uploaded to this server, and no other file.

A Gradio call names its file inputs by path (`{"path": ..., "meta": {"_type": "gradio.FileData"}}`)
and Gradio copies the file a path names into its cache, from where `/gradio_api/file=` serves
it; mounted in an app rather than launched, Gradio checks none of these paths. `UploadsOnly`
reads each call before Gradio does and refuses one that names anything but a file in the
upload folder (where `POST /gradio_api/upload` puts files): no server path, no URL, no
device that never ends.
"""

import json
import os
from collections.abc import Iterator

from gradio.utils import get_upload_folder
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, status_of
from moshi_core.errors import InvalidParameterError, MoshiError
from workers.errors import UploadTooLargeError

MAX_CALL_BYTES = 8 * 2**20  # a call carries paths and form values; files come by the upload route


def named_paths(data: object) -> Iterator[object]:
    """Every value of a "path" key in JSON `data`, however deep."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "path" in item:
                yield item["path"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_uploaded(path: object) -> None:
    """InvalidParameterError unless `path` is a file in Gradio's upload folder (links resolved)."""
    folder = os.path.realpath(get_upload_folder())
    real = os.path.realpath(path) if isinstance(path, str) and "\0" not in path else ""
    if not (real.startswith(folder + os.sep) and os.path.isfile(real)):
        raise InvalidParameterError(f"{str(path)[:200]!r} is not a file uploaded to this server: upload the "
                                    "file first (POST /gradio_api/upload, as Gradio's clients do) and pass "
                                    "the path that answers")


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_CALL_BYTES:
            raise UploadTooLargeError(f"a Gradio call is limited to {MAX_CALL_BYTES // 2**20} MB: upload files "
                                      "with POST /gradio_api/upload")
        if not message.get("more_body"):
            return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app behind: the body already read, then the client's own messages."""
    pending = True

    async def again() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class UploadsOnly:
    """Checks every file path of a call to the Gradio app before the app sees the call."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = Headers(scope=scope).get("content-type", "")
        # Uploads are multipart: the upload route writes them into the upload folder.
        if scope["type"] != "http" or scope["method"] != "POST" or content_type.startswith("multipart/"):
            return await self.app(scope, receive, send)
        try:
            body = await _read_body(receive)
            try:
                data = json.loads(body) if body else None
            except (ValueError, RecursionError):
                data = None  # not JSON: Gradio refuses it itself
            for path in named_paths(data):
                check_uploaded(path)
        except MoshiError as exc:
            status, code = status_of(exc)
            return await error_response(status, code, str(exc))(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)
