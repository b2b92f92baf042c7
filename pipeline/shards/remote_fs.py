"""What reaching a URL takes besides reading it: opening fsspec's filesystem (redirects kept on the set's own
origin), the kinds of failure and their messages, and the digests an object store keeps of its objects."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError, PipelineError
from pipeline.shards.reading import REMOTE_SCHEMES


class Transient(Exception):
    """A read worth retrying: the answer was cut short."""


class TooLarge(DataError):
    """An answer longer than what this tool reads of that object."""


class Unreachable(DataError):
    """Reads of a URL still failing after their retries (the server down, the network gone)."""


def is_permanent(exc: BaseException) -> bool:
    """Missing objects and refused credentials do not heal by retrying; everything else might."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, RedirectRefused)):
        return True
    status = getattr(exc, "status", None)  # aiohttp's answers; s3fs raises the OSError kinds above
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def permanent_message(base: str, url: str, exc: BaseException) -> str:
    """What a failure that retrying does not heal means, in the words of the fix."""
    text = str(exc)
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = base.partition("://")[2].split("/", 1)[0]
        return (f"{url}: the bucket {bucket!r} does not exist (or these credentials cannot see it); check the "
                "URL's bucket name and the endpoint (AWS_ENDPOINT_URL)")
    if isinstance(exc, FileNotFoundError) or getattr(exc, "status", None) == 404:
        return (f"{url}: missing; check the URL, and that the shard set was uploaded there completely "
                "(`pipeline upload DIR URL`)")
    if isinstance(exc, PermissionError) or getattr(exc, "status", None) in (401, 403):
        return (f"{url}: access refused ({short(exc)}); check the credentials (AWS_* variables, "
                "~/.aws, GOOGLE_APPLICATION_CREDENTIALS) and the object's permissions")
    return f"{url}: refused ({short(exc)}); check the URL"



def short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def file_digest(path: Path, h) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def service_md5(info: dict) -> str | None:
    """The hex MD5 of an object's bytes as its service records it, or None where it does not (an S3 multipart
    upload's ETag is not an MD5 of the bytes)."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
        return etag
    b64 = info.get("md5Hash")
    if isinstance(b64, str):
        import base64
        import binascii

        try:
            return base64.b64decode(b64, validate=True).hex()
        except (binascii.Error, ValueError):
            return None
    return None


class RedirectRefused(Exception):
    """A server redirected a read to another origin (scheme, host, port): not followed."""

    status = None  # not an HTTP error status: `_is_permanent` knows this type

    def __init__(self, target: str):
        super().__init__(target)
        self.target = target


def _same_origin_redirects():
    """An aiohttp trace that stops a redirect to another origin before it is followed: a shard server could
    otherwise point the tool at any address (a private one included). Redirects on the set's own origin are
    followed as before."""
    import aiohttp
    from yarl import URL

    async def on_redirect(session, context, params) -> None:
        location = params.response.headers.get("Location", "")
        target = params.url.join(URL(location))
        if (target.scheme, target.host, target.port) != (params.url.scheme, params.url.host, params.url.port):
            raise RedirectRefused(str(target.with_query(None)))

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(on_redirect)
    return trace


def open_filesystem(url: str, timeout: float):
    scheme = url.partition("://")[0].lower()
    extra = REMOTE_SCHEMES[scheme]
    try:
        import fsspec

        if scheme in ("http", "https"):
            import aiohttp

            fs = fsspec.filesystem("http", client_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout),
                                                          "trace_configs": [_same_origin_redirects()]},
                                   skip_instance_cache=True)
            return fs, url
        kwargs = {}
        if scheme == "s3":
            kwargs = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **kwargs)
        return fs, path.rstrip("/")
    except ImportError as exc:
        raise PipelineError(f"{url}: reading {scheme}:// URLs needs the `{extra}` extra "
                            f"(pip install 'pipeline[{extra}]'; missing: {exc.name})") from None


