"""The warning category of this library, so that a test run can turn its warnings into errors."""

from __future__ import annotations

__all__ = ["MllmMetricsWarning"]


class MllmMetricsWarning(UserWarning):
    """A result may not be what you expect: the message says why and what to change.

    Raised, for example, when DDP exactness cannot be guaranteed for a loader, or when a model
    cannot be split and the full logits are computed after all. Filter it like any warning:
    ``warnings.filterwarnings("error", category=MllmMetricsWarning)`` makes each one an error.
    """
