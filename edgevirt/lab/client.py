"""A session with a labgrid coordinator: places, their resources, acquire/release, reservations.

labgrid's client session is asyncio + gRPC. It runs here on an event loop in its own
thread, so any thread (parallel targets, the main thread unwinding after Ctrl-C) can call
in, and the coordinator's place and resource updates keep arriving between calls: a
place that another client grabs, or an exporter that disappears, is visible at once.
Calls are labgrid's own RPCs (AcquirePlace, ReleasePlace, CreateReservation, …); no
labgrid code is copied.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edgevirt.lab import LabError, PlaceBusy, PlaceNotFound, require_labgrid

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Resource classes ``labgrid-client power`` drives (its own list): a place with one of
#: them has power edgevirt can switch without code per PDU.
POWER_CLASSES = (
    "NetworkPowerPort",
    "PDUDaemonPort",
    "NetworkUSBPowerPort",
    "NetworkSiSPMPowerPort",
    "TasmotaPowerPort",
    "NetworkYKUSHPowerPort",
    "NetworkSysfsGPIO",
)
SERIAL_CLASS = "NetworkSerialPort"


@dataclass(frozen=True)
class Resource:
    """One exported resource as the coordinator knows it."""

    path: str  # exporter/group/class/name
    cls: str
    name: str  # the place's rename, else the exporter's name
    params: dict[str, Any]
    avail: bool
    acquired: str | None

    @property
    def exporter(self) -> str:
        return self.path.split("/", 1)[0]


@dataclass
class PlaceInfo:
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    acquired: str | None = None  # "host/user"
    reservation: str | None = None  # token
    comment: str = ""
    matches: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.acquired:
            return "acquired"
        return "reserved" if self.reservation else "free"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "acquired_by": self.acquired,
            "reservation": self.reservation,
            "tags": self.tags,
            "comment": self.comment,
            "matches": self.matches,
        }


def parse_filter(pattern: str) -> dict[str, str] | None:
    """``board=rcar,lab=2`` → tags to match; None when ``pattern`` is a place name/glob."""
    if "=" not in pattern:
        return None
    tags: dict[str, str] = {}
    for part in pattern.split(","):
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise PlaceNotFound(f"place filter {pattern!r}: {part!r} is not KEY=VALUE")
        tags[k.strip()] = v.strip()
    return tags


class LabClient:
    """Use as a context manager; every call raises :class:`LabError` naming the coordinator."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._mod = require_labgrid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="labgrid-session", daemon=True
        )
        self._thread.start()
        self._session: Any = None
        try:
            self._session = self._call(self._start(), timeout)
        except BaseException:
            self._stop_loop()
            raise

    # -- plumbing -------------------------------------------------------------------------

    async def _start(self) -> Any:
        session = self._mod.ClientSession(self.address, asyncio.get_running_loop())
        try:
            await session.start()
        except Exception as e:
            await session.close()
            raise LabError(
                f"labgrid coordinator {self.address} unreachable: {e}",
                hint="is labgrid-coordinator running there? (--coordinator / LG_COORDINATOR)",
            ) from e
        return session

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout or self.timeout)
        except TimeoutError as e:
            fut.cancel()
            limit = timeout or self.timeout
            raise LabError(
                f"labgrid coordinator {self.address}: no answer within {limit:.0f}s"
            ) from e
        except self._mod.Error as e:  # labgrid's UserError/ServerError carry its message
            raise LabError(f"labgrid coordinator {self.address}: {e}") from e

    def _rpc(self, method: str, request: Any) -> Any:
        """One coordinator RPC; the gRPC call object is made on the session's loop."""

        async def call() -> Any:
            return await getattr(self._session.stub, method)(request)

        return self._call(call())

    def _rpc_error(self, what: str, e: Exception) -> LabError:
        details = e.details() if hasattr(e, "details") else str(e)
        return LabError(f"{what} at coordinator {self.address}: {details}")

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.stopping.is_set()

    def _check_connected(self) -> None:
        if not self.connected:
            raise LabError(f"lost the connection to labgrid coordinator {self.address}")

    def sync(self) -> None:
        """Wait until every update the coordinator sent so far has been applied."""
        self._check_connected()
        self._call(self._session.sync_with_coordinator())
        self._check_connected()

    @property
    def user(self) -> str:
        """How the coordinator names us: ``host/user`` (``LG_HOSTNAME``/``LG_USERNAME``)."""
        s = self._session
        return f"{s.gethostname()}/{s.getuser()}"

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            try:
                self._call(self._close(session), 5)
            except LabError as e:
                log.debug("closing the coordinator session: %s", e)
        self._stop_loop()

    @staticmethod
    async def _close(session: Any) -> None:
        await session.stop()
        await session.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> LabClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- places ---------------------------------------------------------------------------

    def places(self) -> list[PlaceInfo]:
        self.sync()
        return [self._info(p) for _, p in sorted(self._session.places.items())]

    @staticmethod
    def _info(p: Any) -> PlaceInfo:
        return PlaceInfo(
            name=p.name,
            tags=dict(p.tags),
            acquired=p.acquired,
            reservation=p.reservation,
            comment=p.comment,
            matches=[str(m) for m in p.matches],
        )

    def place(self, name: str) -> PlaceInfo:
        self.sync()
        p = self._session.places.get(name)
        if p is None:
            known = ", ".join(sorted(self._session.places)) or "none"
            raise PlaceNotFound(
                f"place {name!r} does not exist at coordinator {self.address} (places: {known})"
            )
        return self._info(p)

    def select(self, pattern: str) -> list[PlaceInfo]:
        """Places named by ``pattern``: a name, a glob (``rcar-*``) or tags (``board=rcar``)."""
        tags = parse_filter(pattern)
        places = self.places()
        if tags is None:
            hits = [p for p in places if fnmatch.fnmatchcase(p.name, pattern)]
        else:
            hits = [p for p in places if all(p.tags.get(k) == v for k, v in tags.items())]
        if not hits:
            known = ", ".join(
                p.name + (f" [{','.join(f'{k}={v}' for k, v in p.tags.items())}]" if p.tags else "")
                for p in places
            )
            raise PlaceNotFound(
                f"no place matches {pattern!r} at coordinator {self.address} "
                f"(places: {known or 'none'})"
            )
        return hits

    def resources(self, name: str) -> list[Resource]:
        """The place's resources: those it acquired, or (free) those its matches select."""
        self.sync()
        s = self._session
        place = s.places.get(name)
        if place is None:
            raise PlaceNotFound(f"place {name!r} vanished from coordinator {self.address}")
        out: list[Resource] = []
        if place.acquired:
            paths = [tuple(p) for p in place.acquired_resources]
        else:
            paths = [
                (exp, grp, r.cls, rname)
                for exp, groups in s.resources.items()
                for grp, group in groups.items()
                for rname, r in group.items()
                if "cls" in r.data and place.hasmatch((exp, grp, r.cls, rname))
            ]
        for exp, grp, cls, rname in paths:
            match = place.getmatch((exp, grp, cls, rname))
            entry = s.resources.get(exp, {}).get(grp, {}).get(rname)
            data = entry.data if entry is not None else {}
            out.append(
                Resource(
                    path=f"{exp}/{grp}/{cls}/{rname}",
                    cls=cls,
                    name=(match.rename if match is not None and match.rename else rname),
                    params=dict(data.get("params", {})),
                    avail=bool(data.get("avail")) and "cls" in data,
                    acquired=data.get("acquired"),
                )
            )
        return out

    # -- acquire / release ----------------------------------------------------------------

    def acquire(self, name: str) -> None:
        info = self.place(name)
        if info.acquired:
            who = info.acquired
            if who == self.user:
                who = f"you ({who}: another edgevirt or labgrid-client run?)"
            raise PlaceBusy(
                f"place {name!r} is already acquired by {who}",
                hint=f"wait for it with --wait SECONDS, or `labgrid-client -p {name} release` "
                "if it is a leftover of yours",
            )
        pb2 = self._mod.labgrid_coordinator_pb2
        try:
            self._rpc("AcquirePlace", pb2.AcquirePlaceRequest(placename=name))
        except Exception as e:
            if isinstance(e, LabError):
                raise
            err = self._rpc_error(f"acquiring place {name!r}", e)
            if "already acquired" in str(err) or "not reserved for" in str(err):
                raise PlaceBusy(str(err), hint="try again with --wait SECONDS") from e
            raise err from e
        self.sync()

    def release(self, name: str) -> None:
        """Release ``name`` if we hold it; quiet when it is free or someone else's now."""
        if not self.connected:
            raise LabError(
                f"cannot release place {name!r}: lost the connection to coordinator {self.address}",
                hint=f"labgrid-client -x {self.address} -p {name} release",
            )
        self.sync()
        p = self._session.places.get(name)
        if p is None or not p.acquired:
            return
        if p.acquired != self.user:  # taken from us (release --kick): never release theirs
            log.warning("place %s is now acquired by %s: not releasing it", name, p.acquired)
            return
        pb2 = self._mod.labgrid_coordinator_pb2
        try:
            self._rpc("ReleasePlace", pb2.ReleasePlaceRequest(placename=name))
        except Exception as e:
            if isinstance(e, LabError):
                raise
            raise self._rpc_error(f"releasing place {name!r}", e) from e
        self.sync()

    # -- reservations ---------------------------------------------------------------------

    def reserve(self, tags: dict[str, str], wait: float) -> tuple[str, str]:
        """Reserve a place matching ``tags`` (``name`` selects one place); wait up to
        ``wait`` seconds for the coordinator to allocate it. Returns (token, place)."""
        from labgrid.remote.common import Reservation, ReservationState

        pb2 = self._mod.labgrid_coordinator_pb2
        req = pb2.CreateReservationRequest(
            filters={"main": pb2.Reservation.Filter(filter=tags)}, prio=0.0
        )
        try:
            resp = self._rpc("CreateReservation", req)
        except LabError:
            raise
        except Exception as e:
            raise self._rpc_error(f"reserving {tags}", e) from e
        token = Reservation.from_pb2(resp.reservation).token
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    r = self._rpc("PollReservation", pb2.PollReservationRequest(token=token))
                except LabError:
                    raise
                except Exception as e:
                    raise self._rpc_error(f"polling reservation {token}", e) from e
                res = Reservation.from_pb2(r.reservation)
                if res.state is not ReservationState.waiting:
                    names = [n for group in res.allocations.values() for n in group]
                    held = (ReservationState.allocated, ReservationState.acquired)
                    if res.state in held and names:
                        self.sync()
                        return token, names[0]
                    raise LabError(f"reservation {token} for {tags} ended {res.state.name}")
                if time.monotonic() >= deadline:
                    raise PlaceBusy(
                        f"no place matching {tags} became free within {wait:.0f}s "
                        f"(reservation {token} cancelled)"
                    )
                time.sleep(0.5)
        except BaseException:
            self.cancel_reservation(token)
            raise

    def cancel_reservation(self, token: str) -> None:
        if not self.connected:
            return
        pb2 = self._mod.labgrid_coordinator_pb2
        try:
            self._rpc("CancelReservation", pb2.CancelReservationRequest(token=token))
        except Exception as e:  # already gone (expired, cancelled): nothing to undo
            log.debug("cancel reservation %s: %s", token, e)
