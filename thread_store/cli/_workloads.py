"""Commands that run a workload: ``demo`` (optionally traced) and ``bench``."""

from __future__ import annotations

import importlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import click

import thread_store
from thread_store import ThreadStore
from thread_store.demo import run_demo

from ._output import clip, echo_threads, example, fail, plural, progress

if TYPE_CHECKING:
    from thread_store.otel_setup import TraceDelivery

#: Any of these set turns the demo's tracing on, as the OpenTelemetry SDK would read them.
_OTEL_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")


@click.command(epilog=example("thread-store demo --threads 20 --otlp-endpoint http://127.0.0.1:4318"))
@click.option("--threads", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--seed", type=int, help="Seed of the generated content and interleaving.")
@click.option("--otlp-endpoint", metavar="URL", help="Export traces over OTLP/HTTP, e.g. to Jaeger.")
@click.option("--trace-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the traces as OTLP/JSON lines (Jaeger UI: Upload JSON).")
@click.pass_obj
def demo(store_path: Path, threads: int, seed: int | None, otlp_endpoint: str | None,
         trace_file: Path | None) -> None:
    """Append realistic Codex sessions to new threads, live-agent style, then list them.

    Without --otlp-endpoint/--trace-file, tracing still follows the OTEL_* environment
    variables when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER is set.
    """
    tracing = _start_tracing(otlp_endpoint, trace_file)
    latencies: list[float] = []
    flushed = 0

    def observe(seconds: float, barrier: bool) -> None:
        nonlocal flushed
        if barrier:
            flushed += 1
        else:
            latencies.append(seconds)

    try:
        with ThreadStore.open(store_path) as store, ExitStack() as bars:
            started = time.perf_counter()
            metas = run_demo(store, threads, seed, on_append=observe,
                             progress=progress(bars, "sessions") if threads >= 100 else None)
            elapsed = time.perf_counter() - started
    finally:
        delivery = tracing.stop() if tracing is not None else None
    echo_threads(metas)
    p50 = statistics.median(latencies) * 1000 if latencies else 0.0
    click.echo(f"demo: {plural(len(metas), 'thread')}, {plural(len(latencies) + flushed, 'append')} "
               f"({flushed} append_and_flush) in {elapsed:.2f} s; p50 append {p50:.3f} ms; "
               f"store {store_path}")
    if tracing is not None and delivery is not None and delivery.failed:
        fail(f"{delivery.failed} of {delivery.failed + delivery.delivered} spans could not be "
             f"delivered: {tracing.first_warning or 'the exporter reported a failure'}", 1)


@click.command(context_settings={"ignore_unknown_options": True},
               epilog=example("thread-store bench --quick --out bench-results",
                              "thread-store bench -- --help"))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the benchmarks (python -m benchmarks ARGS) from a source checkout."""
    ctx.exit(_benchmarks_main()(list(args)))


class _Tracing(logging.Handler):
    """The demo's tracing: stops the SDK, and keeps the exporters' first warning, so a
    collector that is down makes one line of output, not one per retry."""

    def __init__(self, stop: Callable[[], TraceDelivery]) -> None:
        super().__init__(logging.WARNING)
        self._stop = stop
        self.first_warning: str | None = None
        self._logger = logging.getLogger("opentelemetry")
        self._logger.addHandler(self)
        self._logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.first_warning is None:
            self.first_warning = clip(record.getMessage(), 300)

    def stop(self) -> TraceDelivery:
        """Flush and shut down the SDK; return what was delivered."""
        try:
            return self._stop()
        finally:
            self._logger.removeHandler(self)
            self._logger.propagate = True


def _start_tracing(endpoint: str | None, trace_file: Path | None) -> _Tracing | None:
    """Configure the OpenTelemetry SDK for the demo; ``None`` when tracing is off."""
    if not (endpoint or trace_file or any(os.environ.get(name) for name in _OTEL_ENV)):
        return None
    try:
        from thread_store.otel_setup import DEFAULT_SERVICE_NAME, configure_tracing
    except ImportError as exc:
        raise click.ClickException(f"tracing needs the OpenTelemetry SDK and exporter: "
                                   f"pip install 'thread_store[otlp]' ({exc})") from exc
    try:
        return _Tracing(configure_tracing(DEFAULT_SERVICE_NAME, endpoint,
                                          str(trace_file) if trace_file else None))
    except (RuntimeError, ValueError, OSError) as exc:
        raise click.ClickException(f"cannot set up tracing: {exc}") from exc


def _benchmarks_main() -> Callable[[list[str]], int]:
    """``benchmarks.__main__.main``; the package lives in a source checkout, not the wheel."""
    checkout = Path(thread_store.__file__).resolve().parent.parent
    try:
        module = importlib.import_module("benchmarks.__main__")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks" or not (checkout / "benchmarks" / "__main__.py").is_file():
            raise click.ClickException(
                "the benchmarks are not importable: they live in benchmarks/ of a source checkout "
                f"and need the bench extra (pip install -e '.[bench]'); {exc}") from exc
        sys.path.insert(0, str(checkout))  # an editable install: the checkout is right there
        module = importlib.import_module("benchmarks.__main__")
    main: Callable[[list[str]], int] = module.main
    return main
