"""A workdir on object storage: stage outputs in a bucket that several machines share.

``[pipeline] workdir`` may be a URL (``s3://bucket/prefix``, ``gs://…``, ``file:///…`` or any
other protocol that pyarrow or fsspec knows). A :class:`Store` is that URL opened through
pyarrow's filesystem layer (``pyarrow.fs``; fsspec's implementation wrapped in
``pyarrow.fs.PyFileSystem`` for the protocols pyarrow lacks). Credentials and endpoint come from
the filesystem's usual environment and configuration (for S3: the AWS variables and profiles,
``AWS_ENDPOINT_URL`` for a MinIO-style server); this module never reads, stores or prints them,
and :func:`redact` strips a URL's user-info and secret query parameters before it is shown.

An object store has no rename, so the stage contract's "build in a hidden directory, rename into
place" becomes "build in a local scratch directory, upload the files, write ``manifest.json``
**last**" (:func:`pipeline.stage.build_stage` with a store): an output is complete exactly when
its manifest object exists, and a worker killed mid-upload leaves objects that no reader takes
for an output. A single object's upload is itself all-or-nothing on S3 (a killed multipart
upload leaves no object); on a ``file://`` store a killed write can leave a truncated file, which
the manifest (absent, or failing its own checksum) keeps from counting.

Everything here is plain Python over ``pyarrow.fs``: the bottom layer of the project, beside
the stage contract that uses it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

from pipeline.errors import InputError

#: ``scheme://`` at the start of a workdir or input: a URL, not a local path.
URL_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: Query parameters that may carry a secret (pyarrow's S3 URI options, common tokens).
SECRET_QUERY_KEYS = {"access_key", "secret_key", "session_token", "token", "password",
                     "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "sig",
                     "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token"}
#: Environment variables whose values must never appear in an error we raise.
SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                      "GOOGLE_APPLICATION_CREDENTIALS")
#: S3 client limits: an unreachable endpoint fails in seconds, not after the SDK's minutes.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_MAX_ATTEMPTS = 3
CHUNK = 1 << 20


def is_url(location: object) -> bool:
    """Whether ``location`` names a store (``scheme://…``) rather than a local path."""
    return isinstance(location, str) and bool(URL_PATTERN.match(location))


def redact(url: str) -> str:
    """``url`` as it may be shown: no user-info (``key:secret@``), no secret query values."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username or parts.password:
        netloc = f"***@{netloc}"
    query = urlencode([(k, "***" if k.lower() in SECRET_QUERY_KEYS else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(text: str) -> str:
    """An error text from a storage library, with any secret of the environment blanked out."""
    for name in SECRET_ENVIRONMENT:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = re.sub(r"(?i)(secret|token|signature|credential)=[^&\s]+", r"\1=***", text)
    return " ".join(text.split())[:300]


def _reason(exc: BaseException) -> str:
    """What went wrong, in words a user can act on, from a pyarrow/fsspec storage error."""
    text = str(exc)
    upper = text.upper()
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        return "the bucket does not exist"
    if any(s in upper for s in ("NETWORK_CONNECTION", "COULD NOT CONNECT", "CURLCODE", "TIMED OUT",
                                "NAME RESOLUTION", "COULDN'T RESOLVE", "CONNECTION REFUSED")):
        return "the storage endpoint cannot be reached"
    if any(s in upper for s in ("ACCESS_DENIED", "ACCESSDENIED", "INVALID_ACCESS_KEY", "INVALIDACCESSKEY",
                                "SIGNATURE_DOES_NOT_MATCH", "SIGNATUREDOESNOTMATCH", "FORBIDDEN",
                                "HTTP STATUS 403", "MISSING_AUTHENTICATION", "UNRECOGNIZEDCLIENT",
                                "NO CREDENTIALS", "UNABLE TO LOCATE CREDENTIALS", "INVALID_SIGNATURE")):
        return ("access denied: credentials are missing or not valid for this bucket (for S3: "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)")
    return _scrub(text)


def s3_credentials_visible(url: str = "") -> bool:
    """Whether any source of S3 credentials is configured that the AWS SDK's default chain reads
    without a network call: the URL's user-info, the AWS variables, a profile or credentials
    file, web identity, container credentials. (An instance role is not visible from here; set
    ``AWS_EC2_METADATA_DISABLED`` = false to declare that one is meant to be used.)"""
    if urlsplit(url).username:
        return True
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if any(os.environ.get(name) for name in names):
        return True
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "false":
        return True
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
             os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"]
    return any(Path(f).expanduser().is_file() for f in files)


def _open_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem behind ``url`` and the root path inside it (no trailing slash)."""
    display = redact(url)
    scheme = URL_PATTERN.match(url).group(1).lower()
    if scheme in ("s3", "s3a"):
        parts = urlsplit(url)
        bucket = parts.hostname or ""
        if not bucket:
            raise InputError("the S3 URL names no bucket (s3://BUCKET/prefix)", display)
        options = dict(parse_qsl(parts.query))
        endpoint = (options.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        kwargs = dict(region=options.get("region") or os.environ.get("AWS_REGION")
                      or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                      connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS))
        if endpoint:
            kwargs["endpoint_override"] = endpoint
        if parts.username:   # s3://KEY:SECRET@bucket: allowed, never echoed
            kwargs.update(access_key=parts.username, secret_key=parts.password or "")
        fs = pafs.S3FileSystem(**kwargs)
        return fs, f"{bucket}{parts.path}".rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(url)
        return fs, path.rstrip("/") or "/"
    except ValueError as exc:   # pyarrow.ArrowInvalid: a protocol pyarrow does not implement
        pyarrow_reason = exc
    except OSError as exc:
        raise InputError(f"cannot open the store: {_reason(exc)}", display) from None
    import fsspec

    try:
        implementation = fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError) as exc:
        known = "s3, gs, file, and the protocols of fsspec's registry"
        raise InputError(f"unknown storage protocol {scheme!r} ({_scrub(str(exc)) or pyarrow_reason}); "
                         f"supported: {known}", display) from None
    try:
        fs = implementation()
    except Exception as exc:   # noqa: BLE001 - any constructor failure is a bad workdir URL
        raise InputError(f"cannot open the store: {_reason(exc)}", display) from None
    root = implementation._strip_protocol(url).rstrip("/")
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


class Store:
    """One workdir URL opened through ``pyarrow.fs``; paths inside it are ``/``-relative strings."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.display = redact(self.url)
        self.fs, self.root = _open_filesystem(self.url)

    def __repr__(self) -> str:
        return f"Store({self.display})"

    # --- names ----------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        rel = str(rel).strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """``rel`` as a (redacted) URL, for messages and manifests."""
        rel = str(rel).strip("/")
        return f"{self.display}/{rel}" if rel else self.display

    def error(self, exc: BaseException, rel: str, action: str) -> InputError:
        return InputError(f"{action} failed: {_reason(exc)}", self.url_of(rel))

    # --- checks ---------------------------------------------------------------------------
    def check(self) -> None:
        """Fail now, with one :class:`InputError` naming the URL, if the store cannot be used:
        a missing bucket, missing or wrong credentials, an unreachable endpoint."""
        try:
            if isinstance(self.fs, pafs.S3FileSystem):
                bucket = self.root.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise InputError(f"the bucket {bucket!r} does not exist (create it first)",
                                     self.display)
            # a listing exercises the credentials (read access) and the endpoint
            self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except InputError:
            raise
        except (OSError, ValueError) as exc:
            reason = _reason(exc)
            if isinstance(self.fs, pafs.S3FileSystem) and not s3_credentials_visible(self.url) \
                    and "cannot be reached" not in reason:
                reason = ("no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                          f"AWS_PROFILE or a credentials file); the server answered: {reason}")
            raise InputError(f"the store cannot be used: {reason}", self.display) from None

    # --- objects --------------------------------------------------------------------------
    def info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(rel))
        except (OSError, ValueError) as exc:
            raise self.error(exc, rel, "reading object information") from None

    def exists(self, rel: str) -> bool:
        return self.info(rel).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as handle:
                return handle.read()
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            if self.info(rel).type == pafs.FileType.NotFound:
                raise FileNotFoundError(self.url_of(rel)) from None
            raise self.error(exc, rel, "reading") from None

    def _make_parent(self, rel: str) -> None:
        """Object stores have no directories; a file-backed store needs the parent to exist."""
        if self.fs.type_name not in ("s3", "gcs"):
            parent = self.path(rel).rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            self._make_parent(rel)
            with self.fs.open_output_stream(self.path(rel)) as handle:
                handle.write(data)
        except (OSError, ValueError) as exc:
            raise self.error(exc, rel, "writing") from None

    def upload(self, local: Path, rel: str) -> None:
        """Copy the local file ``local`` to the object ``rel`` (one object, all or nothing)."""
        try:
            self._make_parent(rel)
            with open(local, "rb") as source, self.fs.open_output_stream(self.path(rel)) as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
        except (OSError, ValueError) as exc:
            if isinstance(exc, FileNotFoundError) and not Path(local).exists():
                raise
            raise self.error(exc, rel, "uploading") from None

    def download(self, rel: str, local: Path) -> str:
        """Copy the object ``rel`` to the local file ``local`` (written under a temporary name
        and renamed); return its sha256."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        try:
            with self.fs.open_input_stream(self.path(rel)) as source, open(tmp, "wb") as target:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    target.write(chunk)
            os.replace(tmp, local)
        except (OSError, ValueError) as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if self.info(rel).type == pafs.FileType.NotFound:
                raise FileNotFoundError(self.url_of(rel)) from None
            raise self.error(exc, rel, "downloading") from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return digest.hexdigest()

    def sha256(self, rel: str) -> str:
        """sha256 of an object's content, streamed (nothing kept locally)."""
        digest = hashlib.sha256()
        try:
            with self.fs.open_input_stream(self.path(rel)) as source:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
        except (OSError, ValueError) as exc:
            raise self.error(exc, rel, "reading") from None
        return digest.hexdigest()

    def list_files(self, rel: str = "") -> dict[str, pafs.FileInfo]:
        """Every object below ``rel`` (recursive) as ``relative path -> FileInfo``; {} if none."""
        base = self.path(rel)
        try:
            found = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except (OSError, ValueError) as exc:
            raise self.error(exc, rel, "listing") from None
        prefix = base.rstrip("/") + "/"
        return {info.path[len(prefix):]: info for info in found
                if info.type == pafs.FileType.File and info.path.startswith(prefix)}

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the entries directly below ``rel`` that hold objects (one level)."""
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        except (OSError, ValueError) as exc:
            raise self.error(exc, rel, "listing") from None
        return sorted(info.base_name for info in found if info.type == pafs.FileType.Directory)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            try:
                self.fs.delete_file(self.path(rel))
            except (OSError, ValueError) as exc:
                if self.info(rel).type != pafs.FileType.NotFound:
                    raise self.error(exc, rel, "deleting") from None

    def delete_tree(self, rel: str) -> None:
        """Delete every object below ``rel`` (nothing if there are none)."""
        for name in self.list_files(rel):
            self.delete(f"{rel}/{name}")
        with contextlib.suppress(OSError, ValueError):   # the "directory" marker, where one exists
            if self.info(rel).type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(rel))


_STORES: dict[tuple, Store] = {}


def open_store(url: str) -> Store:
    """The :class:`Store` of ``url``, one per process and endpoint (a client is not free to
    create; the endpoint variables are part of the key, so a changed endpoint opens anew)."""
    key = (url, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    if key not in _STORES:
        _STORES[key] = Store(url)
    return _STORES[key]


def iter_chunks(store: Store, rel: str) -> Iterator[bytes]:
    with store.fs.open_input_stream(store.path(rel)) as source:
        while chunk := source.read(CHUNK):
            yield chunk


def copy_tree_to_local(store: Store, rel: str, local: Path, *, keep_existing: bool = True) -> list[str]:
    """Download every object below ``rel`` into ``local`` (a resumed build's parts); files that
    already exist locally are kept when ``keep_existing`` (this machine's own, newer pieces)."""
    fetched = []
    for name, info in sorted(store.list_files(rel).items()):
        target = Path(local) / name
        if any(part.startswith(".") and part.endswith(".tmp") for part in Path(name).parts):
            continue
        if keep_existing and target.exists():
            continue
        store.download(f"{rel}/{name}", target)
        fetched.append(name)
    return fetched


def remove_local_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class LocalObjectCache:
    """A size-bounded local copy of store objects, keyed by their content (sha256).

    A teacher-cache reader on a URL workdir fetches a shard here the first time it reads it, so
    the second epoch reads local disk instead of downloading again. Entries are named by the
    sha256 the manifest records (content-addressed: an entry is never stale) and are checked
    against it as they download. When a new entry would exceed ``max_bytes`` the least recently
    used entries go first; an object larger than the whole budget is not cached (the reader then
    streams it with ranged reads). Several processes may share one directory: entries are written
    under a temporary name and renamed, and an entry deleted while another process has it open
    stays readable to that process (POSIX unlink).
    """

    def __init__(self, root: Path | str, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def _entry(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.glob("*/*") if p.is_file() and not p.name.startswith(".")]

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def get(self, store: Store, rel: str, size: int, sha256: str) -> Path | None:
        """The local copy of ``rel`` (fetched now if missing), or None when it cannot fit."""
        entry = self._entry(sha256)
        if entry.is_file():
            with contextlib.suppress(OSError):
                os.utime(entry)   # recently used: evicted last
            return entry
        if size > self.max_bytes:
            return None
        self._make_room(size)
        digest = store.download(rel, entry)
        if digest != sha256:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            raise InputError("content differs from the manifest (sha256) while fetching it into the "
                             "local cache", store.url_of(rel))
        return entry

    def _make_room(self, size: int) -> None:
        entries = []
        for path in self.entries():
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        used = sum(e[1] for e in entries)
        for _, entry_size, path in sorted(entries):
            if used + size <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            used -= entry_size
