"""Ranks and attackers for tests/test_distributed_auth.py: real spawned processes over real loopback sockets.

Each rank builds a `DistributedTransport` with its own keyword arguments (so one rank may hold another secret), runs
its target, and writes what happened to OUT/rank<r>.json. The attacks on payloads take over the sending side of a
link, as an attacker on the wire does (or one that hijacked the link's gloo rendezvous, which the store does not
protect): the receiver gets well-formed bytes with valid checksums, and a seal forged without the secret, replayed
from an earlier stage, or made for another receiver.

The intruder (`intrude`) is a separate process that holds no secret: it connects to the run's rendezvous store as any
host on the network could, and reads, forges and replays store messages while the run goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from snake_hf.engine.auth import RunAuth
from snake_hf.engine.payload import EncodedPayload, Payload, encode_payload
from snake_hf.engine.torch_dist import DistributedTransport, _bytes_of


SECRET = "correct horse battery staple 0123456789"
OTHER_SECRET = "a different secret, also long enough"
FAST = {"hop_timeout": 5.0, "heartbeat_interval": 0.2, "heartbeat_timeout": 3.0}


def payload(stage: int, numel: int = 1000, seed: int | None = None) -> EncodedPayload:
    """A well-formed payload with valid checksums (anyone can build one: the checksums are not secret)."""
    generator = torch.Generator().manual_seed(stage if seed is None else seed)
    tensors = {f"w{stage}": torch.randn(numel, generator=generator)}
    manifest = {"sender": 0, "receiver": 1, "stage": stage, "parts": ["g0"]}
    return encode_payload(Payload(manifest, tensors), dict.fromkeys(tensors, "g0"))


def entry(target, rank, world_size, port, out, kwargs, ready, go):
    torch.set_num_threads(1)
    ready.release()
    if not go.wait(180):
        os._exit(2)
    result, start = {}, time.monotonic()
    try:
        transport = DistributedTransport(rank, world_size, master_addr="127.0.0.1", master_port=port, **kwargs)
        try:
            result = target(transport) or {}
        finally:
            transport.close()
        result["link_bytes"] = [[a, b, n] for (a, b), n in transport.link_bytes.items()]
    except Exception as error:  # reported to the test, which asserts on it
        result = {"error": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    result["seconds"] = time.monotonic() - start
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)


# -- rank targets ---------------------------------------------------------------------------------------------------


def idle(transport):
    """Joins and closes."""


def idle_until_forged(transport, key="snake/exchange/sizes/0/1", seconds=60.0):
    """Joins, stays until an intruder has written `key` in this rank's name, and closes. Closing at once would race
    the intruder: a peer waiting for `key` that saw this rank closed first stops on that, not on the forgery."""
    deadline = time.monotonic() + seconds
    while not transport.store.check([key]) and time.monotonic() < deadline:
        time.sleep(0.01)


def receive_stages(transport, stages=(1,), sender=0):
    """Receives the payload of each of `stages` from `sender`; records which arrived intact."""
    arrived = {}
    for stage in stages:
        arrived[stage] = transport.recv(sender, transport.rank, stage).to_bytes() == payload(stage).to_bytes()
    return {"arrived": arrived}


def send_genuine(transport, stages=(1,), receiver=1):
    for stage in stages:
        transport.send(transport.rank, receiver, payload(stage), stage)


def send_forged(transport):
    """Sends stage 1 a forged payload: right format and checksums, sealed by someone who lacks the secret but read
    everything public (the session's nonces in the store, so the session id, hop, ranks and sequence number)."""
    forger = RunAuth(OTHER_SECRET)
    forger.session = transport._auth.session  # public: the hash of the nonces every rank published

    def forged_seal(peer, hop, encoded):
        body = [_bytes_of(encoded.manifest), _bytes_of(encoded.data)]
        seal = forger.seal_payload(hop, transport.rank, peer, 0, _bytes_of(encoded.header), body)
        return torch.frombuffer(bytearray(seal), dtype=torch.uint8)

    transport._seal = forged_seal
    transport.send(transport.rank, 1, payload(1, seed=666), 1)


def replay_earlier_stage(transport):
    """Sends stage 1 genuinely, then replays stage 1's bytes and seal as the payload of stage 3."""
    genuine_seal, captured = transport._seal, {}

    def capture(peer, hop, encoded):
        captured.setdefault("seal", genuine_seal(peer, hop, encoded))
        return captured["seal"]

    transport._seal = capture
    transport.send(transport.rank, 1, payload(1), 1)
    transport.send(transport.rank, 1, payload(1), 3)  # stage 1's bytes, stage 1's seal, on stage 3's hop


def readdress(transport):
    """Seals stage 1's payload for rank 2 and sends it to rank 1."""
    genuine_seal = transport._seal
    transport._seal = lambda peer, hop, encoded: genuine_seal(2, hop, encoded)
    transport.send(transport.rank, 1, payload(1), 1)


def exchange(transport):
    return {"texts": transport.exchange_text("sizes", f"size-of-{transport.rank}")}


def exchange_then_send(transport):
    exchange(transport)
    transport.send(transport.rank, 1, payload(1), 1)


def exchange_lost_then_receive(transport):
    """Rank 1's exchanged text is deleted from the store the moment it lands (an intruder quicker than any reader);
    then rank 1 waits for rank 0's payload, which rank 0 sends only after the exchange: without a defence both ranks
    would wait for each other for ever, each heartbeat telling the other that it lives."""
    publish = transport.publish

    def publish_and_lose(key, text):
        publish(key, text)
        if key.startswith("snake/exchange/"):
            transport.store.delete_key(key)

    transport.publish = publish_and_lose
    exchange(transport)
    transport.recv(0, 1, 1)


# -- the intruder -----------------------------------------------------------------------------------------------------


def _write_atomically(path: Path, record: dict) -> None:
    """Writes `record` as JSON so that a reader never sees a part of it: the test kills the intruder at any moment,
    and a kill between `write_text`'s truncation and its write left an empty file (a CI failure, JSONDecodeError)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def intrude(port: int, mode: str, world_size: int, out: str, seconds: float = 60.0) -> None:
    """A process without the secret, on the store from the start of the run.

    * `lurker`: reads every key it can name, joins as a rank once the ranks have joined (a greeting and a proof of
      its own), and writes keys of its own. It cannot change anything any rank trusts.
    * `forger`: once the run is under way, keeps overwriting every rank's heartbeat and the hop flags with forged and
      replayed (copied from another key) values.
    """
    import socket

    from torch.distributed import TCPStore

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # wait for rank 0's store to listen (a TCPStore client may stall otherwise)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    store = TCPStore("127.0.0.1", port, None, False, timedelta(seconds=30))
    seen, record = {}, Path(out, "intruder.json")
    joined = [f"snake/join/{r}/done" for r in range(world_size)]
    while not store.check(joined) and time.monotonic() < deadline:
        time.sleep(0.05)
    for rank in range(world_size):  # try to take a rank's place after the fact, and read what it can
        store.set(f"snake/join/{rank}/hello", json.dumps({"auth": True, "nonce": "intruder"}))
        store.set(f"snake/join/{rank}/proof", "0" * 64)
    actions = 0
    _write_atomically(record, {"actions": actions, "read": [], "joined_at": time.time()})
    try:
        while time.monotonic() < deadline:
            for rank in range(world_size):
                key = f"snake/alive/{rank}"
                if store.check([key]):
                    seen[key] = store.get(key).decode(errors="replace")
            if mode == "forger" and len(seen) == world_size:
                for rank in range(world_size):
                    other = seen[f"snake/alive/{(rank + 1) % world_size}"]  # a genuine value, replayed elsewhere
                    store.set(f"snake/alive/{rank}", other if actions % 2 else "hmac1:" + "0" * 64 + "|999999")
                for stage in range(1, 16):
                    for a in range(world_size):
                        for b in range(world_size):
                            if a != b:
                                store.set(f"snake/hop/{stage}/{a}-{b}/sent", "1")
                actions += 1
            elif mode == "lurker":
                store.set("snake/intruder/was-here", str(actions))
                actions += 1
            _write_atomically(record, {"actions": actions, "read": sorted(seen)})
            time.sleep(0.05)
    except RuntimeError:  # the run is over: its store went away
        pass


if __name__ == "__main__":
    intrude(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
