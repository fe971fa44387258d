"""Opening a store: its options checked, then the storage opened and the projector
started, the parts :class:`~thread_store.store.ThreadStore` wires together."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import metrics, trace

from ._attempt import ProjectionHook
from ._options import backend_options, catch_up_for, check_open_kwargs, check_options, check_target
from .backends import open_storage
from .derive import CodexRules, ProjectionRules, rules_id
from .model import RetryPolicy
from .projector import Projector
from .storage import Storage
from .tracing import Telemetry


def open_parts(target: str | os.PathLike[str], other: dict[str, Any], *, projection: str,
               durability: str, tracer_provider: trace.TracerProvider | None,
               meter_provider: metrics.MeterProvider | None,
               projection_hook: ProjectionHook | None, rules: ProjectionRules | None,
               max_item_bytes: int, coalesce_delay: float, retry: RetryPolicy | None,
               caller_runs: bool, read_only: bool, catch_up_after: float | None,
               ) -> tuple[Storage, Projector | None, ProjectionRules, Telemetry]:
    """The storage, projector (``None``: read-only), rules and telemetry of the store
    :meth:`ThreadStore.open <thread_store.store.ThreadStore.open>` opens; nothing is
    written before every option was checked."""
    where = check_target(target)
    check_open_kwargs(other)
    check_options(projection=projection, durability=durability, tracer_provider=tracer_provider,
                  meter_provider=meter_provider, projection_hook=projection_hook, rules=rules,
                  max_item_bytes=max_item_bytes, coalesce_delay=coalesce_delay, retry=retry,
                  caller_runs=caller_runs, read_only=read_only, catch_up_after=catch_up_after)
    catch_up = catch_up_for(where, catch_up_after)
    rules = rules or CodexRules()
    storage = open_storage(where, durability=durability, read_only=read_only,
                           rules_id=rules_id(rules), options=backend_options(where, other))
    try:
        telemetry = Telemetry(tracer_provider, meter_provider)
        projector = None
        if not read_only:
            projector = Projector(storage, rules, telemetry, hook=projection_hook,
                                  retry=retry or RetryPolicy(), coalesce_delay=coalesce_delay,
                                  caller_runs=caller_runs, catch_up_after=catch_up)
            projector.start(storage.lagging())
    except BaseException:
        storage.close()  # or this process could never open the store again
        raise
    return storage, projector, rules, telemetry
