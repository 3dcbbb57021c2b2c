"""Who trains which layer: a policy's roles, and routing one person's feedback to one layer.

A layer's ``roles`` lists the roles whose feedback trains it. A person's event carries
one role; the role names exactly one layer, so every event trains one layer, and the
policy (not the instance's list of layers, nor the server's task) decides which.

Defaults, when a layer declares no ``roles``:

* a per-instance layer (``slot_key: instance``, the individual layer) is trained by
  :data:`OWN_ROLE` (``everyone``): a person's own feedback, the role of anyone no call
  and no instance config names otherwise;
* every other layer is trained by the role of its own name (``creator`` by the role
  ``creator``, ``government`` by ``government``, ...).

So with no roles declared, a person's own feedback trains ``individual`` when the
policy has it, and never silently a shared layer: a shared layer trains only on events
a caller marked with its role. A role named by two layers is a semantic error.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from layerfed.errors import LayerfedError
from layerfed.governance.issues import Issue
from layerfed.governance.schema import LayerPolicy, Policy

__all__ = [
    "OWN_ROLE",
    "RoleError",
    "layer_roles",
    "role_routes",
    "role_rule",
    "roles_of",
    "route_role",
]

OWN_ROLE = "everyone"
"""The role of a person no call or config names: their own feedback."""


class RoleError(LayerfedError):
    """A role that the policy or the instance does not route: names field, expected, got."""

    def __init__(self, field: str, expected: str, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{field}: expected {expected}, got {got!r}")


def layer_roles(layer: LayerPolicy) -> tuple[str, ...]:
    """The roles whose feedback trains ``layer`` (declared, or the default by slot key)."""
    if layer.roles is not None:
        return tuple(layer.roles)
    return (OWN_ROLE,) if layer.slot_key == "instance" else (layer.name,)


def roles_of(policy: Policy, layer: str) -> tuple[str, ...]:
    """The roles that train the layer called ``layer`` (KeyError when the policy lacks it)."""
    return layer_roles(policy.layer(layer))


def role_routes(policy: Policy) -> dict[str, str]:
    """Role -> the layer its feedback trains (highest rank first wins a conflict)."""
    routes: dict[str, str] = {}
    for layer in policy.layers_by_rank():
        for role in layer_roles(layer):
            routes.setdefault(role, layer.name)
    return routes


def route_role(policy: Policy, role: str, layers: Collection[str] | None = None) -> str:
    """The layer ``role``'s feedback trains; :class:`RoleError` when nothing routes it.

    ``layers`` (an instance's layers) must hold that layer: an instance never trains a
    layer it does not feed, and never another one in its place.
    """
    routes = role_routes(policy)
    if role not in routes:
        raise RoleError("role", f"a role of policy {policy.name!r}: one of {sorted(routes)}", role)
    layer = routes[role]
    if layers is not None and layer not in layers:
        mine = sorted(r for r, name in routes.items() if name in layers)
        expected = f"a role that trains one of this instance's layers {sorted(layers)}: {mine}"
        raise RoleError("role", f"{expected} (role {role!r} trains {layer!r})", role)
    return layer


def role_rule(policy: Policy) -> Iterator[Issue]:
    """Semantic issues of roles: a role listed twice, or by two layers."""
    owner: dict[str, str] = {}
    for i, layer in enumerate(policy.layers):
        roles = layer_roles(layer)
        for j, role in enumerate(roles):
            path = ("layers", i, "roles", j) if layer.roles is not None else ("layers", i, "name")
            if role in roles[:j]:
                yield Issue(path, f"expected each role once, got '{role}' again")
            elif role in owner and owner[role] != layer.name:
                how = "" if layer.roles is not None else " (by default; declare its roles)"
                msg = (
                    f"expected each role to train one layer, got '{role}' training both "
                    f"'{owner[role]}' and '{layer.name}'{how}"
                )
                yield Issue(path, msg)
            owner.setdefault(role, layer.name)
