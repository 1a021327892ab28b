"""Optional API keys (``Authorization: Bearer KEY``). Each key maps to a tenant; with keys configured, every data
endpoint requires one, and the store query is filtered to that tenant. Health endpoints stay open."""

from __future__ import annotations

import hmac


class AuthError(Exception):
    pass


def tenant_for(header: str | None, keys: dict[str, str]) -> str | None:
    """The tenant of the request's key; None when auth is off. Raises AuthError for a missing or unknown key."""
    if not keys:
        return None
    if not header or not header.lower().startswith("bearer "):
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    given = header[7:].strip()
    for key, tenant in keys.items():
        if hmac.compare_digest(given.encode(), key.encode()):  # constant time: no key-guessing by timing
            return tenant
    raise AuthError("invalid API key")
