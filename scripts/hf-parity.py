#!/usr/bin/env python3
"""Logits parity between the worker's checkpoints and transformers.MambaForCausalLM (fp32).

How the work is split, and why: the worker is C++ built on Debian 12 (abseil, OpenBLAS); the GPU
machine (Ubuntu 24.04) has torch and transformers but not those libraries. So the C++ side runs
here and only the torch side runs there; files travel both ways:

  here:   mamba-worker trains a tiny job and saves a checkpoint (model.safetensors + config.json);
          build/mamba-logits writes random tokens and the worker's logits on them.     -> CARRY
  device: python3 hf-parity.py device --carry CARRY --out $OUT
          (1) MambaForCausalLM.from_pretrained(worker checkpoint), logits on the same tokens,
              compared with the worker's: relative error = max|hf - worker| / max|worker|.
          (2) a randomly initialized HF Mamba (every parameter perturbed, so none is left at a
              constant), saved with save_pretrained into $OUT/hf_random with tokens and its logits.
  here:   python3 scripts/hf-parity.py local --from $OUT   (runs build/mamba-logits on
          $OUT/hf_random and compares with HF's logits: direction 2).

HF runs on the CPU by default: it is the plain fp32 reference (no TF32, no fused kernels);
--device cuda runs it on the GPU with TF32 disabled. Pass criterion: relative error <= 1e-4.
`python3 scripts/hf-parity.py prepare --carry DIR` does the first "here" step.
"""
import argparse
import json
import os
import subprocess
import sys

TOL = 1e-4


def prepare(args):
    build = os.path.abspath(args.build)
    os.makedirs(args.carry, exist_ok=True)
    job = {"name": "hf-parity", "data": {"inductionHeads": {"seqLen": 64}},
           "model": {"dModel": 32, "nLayer": 2, "dState": 16}, "steps": 30, "batchSize": 4,
           "logEvery": 10, "eval": {"batches": 0},
           "checkpoint": {"dir": os.path.join(args.carry, "worker_ckpt"), "keepLast": 1}}
    job_path = os.path.join(args.carry, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    subprocess.run([f"{build}/mamba-worker", "--job", job_path], check=True)
    ckpt = os.path.join(args.carry, "worker_ckpt", "step_00000030")
    tokens = os.path.join(args.carry, "tokens.safetensors")
    subprocess.run([f"{build}/mamba-logits", "--random_tokens", "2,64", "--vocab", "16",
                    "--seed", "7", "--tokens", tokens], check=True)
    subprocess.run([f"{build}/mamba-logits", "--checkpoint", ckpt, "--tokens", tokens, "--out",
                    os.path.join(args.carry, "worker_logits.safetensors")], check=True)
    print(f"prepared {args.carry}: checkpoint {ckpt}")


def rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def device(args):
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import MambaConfig, MambaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, HF on {dev}")
    ok = True

    def load(path):
        try:
            return MambaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    output_loading_info=True)
        except TypeError:  # transformers < 4.56
            return MambaForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                    output_loading_info=True)

    # (1) The worker's checkpoint in transformers.
    ckpt = os.path.join(args.carry, "worker_ckpt", "step_00000030")
    model, info = load(ckpt)
    bad = {k: v for k, v in info.items() if v and k != "mismatched_keys" or
           (k == "mismatched_keys" and v)}
    print(f"(1) loaded {ckpt}: loading info {info}")
    if bad:
        print(f"(1) FAIL: transformers reported {bad}")
        ok = False
    model = model.to(dev).eval()
    ids = load_file(os.path.join(args.carry, "tokens.safetensors"))["input_ids"].long()
    want = load_file(os.path.join(args.carry, "worker_logits.safetensors"))["logits"]
    with torch.no_grad():
        got = model(ids.to(dev)).logits.float().cpu()
    err = rel_error(got, want)
    ok &= err <= TOL
    print(f"(1) worker checkpoint -> HF: logits {tuple(got.shape)}, max|worker| "
          f"{want.abs().max().item():.4f}, relative error {err:.3e} "
          f"{'PASS' if err <= TOL else 'FAIL'}")

    # (2) A random HF model, saved for the worker. vocab 50 is deliberately not a multiple of 8.
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=50, hidden_size=48, state_size=16, num_hidden_layers=2,
                         expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                         tie_word_embeddings=True)
    hf = MambaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "hf_random")
    hf.save_pretrained(out)
    ids2 = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(3))
    hf = hf.to(dev).eval()
    with torch.no_grad():
        logits2 = hf(ids2.to(dev)).logits.float().cpu().contiguous()
    save_file({"input_ids": ids2.contiguous()}, os.path.join(args.out, "hf_random_tokens.safetensors"))
    save_file({"logits": logits2}, os.path.join(args.out, "hf_random_logits.safetensors"))
    print(f"(2) saved random HF Mamba to {out}: {sorted(os.listdir(out))}, logits "
          f"{tuple(logits2.shape)}")
    return 0 if ok else 1


def local(args):
    src = args.from_dir
    cmd = [os.path.join(args.build, "mamba-logits"), "--checkpoint", os.path.join(src, "hf_random"),
           "--tokens", os.path.join(src, "hf_random_tokens.safetensors"),
           "--reference", os.path.join(src, "hf_random_logits.safetensors"),
           "--tolerance", str(TOL)]
    print("(2) HF save_pretrained -> worker:", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--carry", required=True)
    p.add_argument("--build", default="build")
    d = sub.add_parser("device")
    d.add_argument("--carry", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--device", default="cpu")
    lo = sub.add_parser("local")
    lo.add_argument("--from", dest="from_dir", required=True)
    lo.add_argument("--build", default="build")
    args = ap.parse_args()
    return {"prepare": prepare, "device": device, "local": local}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
