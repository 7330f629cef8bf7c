"""Throughput of the circuits stage on CPU: LM forward tokens/s and transcoder / SAE training tokens/s.

Forward cases, on the embedded cell-sentence model (4 layers, d 128) with real-sized sentences (top-100 genes
+ specials = 102 tokens, batch 32), repeated ``--reps`` times after one warm-up:
  hf            transformers GPTNeoXForCausalLM forward (sdpa attention), logits included
  hooked        sclens' explicit hooked forward, no hooks attached
  hooked+cache  hooked forward caching every layer's MLP input and output (what transcoder harvesting does)
Training cases (forward + backward + Adam, batch 1,024 token rows, 2 epochs on 60,000 rows):
  transcoder-topk   128 -> 1,024 features, k = 16, with AuxK       (the circuits run's setting)
  transcoder-l1     128 -> 1,024 features, ReLU + L1
  sae-topk          128 -> 512 features, k = 16                    (the SAE atlas setting)

    python benchmarks/circuits_throughput.py [--threads 2] [--reps 5]

Writes benchmarks/results/circuits/throughput.json and .md. Rows are random Gaussian activations for the
training cases (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "circuits")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from sclens.circuits.lm import load_default_cell_lm, pad_batch
    from sclens.circuits.transcoders import TranscoderConfig, train_transcoder
    from sclens.utils import package_versions, write_json

    model = load_default_cell_lm()
    genes = model.vocab.genes
    g = torch.Generator().manual_seed(0)
    sents = [[genes[int(i)] for i in torch.randperm(len(genes), generator=g)[:100]] for _ in range(32)]
    ids, mask = pad_batch(model.encode_cells(sents))
    n_tok = int(mask.sum())
    names = [f"blocks.{l}.{h}" for l in range(model.n_layers) for h in ("ln2.hook_normalized", "hook_mlp_out")]
    cases = {
        "hf": lambda: model.hf(input_ids=ids, attention_mask=mask).logits,
        "hooked": lambda: model(ids, mask),
        "hooked+cache": lambda: model.run_with_cache(ids, mask, names=names),
    }
    rows = []
    with torch.no_grad():
        for name, fn in cases.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn()
            dt = (time.perf_counter() - t0) / args.reps
            rows.append({"case": name, "kind": "forward", "tokens": n_tok, "seconds": dt, "tokens_per_second": n_tok / dt})
            print(f"{name}: {n_tok / dt:,.0f} tok/s")
    x = torch.randn(60_000, model.d_model, generator=g)
    y = torch.randn(60_000, model.d_model, generator=g)
    for name, cfg, target in (
        ("transcoder-topk", TranscoderConfig(kind="topk", expansion=8, k=16, epochs=2, eval_fraction=0.02), y),
        ("transcoder-l1", TranscoderConfig(kind="l1", expansion=8, epochs=2, eval_fraction=0.02), y),
        ("sae-topk", TranscoderConfig(kind="topk", expansion=4, k=16, epochs=2, eval_fraction=0.02), None),
    ):
        res = train_transcoder(x, target, cfg, progress=False)
        rows.append({"case": name, "kind": "training", "d_in": model.d_model, "d_sae": res.transcoder.d_sae,
                     "tokens": res.metrics["train_tokens"] * cfg.epochs, "seconds": res.metrics["seconds"],
                     "tokens_per_second": res.metrics["tokens_per_second"],
                     "minutes_per_million_tokens": 1e6 / res.metrics["tokens_per_second"] / 60})
        print(f"{name}: {res.metrics['tokens_per_second']:,.0f} tok/s")
    info = {"threads": args.threads, "reps": args.reps, "machine": platform.processor() or platform.machine(),
            "model": str(model.source), "versions": package_versions(("sclens", "torch", "transformers", "numpy"))}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "throughput.json", {"rows": rows, "info": info})
    md = ["| case | kind | tokens/s | notes |", "|---|---|---|---|"]
    for r in rows:
        note = (f"{r['d_in']} → {r['d_sae']}, {r['minutes_per_million_tokens']:.2f} min per 1M tokens"
                if r["kind"] == "training" else f"batch 32 × {r['tokens'] // 32} tokens")
        md.append(f"| {r['case']} | {r['kind']} | {r['tokens_per_second']:,.0f} | {note} |")
    (args.out / "throughput.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
