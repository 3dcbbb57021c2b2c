"""What a ClientApp needs from its host: a runtime, identities, instances, a disk, a plan.

:class:`~layerfed.clients.node.NodeSource` serves a deployed node from its node
config; the gym implements its own source from above (its simulated people give
feedback through :meth:`~layerfed.clients.instance.Instance.feedback_many` in
:meth:`InstanceSource.prepare_round`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Context, Message

from layerfed.clients.instance import Instance
from layerfed.clients.instance_rounds import TrainPlan
from layerfed.clients.synced import SyncedSlots
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import Identity, Task

__all__ = ["InstanceSource", "NodeRuntime", "TrainPlan"]


@dataclass
class NodeRuntime:
    """One policy, base model and layer stack per process, shared by its instances."""

    policy: Policy
    stack: LayerStack
    shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    policy_hash: str = ""
    """Canonical hash of the verified policy; when set, tasks must carry the same one."""

    def zeros(self, slot: SlotId) -> Arrays:
        """Zero arrays of a slot; shapes are the same for every slot of a layer (cached)."""
        prefix = f"{slot}/"
        if slot.layer not in self.shapes:
            shapes = self.stack.spec(slot).shapes()
            self.shapes[slot.layer] = {n.removeprefix(prefix): s for n, s in shapes.items()}
        return {
            prefix + n: np.zeros(s, dtype=np.float32) for n, s in self.shapes[slot.layer].items()
        }


class InstanceSource(ABC):
    """Where a ClientApp's runtime, identities and instances come from."""

    @abstractmethod
    def runtime(self, msg: Message, context: Context) -> NodeRuntime:
        """The (cached) runtime this message is for."""

    @abstractmethod
    def identity(
        self, msg: Message, context: Context, rt: NodeRuntime, task: Task | None
    ) -> Identity:
        """Who this node runs (for ``task`` when the server names a simulated instance)."""

    @abstractmethod
    def instance(
        self, msg: Message, context: Context, rt: NodeRuntime, identity: Identity
    ) -> Instance:
        """The instance for ``identity``, on the runtime's shared stack."""

    @abstractmethod
    def disk(self, context: Context, identity: Identity) -> InstanceDisk:
        """Where the instance keeps the slots whose updates never leave it."""

    def synced(self, context: Context, identity: Identity) -> SyncedSlots | None:
        """Where the instance saves the verified shared slots it is sent (default: nowhere)."""
        return None

    def prepare_round(self, instance: Instance, identity: Identity, task: Task) -> TrainPlan:
        """Called before the round; says how to train it (default: a seed from round and index).

        A host may give the instance feedback here, through its public API (the gym's
        simulated people do); it never touches the journal itself.
        """
        seq = np.random.SeedSequence([task.round, task.index, 17])
        return TrainPlan(seed=int(seq.generate_state(1)[0]))
