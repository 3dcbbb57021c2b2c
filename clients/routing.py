"""Which layer a person's feedback trains on this instance: the policy's roles, its people.

An event is given in one role: named by the call (``role=``), or the one role the
instance config gives the person (``person=``), or else :data:`OWN_ROLE` (a person's
own feedback). The policy routes the role to exactly one layer
(:func:`~layerfed.governance.schema_roles.route_role`), which must be one of the
instance's layers. The journal records that layer with the event; a round trains a
layer only on the events routed to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerfed.clients.events import InvalidFeedback
from layerfed.governance.schema import Policy
from layerfed.governance.schema_roles import OWN_ROLE, role_routes, route_role
from layerfed.governance.schema_roles import RoleError as PolicyRoleError

__all__ = ["OWN_ROLE", "RoleError", "Route", "Router"]


class RoleError(InvalidFeedback):
    """Feedback in a role (or from a person) the policy or this instance does not route.

    An :class:`~layerfed.clients.events.InvalidFeedback` (so a page answers it as a bad
    request), naming the field (``role``, ``person``, ``people.<id>``), expected and got.
    """


@dataclass(frozen=True)
class Route:
    """The role an event was given in and the layer it trains."""

    role: str
    layer: str


class Router:
    """Routes this instance's feedback by the policy's roles.

    ``layers`` are the layers the instance feeds (None: every layer of the policy);
    ``people`` maps a person id to the roles the instance config gives them. Every
    person's roles are checked here: :class:`RoleError` for one the policy or the
    instance does not route.
    """

    def __init__(
        self,
        policy: Policy,
        layers: Sequence[str] | None = None,
        people: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.policy = policy
        self.layers = tuple(layers) if layers is not None else tuple(x.name for x in policy.layers)
        self.people = {person: tuple(roles) for person, roles in (people or {}).items()}
        for person, roles in self.people.items():
            if not roles:
                raise RoleError(f"people.{person}", "at least one role", [])
            for role in roles:
                try:
                    route_role(policy, role, self.layers)
                except PolicyRoleError as e:
                    raise RoleError(f"people.{person}", e.expected, role) from e
        own = role_routes(policy).get(OWN_ROLE)
        self.own_layer = own if own in self.layers else None
        """The layer a person's own feedback trains here (None: the instance has none)."""

    def route(self, role: str | None = None, person: str | None = None) -> Route:
        """The role and layer of feedback given by ``person`` in ``role`` (see the module)."""
        if person is not None:
            if person not in self.people:
                expected = f"one of this instance's people {sorted(self.people)}"
                raise RoleError("person", expected, person)
            allowed = self.people[person]
            if role is None:
                if len(allowed) != 1:
                    raise RoleError("role", f"one of {person!r}'s roles {list(allowed)}", None)
                role = allowed[0]
            elif role not in allowed:
                raise RoleError("role", f"one of {person!r}'s roles {list(allowed)}", role)
        if role is None:
            role = OWN_ROLE
        try:
            return Route(role, route_role(self.policy, role, self.layers))
        except PolicyRoleError as e:
            raise RoleError(e.field, e.expected, e.got) from e

    def selects(self, layer: str) -> tuple[str, bool]:
        """How the journal selects ``layer``'s events: its name, and whether rows journalled
        before events were routed belong to it (they are a person's own feedback)."""
        return layer, layer == self.own_layer
