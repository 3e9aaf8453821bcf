"""Model back ends. Each streams deltas through the small interface in :mod:`.base`."""

from .base import (
    ContentDelta,
    Delta,
    FinishDelta,
    ModelRequest,
    Provider,
    ProviderError,
    ReasoningDelta,
    ToolCallDelta,
    ToolSpec,
    UsageDelta,
    resolve_model,
)

__all__ = [
    "ContentDelta",
    "Delta",
    "FinishDelta",
    "ModelRequest",
    "Provider",
    "ProviderError",
    "ReasoningDelta",
    "ToolCallDelta",
    "ToolSpec",
    "UsageDelta",
    "resolve_model",
]
