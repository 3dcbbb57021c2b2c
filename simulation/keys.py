"""Keys the gym computes from its seed: simulated layer principals and instance keys.

Anyone who knows the seed can compute these private keys, so they exist only in
simulation: a deployment never adds these principals (docs/security.md).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from layerfed.governance.envelope import InstanceCertificate, certify_instance
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy, Principal

__all__ = [
    "layer_principal",
    "sim_certificate",
    "sim_instance_key",
    "sim_layer_key",
    "sim_policy",
    "sim_principals",
]


def _key(*parts: object) -> Ed25519PrivateKey:
    seed = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def sim_layer_key(seed: int, layer: str) -> Ed25519PrivateKey:
    """The simulated key of a layer's delegating principal (deterministic from the seed)."""
    return _key("layerfed-sim-layer", seed, layer)


def sim_instance_key(seed: int, instance_id: str) -> Ed25519PrivateKey:
    """The simulated key of one instance (deterministic from the seed)."""
    return _key("layerfed-sim-instance", seed, instance_id)


def layer_principal(layer: str) -> str:
    """Name of the simulated principal that certifies a layer's instance keys."""
    return f"sim_{layer}"


def sim_certificate(seed: int, instance_id: str, layer: str) -> InstanceCertificate:
    """The certificate a simulated layer principal issues to a simulated instance key."""
    key = sim_instance_key(seed, instance_id)
    return certify_instance(
        instance_id, key.public_key(), layer, layer_principal(layer), sim_layer_key(seed, layer)
    )


def sim_principals(policy: Policy, seed: int) -> list[Principal]:
    """One delegating principal per layer whose key the simulation holds."""
    have = {p.name for p in policy.principals}
    return [
        Principal(
            name=layer_principal(layer.name),
            layer=layer.name,
            public_key=public_key_string(sim_layer_key(seed, layer.name).public_key()),
            delegates_to_instances=True,
        )
        for layer in policy.layers
        if layer_principal(layer.name) not in have
    ]


def sim_policy(policy: Policy, seed: int) -> Policy:
    """``policy`` plus :func:`sim_principals` (simulated instances sign as deployed ones do)."""
    extra = sim_principals(policy, seed)
    return policy.model_copy(update={"principals": [*policy.principals, *extra]})
