"""The server's figures in Prometheus's text format (version 0.0.4): counters, gauges and one
histogram, written by the engine thread and the HTTP side, read by `GET /metrics`."""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

# time to first token, seconds: from a few milliseconds (a cached prompt on a Mac) to a queued minute
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.gauges: dict[str, float] = {}
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def count(self, name: str, value: float = 1, **labels) -> None:
        with self._lock:
            self.counters[name, tuple(sorted(labels.items()))] += value

    def set(self, **gauges: float) -> None:
        with self._lock:
            self.gauges.update(gauges)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self.ttft_sum += seconds

    def value(self, name: str, **labels) -> float:
        """A counter's value (0 if never counted) or a gauge's."""
        with self._lock:
            if name in self.gauges:
                return self.gauges[name]
            return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        with self._lock:
            lines = []
            for name in sorted({n for n, _ in self.counters}):
                lines.append(f"# TYPE metalforge_{name} counter")
                for (n, labels), v in sorted(self.counters.items()):
                    if n == name:
                        lines.append(f"metalforge_{name}{_labels(labels)} {_number(v)}")
            for name, v in sorted(self.gauges.items()):
                lines += [f"# TYPE metalforge_{name} gauge", f"metalforge_{name} {_number(v)}"]
            lines.append("# TYPE metalforge_time_to_first_token_seconds histogram")
            total = 0
            for bound, n in zip((*TTFT_BUCKETS, "+Inf"), self.ttft_counts):
                total += n
                lines.append(f'metalforge_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
            lines += [f"metalforge_time_to_first_token_seconds_sum {self.ttft_sum!r}",
                      f"metalforge_time_to_first_token_seconds_count {total}"]
            return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + ",".join(escaped) + "}"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse(text: str) -> dict[str, float]:
    """`/metrics` text back into {'name{labels}': value} (for tests and the load benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
