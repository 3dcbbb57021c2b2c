"""The layered Flower strategy: sample per layer, send slots, verify, aggregate, veto, commit.

A subclass of Flower's message-based :class:`~flwr.serverapp.strategy.Strategy`;
Flower's own ``start`` loop drives the rounds. The maths lives in pure modules
(:mod:`~layerfed.federation.aggregate`, :mod:`~layerfed.federation.validate`,
:mod:`~layerfed.federation.vetoes`); this class wires them to messages, the
audit log and the checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from layerfed.federation.candidates import CandidateKeeper
from layerfed.federation.host import Placement
from layerfed.federation.pipeline import RoundContext, checkpoint_round, process_replies
from layerfed.federation.privacy_ledger import PrivacyLedger
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.secagg_server import SecAggServer, SecureRound
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.canonical import arrays_digest
from layerfed.governance.schema import Policy
from layerfed.layers.slots import SlotId, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.wire.manifest import MANIFEST, SlotManifest, SlotVersion, sign_manifest
from layerfed.wire.protocol import (
    Identity,
    MessageError,
    Task,
    arrays_to_record,
    slot_record_name,
)

__all__ = ["LayeredStrategy"]

log = logging.getLogger("layerfed")
TASK = "lf.task"
ACKS_KEPT = 4
"""Accepted digests remembered per instance (sent with every task until superseded)."""


class LayeredStrategy(Strategy):
    """Federated rounds over a governed layer stack (see docs/federation.md)."""

    def __init__(
        self,
        *,
        policy: Policy,
        placement: Placement | None = None,
        sample_per_layer: dict[str, int],
        state: ServerState,
        stack: LayerStack,
        tokenizer: Any,
        audit: AuditLog,
        run_id: str,
        seed: int,
        round_offset: int = 0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        discovery_timeout: float = 120.0,
        noise_seed: int | None = None,
        policy_hash: str = "",
        keep: CandidateKeeper | None = None,
        server_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.policy = policy
        self.policy_hash = policy_hash
        self.keep = keep
        self.server_key = server_key
        """Signs each task's manifest of the slots it sends (lf.manifest); None: unsigned."""
        """Keeps each slot's judged mean for replay (``keep_candidates``); None: off."""
        """Canonical hash of the verified policy, sent in every task (clients compare theirs)."""
        self.placement = placement
        """Known instances on a node pool (tasks name the instance); None: discover nodes."""
        self.sample_per_layer = sample_per_layer
        self.state = state
        self.stack = stack
        self.tokenizer = tokenizer
        self.audit = audit
        self.run_id = run_id
        self.seed = seed
        self.round_offset = round_offset
        self.on_round = on_round
        self.discovery_timeout = discovery_timeout
        self.noise_seed = noise_seed
        """Seed of server-side DP noise; None: OS entropy (a deployment)."""
        self.identities: dict[int, Identity] = {}
        self.refused: set[int] = set()
        """Nodes whose declared identity was refused at discovery (asked once per run)."""
        self.by_index: dict[int, int] = {}
        self.nodes: list[int] = []
        self.sent: dict[int, dict[str, int]] = {}
        self.pending: dict[int, Task] = {}
        self.acks: dict[str, list[str]] = {}
        """Instance id -> digests of its updates a commit used, sent with its next task."""
        self._started = 0.0
        self._roster_profiles: frozenset[tuple[str, tuple[str, ...]]] | None = None
        self.probes = ProbeRunner(policy, stack, tokenizer)
        self.privacy = PrivacyLedger(policy, state)
        self.secagg = SecAggServer(policy, stack, run_id, timeout=discovery_timeout)
        self._grid: Grid | None = None
        """The round's grid, kept from configure_train for secure aggregation's extra stages."""

    # -- discovery -------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid, expected: int | None) -> list[int]:
        deadline = time.monotonic() + self.discovery_timeout
        nodes = list(grid.get_node_ids())
        while expected is not None and len(nodes) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            nodes = list(grid.get_node_ids())
        return nodes

    def attach(self, grid: Grid, placement: Placement) -> None:
        """A placement: roster instances run on a pool of stateless nodes (no queries).

        Pool nodes hold no identity of their own, so the task names the instance and
        no node is asked who it is; the pool has as many nodes as one round has tasks
        (``placement.nodes``), so the cost of a round grows with the instances
        sampled, not with the instances that exist.
        """
        if not self.nodes:
            self.nodes = sorted(self._wait_for_nodes(grid, placement.nodes))
            log.info(
                "attached %s known instances to %s nodes", len(placement.roster), len(self.nodes)
            )

    def _pool_node(self, placement: Placement, index: int, busy: set[int]) -> int:
        """Node ``index mod K`` runs instance ``index`` this round, or the next one not ``busy``."""
        if len(busy) >= len(self.nodes):
            raise MessageError(
                f"placement: expected a free virtual node for instance {index}, got all "
                f"{len(self.nodes)} busy (fewer nodes than this round's tasks)"
            )
        at = index % len(self.nodes)
        while self.nodes[at] in busy:
            at = (at + 1) % len(self.nodes)
        node = self.nodes[at]
        busy.add(node)
        if node not in self.identities or self.identities[node].index != index:
            self.identities[node] = placement.roster.identity(index)
        return node

    def discover(self, grid: Grid, expected: int | None = None) -> None:
        """Deployment: ask every node not yet known who it is (once per node and run)."""
        nodes = self._wait_for_nodes(grid, expected)
        unknown = [n for n in nodes if n not in self.identities and n not in self.refused]
        if not unknown:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in unknown]
        for reply in grid.send_and_receive(messages, timeout=self.discovery_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.audit.append(
                    AuditKind.NODE_UNREACHABLE, node=str(node), error=str(reply.error.reason)
                )
                continue
            try:
                identity = Identity.from_message(reply)
            except MessageError as e:
                self.refused.add(node)
                self.audit.append(AuditKind.NODE_REFUSED, node=str(node), reason=str(e)[:300])
                continue
            self.identities[node] = identity
            self.by_index[identity.index] = node
        log.info("discovered %s nodes", len(self.identities))

    # -- sampling --------------------------------------------------------------

    def sample(self, round_: int) -> list[tuple[int, str]]:
        """(node, layer) pairs for this round: per layer, by rank, each instance at most once.

        A placement samples roster indices (so a resumed run samples the same instances);
        deployment samples the nodes that said they feed the layer.
        """
        rng = np.random.default_rng([self.seed, round_, 7])
        place = self.placement
        taken: set[int] = set()
        busy: set[int] = set()
        out: list[tuple[int, str]] = []
        for layer in self.policy.layers_by_rank():
            pool = self._eligible(layer.name, taken, round_)
            want = self.sample_per_layer.get(layer.name, len(pool))
            if not pool or want <= 0:
                continue
            chosen = rng.choice(len(pool), size=min(want, len(pool)), replace=False)
            for i in sorted(int(c) for c in chosen):
                taken.add(pool[i])
                node = self._pool_node(place, pool[i], busy) if place is not None else pool[i]
                out.append((node, layer.name))
        return out

    def _eligible(self, layer: str, taken: set[int], round_: int | None = None) -> list[int]:
        """Roster indices (a placement) or node ids (deployment) that may train ``layer``."""
        if self.placement is not None:
            indices = np.asarray(self.placement.roster.eligible(layer, round_), dtype=np.int64)
            if taken:  # vectorised: a round costs the same with 100 or 100,000 instances
                indices = indices[~np.isin(indices, np.fromiter(taken, np.int64, len(taken)))]
            return [int(i) for i in indices.tolist()]
        nodes = sorted(n for n, ident in self.identities.items() if layer in ident.layers)
        return [n for n in nodes if n not in taken]

    def profiles(self) -> frozenset[tuple[str, tuple[str, ...]]]:
        """(jurisdiction, groups) of every known instance: the roster's, or discovered nodes'."""
        if self._roster_profiles is None:
            self._roster_profiles = (
                self.placement.roster.profiles() if self.placement is not None else frozenset()
            )
        known = {(i.jurisdiction, tuple(i.groups)) for i in self.identities.values()}
        return self._roster_profiles | known

    def _train_slot(self, identity: Identity, layer: str, rng: np.random.Generator) -> SlotId:
        kind = self.policy.layer(layer).slot_key
        if kind == "global":
            return SlotId(layer, "global")
        if kind == "jurisdiction":
            return SlotId(layer, identity.jurisdiction)
        if kind == "group":
            return SlotId(layer, str(rng.choice(list(identity.groups))))
        return SlotId(layer, identity.instance_id)

    # -- Flower hooks ------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample instances per layer and send each its slots and its task."""
        round_ = self.round_offset + server_round
        self._started = time.monotonic()
        self._grid = grid
        if self.placement is not None:
            self.attach(grid, self.placement)
        else:
            self.discover(grid)
        rng = np.random.default_rng([self.seed, round_, 11])
        self.pending = {}
        messages = []
        for node, layer in self.sample(round_):
            identity = self.identities[node]
            if layer == "in_group" and not identity.groups:
                continue
            slot = self._train_slot(identity, layer, rng)
            if not self.privacy.allows(slot, identity.instance_id, round_, self.audit):
                continue  # the slot's epsilon budget is spent (audited once)
            slots = slots_for_instance(
                self.policy, identity.instance_id, identity.jurisdiction, list(identity.groups)
            )
            versions = {str(s): self.state.version(s) for s in slots}
            task = Task(
                self.run_id,
                round_,
                identity.index,
                identity.instance_id,
                layer,
                slot,
                versions,
                acks=tuple(self.acks.get(identity.instance_id, ())),
                policy_hash=self.policy_hash,
            )
            self.pending[node] = task
            content = RecordDict({TASK: task.to_record()})
            known = self.sent.setdefault(node, {})
            vouched: dict[str, SlotVersion] = {}
            for s in slots:
                leaves = self.policy.layer(s.layer).updates_leave_instance
                if not leaves or known.get(str(s)) == versions[str(s)]:
                    continue
                current = self.state.current(s, self.stack.spec(s), round_)
                content[slot_record_name(s)] = arrays_to_record(current)
                known[str(s)] = versions[str(s)]
                if self.server_key is not None:
                    vouched[str(s)] = SlotVersion(versions[str(s)], arrays_digest(current))
            if vouched and self.server_key is not None:
                manifest = SlotManifest(self.run_id, round_, identity.instance_id, vouched)
                content[MANIFEST] = sign_manifest(manifest, self.server_key)
            messages.append(Message(content, dst_node_id=node, message_type="train"))
        self.secagg.setup(messages, self.pending)  # secure slots: a setup record on their tasks
        self.audit.append(AuditKind.ROUND_START, round=round_, sampled=len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Verify, validate, aggregate, veto, commit, audit and checkpoint one round."""
        round_ = self.round_offset + server_round
        secured = SecureRound(list(replies), {}, ())
        if self.secagg.secure_nodes() and self._grid is not None:
            secured = self.secagg.run(self._grid, round_, secured.plain)
        secure_nodes = self.secagg.secure_nodes()
        ctx = RoundContext(
            policy=self.policy,
            run_id=self.run_id,
            round=round_,
            state=self.state,
            stack=self.stack,
            tokenizer=self.tokenizer,
            audit=self.audit,
            identities=self.identities,
            pending={n: t for n, t in self.pending.items() if n not in secure_nodes},
            probes=self.probes,
            secure=secured.sums,
            noise_seed=self.noise_seed,  # deployments: None, OS entropy
            profiles=self.profiles(),
            keep=self.keep,
        )
        report = process_replies(ctx, secured.plain, earlier=secured.events)
        for instance_id, digest in report.accepted.items():
            kept = self.acks.setdefault(instance_id, [])
            kept.append(digest)
            del kept[:-ACKS_KEPT]
        for node in report.unreachable:
            self.sent.pop(node, None)
        sent = [t.slot for t in self.pending.values()]
        wall_s = time.monotonic() - self._started
        metrics = checkpoint_round(ctx, report, self.privacy, sent, wall_s)
        if self.on_round is not None:
            self.on_round(metrics)
        summary: dict[str, int | float | list[int] | list[float]] = dict(report.summary.items())
        return None, MetricRecord(summary)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: probes run on the server after each commit."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the strategy's configuration."""
        layers = ", ".join(
            f"{layer.name}({layer.aggregator.kind})" for layer in self.policy.layers_by_rank()
        )
        log.info(
            "LayeredStrategy run %s: layers %s, sampling %s",
            self.run_id,
            layers,
            self.sample_per_layer,
        )
