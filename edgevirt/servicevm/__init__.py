"""The back-end in an aarch64 service VM, linked to the front-end VM only by shared memory.

:mod:`.peer` runs *inside* the service VM (it must import nothing but the back-end);
:mod:`.hypervisor` is the host's small part (shared-memory files + ivshmem server);
:mod:`.image` builds the service VM's image; :mod:`.up` runs both VMs end to end.
"""
