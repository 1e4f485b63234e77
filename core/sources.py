"""Where a bake job may take its model from: the allow-lists of model sources.

A job's `model` URL names a directory the worker will read, so it is a trust decision:
`bakehouse://NAME` is the local model cache, `file://` must lie inside a configured model root
(after following symlinks) and `s3://` must name a configured bucket. Anything else is refused.
The API checks at submission and the worker checks again before it fetches, with this one function.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from core.settings import Settings

CACHE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def check_model_source(url: str, settings: Settings) -> None:
    """Raise ValueError, with a message a user can act on, unless `url` is an allowed model source."""
    if "\x00" in url:
        raise ValueError("model URL must not contain NUL bytes")
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError("model must be a URL: bakehouse://NAME, file:///absolute/dir or s3://bucket/prefix/")
    if scheme == "bakehouse":
        _check_cache_name(url)
    elif scheme == "file":
        _check_file(url, settings.model_root_paths)
    elif scheme == "s3":
        _check_bucket(url, settings.model_bucket_names)
    else:
        raise ValueError(f"model URL scheme {scheme!r} is not allowed; use bakehouse://, file:// or s3://")


def _check_cache_name(url: str) -> None:
    name = url.removeprefix("bakehouse://")
    # The name becomes a directory under the model cache: one plain path segment, never "..".
    if not CACHE_NAME.match(name) or ".." in name:
        raise ValueError(f"bakehouse:// model name {name!r} must match [a-z0-9][a-z0-9._-]* without '..'")


def _check_file(url: str, roots: list[Path]) -> None:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// model must be on this machine, not on host {parts.netloc!r}")
    path = Path(unquote(parts.path))
    if not path.is_absolute():
        raise ValueError("file:// model must be an absolute path: file:///absolute/dir")
    # resolve() follows symlinks, so a link inside a root that points elsewhere is judged by its target.
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ValueError(
            f"file:// model {path} is outside the allowed model roots ({allowed}); see BAKEHOUSE_MODEL_ROOTS"
        )


def _check_bucket(url: str, buckets: frozenset[str]) -> None:
    bucket = urlsplit(url).netloc
    if not bucket:
        raise ValueError("s3:// model must name a bucket: s3://bucket/prefix/")
    if bucket not in buckets:
        hint = f"allowed: {', '.join(sorted(buckets))}" if buckets else "no bucket is allowed"
        raise ValueError(f"s3:// bucket {bucket!r} is not allowed ({hint}); see BAKEHOUSE_MODEL_BUCKETS")
