"""Bearer API keys, decided from the settings alone: inspection keys and a separate admin key for writes.

Keys are compared with `hmac.compare_digest` against every configured key (no early exit on the first
match), so response timing does not reveal how much of a key was right. The production profile refuses
to start with no keys unless `allow_open` says so on purpose; the demo profile runs open. The HTTP side
(reading the bearer header) is `service/api/auth.py`.
"""

from __future__ import annotations

import hmac

from service.core.errors import ServiceError
from service.settings import FiloSettings


class AuthConfigError(RuntimeError):
    """The settings would expose a production service without keys."""


def check_auth_config(settings: FiloSettings) -> None:
    if settings.is_demo or settings.allow_open:
        return
    if not settings.api_keys:
        raise AuthConfigError(
            "production profile without API keys: set FILO_API_KEYS='[\"...\"]' "
            "(and FILO_ADMIN_KEY for category writes), or FILO_ALLOW_OPEN=true to run open on purpose"
        )


def _matches(candidate: str, keys: list[str]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


class Authenticator:
    """Decides, from the settings alone, whether a presented key may inspect or administer."""

    def __init__(self, settings: FiloSettings) -> None:
        self.api_keys = list(settings.api_keys)
        self.admin_key = settings.admin_key
        runs_open = settings.is_demo or settings.allow_open
        self.inspect_open = runs_open and not settings.api_keys
        self.admin_open = runs_open and not settings.admin_key and not settings.api_keys

    def _unauthorized(self, message: str) -> ServiceError:
        return ServiceError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})

    def check_inspect(self, key: str | None) -> None:
        if self.inspect_open:
            return
        if key is None:
            raise self._unauthorized("missing bearer API key")
        admin = [self.admin_key] if self.admin_key else []
        if not _matches(key, self.api_keys + admin):
            raise self._unauthorized("wrong API key")

    def check_admin(self, key: str | None) -> None:
        if self.admin_open:
            return
        if key is None:
            raise self._unauthorized("missing bearer admin key")
        if self.admin_key and _matches(key, [self.admin_key]):
            return
        if _matches(key, self.api_keys):
            raise ServiceError(403, "forbidden", "category writes need the admin key")
        if not self.admin_key:
            raise ServiceError(403, "forbidden", "no admin key configured (FILO_ADMIN_KEY): writes are disabled")
        raise self._unauthorized("wrong admin key")
