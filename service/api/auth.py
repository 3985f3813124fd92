"""The routes' key checks: the bearer header read by FastAPI, judged by `service.core.security`.

One annotation per right, so a route says what it needs in its signature: `Catalog` (any key), `Inspector`
(camera, reviewer, admin), `Reader` (reader, reviewer, admin), `Reviewer`, `Admin`. The principal they give
carries the key's limits; a route that reads one record or category checks them (`Principal.check_record`,
`check_category`), and a route that lists, exports or counts records passes them to the query
(`scoped`), so a limited key never sees another category's or source's records.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.deps import AuthDep
from service.core.security import Principal
from service.records.model import RecordQuery

bearer_scheme = HTTPBearer(auto_error=False, description="API key: camera, reader, reviewer or admin "
                           "(docs/records.md, Keys, roles and limits)")
metrics_scheme = HTTPBearer(auto_error=False, scheme_name="MetricsKey",
                            description="the metrics key (FILO_METRICS_KEY), where one is set")


def _key(creds: HTTPAuthorizationCredentials | None) -> str | None:
    return creds.credentials if creds is not None else None


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def require_catalog_key(creds: Credentials, auth: AuthDep) -> Principal:
    return auth.check_catalog(_key(creds))


def require_api_key(creds: Credentials, auth: AuthDep) -> Principal:
    """A key that may inspect."""
    return auth.check_inspect(_key(creds))


def require_reader_key(creds: Credentials, auth: AuthDep) -> Principal:
    return auth.check_read(_key(creds))


def require_reviewer_key(creds: Credentials, auth: AuthDep) -> Principal:
    return auth.check_review(_key(creds))


def require_admin_key(creds: Credentials, auth: AuthDep) -> Principal:
    return auth.check_admin(_key(creds))


def require_metrics_key(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(metrics_scheme)],
                        auth: AuthDep) -> None:
    auth.check_metrics(_key(creds))


Catalog = Annotated[Principal, Depends(require_catalog_key)]
Inspector = Annotated[Principal, Depends(require_api_key)]
Reader = Annotated[Principal, Depends(require_reader_key)]
Reviewer = Annotated[Principal, Depends(require_reviewer_key)]
Admin = Annotated[Principal, Depends(require_admin_key)]


def scoped(query: RecordQuery, who: Principal) -> RecordQuery:
    """`query` narrowed to the categories and sources `who` is limited to (unchanged for an unlimited key)."""
    if not who.limited:
        return query
    return replace(query, allowed_categories=who.categories, allowed_sources=who.sources)
