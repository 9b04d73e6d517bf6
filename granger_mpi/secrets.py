"""Credentials in a job: sent where they are needed, never stored or shown.

A job key that may hold a secret (``[output].http_url``) takes either the value itself or
``env:NAME``, read from the environment where it is used (rank 0, at start-up), so that the
job file, which goes into every checkpoint, ``model.h5``, ``metrics.h5`` and ``job.toml``,
holds no secret. A user and password written into a URL are sent (HTTP basic
authentication) but replaced by ``***`` wherever the job is stored or printed.
"""

import os
import re
import urllib.parse

from granger_mpi.errors import UserError

ENV_PREFIX = "env:"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s\"'@]+@")


def is_reference(value):
    """True for ``env:NAME`` (a valid variable name)."""
    return value.startswith(ENV_PREFIX) and bool(_ENV_NAME.match(value[len(ENV_PREFIX):]))


def resolve(value, key):
    """The value of ``key``'s setting: itself, or the variable an ``env:NAME`` names
    (``UserError`` naming the variable, never a value, when it is not set)."""
    if not value.startswith(ENV_PREFIX):
        return value
    name = value[len(ENV_PREFIX):]
    if name not in os.environ:
        raise UserError(f"{key} = {value!r}: the environment variable {name} is not set")
    return os.environ[name]


def redact_url(url):
    """``url`` with any user and password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query,
                                    parts.fragment))


def redact_text(text):
    """``text`` (a job file) with the credentials of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
