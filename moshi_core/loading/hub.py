"""Model sources: a Hugging Face repo id, an `hf://` URI, or a local file or folder.

    kyutai/moshika-candle-q8                   a repo; the file is found by its known names
    kyutai/moshika-candle-q8@4b4a873           the same, pinned to a revision
    hf://kyutai/moshika-candle-q8/FILE         one file of a repo (`@REV` after the repo pins it)
    /path/to/file.safetensors, /path/to/dir    local files, used as they are

Downloads go through `huggingface_hub`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), offline mode
(`HF_HUB_OFFLINE=1`) and token (`HF_TOKEN`) apply unchanged.
"""

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moshi_core.errors import ModelSourceError

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
    for name in names:
        path = _download(parsed, name)
        if path is not None:
            return path
        missing.append(name)
    raise ModelSourceError(f"{parsed} has none of: {', '.join(missing)}")


def _download(source: ModelSource, filename: str) -> Path | None:
    """Fetch one file; None when the repo exists but lacks it."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    where = f"{source.repo_id}/{filename}" + (f" at revision {source.revision}" if source.revision else "")
    try:
        return Path(hf_hub_download(source.repo_id, filename, revision=source.revision))
    except hf_errors.LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"cannot fetch {where}: it is not in the Hugging Face cache and the Hub cannot be "
            "reached (HF_HUB_OFFLINE is set or there is no network). Download it once with "
            "network access, or pass a local path."
        ) from exc
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
