"""What travels and when: payload encoding and checks (`payload.py`), version vectors (`ledger.py`), quantized deltas
with error feedback (`deltas.py`), transports (`transport.py`: the interface and the in-memory wire; `torch_dist.py`:
gloo links with per-hop liveness), the relay between stages (`relay.py`), the cs coordinator that survives a dead node
(`coordinator.py`), and the session that builds them for a run (`session.py`). The trainer decides what trains; the
engine decides what travels."""
