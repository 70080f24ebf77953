"""In-guest workload (DESIGN §4) on Xen 4.17 dom0less beside the QEMU service VM.

Both: the same front-end image (virtio_msg.ko), the same busybox ``dd`` commands timed
with the front-end's own clock (edgevirt.servicevm.bench), back-end in a service VM
(Python + C ring, TCG). Xen: ``up --platform xen`` (passthrough regions, static event
channels, DMA bounced through the carve-out by the module's own DMA ops); QEMU:
``up --backend service-vm`` (ivshmem BARs, MSI-X, restricted-dma-pool). Also reports
power-on to both shells.

    .venv/bin/python bench/xen.py [--repeat N] [--keep DIR]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgevirt.errors import EdgevirtError  # noqa: E402
from edgevirt.servicevm.bench import WORKLOADS, workload  # noqa: E402
from edgevirt.servicevm.up import up_service_vm  # noqa: E402
from edgevirt.up import UpOptions, up  # noqa: E402


def run(build: Path, repeat: int) -> list[dict]:
    xen = up(UpOptions(build / "xen", platform="xen", boot_timeout=300,
                       workload=workload(repeat)))  # fmt: skip
    if not xen.ok:
        raise EdgevirtError(f"Xen run failed: {xen.error or [c for c in xen.checks if not c.ok]}")
    svm = up_service_vm(build / "servicevm", workload=workload(repeat))
    if not svm.ok:
        raise EdgevirtError(f"service-VM run failed: {svm.error}")
    rows = [{"workload": "power-on to both shells (s)",
             "xen": round(xen.timings["both_shells"], 1),
             "qemu_svm": round(svm.timings.get("service_boot", 0)
                               + svm.timings.get("frontend_boot", 0), 1)}]  # fmt: skip
    for name, _ in WORKLOADS:
        x, q = xen.workload[name], svm.workload[name]
        rows.append(
            {
                "workload": f"{name} (ms, median/min)",
                "xen": f"{statistics.median(x):.0f} / {min(x):.0f}",
                "qemu_svm": f"{statistics.median(q):.0f} / {min(q):.0f}",
                "xen/qemu (median)": f"{statistics.median(x) / statistics.median(q):.2f}",
            }
        )
    return rows


def main() -> None:
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 5
    keep = Path(sys.argv[sys.argv.index("--keep") + 1]) if "--keep" in sys.argv else None
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(keep or Path(tmp), repeat)
    cols = list(rows[-1])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
