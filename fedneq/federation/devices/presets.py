"""The preset fleets: :func:`default_fleet` (four device classes) and :func:`homogeneous_fleet`.

Where the default classes' figures come from: docs/DEVICES.md.
"""

from __future__ import annotations

from fedneq.federation.devices.profile import DeviceProfile, Fleet

__all__ = ["default_fleet", "homogeneous_fleet"]

# Figures of the default classes (order of magnitude; the time model only needs that;
# sources in docs/DEVICES.md).
_DEFAULT_CLASSES: tuple[tuple[DeviceProfile, float], ...] = (
    (DeviceProfile("mcu", budget=0.01, batch_size=8, speed=0.02,
                   download_mbps=0.25, upload_mbps=0.25, memory_fraction=0.25), 0.3),
    (DeviceProfile("pi-zero", budget=0.05, batch_size=16, speed=0.25,
                   download_mbps=20.0, upload_mbps=20.0, memory_fraction=0.5), 0.4),
    (DeviceProfile("pi-4", budget=0.2, batch_size=32, speed=1.0,
                   download_mbps=100.0, upload_mbps=100.0), 0.2),
    (DeviceProfile("phone", budget=1.0, batch_size=64, speed=4.0,
                   download_mbps=50.0, upload_mbps=10.0), 0.1),
)  # fmt: skip


def default_fleet() -> Fleet:
    """A heterogeneous fleet: 30 % mcu, 40 % pi-zero, 20 % pi-4, 10 % phone.

    Budgets 1 % / 5 % / 20 % / 100 % of the selectable parameters, batch
    sizes 8 / 16 / 32 / 64, memory limits at 25 % / 50 % of the way from the
    least memory that trains one neuron to full training (``memory_fraction``;
    pi-4 and phone unlimited),
    always available; speeds
    0.02 / 0.25 / 1 / 4 (x 8 GFLOP/s: 0.16 / 2 / 8 / 32 GFLOP/s) and
    bandwidths 0.25 / 20 / 100 / 50 Mbit/s down, 0.25 / 20 / 100 / 10 up
    (figures and sources in docs/DEVICES.md).
    """
    return Fleet(_DEFAULT_CLASSES)


def homogeneous_fleet(
    budget: float | int,
    *,
    name: str = "uniform",
    memory_limit_bytes: int | None = None,
    local_epochs: int = 1,
    batch_size: int = 32,
    speed: float = 1.0,
    grad_filter_r: int | None = None,
    download_mbps: float = 100.0,
    upload_mbps: float = 100.0,
    availability: float = 1.0,
) -> Fleet:
    """A fleet of one device class (every client alike; by default the reference device)."""
    profile = DeviceProfile(
        name,
        budget=budget,
        memory_limit_bytes=memory_limit_bytes,
        local_epochs=local_epochs,
        batch_size=batch_size,
        speed=speed,
        grad_filter_r=grad_filter_r,
        download_mbps=download_mbps,
        upload_mbps=upload_mbps,
        availability=availability,
    )
    return Fleet(((profile, 1.0),))
