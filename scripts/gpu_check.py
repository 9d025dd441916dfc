"""Device check: the quickstart, a short TRM run and a tiny-Qwen LoRA run with bf16 autocast on
one device (CUDA by default): train -> kill mid-run -> resume -> eval -> edge_glass.load on that
device, printing PASS / FAIL per step and a summary line. On CUDA it then trains the TRM VLM
config under DeepSpeed ZeRO-2 and FSDP (configs/accelerate/2gpu_zero2.yaml, 2gpu_fsdp.yaml; on
as many GPUs as there are, up to 2) and the tiny-Qwen LoRA under ZeRO-2, each resumed from its
first sharded checkpoint and compared with the uninterrupted run. Needs the project set up
(README) and ../shared/data; every run is small (a few minutes on a GPU).

    python scripts/gpu_check.py                      # CUDA, bf16
    python scripts/gpu_check.py --only engines       # just the ZeRO-2 / FSDP runs
    python scripts/gpu_check.py --device cpu         # the base sequence on the CPU (checks the script)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edge_glass.cli"]
results: list[tuple[str, bool, str]] = []


def step(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def cli(out: Path, name: str, *args: str, timeout: float = 1800) -> bool:
    log = out / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([*CLI, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
    tail = log.read_text().strip().splitlines()[-1:] if proc.returncode else []
    return step(name, proc.returncode == 0, f"exit {proc.returncode}, {log}: {tail[0][:200] if tail else ''}" if proc.returncode else "")


def train_kill_resume(out: Path, name: str, config: str, sets: list[str], checkpoint: int) -> bool:
    """Train until the first checkpoint exists, SIGKILL, resume to the end."""
    run = out / name
    args = [*CLI, "train", config, "--out", str(run), "--no-progress", *[x for s in sets for x in ("--set", s)]]
    log = open(out / f"{name}_train.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 1800
    while proc.poll() is None and not (run / "checkpoints" / f"step-{checkpoint:08d}" / "state.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    step(f"{name}: train until step {checkpoint}, then SIGKILL", killed or proc.returncode == 0,
         "" if killed else "finished before the kill (nothing to resume)")
    return cli(out, f"{name}_resume", "train", config, "--out", str(run), "--no-progress", "--resume", *[x for s in sets for x in ("--set", s)])


def engine_run(out: Path, name: str, launch: str, config: str, sets: list[str], processes: int, first: int) -> None:
    """Train under an accelerate launch config; then resume from the first checkpoint (step
    ``first``, sharded by every rank) and expect the same metrics and weights as the uninterrupted run."""
    run = out / name
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", f"configs/accelerate/{launch}.yaml",
           "--num_processes", str(processes), "--main_process_port", "0", "-m", "edge_glass.cli",
           "train", config, "--out", str(run), "--no-progress", *[x for s in [*sets, "train.keep_checkpoints=100"] for x in ("--set", s)]]

    def go(label: str, tag: str, *extra: str) -> bool:
        log = out / f"{name}_{tag}.log"
        with open(log, "w") as f:
            proc = subprocess.run([*cmd, *extra], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=1800)
        errors = [l for l in log.read_text().splitlines() if l.startswith("error:")] or log.read_text().strip().splitlines()[-1:]
        return step(label, proc.returncode == 0, f"exit {proc.returncode}, {log}: {errors[0][:300] if errors else ''}" if proc.returncode else "")

    if not go(f"{name}: train under {launch} on {processes} process(es)", "train"):
        return
    summary = json.loads((run / "summary.json").read_text())
    want = {"2gpu_zero2": "DEEPSPEED", "2gpu_fsdp": "FSDP", "2gpu_ddp": "MULTI_GPU", "2cpu": "MULTI_CPU"}[launch]
    step(f"{name}: the engine was {want}", summary["engine"] == want, f"summary.json says {summary['engine']}")

    def losses() -> list[float]:
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == "train"]

    import torch
    from safetensors.torch import load_file

    def flat(weights: dict) -> torch.Tensor:
        return torch.cat([weights[k].float().flatten() for k in sorted(weights)])

    before, weights = losses(), flat(load_file(str(run / "model.safetensors")))
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    if not step(f"{name}: checkpoint of step {first} kept", (run / "checkpoints" / f"step-{first:08d}").is_dir(), str([c.name for c in ckpts])):
        return
    for c in ckpts:
        if c.name != f"step-{first:08d}":
            import shutil

            shutil.rmtree(c)
    (run / "checkpoints" / "latest").write_text(f"step-{first:08d}\n")
    if go(f"{name}: resume from the checkpoint of step {first}", "resume", "--resume"):
        # GPU kernels need not be bitwise deterministic: the same losses and weights up to 1e-3
        now, after = losses(), flat(load_file(str(run / "model.safetensors")))
        loss_gap = max((abs(a - b) / max(abs(b), 1e-8) for a, b in zip(now, before)), default=float("inf")) if len(now) == len(before) else float("inf")
        weight_gap = ((after - weights).norm() / weights.norm()).item()
        step(f"{name}: resumed run ends like the uninterrupted one", loss_gap < 1e-3 and weight_gap < 1e-3,
             f"largest relative loss difference {loss_gap:.2e}, relative weight difference {weight_gap:.2e}")


def tiny_qwen(dest: Path) -> Path:
    """A tiny random Qwen2 LM with a byte-level BPE tokenizer and a ChatML template, saved as a model dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from edge_glass.data.vqa import read_easy_vqa

    samples, _ = read_easy_vqa("train")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator([f"{s.question} {s.answer}" for s in samples[:5000]] + ["system user assistant"],
                           trainers.BpeTrainer(vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--only", action="append", choices=["quickstart", "trm", "qwen", "engines"], help="run only these parts (repeatable)")
    args = ap.parse_args()
    parts = set(args.only or ["quickstart", "trm", "qwen", "engines"])
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""), flush=True)
    if args.device == "cuda" and not step("a CUDA GPU is visible to torch", torch.cuda.is_available()):
        return 1
    dev = [f"train.device={args.device}", f"train.mixed_precision={args.precision}", "train.log_every=5"]

    # 1. quickstart (alignment): 3 epochs, checkpoint every 5 steps; kill after step 5, resume
    qs = [*dev, "train.epochs=3", "train.checkpoint_every=5"]
    if "quickstart" in parts and train_kill_resume(out, "quickstart", "configs/quickstart.yaml", qs, 5):
        if cli(out, "quickstart_eval", "eval", str(out / "quickstart"), "--device", args.device, "--json", str(out / "quickstart_eval.json"), "--no-progress"):
            m = json.loads((out / "quickstart_eval.json").read_text())
            step("quickstart eval: R@1 above chance (0.5)", m["text_to_image"]["R@1"] > 5, f"text_to_image R@1 {m['text_to_image']['R@1']}")
        import edge_glass

        model = edge_glass.load(out / "quickstart", device=args.device)
        where = {p.device.type for p in model.parameters()}
        emb = model.encode_texts(["a dog on a beach"], dim=64)
        step("edge_glass.load(device) puts encoders and heads there and embeds", where == {args.device} and emb.shape == (1, 64), f"parameter devices {where}")

    # 2. TRM decoder on easy-VQA, short: 2000 questions, 2 epochs
    trm = [*dev, "data.max_samples=2000", "train.epochs=2", "train.checkpoint_every=20", "train.warmup=10"]
    if "trm" in parts and train_kill_resume(out, "trm", "configs/trm_easy_vqa.yaml", trm, 20):
        cli(out, "trm_eval", "eval", str(out / "trm"), "--device", args.device, "--json", str(out / "trm_eval.json"), "--no-progress")

    # 3. LoRA on a tiny random Qwen2 (the Qwen path with no hub access), bf16
    qwen = tiny_qwen(out / "tiny_qwen") if parts & {"qwen", "engines"} else None
    lm = [*dev, f"decoder={{type: lm, model: {qwen}, lora_r: 8, lora_alpha: 16}}", "data.max_samples=400", "train.epochs=2",
          "train.batch_size=16", "train.lr=1.0e-3", "train.checkpoint_every=10", "train.warmup=5", "eval.max_new_tokens=4"]
    if "qwen" in parts and train_kill_resume(out, "qwen_lora", "configs/trm_easy_vqa.yaml", lm, 10):
        cli(out, "qwen_lora_eval", "eval", str(out / "qwen_lora"), "--device", args.device, "--json", str(out / "qwen_eval.json"), "--no-progress")

    # 4. engines (CUDA only): the TRM VLM under ZeRO-2 and FSDP, the LoRA LM under ZeRO-2; short runs
    if "engines" in parts and args.device == "cuda":
        gpus = min(2, torch.cuda.device_count())
        short = [*dev, "data.max_samples=600", "train.epochs=1", "train.batch_size=32", "train.checkpoint_every=5", "train.warmup=2",
                 "train.eval_every=10", "eval.val_limit=64"]
        import importlib.util

        if step("deepspeed importable (scripts/gpu_check.sh installs it when missing)", importlib.util.find_spec("deepspeed") is not None):
            engine_run(out, "trm_zero2", "2gpu_zero2", "configs/trm_easy_vqa.yaml", short, gpus, 5)
            engine_run(out, "qwen_lora_zero2", "2gpu_zero2", "configs/trm_easy_vqa.yaml",
                       [*lm, "data.max_samples=160", "train.epochs=1", "train.checkpoint_every=4"], gpus, 4)
        engine_run(out, "trm_fsdp", "2gpu_fsdp", "configs/trm_easy_vqa.yaml", short, gpus, 5)

    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
