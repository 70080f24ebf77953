"""Run the virtio-msg back-end: see :func:`.service.main`."""

import sys

from edgevirt.backend.transport.virtio_msg.service import main

sys.exit(main())
