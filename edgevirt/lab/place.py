"""An acquired labgrid place as a target's console and power; released whatever happens.

:class:`PlaceSession` reserves (``--wait``) and acquires a place, reads its resources and
gives the target model what a local board gives it: a console URL (the exporter's ser2net,
``rfc2217://host:port?ign_set_control``: over a pty ser2net never answers SET_CONTROL,
DESIGN §10) and a :class:`LabPower`. Leaving the session powers nothing on and always
releases the place and cancels the reservation, on success, failure, Ctrl-C or SIGTERM.

Power goes through labgrid's own drivers (the resource-to-driver choice of
``labgrid-client power``), built in this process from the resource parameters the
coordinator published: every PDU labgrid supports works with no edgevirt code per PDU, and
a network PDU can still be switched off after its exporter died.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from edgevirt.deploy.power import Power
from edgevirt.errors import ConfigError, EdgevirtError
from edgevirt.lab import LabError, PlaceBusy
from edgevirt.lab.client import POWER_CLASSES, SERIAL_CLASS, LabClient, Resource

log = logging.getLogger(__name__)

#: labgrid-client's choice of power driver per resource class (its ``power`` command).
POWER_DRIVERS: dict[str, tuple[str, ...]] = {
    "NetworkPowerPort": ("NetworkPowerDriver",),
    "PDUDaemonPort": ("PDUDaemonDriver",),
    "NetworkUSBPowerPort": ("USBPowerDriver",),
    "NetworkSiSPMPowerPort": ("SiSPMPowerDriver",),
    "TasmotaPowerPort": ("TasmotaPowerDriver",),
    "NetworkYKUSHPowerPort": ("YKUSHPowerDriver",),
    "NetworkSysfsGPIO": ("GpioDigitalOutputDriver", "DigitalOutputPowerDriver"),
}
assert set(POWER_DRIVERS) == set(POWER_CLASSES)
#: labgrid's drivers report through one process-wide step stack (labgrid.step.steps) that
#: asserts strict nesting: calls from parallel targets' threads must not interleave.
DRIVER_LOCK = threading.Lock()
#: How often, while waiting on the console, the coordinator's view of the place is checked.
CHECK_INTERVAL = 1.0


def console_url(place: str, r: Resource) -> str:
    """The pyserial URL of a ``NetworkSerialPort``."""
    p = r.params
    if p.get("extra", {}).get("proxy_required"):
        raise LabError(
            f"place {place!r}: serial port {r.path} is on an isolated exporter (SSH proxy "
            "required); edgevirt connects to exporters directly",
            hint="run the exporter without --isolated, or edgevirt on a host that reaches it",
        )
    host, port = p.get("host"), p.get("port")
    if not host or not port:
        raise LabError(
            f"place {place!r}: serial port {r.path} has no host/port yet (exporter "
            f"{r.exporter} not serving it: is the place acquired and the device present?)"
        )
    if p.get("protocol", "rfc2217") == "raw":
        return f"socket://{host}:{port}"
    return f"rfc2217://{host}:{port}?ign_set_control"


class LabPower(Power):
    """A place's power resource, switched by labgrid's driver for its class."""

    #: The UART adapter exists while the board is off: connect first, lose no boot output.
    console_first = True

    def __init__(self, session: PlaceSession, resource: Resource) -> None:
        from labgrid import Target, target_factory

        self.session = session
        self.resource = resource
        self.target = Target(f"edgevirt-{session.name}")
        args = {k: v for k, v in resource.params.items() if k != "extra"}
        res = target_factory.make_resource(self.target, resource.cls, resource.name, args)
        res.avail = True  # the coordinator said so; remote resources default to False
        driver: Any = None
        with DRIVER_LOCK:
            for name in POWER_DRIVERS[resource.cls]:
                driver = target_factory.make_driver(self.target, name, None, {})
                self.target.activate(driver)
        self.driver = driver
        self.is_on = False
        self._checked = 0.0

    def _do(self, action: str) -> Any:
        try:
            with DRIVER_LOCK:
                return getattr(self.driver, action)()
        except EdgevirtError:
            raise
        except Exception as e:  # labgrid drivers raise their own and requests' errors
            raise LabError(
                f"place {self.session.name!r}: power {action} through {self.resource.path} "
                f"({self.driver.__class__.__name__}) failed: {type(e).__name__}: {e}"
            ) from e

    def on(self) -> None:
        log.info("place %s: power on", self.session.name)
        self._do("on")
        self.is_on = True

    def off(self) -> None:
        log.info("place %s: power off", self.session.name)
        self._do("off")
        self.is_on = False

    def reset(self) -> None:
        self._do("cycle")
        self.is_on = True

    def get(self) -> bool:
        return bool(self._do("get"))

    def check(self) -> None:
        now = time.monotonic()
        if now - self._checked >= CHECK_INTERVAL:
            self._checked = now
            self.session.check()

    def close(self) -> None:
        try:
            if self.is_on:
                self.off()
        finally:
            with DRIVER_LOCK:
                self.target.cleanup()


@dataclass
class Acquired:
    name: str
    board: str | None
    console_url: str
    baudrate: int
    serial: Resource
    power: Resource


class PlaceSession:
    """Reserve (when ``wait`` > 0) and acquire one place; release it on leaving."""

    def __init__(
        self, client: LabClient, name: str, *, wait: float = 0.0, token: str | None = None
    ) -> None:
        """``token``: a reservation already allocated to us for this place (cancelled on
        leaving)."""
        self.client = client
        self.name = name
        self.wait = wait
        self.token = token
        self.acquired: Acquired | None = None
        self.power: LabPower | None = None
        self._held = False
        self._lock = threading.Lock()

    # -- entering -------------------------------------------------------------------------

    def __enter__(self) -> PlaceSession:
        try:
            self._acquire()
            self.acquired = self._read()
            self.power = LabPower(self, self.acquired.power)
        except BaseException:
            self.release()
            raise
        return self

    def _acquire(self) -> None:
        info = self.client.place(self.name)
        if self.token is None and (info.acquired or info.reservation):
            if self.wait <= 0:
                who = info.acquired or f"reservation {info.reservation}"
                raise PlaceBusy(
                    f"place {self.name!r} is {info.state} ({who})",
                    hint="pass --wait SECONDS to queue for it with a reservation",
                )
        if self.wait > 0 and self.token is None:
            self.token, _ = self.client.reserve({"name": self.name}, self.wait)
        self.client.acquire(self.name)
        self._held = True
        log.info("place %s acquired", self.name)

    def _read(self) -> Acquired:
        resources = self.client.resources(self.name)
        serial = [r for r in resources if r.cls == SERIAL_CLASS]
        power = [r for r in resources if r.cls in POWER_CLASSES]
        have = ", ".join(r.path for r in resources) or "none"
        if not serial:
            raise ConfigError(
                f"place {self.name!r} has no {SERIAL_CLASS} (its resources: {have})",
                hint="export the board's UART (RawSerialPort/USBSerialPort) and add-match it",
            )
        if not power:
            raise ConfigError(
                f"place {self.name!r} has no power resource labgrid can switch "
                f"({', '.join(POWER_CLASSES)}; its resources: {have})"
            )
        for r in (serial[0], power[0]):
            if not r.avail:
                raise LabError(f"place {self.name!r}: resource {r.path} is not available")
        info = self.client.place(self.name)
        return Acquired(
            name=self.name,
            board=info.tags.get("board"),
            console_url=console_url(self.name, serial[0]),
            baudrate=int(serial[0].params.get("speed") or 115200),
            serial=serial[0],
            power=power[0],
        )

    # -- while held -----------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`LabError` naming what went wrong if the place is no longer ours."""
        problem = self.diagnose()
        if problem:
            raise LabError(problem)

    def diagnose(self) -> str | None:
        """What is wrong with the place now (None: nothing the coordinator knows of)."""
        if not self.client.connected:
            return f"place {self.name!r}: lost the connection to coordinator {self.client.address}"
        try:
            info = self.client.place(self.name)
        except EdgevirtError:
            return f"place {self.name!r} vanished from coordinator {self.client.address}"
        if info.acquired != self.client.user:
            now = f"now acquired by {info.acquired}" if info.acquired else "now released"
            return f"place {self.name!r} was taken away from us ({now})"
        assert self.acquired is not None
        current = {r.path: r for r in self.client.resources(self.name)}
        for mine, what in ((self.acquired.serial, "serial port"), (self.acquired.power, "power")):
            r = current.get(mine.path)
            if r is None or not r.avail:
                where = mine.params.get("extra", {}).get("path")
                return (
                    f"place {self.name!r}: {what} resource {mine.path}"
                    + (f" ({where})" if where else "")
                    + f" is gone (exporter {mine.exporter} stopped, or the device vanished)"
                )
            if what == "serial port" and r.params.get("port") != mine.params.get("port"):
                return (
                    f"place {self.name!r}: serial port resource {mine.path} moved to port "
                    f"{r.params.get('port')} (exporter {mine.exporter} restarted its ser2net)"
                )
        return None

    # -- leaving --------------------------------------------------------------------------

    def release(self) -> None:
        with self._lock:
            errors: list[str] = []
            if self.power is not None:
                try:
                    self.power.close()
                except EdgevirtError as e:
                    errors.append(str(e))
                self.power = None
            if self._held:
                try:
                    self.client.release(self.name)
                    self._held = False
                    log.info("place %s released", self.name)
                except EdgevirtError as e:
                    errors.append(str(e))
            if self.token is not None:
                self.client.cancel_reservation(self.token)
                self.token = None
            if errors and self._held:
                raise LabError(
                    "; ".join(errors),
                    hint=f"labgrid-client -x {self.client.address} -p {self.name} release "
                    "(when the coordinator is back)",
                )
            for text in errors:
                log.warning("%s", text)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.release()
        except LabError:
            if et is None:
                raise
            log.exception("releasing place %s after %s", self.name, et.__name__)
