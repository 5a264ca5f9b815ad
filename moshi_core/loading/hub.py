"""Model sources: a Hugging Face repo id, an `hf://` URI, or a local file or folder.

    kyutai/moshika-candle-q8                   a repo; the file is found by its known names
    kyutai/moshika-candle-q8@4b4a873           the same, pinned to a revision
    hf://kyutai/moshika-candle-q8/FILE         one file of a repo (`@REV` after the repo pins it)
    /path/to/file.safetensors, /path/to/dir    local files, used as they are

Downloads go through `huggingface_hub`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), offline mode
(`HF_HUB_OFFLINE=1`) and token (`HF_TOKEN`) apply unchanged. Two things are our own:

- Failing fast. `huggingface_hub` retries an unreachable Hub for about 25 s per file before it
  gives up. Before each download we ask the Hub once, with a short timeout; when it does not
  answer, the file comes from the cache alone (as offline) and the Hub is not asked again for
  `UNREACHABLE_SECONDS`, so every request meanwhile answers at once, cached files still work.
- Progress. A download made inside a recorded load (`moshi_core.loading.progress`) reports its
  bytes there instead of drawing a progress bar.
"""

import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import NoneType

from moshi_core.errors import ModelSourceError
from moshi_core.loading.progress import LOADING_WEIGHTS, report_download, report_stage

DEFAULT_MODEL_REPO = "kyutai/moshika-candle-q8"
MIMI_FILENAMES = (
    "tokenizer-e351c8d8-checkpoint125.safetensors",  # Moshi and TTS repos
    "mimi-pytorch-e351c8d8@125.safetensors",  # STT repos (the same bytes)
)
DEFAULT_MIMI_SOURCE = DEFAULT_MODEL_REPO
# What the Hub allows: letters, digits, '-', '_', '.', at most 96, not starting or ending
# with '-' or '.', no '--' or '..' (a name must never walk out of the cache's folders).
_HUB_NAME = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")  # a branch, tag or commit
_FILE_PART = re.compile(r"(?!\.{1,2}$)[^\\\x00-\x1f]+")  # a folder or file name of the repo
HUB_TIMEOUT = 3.0  # seconds the Hub has to answer the one check before a download
UNREACHABLE_SECONDS = 60.0  # how long an unreachable Hub is left alone (cache only meanwhile)


@dataclass(frozen=True)
class ModelSource:
    """A parsed source: either `local` or a `repo_id` (with an optional file and revision)."""

    local: Path | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        if self.local is not None:
            return str(self.local)
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}{rev}" + (f"/{self.filename}" if self.filename else "")


def parse_source(source: str | os.PathLike, revision: str | None = None) -> ModelSource:
    text = os.fspath(source).strip()
    if not text:
        raise ModelSourceError("empty model source: give a Hugging Face repo id, an hf:// URI or a local path")
    if text.startswith("hf://"):
        parts = text[len("hf://"):].split("/")
        if len(parts) < 2:
            raise ModelSourceError(f"{text!r}: an hf:// URI is hf://OWNER/REPO[@REVISION][/FILE]")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
        if filename is not None and not all(_FILE_PART.fullmatch(p) for p in parts[2:]):
            raise ModelSourceError(f"{text!r}: the file part must be a path inside the repo, without empty, "
                                   "'.' or '..' parts")
    else:
        path = Path(text).expanduser()
        if path.exists():
            return ModelSource(local=path)
        parts = text.split("/")
        if len(parts) != 2 or text.startswith((".", "/")) or not all(parts):
            raise ModelSourceError(
                f"{text!r} is neither an existing local path nor a Hugging Face repo id (OWNER/REPO)"
            )
        repo, filename = text, None
    if "@" in repo:
        repo, pinned = repo.split("@", 1)
        if not _REVISION.fullmatch(pinned):
            raise ModelSourceError(f"{text!r}: {pinned!r} is not a revision (a branch, tag or commit hash)")
        revision = revision or pinned
    if not all(_HUB_NAME.fullmatch(p) for p in repo.split("/")):
        raise ModelSourceError(f"{text!r}: {repo!r} is not a Hugging Face repo id: OWNER/REPO, each of letters, "
                               "digits, '-', '_' and '.' (at most 96, no '--' or '..')")
    return ModelSource(repo_id=repo, filename=filename, revision=revision)


def resolve_file(source: str | os.PathLike, candidates: Sequence[str], revision: str | None = None) -> Path:
    """Local path of the file a source names, downloading it into the HF cache if needed.

    A folder or a bare repo id is searched for the first of `candidates` it holds.
    """
    parsed = parse_source(source, revision)
    if parsed.local is not None:
        if parsed.local.is_file():
            return parsed.local
        for name in candidates:
            if (parsed.local / name).is_file():
                return parsed.local / name
        raise ModelSourceError(f"{parsed.local} holds none of: {', '.join(candidates)}")
    names = [parsed.filename] if parsed.filename else list(candidates)
    missing: list[str] = []
    uncached: list[_NotCachedError] = []
    for name in names:
        try:
            path = _download(parsed, name)
        except _NotCachedError as exc:  # offline, or the Hub is away: a later name may be in the cache
            uncached.append(exc)
            continue
        if path is not None:
            return path
        missing.append(name)
    if len(uncached) == 1:
        raise uncached[0]
    if uncached:
        raise _NotCachedError(_not_cached(f"{parsed.repo_id} (none of {', '.join(names)})")) from uncached[-1]
    raise ModelSourceError(f"{parsed} has none of: {', '.join(missing)}")


class _NotCachedError(ModelSourceError):
    """A file that is not in the HF cache while the Hub cannot be asked."""


def _not_cached(what: str) -> str:
    return (f"cannot fetch {what}: it is not in the Hugging Face cache and the Hub cannot be "
            "reached (HF_HUB_OFFLINE is set or there is no network). Download it once with "
            "network access, or pass a local path.")


class _HubReachability:
    """Whether the Hub answered lately: asked at most once per download, and not at all for
    `UNREACHABLE_SECONDS` after it did not answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}  # endpoint -> monotonic time

    def reachable(self) -> bool:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        endpoint = constants.ENDPOINT
        with self._lock:
            if time.monotonic() < self._down_until.get(endpoint, 0.0):
                return False
        try:
            get_session().head(endpoint, timeout=HUB_TIMEOUT)  # any answer, even an error status, will do
            return True
        except Exception:  # noqa: BLE001 (httpx's connection and timeout errors, a proxy's: all mean "no answer")
            with self._lock:
                self._down_until[endpoint] = time.monotonic() + UNREACHABLE_SECONDS
            return False


HUB = _HubReachability()


def hub_offline() -> bool:
    """True when the Hub is not to be asked now: offline mode, or it did not answer lately."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or not HUB.reachable()


def _progress_bar(filename: str) -> type:
    """A stand-in for tqdm that `huggingface_hub` drives: it reports the bytes of `filename` to
    the load this runs under instead of drawing (no bar spam in a log file)."""

    class Bar:
        def __init__(self, *args, total: int | None = None, initial: int = 0, **kwargs) -> None:
            self.total, self.n = total, initial
            report_download(filename, self.n, self.total)

        def update(self, n: int = 1) -> None:
            self.n += n
            report_download(filename, self.n, self.total)

        def update_transfer(self, n: int) -> None:
            """Xet's bytes over the network: `update` counts the file's own, which is what we show.
            (Having this method is also what makes Xet drive one bar, not two.)"""

        def set_postfix_str(self, *args, **kwargs) -> None:
            pass

        set_transfer_postfix_str = set_postfix_str

        def close(self) -> None:
            pass

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *exc) -> None:
            self.close()

    return Bar


def _download(source: ModelSource, filename: str) -> Path | None:
    """Fetch one file; None when the repo exists but lacks it."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    where = f"{source.repo_id}/{filename}" + (f" at revision {source.revision}" if source.revision else "")
    try:
        path = hf_hub_download(source.repo_id, filename, revision=source.revision, local_files_only=hub_offline(),
                               tqdm_class=_progress_bar(filename))
    except hf_errors.LocalEntryNotFoundError as exc:
        if not isinstance(try_to_load_from_cache(source.repo_id, filename, revision=source.revision), (str, NoneType)):
            return None  # the cache remembers that the repo lacks it (its "no exist" marker)
        raise _NotCachedError(_not_cached(where)) from exc
    except hf_errors.EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass
        return None
    except hf_errors.GatedRepoError as exc:
        raise ModelSourceError(f"{source.repo_id} is gated: accept its terms on the Hub and set HF_TOKEN") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise ModelSourceError(f"no Hugging Face repo named {source.repo_id!r} (or it is private: set HF_TOKEN)") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise ModelSourceError(f"{source.repo_id} has no revision {source.revision!r}") from exc
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise ModelSourceError(f"cannot fetch {where}: {exc}") from exc
    finally:
        report_stage(LOADING_WEIGHTS)  # after a download (a no-op outside a load)
    return Path(path)
