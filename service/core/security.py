"""Bearer API keys, decided from the settings alone: camera (inspection) keys, reviewer keys that may also
judge inspection records, and a separate admin key for writes. Each check answers who the caller is (a
`Principal`): a key configured as `name:secret` is recorded by its name, a bare key by a short hash of it.

Keys are compared with `hmac.compare_digest` against every configured key (no early exit on the first
match), so response timing does not reveal how much of a key was right. The production profile refuses
to start with no keys unless `allow_open` says so on purpose; the demo profile runs open. The HTTP side
(reading the bearer header) is `service/api/auth.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

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


_NAMED_KEY = re.compile(r"^([A-Za-z0-9_.-]{1,64}):(.+)$")
ROLES = ("camera", "reviewer", "admin")  # each may do what the ones before it may


@dataclass(frozen=True)
class Principal:
    """Who presented a key: the name recorded with what they do, and the role it grants."""

    name: str
    role: str

    @property
    def may_review(self) -> bool:
        return self.role in ("reviewer", "admin")


@dataclass(frozen=True)
class _Key:
    secret: str
    whole: str  # the configured string: a key configured as "a:b" before names existed keeps working
    name: str


def _parse_key(configured: str) -> _Key:
    named = _NAMED_KEY.match(configured)
    if named:
        return _Key(named.group(2), configured, named.group(1))
    return _Key(configured, configured, "key-" + hashlib.sha256(configured.encode()).hexdigest()[:8])


def _find(candidate: str, keys: list[_Key]) -> _Key | None:
    """The key `candidate` is (its secret or its whole configured string), comparing against every key."""
    found: _Key | None = None
    for key in keys:
        hit = hmac.compare_digest(candidate.encode(), key.secret.encode())
        hit |= hmac.compare_digest(candidate.encode(), key.whole.encode())
        if hit and found is None:
            found = key
    return found


class Authenticator:
    """Decides, from the settings alone, whether a presented key may inspect or administer."""

    def __init__(self, settings: FiloSettings) -> None:
        self.api_keys = list(settings.api_keys)
        self.admin_key = settings.admin_key
        self._keys = {"camera": [_parse_key(k) for k in settings.api_keys],
                      "reviewer": [_parse_key(k) for k in settings.reviewer_keys],
                      "admin": [_parse_key(settings.admin_key)] if settings.admin_key else []}
        runs_open = settings.is_demo or settings.allow_open
        self.inspect_open = runs_open and not settings.api_keys and not settings.reviewer_keys
        self.admin_open = runs_open and not settings.admin_key and not settings.api_keys \
            and not settings.reviewer_keys

    def identify(self, key: str) -> Principal | None:
        """The highest role `key` holds (every role's keys are compared, whichever matches)."""
        found = {role: _find(key, keys) for role, keys in self._keys.items()}
        for role in reversed(ROLES):
            if found[role] is not None:
                return Principal(found[role].name, role)  # type: ignore[union-attr]
        return None

    def check_read(self, key: str | None) -> Principal:
        """Inspect and read records: any key."""
        if self.inspect_open and key is None:
            return Principal("anonymous", "admin" if self.admin_open else "camera")
        if key is None:
            raise self._unauthorized("missing bearer API key")
        who = self.identify(key)
        if who is None:
            if self.inspect_open:
                return Principal("anonymous", "admin" if self.admin_open else "camera")
            raise self._unauthorized("wrong API key")
        return who

    def check_review(self, key: str | None) -> Principal:
        """Judge inspection records: reviewer and admin keys; camera keys are refused (403)."""
        who = self.check_read(key)
        if who.may_review or (self.inspect_open and who.name == "anonymous" and not self._keys["admin"]):
            return who
        raise ServiceError(403, "forbidden", "judging inspections needs a reviewer or admin key "
                           "(FILO_REVIEWER_KEYS, FILO_ADMIN_KEY)")

    def _unauthorized(self, message: str) -> ServiceError:
        return ServiceError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})

    def check_inspect(self, key: str | None) -> Principal:
        return self.check_read(key)

    def check_admin(self, key: str | None) -> Principal:
        if self.admin_open:
            return Principal("anonymous", "admin")
        if key is None:
            raise self._unauthorized("missing bearer admin key")
        who = self.identify(key)
        if who is not None and who.role == "admin":
            return who
        if who is not None:
            raise ServiceError(403, "forbidden", "category writes need the admin key")
        if not self.admin_key:
            raise ServiceError(403, "forbidden", "no admin key configured (FILO_ADMIN_KEY): writes are disabled")
        raise self._unauthorized("wrong admin key")
