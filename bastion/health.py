"""``/healthz`` and ``/readyz``.

``/healthz``: the process runs and its event loop answers (liveness; stays 200 while the
gateway drains, so a platform never kills a draining replica early).

``/readyz``: this replica should get new connections. 503 at once when it drains
(SIGTERM), and while any check fails:

* ``recordings``: the recordings store answers its start-up check (bucket, Object Lock,
  versioning) and uploads are not failing. The check costs a few requests, so its result
  is kept for :data:`STORE_TTL` seconds, and one slow store never piles up checks: a
  check still running after :data:`CHECK_TIMEOUT` seconds counts as failed;
* ``state``: the state database answers a trivial query within :data:`CHECK_TIMEOUT`;
* ``oidc_keys``: every issuer's signing keys are cached.

The answer is JSON: ``{"ready": bool, "draining": bool, "checks": {name: bool},
"problems": {name: "why"}}``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.services import Services

STORE_TTL = 5.0
# A failing store is checked again sooner, so that readiness comes back quickly.
STORE_FAILED_TTL = 1.0
CHECK_TIMEOUT = 3.0


class Readiness:
    def __init__(self, gateway: Services, store_ttl: float = STORE_TTL, timeout: float = CHECK_TIMEOUT) -> None:
        self.gw = gateway
        self.store_ttl = store_ttl
        self.timeout = timeout
        self._store_result: tuple[float, list[str]] | None = None
        self._store_check: asyncio.Task[list[str]] | None = None

    async def report(self) -> tuple[bool, dict[str, Any]]:
        store_problem, state_problem = await asyncio.gather(self._store_problem(), self._state_problem())
        problems: dict[str, str] = {}
        if store_problem:
            problems["recordings"] = store_problem
        if state_problem:
            problems["state"] = state_problem
        if not self.gw.verifier.keys_ready():
            problems["oidc_keys"] = "the signing keys of an issuer are not cached yet (its discovery or JWKS " \
                                    "did not answer)"
        checks = {name: name not in problems for name in ("recordings", "state", "oidc_keys")}
        draining = self.gw.draining
        if draining:
            problems["draining"] = "this gateway is shutting down (SIGTERM): it takes no new connections"
        ready = not problems
        return ready, {"ready": ready, "draining": draining, "checks": checks, "problems": problems}

    # -- recordings store ---------------------------------------------------------------------

    async def store_problem(self) -> str | None:
        """Why the recordings store is not usable now (None when it is), within ``timeout``: a
        store that hangs counts as down, not only one that answers with an error."""
        return await self._store_problem()

    async def _store_problem(self) -> str | None:
        rec = self.gw.recorder
        if rec.store_down_since is not None:
            return f"uploads to {self.gw.store.url} fail since {time.time() - rec.store_down_since:.0f}s ago: " \
                   f"{rec.last_upload_error}"
        since = getattr(rec, "upload_since", None)
        if since is not None and time.time() - since > self.timeout:
            return f"an upload to {self.gw.store.url} has not finished after {time.time() - since:.0f}s (the store " \
                   "does not answer)"
        now = time.monotonic()
        if self._store_result is not None and now - self._store_result[0] < (
                self.store_ttl if not self._store_result[1] else min(self.store_ttl, STORE_FAILED_TTL)):
            problems = self._store_result[1]
        else:
            if self._store_check is None or self._store_check.done():
                self._store_check = asyncio.create_task(asyncio.to_thread(self._check_store))
            try:
                problems = await asyncio.wait_for(asyncio.shield(self._store_check), self.timeout)
            except TimeoutError:
                return f"the recordings store {self.gw.store.url} did not answer within {self.timeout:g}s"
            self._store_result = (time.monotonic(), problems)
        return "; ".join(problems) if problems else None

    def _check_store(self) -> list[str]:
        try:
            return list(self.gw.store.check())
        except Exception as exc:  # noqa: BLE001 - whatever it is, it makes the store unusable
            return [f"{type(exc).__name__}: {exc}"]

    # -- state database -------------------------------------------------------------------------

    async def _state_problem(self) -> str | None:
        if self.gw.state.engine is None:
            return "the state database is not open"
        try:
            await asyncio.wait_for(_ping(self.gw.state), self.timeout)
        except TimeoutError:
            return f"the state database did not answer within {self.timeout:g}s"
        except Exception as exc:  # noqa: BLE001
            return f"the state database is not usable: {exc}"
        return None


async def _ping(state: Any) -> None:
    from sqlalchemy import text

    async with state.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
