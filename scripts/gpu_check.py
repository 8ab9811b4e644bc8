"""GPU checks of docs/precision_and_devices.md (issue #18), one line per check; `scripts/gpu_check.sh` runs them.

    python scripts/gpu_check.py                  # on a machine with a CUDA GPU (under 8 minutes on one GPU)
    python scripts/gpu_check.py --cpu-dry-run    # every check on CPU at tiny sizes: the code paths run, no GPU needed
    python scripts/gpu_check.py --only bf16_mixed,two_ranks_p2p

Checks: CUDA vs CPU (tiny model, LoRA and full, within a stated tolerance); bf16 mixed precision (Snake 1/1/1 equals
Trainer + PEFT on the device); QLoRA on SmolLM2-135M (per-node peak vs bf16 LoRA); two ranks sharing the one GPU (p2p
and cs) bit-identical to the simulation on that GPU; a device-mapped node; the SmolLM2 full-mode memory ratio (one
block per group, bf16 frozen weights) as (a) model state and (b) measured peak. A check whose requirement is missing
(bitsandbytes, the SmolLM2 asset) prints `skipped` and why.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CPU_TOLERANCE = 1e-4  # max |CUDA - CPU| over the trained tensors after 8 float32 steps (different kernels)


class Skip(Exception):
    """A check whose requirement is missing here."""


def _tiny_llama(dtype=torch.float32, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def _lm_data(n: int = 16, length: int = 8):
    import datasets

    ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _args(out: str, device: torch.device, **fields):
    from snake_hf import SnakeConfig

    values = dict(
        output_dir=out, num_nodes=2, num_block_groups=2, num_passes=1, stage_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to="none", disable_tqdm=True, save_strategy="no", seed=0, num_train_epochs=1,
        use_cpu=device.type == "cpu",
    )  # fmt: skip
    return SnakeConfig(**{**values, **fields})


def _quiet(trainer):
    """Without Trainer's log lines on stdout (this script prints one line per check)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _trained(trainer) -> dict[str, torch.Tensor]:
    from peft import PeftModel, get_peft_model_state_dict

    model = trainer.model
    state = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    return {k: v.detach().float().cpu() for k, v in state.items()}


def tiny_run(out: str, device: torch.device, mode: str, **fields) -> dict[str, torch.Tensor]:
    """A 2-node x 2-group tiny Llama run on `device` (LoRA or full); returns the trained tensors on CPU."""
    from snake_hf import SnakeTrainer

    torch.set_num_threads(1)
    peft = _lora() if mode == "lora" else None
    trainer = _quiet(
        SnakeTrainer(_tiny_llama(), _args(out, device, **fields), train_dataset=_lm_data(), peft_config=peft)
    )
    trainer.train()
    if trainer.transport is not None:
        trainer.transport.close()
    return _trained(trainer)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_cuda_vs_cpu(ctx, mode: str) -> str:
    on_cpu = tiny_run(tempfile.mkdtemp(), torch.device("cpu"), mode)
    on_device = tiny_run(tempfile.mkdtemp(), ctx.device, mode)
    diff = _max_diff(on_cpu, on_device)
    verdict = "ok" if diff <= CPU_TOLERANCE else "FAIL"
    return (
        f"{verdict}: max |{ctx.device.type} - cpu| = {diff:.2e} over {len(on_cpu)} tensors (tolerance {CPU_TOLERANCE})"
    )


def check_bf16_mixed(ctx) -> str:
    """bf16 base + `bf16=True` autocast: Snake at 1/1/1 equals Trainer + PEFT on the device, step for step."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from snake_hf import SnakeTrainer

    common = dict(
        per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", disable_tqdm=True, save_strategy="no",
        seed=0, num_train_epochs=1, logging_steps=1, bf16=True, use_cpu=ctx.device.type == "cpu",
    )  # fmt: skip
    plain = _quiet(
        Trainer(
            get_peft_model(_tiny_llama(torch.bfloat16), _lora()),
            TrainingArguments(tempfile.mkdtemp(), **common),
            train_dataset=_lm_data(),
        )
    )
    plain.train()
    args = _args(tempfile.mkdtemp(), ctx.device, num_nodes=1, num_block_groups=1, stage_steps=None, logging_steps=1,
                 bf16=True)  # fmt: skip
    snake = _quiet(SnakeTrainer(_tiny_llama(torch.bfloat16), args, train_dataset=_lm_data(), peft_config=_lora()))
    snake.train()
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    same = losses(snake) == losses(plain)
    diff = _max_diff(_trained(snake), _trained(plain))
    verdict = "ok" if same and diff == 0 else "FAIL"
    return f"{verdict}: losses equal {same}, max |adapter diff| = {diff:.2e} ({len(losses(plain))} steps)"


def _load_base(ctx, quantized: bool):
    """SmolLM2-135M (tiny Llama in a dry run) in bf16 or 4-bit NF4, on the device."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if ctx.dry:
        folder = Path(tempfile.mkdtemp())
        _tiny_llama(hidden=64).save_pretrained(folder)
    else:
        from snake_hf.recipes.assets import AssetNotFoundError, smollm2_path

        try:
            folder = smollm2_path()
        except AssetNotFoundError as error:
            raise Skip(f"SmolLM2 asset not installed ({error.install_command})") from None
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": str(ctx.device)}}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def _lora_peak(ctx, quantized: bool) -> int:
    from peft import prepare_model_for_kbit_training

    from snake_hf import SnakeTrainer

    model = _load_base(ctx, quantized)
    if quantized:
        model = prepare_model_for_kbit_training(model)  # Snake removes its input-grad hook and checkpointing
    vocab = model.config.vocab_size
    length = 16 if ctx.dry else 256
    ids = torch.randint(0, vocab, (32, length), generator=torch.Generator().manual_seed(0)).tolist()
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = _args(tempfile.mkdtemp(), ctx.device, num_nodes=2, num_block_groups=2, stage_steps=2)
    trainer = _quiet(SnakeTrainer(model, args, train_dataset=data, peft_config=_lora()))
    trainer.train()
    return max(trainer.snake_report.peak_memory_per_node().values())


def check_qlora_memory(ctx) -> str:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes not installed (pip install 'snake-hf[bnb]')") from None
    bf16, nf4 = _lora_peak(ctx, False), _lora_peak(ctx, True)
    target = "target <= 0.5" if not ctx.dry else "dry run: process peaks, not meaningful"
    return (
        f"4-bit / bf16 LoRA per-node peak = {nf4 / 2**20:.0f} / {bf16 / 2**20:.0f} MiB = {nf4 / bf16:.3f} ({target})"
    )


def _env() -> dict[str, str]:
    """The environment for subprocesses: this checkout first on the path."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_two_ranks(ctx, topology: str) -> str:
    """Two ranks on the one device (LOCAL_RANK 0 and 1 -> cuda:0 both), bit-identical to the simulation there."""
    simulated = tiny_run(tempfile.mkdtemp(), ctx.device, "lora", engine="simulation")
    out, port = Path(tempfile.mkdtemp()), _free_port()
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONHASHSEED=str(7 + rank))  # fmt: skip
        command = [sys.executable, __file__, "--rank-worker", str(out), topology, str(ctx.device.type)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            return f"FAIL: rank {rank} exited {proc.returncode}: {output.strip().splitlines()[-1:]}"
    from safetensors.torch import load_file

    ranks = [load_file(str(out / f"rank-{rank}.safetensors")) for rank in range(2)]
    same = all(all(torch.equal(r[k], simulated[k]) for k in simulated) for r in ranks)
    devices = {json.loads((out / f"rank-{rank}.json").read_text())["device"] for rank in range(2)}
    return (
        f"{'ok' if same else 'FAIL'}: both ranks bit-identical to the simulation: {same}; ranks on {sorted(devices)}"
    )


def _rank_worker(out: str, topology: str, device_type: str) -> None:
    from safetensors.torch import save_file

    device = torch.device(device_type)
    state = tiny_run(out, device, "lora", engine="distributed", topology=topology)
    from snake_hf.launch import current_launch

    rank = current_launch().rank  # the launcher's variables are hidden once the run started

    save_file(state, os.path.join(out, f"rank-{rank}.safetensors"))
    chosen = _args(out, device).device  # what a rank's config picks (cuda:LOCAL_RANK % GPUs)
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"device": str(chosen), "launch": str(current_launch())}))


def check_device_map(ctx) -> str:
    """A node over the device and `cpu` (Accelerate offloads `cpu` entries to host memory when the main device is a
    GPU; on a CPU-only dry run, `disk`): LoRA trains over the offloaded frozen blocks and gives the same adapters as
    the base held whole on the device (the same kernels run: the offload only moves the weights in for each forward).
    Full mode over it is refused by name (its weights train and travel)."""
    from accelerate import dispatch_model

    from snake_hf import SnakeTrainer

    other = "cpu" if ctx.device.type == "cuda" else "disk"
    on = str(ctx.device)
    device_map = {"model.embed_tokens": on, "model.rotary_emb": on, "model.norm": on, "lm_head": on,
                  "model.layers.0": on, "model.layers.1": other, "model.layers.2": on, "model.layers.3": other}  # fmt: skip
    _reset_peak(ctx.device)
    whole = tiny_run(tempfile.mkdtemp(), ctx.device, "lora")
    whole_peak = _peak(ctx.device)
    torch.set_num_threads(1)
    model = dispatch_model(_tiny_llama(), device_map, on, offload_dir=tempfile.mkdtemp())
    trainer = _quiet(
        SnakeTrainer(model, _args(tempfile.mkdtemp(), ctx.device), train_dataset=_lm_data(), peft_config=_lora())
    )
    _reset_peak(ctx.device)
    trainer.train()
    offloaded, peak = _trained(trainer), _peak(ctx.device)
    diff = _max_diff(whole, offloaded)
    try:
        full = dispatch_model(_tiny_llama(), device_map, on, offload_dir=tempfile.mkdtemp())
        SnakeTrainer(full, _args(tempfile.mkdtemp(), ctx.device, train_mode="full"), train_dataset=_lm_data())
        refused = "FAIL: full mode over an offload was not refused"
    except ValueError as error:
        refused = "full mode refused" if "offloads weights" in str(error) else f"FAIL: {error}"
    verdict = "ok" if diff == 0 and not refused.startswith("FAIL") else "FAIL"
    peaks = f", device peak {peak / 2**20:.2f} MiB vs {whole_peak / 2**20:.2f} MiB whole" if peak else ""
    return (f"{verdict}: blocks 1 and 3 on {other}, LoRA adapters max |offloaded - whole| = {diff:.2e} over "
            f"{len(whole)} tensors (expected 0){peaks}; {refused}")  # fmt: skip


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    """Bytes allocated on `device` at most since the last reset (0 on CPU: no allocator statistics)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def check_memory_ratio(ctx) -> str:
    """SmolLM2-135M full mode, one block per group, bf16 frozen weights: (a) model state and (b) measured peak over
    full fine-tuning (float32), through benchmarks/compare.py --task memory_full."""
    out = tempfile.mkdtemp()
    size = ["--tiny", "--num_nodes", "4", "--num_groups", "4"] if ctx.dry else [
        "--quick", "--num_nodes", "30", "--num_groups", "30", "--train_size", "240", "--stage_steps", "1"]  # fmt: skip
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--task", "memory_full", *size,
               "--base_dtype", "bfloat16", "--output_dir", out, "--no_cache"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=_env())
    if done.returncode != 0:
        if "AssetNotFoundError" in done.stderr:
            raise Skip("SmolLM2 asset not installed")
        return f"FAIL: compare.py exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    result = next(Path(out).glob("compare_memory_full_*.json"))
    summary = json.loads(result.read_text())["summary"]
    return (f"(a) model state {summary['model_state_ratio']:.3f} (target <= 0.16), (b) measured peak with weights "
            f"{summary.get('peak_with_weights_ratio', float('nan')):.3f} (target <= 0.20 on GPU), above the loaded "
            f"model {summary['memory_ratio']:.3f}")  # fmt: skip


CHECKS = {
    "cuda_vs_cpu_lora": lambda ctx: check_cuda_vs_cpu(ctx, "lora"),
    "cuda_vs_cpu_full": lambda ctx: check_cuda_vs_cpu(ctx, "full"),
    "bf16_mixed": check_bf16_mixed,
    "qlora_memory": check_qlora_memory,
    "two_ranks_p2p": lambda ctx: check_two_ranks(ctx, "p2p"),
    "two_ranks_cs": lambda ctx: check_two_ranks(ctx, "cs"),
    "device_map": check_device_map,
    "memory_ratio": check_memory_ratio,
}


def run_checks(dry: bool, only: list[str] | None = None) -> dict[str, str]:
    """Runs the checks (all, or `only`), printing one line each; returns name -> line."""
    if not dry and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; run with --cpu-dry-run to exercise the checks on CPU.")
    ctx = argparse.Namespace(dry=dry, device=torch.device("cpu" if dry else "cuda:0"))
    lines = {}
    for name in only or list(CHECKS):
        start = time.perf_counter()
        try:
            line = CHECKS[name](ctx)
        except Skip as why:
            line = f"skipped: {why}"
        except Exception as error:  # one failing check must not hide the others' lines
            line = f"FAIL: {type(error).__name__}: {str(error)[:200]}"
        lines[name] = f"{name}: {line} [{time.perf_counter() - start:.0f} s]"
        print(lines[name], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="every check on CPU at tiny sizes")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--rank-worker", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    if options.rank_worker:
        _rank_worker(*options.rank_worker)
        return
    run_checks(options.cpu_dry_run, [n for n in options.only.split(",") if n] or None)


if __name__ == "__main__":
    main()
