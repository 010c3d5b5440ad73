"""What is being served."""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import Pool
from service.schemas import ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse)
async def list_models(pool: Pool) -> ModelsResponse:
    """Every loaded model with its task, input size, labels, engine and batch settings."""
    return ModelsResponse(models=[runner.info(pool.ready) for runner in pool.runners.values()])
