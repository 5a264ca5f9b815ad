"""The REST batch API (FastAPI): jobs for dialogue and the Mimi codec, run by `workers`.

`create_api()` builds the app; `python -m api` serves it alone, `app.py` beside the web UI.
"""

from .app import create_api

__all__ = ["create_api"]
