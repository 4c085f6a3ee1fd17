"""GET /healthz (the process answers) and GET /readyz (models loaded and warm). No API key needed."""

from __future__ import annotations

from fastapi import APIRouter

from service.app.deps import RegistryDep
from service.app.schemas import Health, ModelRef, Readiness, problem_responses
from service.errors import ModelNotReadyError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process is up and its event loop answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=problem_responses(503),
    summary="Readiness: at least one model is loaded and warmed up",
)
async def readyz(registry: RegistryDep) -> Readiness:
    failed = [f.name for f in registry.failures()]
    if not registry.ready:
        why = f"; failed to load: {', '.join(failed)}" if failed else ""
        msg = f"no model is loaded and warm yet{why}. GET /v1/models says why; fix the bundles and reload them"
        raise ModelNotReadyError(msg)
    models = [ModelRef(name=e.name, version=e.metadata.version) for e in registry.entries()]
    return Readiness(models=models, failed=failed)
