"""Engines the tests can watch and steer: batch sizes recorded, batches held in the
engine until the test lets them go, a delay or a failure injected."""

from __future__ import annotations

import threading
import time

from service.engines import create_engine

RELEASE_TIMEOUT_S = 30


class InstrumentedEngine:
    """A real engine that records batch sizes and can be held, slowed down or made to fail."""

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.description = inner.description
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []
        self.fail = False
        self._released = threading.Event()
        self._released.set()

    def hold(self) -> None:
        """Batches reaching the engine from now on wait in it until `release()`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def run(self, inputs):
        (batch,) = inputs.values()
        self.batch_sizes.append(int(batch.shape[0]))
        if not self._released.wait(RELEASE_TIMEOUT_S):
            raise TimeoutError("the test never released the engine")
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("engine failure injected by the test")
        return self.inner.run(inputs)

    def close(self) -> None:
        self.inner.close()


class InstrumentedFactory:
    """engine_factory building InstrumentedEngines; `gate` holds model loading back."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.engines: list[InstrumentedEngine] = []
        self.settings: list = []  # what each engine was made with, in order

    def __call__(self, bundle, settings) -> InstrumentedEngine:
        if self.gate is not None and not self.gate.wait(RELEASE_TIMEOUT_S):
            raise TimeoutError("the test never opened the loading gate")
        engine = InstrumentedEngine(create_engine(bundle, settings), self.delay_s)
        self.engines.append(engine)
        self.settings.append(settings)
        return engine

    @property
    def batch_sizes(self) -> list[int]:
        return [size for engine in self.engines for size in engine.batch_sizes]
