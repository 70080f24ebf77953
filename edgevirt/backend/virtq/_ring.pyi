"""C fast path of the split virtqueue; same API as edgevirt.backend.virtq.pyring."""

from collections.abc import Iterable

from edgevirt.backend.virtq.pyring import Chain, MemoryTable

POP_SEGMENT_BUDGET: int

class BlkResult(tuple[object, ...]):
    """What SplitQueue.serve_blk() did (a struct sequence)."""

    @property
    def pushed(self) -> int: ...
    @property
    def done(self) -> list[tuple[int, int]]: ...
    @property
    def rest(self) -> list[Chain]: ...
    @property
    def counter(self) -> int: ...
    @property
    def reads(self) -> int: ...
    @property
    def writes(self) -> int: ...
    @property
    def flushes(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def bounced(self) -> int: ...
    @property
    def notified(self) -> bool: ...

class SplitQueue:
    def __init__(
        self, size: int, desc: int, avail: int, used: int, *, event_idx: bool = False
    ) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def desc(self) -> int: ...
    @property
    def avail(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def broken(self) -> str | None: ...
    last_avail_idx: int
    used_idx: int
    event_idx: bool
    def pop(self, mem: MemoryTable, max_chains: int = 0) -> list[Chain]: ...
    def push(self, mem: MemoryTable, completions: Iterable[tuple[int, int]]) -> None: ...
    def should_notify(self, mem: MemoryTable) -> bool: ...
    def set_notification(self, mem: MemoryTable, enable: bool) -> None: ...
    def pending(self, mem: MemoryTable) -> int: ...
    def serve_blk(
        self,
        mem: MemoryTable,
        fd: int,
        capacity: int,
        seg_max: int,
        readonly: bool,
        max_chains: int = 0,
        inflight: memoryview | bytearray | None = None,
        counter: int = 0,
        fd_fallback: int = -1,
    ) -> BlkResult: ...

class BlkAio:
    """The asynchronous virtio-blk request path of one queue (io_uring or a thread pool)."""

    def __init__(
        self,
        fd: int,
        capacity: int,
        seg_max: int,
        readonly: bool,
        depth: int,
        engine: str = "auto",
        direct: bool = False,
        align: int = 512,
        mem_align: int = 0,
        fd_buffered: int = -1,
    ) -> None: ...
    @property
    def engine(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def eventfd(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def bounced(self) -> int: ...
    def submit(
        self,
        queue: SplitQueue,
        mem: MemoryTable,
        max_chains: int = 0,
        inflight: memoryview | bytearray | None = None,
        counter: int = 0,
    ) -> BlkResult: ...
    def reap(
        self,
        queue: SplitQueue,
        inflight: memoryview | bytearray | None = None,
        wait: bool = False,
        call: int = -1,
    ) -> BlkResult: ...
    def close(self) -> None: ...
