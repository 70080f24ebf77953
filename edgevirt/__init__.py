"""edgevirt: virtio bring-up for Type-1-hypervisor automotive SoCs."""

__version__ = "0.1.0"
