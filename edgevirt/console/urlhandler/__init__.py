"""pyserial URL handlers edgevirt adds (``unix://``); registered by :mod:`edgevirt.console`."""
