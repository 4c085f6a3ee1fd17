"""Optional API keys: header `X-API-Key`, several keys, constant-time comparison.

With `ANOSCOPE_API_KEYS` set, every route that includes `require_api_key` answers 401 before it reads
the request body; that is every route, the API description (`/openapi.json`, `/docs`, `/redoc`)
included, except `/healthz`, `/readyz`, the operator page's static shell (`/`, `/static/*`) and the
API pages' scripts (`/docs-assets/*`): they hold no data and run no model; the operator page asks for
the key and sends it with each call.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key without
stopping early, so the time taken says neither which key nor how much of one matched. Keys are never
logged: settings hold them as `SecretStr`, and errors name no key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from service.errors import AuthenticationError

HEADER = "X-API-Key"

api_key_header = APIKeyHeader(
    name=HEADER,
    auto_error=False,
    scheme_name="ApiKey",
    description="required when the service is configured with ANOSCOPE_API_KEYS",
)


def key_digests(keys: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k).digest() for k in keys)


def key_matches(candidate: str, digests: tuple[bytes, ...]) -> bool:
    """Constant-time check of a presented key against every configured key's digest."""
    # Starlette decodes header bytes as latin-1, so this round-trips the bytes the client sent.
    presented = hashlib.sha256(candidate.encode("latin-1", errors="replace")).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest)
    return matched


async def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> None:
    """Dependency: pass when no keys are configured or a valid key was sent, else AuthenticationError."""
    digests: tuple[bytes, ...] = request.app.state.api_key_digests
    if not digests:
        return
    if not key:
        msg = f"this endpoint needs an API key: send it in the {HEADER} header"
        raise AuthenticationError(msg)
    if not key_matches(key, digests):
        msg = f"the {HEADER} header does not hold a valid API key; ask the service's operator for one"
        raise AuthenticationError(msg)
