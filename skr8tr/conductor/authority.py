"""Who may do what: the authorized keys, the replay guard, the node sessions they opened.

One :class:`Authority` per conductor, shared by ``/v1/cli`` (requests are
checked against its keys and guard) and ``/v1/node`` (node keys, and the
sessions a revoked key must lose). SIGHUP replaces the keys in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from skr8tr.core import envelope
from skr8tr.core.keys import AuthorizedKeys


@dataclass(eq=False)
class NodeSessionHandle:
    """A welcomed node session, so that revoking its key can end it."""

    node_id: str
    key: str
    scope: trio.CancelScope
    revoked: bool = False


@dataclass
class Authority:
    """Who may do what: the authorized keys (replaced on SIGHUP), the replay guard and the
    node sessions those keys opened."""

    authorized: AuthorizedKeys
    insecure: bool = False
    guard: envelope.ReplayGuard = field(default_factory=envelope.ReplayGuard)
    node_sessions: set[NodeSessionHandle] = field(default_factory=set)

    def replace_keys(self, authorized: AuthorizedKeys) -> list[NodeSessionHandle]:
        """Trust *authorized* from now on; end the node sessions whose key lost the node
        role, and return them. Requests are checked against the new keys at once."""
        self.authorized = authorized
        if self.insecure:
            return []
        revoked = [h for h in self.node_sessions if not authorized.has_role(h.key, "node")]
        for handle in revoked:
            handle.revoked = True
            handle.scope.cancel()
        return revoked
