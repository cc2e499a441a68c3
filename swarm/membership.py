"""The swarm's shared state in the DHT: runs, capability adverts, progress. Validated on read.

Every value is signed by its writer (the transport checks signatures and names the owner); here
each is also schema-checked, and must name its own owner: a record that claims another peer's
id, has wrong types, an unknown version or absurd values is dropped and never reaches the planner.
"""

from __future__ import annotations

import logging

from swarm.records import (CapabilityAdvert, ProgressRecord, RecordError, RunRecord, parse_advert,
                           parse_progress, parse_run)
from swarm.transport.base import Transport

log = logging.getLogger(__name__)

RUNS_KEY = "swarm.runs"
RUN_TTL = 120.0
ADVERT_TTL = 30.0
PROGRESS_TTL = 60.0
MAX_REJECTED = 1024  # owners whose dropped records are remembered (to log each reason once)


def adverts_key(run: str) -> str:
    return f"swarm.{run}.adverts"


def progress_key(run: str) -> str:
    return f"swarm.{run}.progress"


class Membership:
    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self.rejected: dict[str, str] = {}  # owner -> last reason its record was dropped

    def _valid(self, key: str, parse, *, id_field: str | None):
        out = []
        for rec in self.t.get(key):
            try:
                value = parse(rec.value)
            except RecordError as e:
                self._reject(rec.owner, str(e))
                continue
            if id_field and getattr(value, id_field) != rec.owner:
                self._reject(rec.owner, f"record claims {id_field}={getattr(value, id_field)!r}")
                continue
            out.append(value)
        return out

    def _reject(self, owner: str, why: str) -> None:
        if self.rejected.get(owner) != why:
            log.warning("dropped a record from %s: %s", owner, why)
        self.rejected.pop(owner, None)
        self.rejected[owner] = why
        while len(self.rejected) > MAX_REJECTED:  # bounded: identities are free
            del self.rejected[next(iter(self.rejected))]

    # --- runs ---------------------------------------------------------------------------------
    def runs(self) -> dict[str, RunRecord]:
        """Live runs by name (if two creators disagree on a name, the oldest record wins)."""
        found: dict[str, RunRecord] = {}
        for r in sorted(self._valid(RUNS_KEY, parse_run, id_field=None), key=lambda r: (r.created, r.fingerprint)):
            found.setdefault(r.name, r)
        return found

    def publish_run(self, record: RunRecord) -> bool:
        return self.t.put(RUNS_KEY, record.to_wire(), RUN_TTL)

    # --- adverts and progress -----------------------------------------------------------------
    def adverts(self, run: str) -> list[CapabilityAdvert]:
        return [a for a in self._valid(adverts_key(run), parse_advert, id_field="peer_id") if a.run == run]

    def advertise(self, advert: CapabilityAdvert) -> bool:
        return self.t.put(adverts_key(advert.run), advert.to_wire(), ADVERT_TTL)

    def progress(self, run: str) -> list[ProgressRecord]:
        return self._valid(progress_key(run), parse_progress, id_field="peer_id")

    def report(self, run: str, progress: ProgressRecord) -> bool:
        return self.t.put(progress_key(run), progress.to_wire(), PROGRESS_TTL)
