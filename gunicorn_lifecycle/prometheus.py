"""``status --prometheus``: the state in Prometheus' text format, for node_exporter's
textfile collector (write it to a ``*.prom`` file from cron or a systemd timer).

Every series carries the ``state_file`` label, so that several instances of one
node can share one file; generation series carry ``generation`` and ``reason``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Report = dict[str, Any]
Generation = dict[str, Any]

# name, type, help, the value of one open generation
PER_GENERATION: tuple[tuple[str, str, Callable[[Generation], float]], ...] = (
    ("workers", "Live workers (registered, not lost).",
     lambda g: sum(1 for w in g["workers"] if not w["lost"])),
    ("workers_booted", "Live workers that finished booting (post_worker_init ran).",
     lambda g: sum(1 for w in g["workers"] if w["booted"] and not w["lost"])),
    ("workers_target", "The master's worker count (follows TTIN/TTOU).",
     lambda g: g["target"]),
    ("generation_ready", "1 once the generation's booted workers reached its target.",
     lambda g: int(g["ready"])),
    ("generation_master_alive", "1 while the generation's master runs.",
     lambda g: int(g["master_alive"] is not False)),
    ("leader_term", "The leadership term, on the generation of the leader (0: none of it leads).",
     lambda g: g["leader"]["term"] if g["leader"] else 0),
    ("heartbeat_age_max_seconds", "Age of the oldest heartbeat of its live workers.",
     lambda g: max((w["heartbeat_age"] for w in g["workers"] if not w["lost"]), default=0.0)),
)
TALLIES = (
    ("master_starts_total", "master_start", "Generations opened, by reason (restart: after a "
     "master died without on_exit)."),
    ("master_exits_total", "master_exit", "Generations closed, by reason (crash: their master "
     "died without on_exit)."),
    ("workers_lost_total", "worker_lost", "Workers that died without a word, by reason."),
)
PREFIX = "gunicorn_lifecycle_"


def render(reports: Iterable[Report]) -> str:
    """One text exposition for the instances of ``reports``, each family's samples together."""
    reports = list(reports)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, object], float]]) -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
            lines.append(f"{PREFIX}{name}{{{text}}} {_number(value)}")

    family("generations_open", "gauge", "Generations whose master serves them (open, or "
           "draining after HUP).",
           (({"state_file": r["state_file"]}, sum(1 for g in r["generations"] if g["open"]))
            for r in reports))
    for name, help_text, value in PER_GENERATION:
        family(name, "gauge", help_text,
               (({"state_file": r["state_file"], "generation": g["generation"],
                  "reason": g["reason"]}, value(g))
                for r in reports for g in r["generations"] if g["open"]))
    for name, event, help_text in TALLIES:
        family(name, "counter", help_text,
               (({"state_file": r["state_file"], "reason": reason}, count)
                for r in reports for reason, count in r["seen"][event].items()))
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Exactly: a count as a whole number (``:g`` would round 1234567 to 1.23457e+06)."""
    return str(value) if isinstance(value, int) else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
