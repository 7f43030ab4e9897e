"""What a tuning run is told, in one dataclass that travels whole to worker processes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from metalforge import arguments
from metalforge.tuner.timers import Timer, default_timer, timer_from_dict, timer_to_dict


def default_heartbeat_s() -> float:
    """Seconds between a worker's heartbeats; a trial is stale after three missed ones.
    $METALFORGE_HEARTBEAT_S shortens it (tests; a lab on a fast network)."""
    return arguments.env_number("METALFORGE_HEARTBEAT_S", 10.0, minimum=1)


def default_storage_timeout_s() -> float:
    """Seconds a database may stay out of reach before a run stops (resumable):
    $METALFORGE_STORAGE_TIMEOUT_S, else 300."""
    return arguments.env_number("METALFORGE_STORAGE_TIMEOUT_S", 300.0, minimum=1)


@dataclass
class Settings:
    device: str
    trials: int = 24
    timeout: float | None = None
    storage: str | None = None
    timer: Timer = field(default_factory=default_timer)
    backend: str | None = None        # kernel backend used to verify candidates (auto: metal or emulator)
    sampler: str = "auto"             # auto, tpe, random, grid
    seed: int | None = None
    drift_every: int = 8              # re-time the reference config every this many timings
    drift_threshold: float = 0.10     # relative change that counts as drift
    cooldown_s: float = 5.0           # wait after drift before re-measuring
    verify: bool = True
    warm_start: bool = True           # enqueue the default and best known configs first
    heartbeat_s: float = field(default_factory=default_heartbeat_s)
    storage_timeout_s: float = field(default_factory=default_storage_timeout_s)

    def to_dict(self) -> dict:
        """Every field, as JSON (a worker process rebuilds the same Settings with from_dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["timer"] = timer_to_dict(self.timer)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        return cls(**{**data, "timer": timer_from_dict(data["timer"])})
