"""FleetGrid: Flower's Grid seen through the fleet's choice of participants.

The coordinator picks the devices (online, enrolled for FL, enough samples) and
passes them as ``participants`` (device id → the node id Flower gave the
device's key at registration); the strategy samples only among those nodes
(`get_node_ids`), so a registered device that was not chosen never trains. Each round's replies
are checked against ``min-clients`` (the round deadline is the strategy's
``timeout``): too few answers end the run with `Unavailable`, so no version is
registered from it. Per-round metrics go to the journal as the round ends.

Replies are pulled every ``pull_interval`` seconds (run config ``pull-interval``,
0.5 s) with the Grid's own push/pull calls: Flower's `send_and_receive` for a real
SuperLink sleeps 3 s between pulls, ~1.5 s lost per message on average, twice per
round. A pull costs the coordinator a few ms of CPU (ServerApp and SuperLink), and
only while a round waits for replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from edgefleet.models.fl.journal import Journal
from edgefleet.protos.errors import Unavailable

logger = logging.getLogger(__name__)


class FleetGrid(Grid):
    def __init__(
        self,
        inner: Grid,
        journal: Journal,
        *,
        participants: Mapping[int, str],
        min_clients: int,
        join_timeout: float,
        pull_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.journal = journal
        self.wanted = dict(participants)  # node id -> device id; empty: any node
        self.min_clients = min_clients
        self.join_timeout = join_timeout
        self.pull_interval = pull_interval
        self._clock = clock
        self._sleep = sleep
        self.devices: dict[int, str] = {}  # participating node id -> device id
        # between a round's training replies and its evaluation: the nodes that answered
        # (one that missed the training deadline is not asked to evaluate)
        self._evaluate_pool: list[int] | None = None
        self.label = ""  # names the run in round events when one ServerApp runs several
        self._train: dict[str, Any] = {}

    # -- Grid, delegated
    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # -- the fleet's view
    def discover(self) -> dict[int, str]:
        """Wait up to the join timeout for the chosen nodes (with none chosen: any
        `min_clients` nodes) and record who is there; `Unavailable` if too few."""
        deadline = self._clock() + self.join_timeout
        while True:
            online = set(self.inner.get_node_ids())
            if not self.wanted:
                self.devices = {n: f"node-{n}" for n in sorted(online)}
                ready = len(online) >= self.min_clients
            else:
                ready = set(self.wanted) <= online
            if ready or self._clock() >= deadline:
                break
            self._sleep(1.0)
        if self.wanted:
            self.devices = dict(self.wanted)
        present = sorted(d for n, d in self.devices.items() if n in online)
        absent = {
            d: f"not connected within {self.join_timeout:g}s"
            for n, d in sorted(self.devices.items())
            if n not in online
        }
        self.journal.write("participants", devices=present, skipped=absent)
        if len(present) < self.min_clients:
            raise Unavailable(
                f"{len(present)} participant(s) connected to the SuperLink; min-clients is "
                f"{self.min_clients} (absent: {', '.join(absent) or 'none'})"
            )
        return {n: d for n, d in self.devices.items() if n in online}

    def get_node_ids(self) -> Iterable[int]:
        if self._evaluate_pool is not None:
            return list(self._evaluate_pool)
        deadline = self._clock() + self.join_timeout
        while True:
            online = [n for n in self.inner.get_node_ids() if n in self.devices]
            if len(online) >= self.min_clients:
                return online
            if self._clock() >= deadline:
                raise Unavailable(
                    f"{len(online)} of {len(self.devices)} participants connected after "
                    f"{self.join_timeout:g}s; min-clients is {self.min_clients}"
                )
            self._sleep(1.0)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        if not msgs:  # evaluate = "on-train": the round's evaluation came with its train replies
            self._evaluate_pool = None
            if self._train:
                self._round(self._train.get("rnd", 0), self._train.get("eval", {}), {}, [])
            return []
        kind = msgs[0].metadata.message_type
        configs = msgs[0].content.config_records
        rnd = int(str(configs["config"].get("server-round", 0))) if "config" in configs else 0
        replies = self._exchange(msgs, timeout)
        ok = [r for r in replies if not r.has_error()]
        answered = sorted(self.devices.get(r.metadata.src_node_id, "?") for r in ok)
        sent = sorted(self.devices.get(m.metadata.dst_node_id, "?") for m in msgs)
        errors = {
            self.devices.get(r.metadata.src_node_id, "?"): r.error.reason
            for r in replies
            if r.has_error()
        }
        if kind == MessageType.TRAIN:
            self._evaluate_pool = [r.metadata.src_node_id for r in ok]
            metrics = _metrics(ok)
            self._train = {
                "rnd": rnd,
                "sent": sent,
                "answered": answered,
                "errors": errors,
                "metrics": {k: v for k, v in metrics.items() if not k.startswith("eval-")},
                "eval": {k: v for k, v in metrics.items() if k.startswith("eval-")},
            }
            if len(ok) < self.min_clients:
                silent = sorted(set(sent) - set(answered) - set(errors))
                raise Unavailable(
                    f"round {rnd}: {len(ok)} of {len(sent)} participants returned updates "
                    f"within {timeout:g}s; min-clients is {self.min_clients} "
                    f"(no answer: {', '.join(silent) or 'none'}; errors: {errors or 'none'})"
                )
        elif kind == MessageType.EVALUATE:
            self._evaluate_pool = None
            self._round(rnd, _metrics(ok), errors, answered)
        return replies

    def _round(
        self,
        rnd: int,
        evaluate: dict[str, float],
        errors: Mapping[str, str | None],
        evaluated: list[str],
    ) -> None:
        self.journal.write(
            "round",
            **({"label": self.label} if self.label else {}),
            round=rnd,
            participants=self._train.get("answered", []),
            sampled=self._train.get("sent", []),
            errors={**self._train.get("errors", {}), **errors},
            train=self._train.get("metrics", {}),
            evaluate=evaluate,
            evaluated=evaluated or (self._train.get("answered", []) if evaluate else []),
        )
        self._train = {}

    def _exchange(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """Push `msgs`; pull replies every `pull_interval` s until all came or `timeout`."""
        waiting = set(self.inner.push_messages(msgs))
        deadline = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        while True:
            got = list(self.inner.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and self._clock() >= deadline):
                return replies
            self._sleep(self.pull_interval)


def _metrics(replies: list[Message]) -> dict[str, float]:
    contents = [r.content for r in replies if r.content.metric_records]
    if not contents:
        return {}
    agg: MetricRecord = aggregate_metricrecords(contents, "num-examples")
    return {k: float(v) for k, v in agg.items() if isinstance(v, int | float)}
