"""The routes' key checks: the bearer header read by FastAPI, judged by `service.core.security`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.deps import AuthDep
from service.core.security import Principal

bearer_scheme = HTTPBearer(auto_error=False, description="API key (admin key for category writes)")


def _key(creds: HTTPAuthorizationCredentials | None) -> str | None:
    return creds.credentials if creds is not None else None


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def require_api_key(creds: Credentials, auth: AuthDep) -> Principal:
    return auth.check_inspect(_key(creds))


def require_reviewer_key(creds: Credentials, auth: AuthDep) -> Principal:
    return auth.check_review(_key(creds))


def require_admin_key(creds: Credentials, auth: AuthDep) -> Principal:
    return auth.check_admin(_key(creds))


Inspector = Annotated[Principal, Depends(require_api_key)]
Reader = Annotated[Principal, Depends(require_api_key)]
Reviewer = Annotated[Principal, Depends(require_reviewer_key)]
Admin = Annotated[Principal, Depends(require_admin_key)]
