"""The leader lease on a real PostgreSQL: acquire, renew, lose, and the fencing token
that refuses a stale leader's writes (cloud.replicas.lease)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from edgefleet.cloud.db import Database
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.replicas import (
    FencedOut,
    LeaderLease,
    ReplicaStore,
    read_lease,
    require_postgres,
)
from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, RolloutStore, Stage
from edgefleet.cloud.rollouts.model import RolloutState
from edgefleet.protos.errors import Conflict, InvalidArgument
from tests.contract.conftest import fresh_database

pytestmark = pytest.mark.postgres


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(postgres_url: str) -> Iterator[Database]:
    with fresh_database(postgres_url) as url:
        d = Database(url)
        try:
            yield d
        finally:
            d.close()


def lease(
    db: Database, rid: str, *, lease_s: float = 2.0, clock: Clock | None = None
) -> LeaderLease:
    return LeaderLease(db, rid, lease_s=lease_s, **({"clock": clock} if clock else {}))


def state(db: Database) -> tuple[str, int, bool]:
    with db.engine.connect() as conn:
        st = read_lease(conn)
    assert st is not None
    return st.holder, st.token, st.live


def test_one_leader_and_a_token_that_grows_with_each_new_holder(db: Database) -> None:
    a, b = lease(db, "a"), lease(db, "b")
    try:
        assert a.try_acquire() == 1
        assert b.try_acquire() is None  # the lock is held: b cannot lead
        assert state(db) == ("a", 1, True)
        assert a.renew() and a.leading
        a.release()  # clean step-down: lease expired now, lock session ended
        assert not a.leading
        assert state(db)[2] is False
        assert b.try_acquire() == 2
        assert state(db) == ("b", 2, True)
        assert a.try_acquire() is None
    finally:
        a.close()
        b.close()


def test_a_dead_leaders_lock_is_free_at_once(db: Database) -> None:
    """SIGKILL ends the lock session: the lock is free without waiting for the lease."""
    a, b = lease(db, "a", lease_s=60), lease(db, "b", lease_s=60)
    try:
        assert a.try_acquire() == 1
        a._drop()  # what the kernel does to a killed process's socket
        assert b.try_acquire() == 2
        assert state(db) == ("b", 2, True)
        assert not a.renew()  # the old leader learns it on its next renewal
        assert a.token is None
    finally:
        a.close()
        b.close()


def test_an_expired_lease_whose_session_lingers_is_taken_over(db: Database) -> None:
    """A paused or cut-off leader keeps its session (and the lock) but stops renewing:
    past the expiry a candidate ends that session, then takes the lead."""
    a, b = lease(db, "a", lease_s=0.5), lease(db, "b", lease_s=0.5)
    try:
        assert a.try_acquire() == 1
        with db.engine.connect() as conn:  # the lease runs out on the database's clock
            conn.execute(sa.text("SELECT pg_sleep(0.7)"))
        assert b.try_acquire() is None  # ends a's session ...
        deadline = time.monotonic() + 10
        while (token := b.try_acquire()) is None and time.monotonic() < deadline:
            time.sleep(0.05)  # (the ended backend frees the lock a moment later)
        assert token == 2  # ... and leads on a next try
        assert not a.renew()
    finally:
        a.close()
        b.close()


def test_a_leader_stops_by_its_own_clock_when_renewals_do_not_get_through(
    db: Database,
) -> None:
    clock = Clock()
    a = lease(db, "a", lease_s=2.0, clock=clock)
    try:
        assert a.try_acquire() == 1
        clock.now += 1.9
        assert a.valid()
        clock.now += 0.2  # past the lease with no renewal since
        assert not a.valid() and not a.leading
        assert a.renew()  # a renewal that gets through makes it valid again
        assert a.valid()
    finally:
        a.close()


def rollout_store(db: Database) -> tuple[RolloutStore, str]:
    """A rollout r1 over device d1 (the device enrolled, so `issue` can sign for it)."""
    DeviceStore(db).enroll("d1", group="lab")
    store = RolloutStore(db)
    store.create(
        Rollout(
            rollout_id="r1",
            ref="digits:2",
            model="digits",
            version=2,
            selector="group=lab",
            policy=Policy(),
            state="pending",
            stages=(Stage("all", 1.0, 1),),
        ),
        [RolloutDevice("r1", "d1", 0, "fp32", "b" * 64, None)],
    )
    return store, "r1"


def test_the_fencing_token_refuses_a_stale_leaders_writes(db: Database) -> None:
    a, b = lease(db, "a", lease_s=60), lease(db, "b", lease_s=60)
    fenced: list[bool] = []
    try:
        store, rid = rollout_store(db)
        assert a.try_acquire() == 1
        old = RolloutStore(db)
        old.fence = a.fence(lambda: fenced.append(True)).check
        r = old.get(rid)
        r = old.save(r.with_changes(state=RolloutState.CANARY))  # a leads: its write lands
        assert r.state == RolloutState.CANARY and not fenced
        a._drop()  # a is paused/cut off; b takes over
        assert b.try_acquire() == 2
        new = RolloutStore(db)
        new.fence = b.fence().check
        with pytest.raises(FencedOut, match=r"leader term 1 is over \(b holds token 2\)"):
            old.save(r.with_changes(reason="stale"))
        with pytest.raises(FencedOut):
            old.update_devices(rid, {"d1": {"state": "stale"}})
        with pytest.raises(FencedOut):
            old.issue(rid, ["d1"], "shadow", lambda d, g: b"x", phase="shadow")
        assert fenced == [True, True, True]
        assert store.get(rid).reason == ""  # nothing of the stale leader landed
        assert store.devices(rid)[0].state is None  # no reported state landed
        new.save(r.with_changes(reason="new leader"))  # the new term writes
        assert store.get(rid).reason == "new leader"
    finally:
        a.close()
        b.close()


def test_a_takeover_waits_for_the_old_leaders_write_in_flight(db: Database) -> None:
    """The fence locks the lease row for share: the new token is issued only after the
    write in flight committed, and every fenced write after it is refused."""
    a, b = lease(db, "a", lease_s=60), lease(db, "b", lease_s=60)
    try:
        store, rid = rollout_store(db)
        assert a.try_acquire() == 1
        fence = a.fence()
        a._drop()
        with db.session() as s:  # a's write transaction, in flight
            fence.check(s)
            done = threading.Event()
            got: list[int | None] = []
            t = threading.Thread(target=lambda: (got.append(b.try_acquire()), done.set()))
            t.start()
            assert not done.wait(0.3)  # b's token bump waits for a's transaction
            s.execute(
                sa.text("UPDATE rollouts SET reason = 'in flight' WHERE rollout_id = :r"),
                {"r": rid},
            )
            s.commit()
        t.join(10)
        assert got == [2]
        assert store.get(rid).reason == "in flight"
        with db.session() as s, pytest.raises(FencedOut):
            fence.check(s)
    finally:
        a.close()
        b.close()


def test_status_lists_replicas_and_the_leader(db: Database) -> None:
    reg = ReplicaStore(db)
    reg.heartbeat("a", "127.0.0.1:1")
    reg.heartbeat("b", "127.0.0.1:2")
    assert [r.leader for r in reg.list()] == [False, False]
    a = lease(db, "b", lease_s=60)
    try:
        assert a.try_acquire() == 1
        got = reg.list()
        assert [(r.replica_id, r.leader, r.token) for r in got] == [("b", True, 1), ("a", False, 0)]
        assert got[0].address == "127.0.0.1:2" and got[0].heartbeat_age_s < 60
        reg.remove("a")
        assert [r.replica_id for r in reg.list()] == ["b"]
    finally:
        a.close()


def test_replica_mode_refuses_sqlite_in_one_line() -> None:
    with pytest.raises(InvalidArgument) as ei:
        require_postgres("sqlite:////tmp/x/registry.db")
    msg = str(ei.value)
    assert "\n" not in msg and "sqlite" in msg and "accepted: PostgreSQL" in msg


def test_replicas_write_a_rollout_only_from_its_latest_state(db: Database) -> None:
    """The leader's controller and a pause through another replica share no lock: a
    write from a read older than the stored row is refused, not silently undone."""
    store, rid = rollout_store(db)
    leader, api = RolloutStore(db), RolloutStore(db)
    leader.optimistic = api.optimistic = True
    seen = leader.get(rid)
    moved = api.save(
        api.get(rid).with_changes(state=RolloutState.CANARY)
    )  # another replica's write
    with pytest.raises(Conflict, match=r"changed meanwhile \(now canary\)"):
        leader.save(seen.with_changes(reason="from a stale read"))
    assert store.get(rid).reason == ""
    assert leader.save(moved.with_changes(reason="fresh")).reason == "fresh"
