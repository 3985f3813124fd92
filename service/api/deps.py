"""FastAPI dependencies: everything a route needs comes from the app's state, never a module global.

`create_app` puts one settings object, one backend, one metrics registry, one authenticator and the
finished-inspection sinks on `app.state`; these accessors hand them to routes through `Depends`, which is also what lets
tests build several independent apps in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from service.core.telemetry import Metrics
from service.settings import FiloSettings

if TYPE_CHECKING:
    from service.backends.base import Backend
    from service.core.security import Authenticator
    from service.workflows.inspection import Sinks


def get_settings(request: Request) -> FiloSettings:
    return request.app.state.settings


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_auth(request: Request) -> Authenticator:
    return request.app.state.auth


def get_sinks(request: Request) -> Sinks:
    return request.app.state.sinks


SettingsDep = Annotated[FiloSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
BackendDep = Annotated["Backend", Depends(get_backend)]
AuthDep = Annotated["Authenticator", Depends(get_auth)]
SinksDep = Annotated["Sinks", Depends(get_sinks)]
