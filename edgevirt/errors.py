"""One exception root, one subclass per layer.

Messages carry the numbers (file, field, address, length, limit) so a user can act on them.
"""

from __future__ import annotations


class EdgevirtError(Exception):
    """Root of every error edgevirt raises on purpose."""

    #: Short hint of what the user can do about it (shown by the CLI).
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(EdgevirtError):
    """A board profile or system spec is malformed."""


class SetupError(EdgevirtError):
    """A host tool or package edgevirt needs is missing."""


class DeviceTreeError(EdgevirtError):
    """A DTB could not be parsed, composed or applied."""


class ImageError(EdgevirtError):
    """Building or checking a guest image failed."""


class DeployError(EdgevirtError):
    """Starting or stopping a target (QEMU, board) failed."""


class ConsoleError(EdgevirtError):
    """The serial console misbehaved: silence, disconnect, panic."""


class ConsoleTimeout(ConsoleError):
    """A pattern did not appear in time; the message quotes the last console lines."""


class BackendError(EdgevirtError):
    """The back-end refused something or could not run."""


class GuestMemoryError(BackendError):
    """A guest address range lies outside the memory the back-end was given."""


class RingError(BackendError):
    """A virtqueue broke one of the ring rules (DESIGN section 6).

    ``rule`` names the rule, so tests and logs can tell failures apart.
    """

    def __init__(self, message: str, rule: str = "ring") -> None:
        super().__init__(message)
        self.rule = rule


class VhostUserError(BackendError):
    """A vhost-user message was malformed or out of sequence."""


class VirtioMsgError(BackendError):
    """A virtio-msg message or the message memory carrying it broke the protocol."""
