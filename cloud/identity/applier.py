"""Applying the identity records to a running broker, once for every change waiting.

`fleet serve` rewrites its broker's password/ACL/CRL files and reloads it whenever the
records change: after an enrolment it served itself (the caller waits for it) and when a
shell changed them (`watch_identities`). Callers come from several threads; each waits
for a version at least as new as the records it wrote. One apply covers every change
made before it started, so callers that find theirs applied meanwhile return at once:
a burst of concurrent enrolments costs a few reloads, not one each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgefleet.cloud.identity.store import IdentityStore

logger = logging.getLogger(__name__)


class CredentialApplier:
    """`apply()` rewrites the broker's files from `identities` and reloads it."""

    def __init__(self, identities: IdentityStore, apply: Callable[[], None]) -> None:
        self.identities = identities
        self._apply = apply
        self._lock = threading.Lock()
        #: how many times the broker was given new files (for /metrics and tests)
        self.applies = 0

    def __call__(self) -> bool:
        """Return once the broker runs with the records as they are now; True when this
        call applied them, False when an apply made meanwhile already covered them."""
        wanted = self.identities.version()
        with self._lock:
            if self.identities.applied() >= wanted:
                return False
            version = self.identities.version()  # read before the files: a lower bound
            self._apply()
            self.identities.mark_applied(version)
            self.applies += 1
            return True
