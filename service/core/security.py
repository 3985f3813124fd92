"""Bearer API keys, decided from the settings alone: what each key's role may do, and which categories and
sources a limited key may reach. Each check answers who the caller is (a `Principal`): a key configured as
`name:secret` is recorded by its name, a bare key by a short hash of it.

Roles and their rights (docs/records.md, "Keys, roles and limits", has the table route by route):

- camera (`FILO_API_KEYS`): inspect, and read the category catalog; not the records.
- reader (`FILO_READER_KEYS`): read records, kept images, review and threshold history, stats and exports, and
  the catalog (QA dashboards); it neither inspects nor judges.
- reviewer (`FILO_REVIEWER_KEYS`): what a camera and a reader may, and judge records.
- admin (`FILO_ADMIN_KEY`): everything, category writes included.

A camera, reader or reviewer key named in `FILO_KEY_LIMITS` reaches only its categories and sources: outside
them a direct read or an inspection is refused (403 `outside_key_limits`) and lists, exports and counts leave
the records out (the routes pass the limits to the records query).

Keys are compared with `hmac.compare_digest` against every configured key (no early exit on the first
match), so response timing does not reveal how much of a key was right. The production profile refuses
to start with no keys unless `allow_open` says so on purpose; the demo profile runs open. The HTTP side
(reading the bearer header) is `service/api/auth.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from service.core.errors import ServiceError
from service.settings import FiloSettings

INSPECT, CATALOG, READ, REVIEW, ADMIN = "inspect", "catalog", "read", "review", "admin"
ROLES = ("camera", "reader", "reviewer", "admin")  # the configured ones, least to most
RIGHTS: dict[str, frozenset[str]] = {
    "camera": frozenset({CATALOG, INSPECT}),
    "reader": frozenset({CATALOG, READ}),
    "reviewer": frozenset({CATALOG, INSPECT, READ, REVIEW}),
    "admin": frozenset({CATALOG, INSPECT, READ, REVIEW, ADMIN}),
    # the caller of an open server (demo, or allow_open) without inspection keys but with an admin key: it
    # inspects and reads as every caller of an open server always has; judging and writes need the admin key
    "open": frozenset({CATALOG, INSPECT, READ}),
}
# what a refusal says: the keys that would do
_NEEDS = {
    INSPECT: "inspecting needs a camera, reviewer or admin key (FILO_API_KEYS, FILO_REVIEWER_KEYS, FILO_ADMIN_KEY); "
             "a reader key only reads",
    READ: "reading inspection records needs a reader, reviewer or admin key (FILO_READER_KEYS, FILO_REVIEWER_KEYS, "
          "FILO_ADMIN_KEY); a camera key inspects and reads the category catalog only",
    REVIEW: "judging inspections needs a reviewer or admin key (FILO_REVIEWER_KEYS, FILO_ADMIN_KEY)",
}
_KEY_SETTINGS = {"camera": "FILO_API_KEYS", "reader": "FILO_READER_KEYS", "reviewer": "FILO_REVIEWER_KEYS"}


class AuthConfigError(RuntimeError):
    """The settings would expose a production service without keys, or limit keys that do not exist."""


_NAMED_KEY = re.compile(r"^([A-Za-z0-9_.-]{1,64}):(.+)$")


def outside_limits(message: str) -> ServiceError:
    return ServiceError(403, "outside_key_limits", message)


@dataclass(frozen=True)
class Principal:
    """Who presented a key: the name recorded with what they do, the role it grants, and, for a limited key,
    the only categories and sources it reaches (None: every one)."""

    name: str
    role: str
    categories: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None

    def may(self, right: str) -> bool:
        return right in RIGHTS[self.role]

    @property
    def may_review(self) -> bool:
        return self.may(REVIEW)

    @property
    def limited(self) -> bool:
        return self.categories is not None or self.sources is not None

    def reaches_category(self, category: str) -> bool:
        return self.categories is None or category in self.categories

    def reaches(self, category: str, source: str | None) -> bool:
        """Whether a record of `category` from `source` is within this key's limits."""
        return self.reaches_category(category) and (self.sources is None or source in self.sources)

    def check_category(self, category: str) -> None:
        """403 `outside_key_limits` for a category this key is not limited to."""
        if not self.reaches_category(category):
            raise outside_limits(f"this key reaches the categories {', '.join(self.categories or ())} only, "
                                 f"not {category!r}")

    def check_record(self, category: str, source: str | None) -> None:
        """403 `outside_key_limits` for a record outside this key's categories or sources."""
        if not self.reaches(category, source):
            raise outside_limits("this inspection record is outside the categories and sources this key reaches")

    def check_inspection(self, category: str, source: str | None) -> None:
        """A limited key inspects its own categories, and names one of its own sources where it is limited to
        sources (so every record it makes is one it may read)."""
        self.check_category(category)
        if self.sources is not None and source not in self.sources:
            given = f"source {source!r}" if source else "no source"
            raise outside_limits(f"this key inspects for the sources {', '.join(self.sources)} only "
                                 f"(send one as `source`), not {given}")


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


def _names(keys: Iterable[str]) -> set[str]:
    return {_parse_key(k).name for k in keys}


def check_key_limits(settings: FiloSettings) -> None:
    """Every name in `key_limits` is the name of a configured camera, reader or reviewer key (a typo would
    otherwise leave a supplier's key unlimited), and never the admin key's."""
    if not settings.key_limits:
        return
    admin = _names([settings.admin_key]) if settings.admin_key else set()
    limitable = {role: _names(getattr(settings, field)) for role, field in
                 (("camera", "api_keys"), ("reader", "reader_keys"), ("reviewer", "reviewer_keys"))}
    known = set().union(*limitable.values())
    for name in settings.key_limits:
        if name in admin and name not in known:
            raise AuthConfigError(f"FILO_KEY_LIMITS limits {name!r}, the admin key: the admin key changes every "
                                  "category and is never limited; give the limited holder a camera, reader or "
                                  "reviewer key")
        if name not in known:
            configured = ", ".join(sorted(known)) or "none"
            raise AuthConfigError(
                f"FILO_KEY_LIMITS limits {name!r}, but no key of {', '.join(_KEY_SETTINGS.values())} is named "
                f"{name!r} (named keys: {configured}); write the key as '{name}:<secret>' to name it")


def check_auth_config(settings: FiloSettings) -> None:
    check_key_limits(settings)
    if settings.is_demo or settings.allow_open:
        return
    if not (settings.api_keys or settings.reader_keys or settings.reviewer_keys):
        raise AuthConfigError(
            "production profile without API keys: set FILO_API_KEYS='[\"...\"]' "
            "(and FILO_ADMIN_KEY for category writes), or FILO_ALLOW_OPEN=true to run open on purpose"
        )


class Authenticator:
    """Decides, from the settings alone, who a presented key is and whether they may do what they ask."""

    def __init__(self, settings: FiloSettings) -> None:
        check_key_limits(settings)
        self.admin_key = settings.admin_key
        self._keys = {"camera": [_parse_key(k) for k in settings.api_keys],
                      "reader": [_parse_key(k) for k in settings.reader_keys],
                      "reviewer": [_parse_key(k) for k in settings.reviewer_keys],
                      "admin": [_parse_key(settings.admin_key)] if settings.admin_key else []}
        self._limits = {name: (tuple(limit.categories) if limit.categories is not None else None,
                               tuple(limit.sources) if limit.sources is not None else None)
                        for name, limit in settings.key_limits.items()}
        self.metrics_key = settings.metrics_key
        runs_open = settings.is_demo or settings.allow_open
        self.inspect_open = runs_open and not (settings.api_keys or settings.reader_keys or settings.reviewer_keys)
        self.admin_open = self.inspect_open and not settings.admin_key
        self._anonymous = Principal("anonymous", "admin" if self.admin_open else "open")

    def identify(self, key: str) -> Principal | None:
        """The highest role `key` holds (every role's keys are compared, whichever matches), with its limits."""
        found = {role: _find(key, keys) for role, keys in self._keys.items()}
        for role in reversed(ROLES):
            hit = found[role]
            if hit is not None:
                categories, sources = self._limits.get(hit.name, (None, None)) if role != "admin" else (None, None)
                return Principal(hit.name, role, categories, sources)
        return None

    def _unauthorized(self, message: str) -> ServiceError:
        return ServiceError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})

    def authenticate(self, key: str | None) -> Principal:
        """Who presents `key`: 401 for a missing or wrong key, unless the server runs open (then a missing or
        unknown key is the anonymous caller)."""
        if self.inspect_open and key is None:
            return self._anonymous
        if key is None:
            raise self._unauthorized("missing bearer API key")
        who = self.identify(key)
        if who is None:
            if self.inspect_open:
                return self._anonymous
            raise self._unauthorized("wrong API key")
        return who

    def check(self, key: str | None, right: str) -> Principal:
        """The caller, if their role has `right`; 401 without a valid key, 403 `forbidden` with one that may not."""
        who = self.authenticate(key)
        if not who.may(right):
            raise ServiceError(403, "forbidden", _NEEDS.get(right, f"this key may not {right}"))
        return who

    def check_catalog(self, key: str | None) -> Principal:
        """Read the category catalog: any key."""
        return self.check(key, CATALOG)

    def check_inspect(self, key: str | None) -> Principal:
        """Inspect: camera, reviewer and admin keys; a reader key is refused (403)."""
        return self.check(key, INSPECT)

    def check_read(self, key: str | None) -> Principal:
        """Read records, artefacts, stats, exports and histories: reader, reviewer and admin keys; a camera key
        is refused (403)."""
        return self.check(key, READ)

    def check_review(self, key: str | None) -> Principal:
        """Judge inspection records: reviewer and admin keys; camera and reader keys are refused (403)."""
        return self.check(key, REVIEW)

    def check_admin(self, key: str | None) -> Principal:
        if self.admin_open:
            return self._anonymous
        if key is None:
            raise self._unauthorized("missing bearer admin key")
        who = self.identify(key)
        if who is not None and who.may(ADMIN):
            return who
        if who is not None:
            raise ServiceError(403, "forbidden", "category writes need the admin key")
        if not self.admin_key:
            raise ServiceError(403, "forbidden", "no admin key configured (FILO_ADMIN_KEY): writes are disabled")
        raise self._unauthorized("wrong admin key")

    def check_metrics(self, key: str | None) -> None:
        """/metrics: open unless `metrics_key` is set; then that key alone (401 otherwise)."""
        if self.metrics_key is None:
            return
        if key is None or not hmac.compare_digest(key.encode(), self.metrics_key.encode()):
            raise self._unauthorized("/metrics needs the metrics key (FILO_METRICS_KEY) as a bearer key")
