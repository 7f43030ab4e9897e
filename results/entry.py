"""One bucket's winner in a results file, checked field by field, and the rules that compare two."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from metalforge.errors import MetalforgeError
from metalforge.kernels.timing.gate import within_error
from metalforge.kernels.families import get as get_family

TIMER_KINDS = ("metal", "model")


@dataclass(frozen=True)
class Entry:
    """One bucket's winner in a results file: the config, its time and how that time was obtained
    (`timer`: "metal" measured, "model" estimated, with the model's error), MLX's time for the
    same job and the study's trial counts. Built from a file's mapping by `from_dict`, which checks every field.
    The file also says which kernel the bucket ships (`ships`, derived from the speedup: "mlx"
    where MLX's kernel was timed or modelled faster than our best config, so the worst case is parity)."""

    shape: dict
    dtype: str
    config: dict
    time_s: float
    timer: str
    baseline_s: float | None = None
    speedup: float | None = None
    model_error: float | None = None   # modelled entries: the model's held-out error (calibration)
    trials: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)   # fields this version does not know: kept, never dropped

    @classmethod
    def from_dict(cls, family: str, key: str, e, at: str) -> "Entry":
        if not isinstance(e, dict):
            raise MetalforgeError(f"{at}: must be a mapping")
        for name in ("config", "time_s", "timer", "dtype", "shape"):
            if name not in e:
                raise MetalforgeError(f"{at}: missing '{name}'")
        for name in ("config", "shape"):
            if not isinstance(e[name], dict):
                raise MetalforgeError(f"{at}: {name} must be a mapping of field to value, not {e[name]!r}"[:300])
        if e["timer"] not in TIMER_KINDS:
            raise MetalforgeError(f"{at}: timer must be one of {', '.join(TIMER_KINDS)}, not {e['timer']!r}")
        if not isinstance(e["time_s"], (int, float)) or not math.isfinite(e["time_s"]) or e["time_s"] <= 0:
            raise MetalforgeError(f"{at}: time_s must be a positive number")
        error = e.get("model_error")
        if error is not None and (not isinstance(error, (int, float)) or not 0 <= error < 10):
            raise MetalforgeError(f"{at}: model_error must be a fraction (0.08 for 8%)")
        fam = get_family(family)
        try:
            fam.config(e["config"])
            shape = fam.shape(e["shape"])
        except MetalforgeError as err:
            raise MetalforgeError(f"{at}: {err}") from None
        if fam.bucket_key(shape, e["dtype"]) != key:
            raise MetalforgeError(f"{at}: key does not match its shape and dtype")
        entry = cls.of(e)
        if "ships" in e and e["ships"] != entry.ships:
            raise MetalforgeError(f"{at}: ships {e['ships']!r}, but its speedup {e.get('speedup')!r} says "
                                  f"{entry.ships or 'nothing (no time for MLX)'}")
        return entry

    @classmethod
    def of(cls, e: dict) -> "Entry":
        """An entry from a mapping already checked (by from_dict, or by loading its file)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in e.items() if k in known},
                   extra={k: v for k, v in e.items() if k not in known and k != "ships"})

    @property
    def ships(self) -> str | None:
        """"mlx" where MLX's kernel is faster than this config by this entry's times (measured or
        modelled: the best estimate, whatever its error), "ours" otherwise, None without MLX's time."""
        if not self.speedup:
            return None
        return "mlx" if self.speedup < 1.0 else "ours"

    def evidence(self, family_error: float | None) -> tuple[bool, str]:
        """Whether this entry shows ours faster than MLX, and the words for it: a measured speedup
        above 1, or a modelled one priced against MLX's real kernel by the per-kernel model
        (`baseline_kernel` set: kernels/timing) whose gain exceeds the family's per-kernel error.
        A family without kernel-level data (`family_error` None) is unvalidated: no ratio, no
        evidence; a ratio against a hand description of MLX's kernel (older files) is none either."""
        if not self.speedup:
            return False, "no time for MLX's built-in in this entry"
        if self.timer == "metal":
            return self.speedup > 1.0, f"measured {self.speedup:.2f}x" + (
                ": the bucket ships MLX's" if self.ships == "mlx" else "")
        if not self.extra.get("baseline_kernel"):
            return False, "modelled against a description of MLX's kernel, not MLX's real kernel: no evidence"
        if self.ships == "mlx":
            how = "unvalidated" if family_error is None else f"model error {family_error:.0%}"
            return False, f"MLX's kernel modelled faster ({self.speedup:.3f}x, {how}): the bucket ships MLX's"
        if family_error is None:
            return False, "modelled, unvalidated (no per-kernel measurements of this family)"
        if within_error(self.speedup, family_error):
            return False, f"modelled, within model error ({family_error:.0%})"
        return self.speedup > 1.0, f"modelled {self.speedup:.2f}x (model error {family_error:.0%})"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.model_error is None:   # measured entries have none: the file says nothing of it
            del out["model_error"]
        ships = {"ships": self.ships} if self.ships else {}
        return {**{k: v for k, v in out.items() if k != "extra"}, **ships, **out["extra"]}

    def beats(self, other: "Entry | None") -> bool:
        """Merge rule: a measured entry beats a modelled one; otherwise the faster wins."""
        if other is None:
            return True
        if self.timer != other.timer:
            return self.timer == "metal"
        return self.time_s < other.time_s
