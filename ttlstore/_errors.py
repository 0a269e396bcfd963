"""Errors shared by the adapters and their backends."""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(Exception):
    """A shared backend (Redis) failed or did not answer in time.

    Whether the operation took effect is unknown. The original error is the ``__cause__``. The
    idempotency middleware answers it with 503, and so does the rate-limit middleware for a
    limiter whose ``on_error`` policy is ``"raise"``.
    """
