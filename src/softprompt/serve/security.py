"""Who may manage adapters, and which folders they may load: the admin token, loopback rules and adapter roots.

Threat model: anyone who can reach the port. Admin endpoints are off unless a bearer token is configured (or,
on a loopback address only, explicitly enabled without one). A loadable folder must lie under an adapter root after
every symlink is resolved, for the folder and for each file that is read. Files inside the roots are trusted not to
change between the check and the read (whoever can write there can serve their own adapters anyway).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ConfigError
from .config import ADMIN_TOKEN_ENV, ServeConfig
from .errors import BadAdapterPathError, ForbiddenError, UnauthorizedError

# The files ``POST /adapters`` reads from a folder (JSON and safetensors only, never a pickle).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

ADMIN_OFF = (
    f"adapter management is off on this server: start it with --admin-token (or the {ADMIN_TOKEN_ENV} environment "
    "variable) and send 'Authorization: Bearer TOKEN', or with --allow-admin-without-auth on a loopback --host"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (only this machine can connect)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def startup_warnings(cfg: ServeConfig, host: str) -> list[str]:
    """Check the admin settings against the listening host: raise ConfigError for an unsafe combination or an adapter
    root that is not a folder, return one-line warnings for risky settings (the CLI prints them)."""
    for root in cfg.adapter_roots or ():
        if not os.path.isdir(root):
            raise ConfigError(f"--adapter-root {root!r} is not a folder; give the folder that holds the adapters")
    if cfg.allow_admin_without_auth and not is_loopback(host):
        raise ConfigError(
            f"--allow-admin-without-auth needs a loopback --host (127.0.0.1, ::1, localhost), got {host!r}: anyone "
            f"who reaches the port could load and remove adapters; use --admin-token (or {ADMIN_TOKEN_ENV}) instead"
        )
    if cfg.admin_enabled and not is_loopback(host):
        return [(f"warning: admin endpoints (POST/DELETE /adapters) are enabled on {host}, reachable from other "
                 "machines; only holders of the admin token can use them (use TLS in front: the token is a password)")]
    return []


def check_admin(cfg: ServeConfig, authorization: str | None) -> None:
    """Allow an admin request or raise: 403 when admin endpoints are off, 401 without the right bearer token."""
    if not cfg.admin_enabled:
        raise ForbiddenError(ADMIN_OFF)
    if cfg.admin_token is None:  # allow_admin_without_auth (loopback only, checked at startup)
        return
    scheme, _, given = (authorization or "").strip().partition(" ")
    # Starlette decodes header bytes as latin-1; encoding back gives the bytes the client sent. compare_digest takes
    # time independent of where the first difference lies, so the token cannot be guessed byte by byte.
    ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                            cfg.admin_token.encode("ascii"))
    if not ok:
        raise UnauthorizedError(
            "missing or wrong admin token: send 'Authorization: Bearer TOKEN' with the token this server was started "
            f"with (--admin-token or {ADMIN_TOKEN_ENV})"
        )


def default_roots(paths: Iterable[str | os.PathLike]) -> tuple[str, ...]:
    """The parent folders of the given adapter folders (resolved), without repeats, in order."""
    out: list[str] = []
    for p in paths:
        parent = os.path.dirname(os.path.realpath(p))
        if parent not in out:
            out.append(parent)
    return tuple(out)


def _inside(path: str, roots: Sequence[str]) -> bool:
    p = Path(path)
    return any(p == Path(r) or Path(r) in p.parents for r in roots)


def resolve_adapter_path(path: str, roots: Sequence[str]) -> str:
    """The real folder ``path`` names, if it and the files read from it lie under one of ``roots``.

    A relative path is taken relative to each root in turn (the first that holds it wins), never to the server's
    working directory. Raises ForbiddenError (403) for anything that leaves the roots, BadAdapterPathError (400) for
    a path that is not an adapter folder.
    """
    if "\x00" in path:
        raise BadAdapterPathError("adapter path contains a NUL character")
    if not roots:
        raise ForbiddenError(
            "no adapter folder is loadable on this server: it has no adapter root (start it with --adapter-root DIR, "
            "or with --adapter NAME=DIR, whose parent folder becomes the root)"
        )
    real_roots = [os.path.realpath(r) for r in roots]
    if os.path.isabs(path):
        candidates = [os.path.realpath(path)]
    else:
        candidates = [os.path.realpath(os.path.join(r, path)) for r in real_roots]
    inside = [c for c in candidates if _inside(c, real_roots)]
    if not inside:
        raise ForbiddenError(
            f"adapter path {path!r} leads outside the adapter root(s) of this server ({', '.join(roots)}); only "
            "folders under --adapter-root can be loaded"
        )
    folder = next((c for c in inside if os.path.isdir(c)), None)
    if folder is None:
        raise BadAdapterPathError(
            f"adapter folder {path!r} does not exist under the adapter root(s) ({', '.join(roots)}); relative paths "
            "are taken relative to the roots"
        )
    for name in ADAPTER_FILES:
        real = os.path.realpath(os.path.join(folder, name))
        if not _inside(real, real_roots):
            raise ForbiddenError(
                f"{name} in {path!r} is a symlink that leads outside the adapter root(s); copy the file into the "
                "folder instead"
            )
        if not os.path.isfile(real):  # missing, a folder, or a FIFO/device whose read could block or never end
            raise BadAdapterPathError(f"{name} is missing in {path!r} (or not a regular file): it is not a "
                                      "softprompt adapter folder")
    return folder
