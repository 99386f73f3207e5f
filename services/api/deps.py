"""Request dependencies of the control plane, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from services.common.auth import require_key, require_read_key
from services.common.contracts import RUN_ID_PATTERN
from services.common.settings import Settings
from services.common.store import Store


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(app_settings)]
StoreDep = Annotated[Store, Depends(app_store)]
KeyRequired = Annotated[None, Depends(require_key(app_settings))]
ReadKey = Annotated[None, Depends(require_read_key(app_settings))]
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="the run's ID, `<name>-<8 hex>`")]
