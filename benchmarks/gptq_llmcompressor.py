"""GPTQ W4A16 with llmcompressor's oneshot, written as a compressed-tensors checkpoint.

Runs in its own environment (llmcompressor 0.14.0.1 pins transformers<=5.17 and
compressed-tensors==0.19.0; qatpass's main environment has newer ones), so it imports nothing from
qatpass and talks to `accuracy_lm.py` through files only:

    /work/venv-gptq/bin/python benchmarks/gptq_llmcompressor.py --model DIR --calib ids.json \
        --group-size 32 --out CKPT_DIR

`--calib`: a JSON list of token-id lists (one calibration sample each). The scheme is
llmcompressor's W4A16 preset with the group size set: symmetric int4, codes in [-8, 7],
scale = amax / 7.5 (compressed-tensors' convention), GPTQ's default static act-order, dampening
0.01, block 128; `--scale-dtype bfloat16` rounds the scales to bf16 before GPTQ quantizes with them
(what qatpass's Int4Scheme does). lm_head is ignored (embeddings are never Linear targets).
Writes `CKPT_DIR` (save_pretrained(save_compressed=True)), `CKPT_DIR/gptq_run.json` (versions,
CPU seconds) and `CKPT_DIR.dequant.safetensors`: llmcompressor's own dequantized weights of every
quantized linear, which a reader of the checkpoint must reproduce exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path


def _tokenizer(folder: str):
    """The folder's tokenizer, else a stand-in (the calibration ids are already tokens)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        stand_in = Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
        return transformers.PreTrainedTokenizerFast(tokenizer_object=stand_in, unk_token="<unk>")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder (fp32 weights)")
    p.add_argument("--calib", required=True, help="JSON list of token-id lists")
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scale-dtype", default="bfloat16", choices=["bfloat16", "float32", "none"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dampening", type=float, default=0.01)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    calib_bytes = Path(args.calib).read_bytes()
    ids = json.loads(calib_bytes)
    if not ids or not all(isinstance(s, list) and s for s in ids):
        raise ValueError(f"--calib {args.calib}: expected a non-empty JSON list of token-id lists")
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    scale_dtype = None if args.scale_dtype == "none" else getattr(torch, args.scale_dtype)
    weights = QuantizationArgs(
        num_bits=4,
        type="int",
        symmetric=True,
        strategy="group",
        group_size=args.group_size,
        scale_dtype=scale_dtype,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=args.dampening,
    )
    oneshot(
        model=model,
        tokenizer=_tokenizer(args.model),
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(ids),
        max_seq_length=max(len(s) for s in ids),
        shuffle_calibration_samples=False,
    )
    out = Path(args.out)
    # llmcompressor's own dequantized weights (GPTQ leaves q * scale in .weight): the reader of the
    # checkpoint must reproduce them exactly
    dequant = {
        f"{name}.weight": m.weight.detach().float().contiguous().clone()
        for name, m in model.named_modules()
        if hasattr(m, "weight_scale")
    }
    model.save_pretrained(out, save_compressed=True)
    from safetensors.torch import save_file

    save_file(dequant, str(out) + ".dequant.safetensors")
    run = {
        "group_size": args.group_size,
        "scale_dtype": args.scale_dtype,
        "dampening_frac": args.dampening,
        "calibration_samples": len(ids),
        "calibration_tokens": sum(len(s) for s in ids),
        "calibration_sha256": hashlib.sha256(calib_bytes).hexdigest(),
        "cpu_s": time.process_time() - t_cpu,
        "wall_s": time.perf_counter() - t_wall,
        "threads": args.threads,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    (out / "gptq_run.json").write_text(json.dumps(run, indent=2))
    print(json.dumps(run))
    return run


if __name__ == "__main__":
    main()
