"""Distributed Snake overhead: how much of the wall time the hops take, and how many bytes a hop moves.

For 2, 3 and 4 ranks (one CPU process per node on loopback, one torch thread each, started like
`tests/test_distributed.py` starts them: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), a Snake LoRA run of a GPT-2
built from a config runs in the p2p and the cs topology, and the same config runs once in simulation for reference
(same seed and thread count, so the losses must be bit-identical).

**Hop time is the hop's cost on the critical path, not a rank's waiting.** In a sequential plan a rank waits through
other ranks' training for its turn; that wait is in its stages' `wait_seconds` but is not overhead. Per hop:

* `encode`: the sender builds and encodes the payload (`HopRecord.seconds` less its `transport.send` call; the cs
  coordinator sends its own payload later, from its turn loop, so its `HopRecord.seconds` has no send in it);
* `wire`: from the later of the sender's `transport.send` call and the receiver starting to wait for the payload, to
  the receiver's `transport.recv` returning (handshake over the store, gloo link set-up on a link's first hop, the
  transfer, and in cs the coordinator's forwarding). The receiver started to wait `wait_seconds - load_seconds`
  before its `recv` returned: in p2p inside that `recv` call, in cs earlier, when it began to wait for its turn
  (the coordinator publishes the turn once it holds the payload, so the receiver's `recv` starts after the first leg);
* `load`: the receiver decodes, verifies and loads the payload (its stage's `load_seconds`);

hop = encode + wire + load, and the rank's "turn" wait is the rest of `wait_seconds`. The report has no send/recv
timestamps, so the worker wraps the transport's `send`, `recv` and `broadcast_final` and stamps them with
`time.time()`: every rank runs on this host, so one clock serves them all. Hop share = hops / (training + hops),
summed over the ranks (one trains at a time); per rank, the sender's encode and the receiver's wire + load count.
The final hand-off (every rank gets the final adapters) happens once per run and is shown on its own.

Bytes: per hop `nbytes` (header + manifest + data on the wire) against `tensor_nbytes`, the carried tensors alone,
which must equal the sum of `part_nbytes` over the parts the receiver lacked (the theoretical minimum).

**Authentication** (`--auth off on`, the default): every distributed run runs without and with a `run_secret`
(docs/security.md), and a table compares the warm hop times: the ratio authenticated / unauthenticated is the time an
authenticated hop adds (its seal over header, manifest and data, and the sealed store flags it waits on). A second
table times sealing and checking payloads of several sizes alone (HMAC-SHA256, one thread), since on a small model the
hop's bytes are few and the ratio mostly shows the store handshake.

Usage:
    python benchmarks/distributed_overhead.py           # 2, 3, 4 ranks, p2p and cs: a few minutes on 2 CPU cores
    python benchmarks/distributed_overhead.py --quick   # a tiny model, 3 ranks: under 2 minutes (a smoke test)
    python benchmarks/distributed_overhead.py --world_sizes 2 --topologies p2p --stage_steps 4   # any setting
    python benchmarks/distributed_overhead.py --quick --out_dir benchmarks/results --name distributed_overhead_auth_quick

Writes `distributed_overhead.json` (machine, config, per-run details and both reports) and
`distributed_overhead.md` to `--out_dir` (default `benchmarks/results`; with `--quick` a temporary folder, so that a
smoke run never overwrites the measured results).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class BenchConfig:
    """One benchmark's settings; every run (world size, topology, engine) uses the same model, data and plan shape."""

    world_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])
    topologies: list[str] = field(default_factory=lambda: ["p2p", "cs"])
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 1024
    seq_len: int = 128
    batch_size: int = 8
    lora_r: int = 8
    num_block_groups: int = 2
    stage_steps: int = 2
    num_passes: int = 1
    seed: int = 0
    timeout: float = 600.0
    auth: list[str] = field(default_factory=lambda: ["off", "on"])  # distributed runs without / with a run_secret


# 3 ranks: in cs one hop then goes between two other ranks through the coordinator (with 2 ranks none does)
BENCH_SECRET = "benchmark-run-secret-0123456789abcdef"  # a benchmark's secret: nothing to protect here
QUICK = dict(world_sizes=[3], n_layer=4, n_embd=64, n_head=2, vocab_size=256, seq_len=32, batch_size=4, stage_steps=1)


# ---- one rank (or the simulation), in its own process ----


class _Timeline:
    """Wraps a transport's calls and stamps each with `time.time()` (one clock for every rank on this host)."""

    # method -> (event kind, position of the stage among its positional arguments). The cs coordinator routes with
    # send_to(peer, encoded, hop, ...) / recv_from(peer, hop, ...); p2p uses send/recv(src, dst, [encoded,] stage).
    METHODS = {"send": ("send", -1), "recv": ("recv", -1), "send_to": ("send", 2), "recv_from": ("recv", 1),
               "broadcast_final": ("broadcast_final", None)}  # fmt: skip

    def __init__(self, transport):
        self.events: list[dict] = []
        for name, (kind, position) in self.METHODS.items():
            if hasattr(transport, name):
                setattr(transport, name, self._timed(kind, position, getattr(transport, name)))

    def _timed(self, kind: str, position: int | None, method):
        def timed(*args, **kwargs):
            start = time.time()
            result = method(*args, **kwargs)
            stage = -1 if position is None else args[position]
            if isinstance(stage, int):
                self.events.append({"kind": kind, "stage": stage, "start": start, "end": time.time()})
            else:  # a named hop: the cs coordinator's final hand-off, one span per rank from first call to last
                final = next((ev for ev in self.events if ev["kind"] == "broadcast_final"), None)
                if final is None:
                    self.events.append({"kind": "broadcast_final", "stage": -1, "start": start, "end": time.time()})
                else:
                    final["end"] = time.time()
            return result

        return timed


def run_worker(config: BenchConfig, jobs: list[dict], out_dir: Path) -> None:
    """Runs `jobs` one after another in this process (a simulation, or this rank's part of distributed runs), each
    writing its record: timeline, bytes sent, and on the first rank the merged report."""
    import torch

    torch.set_num_threads(1)  # one thread in every process: the same arithmetic as the simulation, bit for bit
    launch_env = {k: os.environ[k] for k in LAUNCH_VARS if k in os.environ}  # the trainer hides them once read
    _warm_up(config)  # the first forward/backward of a process is slow; keep it out of every measured stage
    for job in jobs:
        if job["port"] is not None:
            os.environ.update(launch_env, MASTER_PORT=str(job["port"]))
        record = _run_job(config, job["num_nodes"], job["topology"], job["port"] is not None, out_dir, job["auth"])
        (out_dir / _record_name(job, record["rank"])).write_text(json.dumps(record))
        print(f"job {job} done", flush=True)


def _run_job(
    config: BenchConfig, num_nodes: int, topology: str, distributed: bool, out_dir: Path, auth: str = "off"
) -> dict:
    import datasets
    import torch
    from peft import LoraConfig

    from snake_hf import SnakeConfig, SnakeTrainer

    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=str(out_dir / "trainer"), num_nodes=num_nodes,
        num_block_groups=config.num_block_groups, stage_steps=config.stage_steps, num_passes=config.num_passes,
        per_device_train_batch_size=config.batch_size, learning_rate=1e-3, warmup_steps=1, topology=topology,
        engine="distributed" if distributed else "simulation", hop_timeout=config.timeout, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=10**6, seed=config.seed,
        run_secret=BENCH_SECRET if auth == "on" else None,
    )  # fmt: skip
    samples = num_nodes * config.num_block_groups * config.num_passes * config.stage_steps * config.batch_size
    generator = torch.Generator().manual_seed(config.seed + 1)
    ids = torch.randint(0, config.vocab_size, (samples, config.seq_len), generator=generator).tolist()
    lora = LoraConfig(r=config.lora_r, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = SnakeTrainer(_model(config), args, train_dataset=data, peft_config=lora)
    timeline = _Timeline(trainer.transport)
    if distributed:
        trainer.transport.barrier("benchmark-start")  # every rank built its trainer: start-up skew is not a hop
    start = time.time()
    trainer.train()
    end = time.time()
    rank = trainer.launch.rank if trainer.launch is not None else 0
    link_bytes = getattr(trainer.transport, "link_bytes", {})
    record = {
        "rank": rank,
        "train_start": start,
        "train_end": end,
        "events": timeline.events,
        "bytes_sent": sum(n for (src, _), n in link_bytes.items() if src == rank),
    }
    if rank == 0:
        record["report"] = trainer.snake_report.to_dict()
    trainer.transport.close()
    return record


def _model(config: BenchConfig):
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(config.seed)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, vocab_size=config.vocab_size,
                   n_positions=config.seq_len, bos_token_id=0, eos_token_id=0)
    )  # fmt: skip


def _warm_up(config: BenchConfig) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(config), LoraConfig(r=config.lora_r, target_modules=["c_attn"], fan_in_fan_out=True))
    ids = torch.zeros(config.batch_size, config.seq_len, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()


def _record_name(job: dict, rank: int) -> str:
    engine = f"{job['topology']}-auth-{job['auth']}" if job["port"] is not None else "simulation"
    return f"{engine}-{job['num_nodes']}-rank-{rank}.json"


# ---- launching ----


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(config: BenchConfig, jobs: list[dict], num_procs: int, out_dir: Path, name: str) -> list[list[dict]]:
    """Starts `num_procs` processes (ranks, or one simulation) that run `jobs`; returns each job's records by rank."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out_dir), "--worker_jobs",
               json.dumps(jobs), "--worker_config", json.dumps(dataclasses.asdict(config))]  # fmt: skip
    envs = [base]
    if jobs[0]["port"] is not None:
        envs = [
            dict(base, RANK=str(r), WORLD_SIZE=str(num_procs), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1")
            for r in range(num_procs)
        ]
    logs = [open(out_dir / f"log-{name}-{r}.txt", "w") for r in range(len(envs))]  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        for env, log in zip(envs, logs)
    ]
    try:
        deadline = time.monotonic() + config.timeout
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    for proc, code, log in zip(procs, codes, logs):
        if code != 0:
            tail = Path(log.name).read_text()[-3000:]
            raise RuntimeError(f"Jobs {jobs}: process {proc.pid} exited with {code}:\n{tail}")
    return [[json.loads((out_dir / _record_name(job, r)).read_text()) for r in range(len(envs))] for job in jobs]


# ---- analysis ----


def _events(records: list[dict], kind: str) -> dict[tuple[int, int], dict]:
    """`(rank, stage) -> event` of one kind over every rank's timeline."""
    return {(rec["rank"], ev["stage"]): ev for rec in records for ev in rec["events"] if ev["kind"] == kind}


def hop_costs(report: dict, records: list[dict], distributed: bool, topology: str = "p2p") -> list[dict]:
    """Each hop's encode / wire / load seconds on the critical path, and the receiver's wait for its turn."""
    stages = {s["stage"]: s for s in report["stages"]}
    sends, recvs = _events(records, "send"), _events(records, "recv")
    used_links: set[frozenset] = set()
    hops = []
    for hop in report["hops"]:
        send = sends[(hop["sender"] if distributed else 0, hop["to_stage"])]  # the simulation is all rank 0
        recv = recvs[(hop["receiver"] if distributed else 0, hop["to_stage"])]
        wait, load = stages[hop["to_stage"]]["wait_seconds"], stages[hop["to_stage"]]["load_seconds"]
        send_call, recv_call = send["end"] - send["start"], recv["end"] - recv["start"]
        # Distributed: from the later of "sender sends" and "receiver is ready" to the bytes being there. Simulation:
        # the in-memory send and recv (between them the trainer closes one stage and opens the next). Not the recv
        # call's start: a cs rank waits for its turn before it (engine/coordinator.py `next_stage`), and its turn comes only
        # once the coordinator holds the payload, so a forwarded hop's first leg would count as the receiver's wait.
        ready = recv["end"] - (wait - load)
        wire = recv["end"] - max(send["start"], ready) if distributed else send_call + recv_call
        # The cs coordinator's own payload leaves in its turn loop (engine/coordinator.py `_drive`), after `HopRecord.seconds`
        # stopped: that send is wire time, not the sender's encoding.
        sent_later = topology == "cs" and hop["sender"] == 0
        encode = hop["seconds"] - (0.0 if sent_later else send_call)
        links = _links(hop["sender"], hop["receiver"], topology)
        hops.append(
            {
                "to_stage": hop["to_stage"], "sender": hop["sender"], "receiver": hop["receiver"],
                "first_on_link": distributed and not links <= used_links, "encode_s": encode, "wire_s": wire,
                "load_s": load, "hop_s": encode + wire + load, "send_call_s": send_call, "recv_call_s": recv_call,
                "turn_wait_s": max(0.0, wait - wire - load), "nbytes": hop["nbytes"],
                "tensor_nbytes": hop["tensor_nbytes"],
                "min_nbytes": sum(report["part_nbytes"][part] for part in hop["parts"]),
            }
        )  # fmt: skip
        used_links |= links
    return hops


def _links(sender: int, receiver: int, topology: str, coordinator: int = 0) -> set[frozenset]:
    """The links a payload crosses: straight, or in cs through the coordinator (a new gloo group on first use)."""
    if topology == "cs" and coordinator not in (sender, receiver):
        return {frozenset((sender, coordinator)), frozenset((coordinator, receiver))}
    return {frozenset((sender, receiver))}


def per_rank(report: dict, hops: list[dict]) -> list[dict]:
    """Per rank: training seconds, hop seconds (sent: encode; received: wire + load), raw and turn waits."""
    ranks = {
        node: {"rank": node, "train_s": 0.0, "hop_s": 0.0, "wait_s": 0.0, "turn_wait_s": 0.0}
        for node in range(report["num_nodes"])
    }
    for stage in report["stages"]:
        ranks[stage["node"]]["train_s"] += stage["wall_seconds"]
        ranks[stage["node"]]["wait_s"] += stage["wait_seconds"]
    for hop in hops:
        ranks[hop["sender"]]["hop_s"] += hop["encode_s"]
        ranks[hop["receiver"]]["hop_s"] += hop["wire_s"] + hop["load_s"]
        ranks[hop["receiver"]]["turn_wait_s"] += hop["turn_wait_s"]
    for rank in ranks.values():
        rank["hop_share"] = rank["hop_s"] / max(rank["train_s"] + rank["hop_s"], 1e-12)
    return list(ranks.values())


def summarise(report: dict, records: list[dict], distributed: bool, topology: str = "p2p") -> dict:
    """Totals of one run: training, hops (all; warm ones, not the first on a link), share, final hand-off, bytes."""
    hops = hop_costs(report, records, distributed, topology)
    train = sum(s["wall_seconds"] for s in report["stages"])
    hop_total = sum(h["hop_s"] for h in hops)
    warm = [h for h in hops if not h["first_on_link"]] or hops
    warm_mean = _mean(h["hop_s"] for h in warm)
    wall = max(r["train_end"] for r in records) - min(r["train_start"] for r in records)
    final = 0.0
    if distributed:  # from the last stage's rank starting the hand-off to the last rank having it
        finals = _events(records, "broadcast_final")
        final = max(ev["end"] for ev in finals.values()) - finals[(report["stages"][-1]["node"], -1)]["start"]
    ranks = per_rank(report, hops)
    return {
        "num_stages": len(report["stages"]),
        "num_hops": len(hops),
        "num_first_on_link": sum(h["first_on_link"] for h in hops),
        "train_s": train,
        "hop_s": hop_total,
        "hop_share": hop_total / max(train + hop_total, 1e-12),
        # every hop at the warm-hop mean: the share once each link's one-off gloo set-up is amortised
        "hop_share_warm": len(hops) * warm_mean / max(train + len(hops) * warm_mean, 1e-12),
        "max_rank_hop_share": max(r["hop_share"] for r in ranks),
        "hop_ms_mean": 1000 * _mean(h["hop_s"] for h in hops),
        "hop_ms_max": 1000 * max((h["hop_s"] for h in hops), default=0.0),
        "warm_hop_ms_mean": 1000 * warm_mean,
        "warm_encode_ms_mean": 1000 * _mean(h["encode_s"] for h in warm),
        "warm_wire_ms_mean": 1000 * _mean(h["wire_s"] for h in warm),
        "warm_load_ms_mean": 1000 * _mean(h["load_s"] for h in warm),
        "turn_wait_s": sum(h["turn_wait_s"] for h in hops),
        "final_handoff_s": final,
        "run_wall_s": wall,
        "other_s": wall - train - hop_total - final,
        "hop_nbytes": sum(h["nbytes"] for h in hops),
        "hop_tensor_nbytes": sum(h["tensor_nbytes"] for h in hops),
        "hop_min_nbytes": sum(h["min_nbytes"] for h in hops),
        "wire_nbytes": sum(r["bytes_sent"] for r in records) if distributed else report["total_bytes"],
        "hops": hops,
        "ranks": ranks,
    }


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


# ---- the benchmark ----


def run_benchmark(config: BenchConfig, work: Path) -> list[dict]:
    """The simulations (one process), then per world size one set of ranks running each topology in turn."""
    started = time.monotonic()
    sim_jobs = [{"num_nodes": n, "topology": "p2p", "port": None, "auth": "off"} for n in config.world_sizes]
    simulations = {}
    for job, records in zip(sim_jobs, _launch(config, sim_jobs, 1, work, "simulation")):
        report = records[0].pop("report")
        simulations[job["num_nodes"]] = (report, summarise(report, records, distributed=False))
    print(f"  simulations ({config.world_sizes} nodes): {time.monotonic() - started:.0f} s", flush=True)
    runs = []
    for num_nodes in config.world_sizes:
        started = time.monotonic()
        jobs = [
            {"num_nodes": num_nodes, "topology": t, "port": _free_port(), "auth": a}
            for t in config.topologies
            for a in config.auth
        ]
        sim_report, simulation = simulations[num_nodes]
        for job, records in zip(jobs, _launch(config, jobs, num_nodes, work, f"ranks{num_nodes}")):
            report = records[0].pop("report")
            runs.append(
                {
                    "world_size": num_nodes,
                    "topology": job["topology"],
                    "auth": job["auth"],
                    "distributed": summarise(report, records, distributed=True, topology=job["topology"]),
                    "simulation": simulation,
                    "losses_match_simulation": _losses(report) == _losses(sim_report),
                    "hop_bytes_match_simulation": _hop_bytes(report) == _hop_bytes(sim_report),
                    "report": report,
                    "simulation_report": sim_report,
                }
            )
        what = f"{', '.join(config.topologies)}; auth {', '.join(config.auth)}"
        print(f"  {num_nodes} ranks ({what}): {time.monotonic() - started:.0f} s", flush=True)
    return runs


def _losses(report: dict) -> list[float]:
    return [s["train_loss"] for s in report["stages"]]


def _hop_bytes(report: dict) -> list[int]:
    return [h["nbytes"] for h in report["hops"]]


def time_table(runs: list[dict]) -> str:
    lines = [
        "| ranks | topology | auth | hops (first on a link) | training s | hops s | **hop share** | worst rank "
        "| ms per hop: encode + wire + load = mean (max) | turn wait s | final hand-off s | run wall s "
        "| simulation: hop share, ms per hop |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        d, s = run["distributed"], run["simulation"]
        encode, wire, load = (1000 * _mean(h[key] for h in d["hops"]) for key in ("encode_s", "wire_s", "load_s"))
        lines.append(
            f"| {run['world_size']} | {run['topology']} | {run.get('auth', 'off')} | {d['num_hops']} "
            f"({d['num_first_on_link']}) "
            f"| {d['train_s']:.1f} | {d['hop_s']:.2f} | **{100 * d['hop_share']:.2f}%** "
            f"| {100 * d['max_rank_hop_share']:.2f}% "
            f"| {encode:.1f} + {wire:.1f} + {load:.1f} = {d['hop_ms_mean']:.1f} ({d['hop_ms_max']:.1f}) "
            f"| {d['turn_wait_s']:.1f} | {d['final_handoff_s']:.2f} | {d['run_wall_s']:.1f} (sim {s['run_wall_s']:.1f}) "
            f"| {100 * s['hop_share']:.2f}%, {s['hop_ms_mean']:.1f} |"
        )
    return "\n".join(lines)


def bytes_table(runs: list[dict]) -> str:
    lines = [
        "| ranks | topology | auth | hops | bytes per hop | minimum (tensors) per hop | overhead per hop | ratio "
        "| bytes on all links | same bytes and losses as simulation |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        d = run["distributed"]
        hops = max(d["num_hops"], 1)
        same = "yes" if run["losses_match_simulation"] and run["hop_bytes_match_simulation"] else "**no**"
        lines.append(
            f"| {run['world_size']} | {run['topology']} | {run.get('auth', 'off')} | {d['num_hops']} "
            f"| {d['hop_nbytes'] / hops:,.0f} "
            f"| {d['hop_min_nbytes'] / hops:,.0f} | {(d['hop_nbytes'] - d['hop_tensor_nbytes']) / hops:,.0f} "
            f"| {d['hop_nbytes'] / max(d['hop_min_nbytes'], 1):.4f} | {d['wire_nbytes']:,} | {same} |"
        )
    return "\n".join(lines)


def auth_table(runs: list[dict]) -> str:
    """Warm hops with a run_secret against the same run without: the time an authenticated hop adds."""
    lines = [
        "| ranks | topology | warm hops | ms per warm hop, no secret | with secret | **ratio** "
        "| wire ms, no secret | with secret | load ms, no secret | with secret |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(r["world_size"], r["topology"], r.get("auth", "off")): r["distributed"] for r in runs}
    for (world_size, topology, auth), on in by_key.items():
        off = by_key.get((world_size, topology, "off"))
        if auth != "on" or off is None:
            continue
        lines.append(
            f"| {world_size} | {topology} | {on['num_hops'] - on['num_first_on_link']} | {off['warm_hop_ms_mean']:.2f} "
            f"| {on['warm_hop_ms_mean']:.2f} | **{on['warm_hop_ms_mean'] / max(off['warm_hop_ms_mean'], 1e-9):.3f}** "
            f"| {off['warm_wire_ms_mean']:.2f} | {on['warm_wire_ms_mean']:.2f} | {off['warm_load_ms_mean']:.2f} "
            f"| {on['warm_load_ms_mean']:.2f} |"
        )
    return "\n".join(lines)


def seal_costs(sizes: tuple[int, ...] = (64 << 10, 1 << 20, 16 << 20, 64 << 20), repeats: int = 5) -> list[dict]:
    """Seconds to seal and to check one payload of each size (HMAC-SHA256 in one thread), median of `repeats`."""
    from snake_hf.engine.auth import RunAuth

    auth = RunAuth(BENCH_SECRET)
    auth.session = "benchmark"
    header, results = b"\0" * 32, []
    for nbytes in sizes:
        body = [bytes(nbytes)]
        seal_s, check_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            seal = auth.seal_payload(1, 0, 1, 0, header, body)
            seal_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            auth.check_payload(seal, 1, 0, 1, 0, header, body, str)
            check_s.append(time.perf_counter() - start)
        seal_ms, check_ms = 1000 * statistics.median(seal_s), 1000 * statistics.median(check_s)
        results.append({"nbytes": nbytes, "seal_ms": seal_ms, "check_ms": check_ms,
                        "mb_per_s": nbytes / 1e6 / max(seal_ms / 1000, 1e-12)})  # fmt: skip
    return results


def seal_table(costs: list[dict]) -> str:
    lines = ["| payload bytes | seal ms | check ms | MB/s |", "| ---: | ---: | ---: | ---: |"]
    for c in costs:
        lines.append(f"| {c['nbytes']:,} | {c['seal_ms']:.3f} | {c['check_ms']:.3f} | {c['mb_per_s']:,.0f} |")
    return "\n".join(lines)


def machine_info() -> dict:
    import torch
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads_per_rank": 1,
    }


def _parse() -> tuple[argparse.Namespace, BenchConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny model, 3 ranks: under 2 minutes.")
    parser.add_argument(
        "--out_dir", default=None, help="Where the JSON and markdown go (benchmarks/results; --quick: a temp folder)."
    )
    parser.add_argument("--name", default="distributed_overhead", help="File name of the JSON and markdown.")
    defaults = BenchConfig()
    for f in dataclasses.fields(BenchConfig):
        kind = type(getattr(defaults, f.name))
        if kind is list:
            element = str if f.name in ("topologies", "auth") else int
            parser.add_argument(f"--{f.name}", type=element, nargs="+", default=None)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank's output folder
    parser.add_argument("--worker_jobs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_config is not None:
        return args, BenchConfig(**json.loads(args.worker_config))
    settings = dict(QUICK) if args.quick else {}
    settings.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig) if getattr(args, f.name) is not None}
    )
    return args, BenchConfig(**settings)


def main() -> None:
    args, config = _parse()
    if args.worker is not None:
        run_worker(config, json.loads(args.worker_jobs), Path(args.worker))
        return
    print(f"Distributed overhead benchmark: {json.dumps(dataclasses.asdict(config))}", flush=True)
    started, load_at_start = time.monotonic(), os.getloadavg()[0]  # the cores may be shared: note how busy they were
    with tempfile.TemporaryDirectory(prefix="snake_bench_") as work:
        runs = run_benchmark(config, Path(work))
    costs = seal_costs()
    tables = f"{time_table(runs)}\n\n{bytes_table(runs)}"
    if "on" in config.auth:
        tables += (
            "\n\n**Authenticated hops** (run_secret set; docs/security.md): warm hops (not the first on a link) "
            f"with and without a secret, same model, plan and seed.\n\n{auth_table(runs)}\n\n"
            f"Sealing and checking alone (HMAC-SHA256 over the payload's bytes, one thread):\n\n{seal_table(costs)}"
        )
    quick_dir = Path(tempfile.gettempdir()) / "snake_bench_quick"
    out_dir = Path(args.out_dir or (quick_dir if args.quick else HERE / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name
    result = {
        "benchmark": "distributed_overhead",
        "quick": args.quick,
        "machine": machine_info() | {"load_average_1m_at_start": load_at_start},
        "config": dataclasses.asdict(config),
        "seconds": time.monotonic() - started,
        "seal_costs": costs,
        "runs": runs,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{name}.md").write_text(_markdown(result, tables))
    print(f"\n{tables}\n\nWrote {out_dir / name}.json and .md in {result['seconds']:.0f} s.")


def _markdown(result: dict, tables: str) -> str:
    m, c = result["machine"], result["config"]
    return (
        f"# Distributed Snake overhead ({'quick' if result['quick'] else 'full'})\n\n"
        f"{m['date']}; {m['cpu_count']} CPUs ({m['processor']}, 1-minute load {m['load_average_1m_at_start']:.1f} at the start, {m['load_average_1m']:.1f} at the end), "
        f"torch {m['torch_version']}, one thread per rank, loopback.\n\n"
        f"GPT-2 n_layer={c['n_layer']}, n_embd={c['n_embd']}, vocab {c['vocab_size']}, sequence {c['seq_len']}, "
        f"batch {c['batch_size']}; LoRA r={c['lora_r']} on c_attn; {c['num_block_groups']} block groups, "
        f"{c['stage_steps']} steps per stage, {c['num_passes']} pass(es), serpentine plan.\n\n"
        "Hop = encode (sender) + wire (sender's send call to the receiver having the bytes) + load (decode, verify, "
        "load); hop share = hops / (training + hops). Turn wait (waiting through other ranks' training) is not "
        "overhead and is not counted.\n\n"
        f"{tables}\n"
    )


if __name__ == "__main__":
    main()
