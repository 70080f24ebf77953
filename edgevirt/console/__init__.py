"""Serial-console automation: pyserial transports, expect engine, marker-framed commands."""

import serial

# Make ``unix:///path`` URLs work with serial.serial_for_url (QEMU socket chardevs).
if "edgevirt.console.urlhandler" not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append("edgevirt.console.urlhandler")
