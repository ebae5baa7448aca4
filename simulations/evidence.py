"""The invariants about syncnodes' signed evidence (:mod:`simulations.invariants` says what
each means): **never-accused**, **withholding-detected**, and the ``syncnode-reset`` part of
**alarms**. Apart from the rest because they read what devices concluded about syncnodes
(alarms and their evidence, :mod:`device.witness`), not the documents or the logs.
"""

from __future__ import annotations

from proto.codec import decode_as
from proto.errors import SyncnodeError
from proto.holdings import WithholdingProof, verify
from proto.resets import StorageReset, verify_reset
from simulations.violation import Violation
from simulations.world import World, kept_incarnations


def resets(world: World) -> list[Violation]:
    """The ``syncnode-reset`` part of **alarms** (see the module doc): every such alarm is
    valid evidence about a wiped node; and a device that kept statements of a node when it was
    wiped, and keeps statements of another incarnation of it now, raised one."""
    wiped = {n.key.public for n in world.nodes if n.wipes}
    out = []
    for dev in world.devices:
        if dev.doc is None:
            continue
        for (evidence,) in dev.doc.store.all("SELECT evidence FROM alarms WHERE group_id=? "
                                             "AND kind='syncnode-reset'", dev.doc.group_id):
            try:
                node_id = verify_reset(decode_as(evidence, StorageReset)).node_id
            except SyncnodeError as exc:
                out.append(Violation("alarms", f"{dev.name}'s syncnode-reset alarm holds no "
                                     f"valid evidence: {exc}"))
                continue
            if node_id not in wiped:
                out.append(Violation("alarms", f"{dev.name} says syncnode "
                                     f"{node_id.hex()[:8]} reset, but it was never wiped"))
    for node in world.nodes:
        for index, before in node.watched.items():
            dev = world.devices[index]
            if dev.doc is None or not kept_incarnations(dev, node.key.public) - before:
                continue
            if not any(a.kind == "syncnode-reset" and node.key.public.hex() in a.detail
                       for a in dev.doc.alarms()):
                out.append(Violation("alarms", f"{dev.name} holds statements of {node.name}'s "
                                     "new storage and raised no syncnode-reset"))
    return out


def convictions(world: World) -> tuple[dict[bytes, str], list[Violation]]:
    """Syncnode id -> a device whose ``withholding`` alarm proves it withheld; and the
    alarms whose proof does not verify."""
    convicted: dict[bytes, str] = {}
    bad = []
    for dev in world.devices:
        if dev.doc is None:
            continue
        for (evidence,) in dev.doc.store.all("SELECT evidence FROM alarms WHERE group_id=? "
                                             "AND kind='withholding'", dev.doc.group_id):
            try:
                finding = verify(decode_as(evidence, WithholdingProof))
            except SyncnodeError as exc:
                bad.append(Violation("never-accused", f"{dev.name}'s withholding alarm "
                                     f"holds no valid proof: {exc}"))
                continue
            convicted.setdefault(finding.node_id, dev.name)
    return convicted, bad


def never_accused(world: World) -> list[Violation]:
    """**never-accused**: no valid proof, nor a suspicion, names an honest syncnode."""
    convicted, out = convictions(world)
    honest = {n.key.public: n.name for n in world.nodes if n.honest}
    for node_id, who in convicted.items():
        if node_id in honest:
            out.append(Violation("never-accused", f"{who} holds a proof that honest "
                                 f"{honest[node_id]} withheld"))
    for dev in world.devices:
        if dev.doc is None:
            continue
        for alarm in dev.doc.alarms():
            if alarm.kind == "withholding-suspected" and any(
                    node_id.hex() in alarm.detail for node_id in honest):
                out.append(Violation("never-accused", f"{dev.name} suspects an honest "
                                     f"syncnode: {alarm.detail}"))
    return out


def withholding_detected(world: World) -> list[Violation]:
    """**withholding-detected**: a withholder whose ack a member holds is proven."""
    convicted, _ = convictions(world)
    out = []
    for node in world.nodes:
        if node.behaviour != "withhold" or node.key.public in convicted:
            continue
        holders = [d.name for d in world.members() if d.doc is not None and
                   d.doc.store.one("SELECT 1 FROM witness WHERE group_id=? AND node_id=? "
                                   "AND kind='ack'", d.doc.group_id, node.key.public)]
        if holders:
            out.append(Violation("withholding-detected", f"{node.name} withholds, "
                                 f"{', '.join(holders)} hold its signed acks, and no "
                                 "device raised a withholding alarm with a proof"))
    return out
