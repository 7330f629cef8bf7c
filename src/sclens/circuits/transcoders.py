"""Transcoders (and SAEs) with TopK or L1 sparsity: training, metrics, splicing into the cell-sentence LM.

A transcoder at layer l reads what the MLP reads (``blocks.l.ln2.hook_normalized``) and predicts what it
writes (``blocks.l.hook_mlp_out``): ``f = act(x W_enc + b_enc)``, ``y_hat = f W_dec + b_dec``. An SAE is the
same module with the input as its own target. ``topk`` keeps the k largest pre-activations (then ReLU) and
adds the AuxK loss on dead features (Gao et al. 2024); ``l1`` is ReLU with an L1 penalty on
activation x decoder norm (Dunefsky et al. 2024, Anthropic's recipe). Decoder rows are renormalised to unit
norm after every step when ``normalize_decoder`` is set (so activations carry the scale).

Metrics follow SAELens: L0 (mean active features per token), FVU (residual sum of squares over the target's
total sum of squares about its mean), dead fraction (features that never fire on the evaluation tokens),
and for the LM the loss clean vs every transcoder spliced in vs every MLP zero-ablated, with the fraction of
loss recovered ``(L_ablated - L_spliced) / (L_ablated - L_clean)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, InputError
from ..utils import atomic_write, package_versions, restores_torch_threads, write_json

SPARSITY_KINDS = ("topk", "l1")


@dataclass
class TranscoderConfig:
    """Training settings (SAELens spirit: one dataclass, written next to the weights)."""

    kind: str = "topk"
    expansion: int = 8  # d_sae = expansion x d_in
    k: int = 16  # active features per token (topk)
    l1_coeff: float = 3e-3  # l1 penalty (l1)
    aux_k: int = 64  # dead features revived through the AuxK loss (topk; 0 disables)
    aux_coeff: float = 1 / 32
    dead_tokens: int = 20_000  # a feature silent for this many training tokens counts as dead for AuxK
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 8
    max_tokens: int = 200_000  # harvested tokens per layer (train + eval)
    eval_fraction: float = 0.1
    normalize_decoder: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if self.kind not in SPARSITY_KINDS:
            raise InputError(f"transcoder kind must be one of {SPARSITY_KINDS}, got {self.kind!r}")
        if self.expansion < 1 or self.k < 1:
            raise InputError("expansion and k must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> "TranscoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown transcoder setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def read_transcoder_config(path: str | Path) -> TranscoderConfig:
    """A TOML file of :class:`TranscoderConfig` fields (top level or under ``[transcoder]``)."""
    import tomllib

    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read transcoder config {path}: {exc}") from None
    return TranscoderConfig.from_dict(d.get("transcoder", d))


class Transcoder(nn.Module):
    """Sparse map d_in -> d_sae features -> d_out (an SAE when input and target are the same tensor)."""

    def __init__(self, d_in: int, d_sae: int, d_out: int | None = None, *, kind: str = "topk", k: int = 16):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if kind not in SPARSITY_KINDS:
            raise InputError(f"kind must be one of {SPARSITY_KINDS}")
        self.d_in, self.d_sae, self.d_out, self.kind, self.k = d_in, d_sae, d_out, kind, min(k, d_sae)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        nn.init.kaiming_uniform_(self.W_enc, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.kind == "l1":
            return torch.relu(pre)
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Unit-norm decoder rows, the scale moved into the encoder so the map is unchanged."""
        n = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_dec /= n[:, None]
        self.W_enc *= n[None, :]
        self.b_enc *= n

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v.detach().contiguous() for k, v in self.state_dict().items()}

    def spec(self) -> dict:
        return {"d_in": self.d_in, "d_sae": self.d_sae, "d_out": self.d_out, "kind": self.kind, "k": self.k}


# ---------------------------------------------------------------------------------------------- metrics


def sparsity_metrics(acts: torch.Tensor, target: torch.Tensor, recon: torch.Tensor) -> dict:
    """L0, FVU, explained variance, dead-feature count/fraction and mean activation density on one token set."""
    acts, target, recon = (torch.as_tensor(t, dtype=torch.float64) for t in (acts, target, recon))
    if acts.ndim != 2 or target.shape != recon.shape or acts.shape[0] != target.shape[0]:
        raise InputError(f"shape mismatch: acts {tuple(acts.shape)}, target {tuple(target.shape)}, "
                         f"reconstruction {tuple(recon.shape)}")
    active = acts > 0
    rss = ((target - recon) ** 2).sum()
    tss = ((target - target.mean(0)) ** 2).sum()
    fired = active.any(0)
    fvu = float(rss / tss) if tss > 0 else float("nan")
    return {"l0": float(active.sum(1).double().mean()), "fvu": fvu, "explained_variance": 1 - fvu,
            "dead": int((~fired).sum()), "dead_fraction": float((~fired).double().mean()),
            "mse": float(((target - recon) ** 2).mean()), "n_tokens": int(acts.shape[0])}


@dataclass
class TrainedTranscoder:
    transcoder: Transcoder
    metrics: dict
    history: list = field(default_factory=list)


@restores_torch_threads
def train_transcoder(x: torch.Tensor, y: torch.Tensor | None, config: TranscoderConfig | None = None, *,
                     desc: str = "transcoder", progress: bool = True) -> TrainedTranscoder:
    """Fit a transcoder ``x -> y`` (an SAE when ``y`` is None) on token rows; metrics on a held-out share.

    Loss: squared error normalised by the target's variance (so layers of different scale train alike), plus
    the L1 or AuxK term. ``b_dec`` starts at the target mean.
    """
    cfg = config or TranscoderConfig()
    x = torch.as_tensor(x, dtype=torch.float32)
    y = x if y is None else torch.as_tensor(y, dtype=torch.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise InputError(f"x and y must be [tokens, d] with the same number of rows, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.shape[0] < 20:
        raise InputError(f"only {x.shape[0]} tokens to train on; need at least 20")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise InputError("activations contain NaN or inf")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = x.shape[0]
    perm = torch.randperm(n, generator=gen)
    n_eval = max(1, int(round(cfg.eval_fraction * n)))
    ev, tr = perm[:n_eval], perm[n_eval:]
    tc = Transcoder(x.shape[1], cfg.expansion * x.shape[1], y.shape[1], kind=cfg.kind, k=cfg.k)
    with torch.no_grad():
        tc.b_dec.copy_(y[tr].mean(0))
    var = ((y[tr] - y[tr].mean(0)) ** 2).sum(1).mean().clamp_min(1e-12)
    opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr)
    steps_per_epoch = max(1, math.ceil(len(tr) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * (
        1.0 if s < 0.8 * total else max(0.0, (total - s) / (0.2 * total))))
    since_fired = torch.zeros(tc.d_sae)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        order = tr[torch.randperm(len(tr), generator=gen)]
        run = {"loss": 0.0, "fvu": 0.0, "l0": 0.0}
        for b in range(steps_per_epoch):
            rows = order[b * cfg.batch_size: (b + 1) * cfg.batch_size]
            xb, yb = x[rows], y[rows]
            pre = tc.pre_acts(xb)
            f = tc.activate(pre)
            recon = tc.decode(f)
            err = yb - recon
            mse = (err ** 2).sum(1).mean() / var
            loss = mse
            if cfg.kind == "l1":
                loss = loss + cfg.l1_coeff * (f * tc.W_dec.norm(dim=1)).sum(1).mean()
            fired = (f > 0).any(0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + len(rows))
            dead = since_fired >= cfg.dead_tokens
            if cfg.kind == "topk" and cfg.aux_k and dead.any():
                k_aux = min(cfg.aux_k, int(dead.sum()))
                dead_pre = pre.masked_fill(~dead[None, :], -torch.inf)
                vals, idx = dead_pre.topk(k_aux, dim=-1)
                fa = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
                aux = ((err.detach() - fa @ tc.W_dec) ** 2).sum(1).mean() / var
                loss = loss + cfg.aux_coeff * torch.nan_to_num(aux)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if cfg.normalize_decoder:
                tc.normalize_decoder_()
            run["loss"] += loss.item()
            run["fvu"] += mse.item()
            run["l0"] += float((f > 0).sum(1).float().mean())
            bar.update(1)
        rec = {k: v / steps_per_epoch for k, v in run.items()}
        rec.update(epoch=epoch + 1, dead_for_auxk=int(dead.sum()), seconds=time.perf_counter() - t0)
        history.append(rec)
        bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}")
    bar.close()
    with torch.no_grad():
        f_ev = tc.encode(x[ev])
        metrics = sparsity_metrics(f_ev, y[ev], tc.decode(f_ev))
    metrics.update(train_tokens=int(len(tr)), seconds=time.perf_counter() - t0,
                   tokens_per_second=cfg.epochs * len(tr) / max(1e-9, time.perf_counter() - t0))
    return TrainedTranscoder(tc.eval(), metrics, history)


# ------------------------------------------------------------------------------- harvesting from the LM


def token_batches(model, sentences: Sequence[Sequence[str]], labels: Sequence[str] | None = None,
                  batch_size: int = 64) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    from .lm import pad_batch

    seqs = model.encode_cells(sentences, labels)
    for i in range(0, len(seqs), batch_size):
        yield pad_batch(seqs[i: i + batch_size])


@dataclass
class Harvest:
    """MLP inputs and outputs per layer at every real token, with each token's id and cell."""

    x: dict[int, torch.Tensor]
    y: dict[int, torch.Tensor]
    token_ids: torch.Tensor
    cell: torch.Tensor


def harvest_mlp_io(model, sentences, layers: Sequence[int], labels: Sequence[str] | None = None, *,
                   max_tokens: int = 200_000, batch_size: int = 64, progress: bool = True) -> Harvest:
    """Per layer, (MLP input, MLP output) at every real (non-pad) token, up to ``max_tokens`` tokens.

    With ``labels`` the sequences end in their cell-type token, as in training.
    """
    names = [f"blocks.{l}.ln2.hook_normalized" for l in layers] + [f"blocks.{l}.hook_mlp_out" for l in layers]
    xs = {l: [] for l in layers}
    ys = {l: [] for l in layers}
    ids_all, cells = [], []
    n = 0
    total = min(max_tokens, sum(len(s) + 4 for s in sentences))
    bar = tqdm(total=total, desc="harvest MLP in/out", unit="tok", disable=not progress, leave=False)
    for b, (ids, mask) in enumerate(token_batches(model, sentences, labels, batch_size=batch_size)):
        _, cache = model.run_with_cache(ids, mask, names=names)
        keep = mask.bool()
        for l in layers:
            xs[l].append(cache[f"blocks.{l}.ln2.hook_normalized"][keep])
            ys[l].append(cache[f"blocks.{l}.hook_mlp_out"][keep])
        ids_all.append(ids[keep])
        cells.append((torch.arange(len(ids)) + b * batch_size)[:, None].expand_as(ids)[keep])
        n += int(keep.sum())
        bar.update(int(keep.sum()))
        if n >= max_tokens:
            break
    bar.close()
    cut = lambda parts: torch.cat(parts)[:max_tokens]  # noqa: E731
    return Harvest({l: cut(xs[l]) for l in layers}, {l: cut(ys[l]) for l in layers}, cut(ids_all), cut(cells))


# ------------------------------------------------------------------------------------ splicing and losses


def splice_hooks(model, transcoders: dict[int, Transcoder] | None = None, ablate: Sequence[int] = ()):
    """Forward hooks that replace MLP outputs by transcoder outputs (``transcoders``) or zeros (``ablate``).

    A transcoder may live on another device than the model (e.g. trained on the CPU, model on a GPU): its input
    is moved to it and its output back."""
    hooks = []
    stash: dict[int, torch.Tensor] = {}
    for l, tc in (transcoders or {}).items():
        def keep_in(act, hook, l=l):
            stash[l] = act

        def replace(act, hook, l=l, tc=tc):
            return tc(stash[l].to(tc.b_dec.device)).to(act.device)

        hooks += [(f"blocks.{l}.ln2.hook_normalized", keep_in), (f"blocks.{l}.hook_mlp_out", replace)]
    for l in ablate:
        hooks.append((f"blocks.{l}.hook_mlp_out", lambda act, hook: torch.zeros_like(act)))
    return model.hooks(hooks)


def lm_losses(model, sentences, labels, *, transcoders: dict[int, Transcoder] | None = None,
              ablate: Sequence[int] = (), batch_size: int = 64) -> dict:
    """Next-gene CE, cell-type CE and cell-type accuracy with the given MLPs spliced or ablated."""
    from .lm_training import celltype_losses

    with splice_hooks(model, transcoders, ablate):
        return celltype_losses(model, model.encode_cells(sentences, labels), model.vocab, batch_size=batch_size)


def loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(L_ablated - L_spliced) / (L_ablated - L_clean): 1 = transcoders as good as the MLPs, 0 = as bad as none."""
    den = ablated - clean
    return float((ablated - spliced) / den) if abs(den) > 1e-12 else float("nan")


# -------------------------------------------------------------------------------------- the whole stage


@dataclass
class TranscoderSet:
    """Transcoders on several MLP layers of one model, with their config and metrics."""

    transcoders: dict[int, Transcoder]
    config: TranscoderConfig
    metrics: dict = field(default_factory=dict)  # per layer + "lm" losses
    info: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """``transcoders.safetensors`` (``blocks.{l}.W_enc`` ...) + ``transcoders.json`` (config, specs, metrics)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        tensors = {}
        for l, tc in self.transcoders.items():
            tensors.update(tc.state(f"blocks.{l}."))
        st = atomic_write(out_dir / "transcoders.safetensors", lambda p: save_file(tensors, p))
        manifest = {"format": "sclens-transcoders", "version": 1, "config": asdict(self.config),
                    "layers": {str(l): tc.spec() for l, tc in self.transcoders.items()},
                    "metrics": self.metrics, "info": self.info}
        js = write_json(out_dir / "transcoders.json", manifest)
        return {"safetensors": st, "json": js}

    @classmethod
    def load(cls, path: str | Path) -> "TranscoderSet":
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / "transcoders.json"
        import json

        if not path.is_file():
            raise CheckpointError(f"no transcoders manifest at {path}")
        man = json.loads(path.read_text())
        if man.get("format") != "sclens-transcoders":
            raise CheckpointError(f"{path} is not an sclens transcoders manifest")
        st = load_file(str(path.with_name("transcoders.safetensors")))
        tcs = {}
        for l, spec in man["layers"].items():
            tc = Transcoder(spec["d_in"], spec["d_sae"], spec["d_out"], kind=spec["kind"], k=spec["k"])
            tc.load_state_dict({k: st[f"blocks.{l}.{k}"] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
            tcs[int(l)] = tc.eval()
        return cls(tcs, TranscoderConfig(**man["config"]), man.get("metrics", {}), man.get("info", {}))


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Sorted unique layer indices (default: all), each checked against the model's depth."""
    layers = list(range(n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise InputError(f"layer(s) {bad} out of range: the model has {n_layers} layers")
    return layers


@restores_torch_threads
def train_transcoders(model, sentences, labels, config: TranscoderConfig | None = None, *,
                      layers: Sequence[int] | None = None, eval_sentences=None, eval_labels=None,
                      progress: bool = True) -> TranscoderSet:
    """One transcoder per MLP layer of a cell-sentence LM, then the splice evaluation on ``eval_sentences``.

    ``layers`` defaults to every layer. Activations are harvested from ``sentences`` (with their label
    tokens, as in training); LM losses are measured clean, with every trained transcoder spliced in at once,
    with each one alone, and with the same MLPs zero-ablated.
    """
    cfg = config or TranscoderConfig()
    layers = check_layers(layers, model.n_layers)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    seqs = [list(s) for s in sentences]
    acts = harvest_mlp_io(model, seqs, layers, labels, max_tokens=cfg.max_tokens, progress=progress)
    tcs, metrics = {}, {}
    for l in layers:
        res = train_transcoder(acts.x[l], acts.y[l], cfg, desc=f"transcoder L{l}", progress=progress)
        tcs[l] = res.transcoder
        metrics[f"L{l}"] = {**res.metrics, "history": res.history}
    ev_s = eval_sentences if eval_sentences is not None else sentences
    ev_l = eval_labels if eval_labels is not None else labels
    clean = lm_losses(model, ev_s, ev_l)
    spliced = lm_losses(model, ev_s, ev_l, transcoders=tcs)
    ablated = lm_losses(model, ev_s, ev_l, ablate=layers)
    lm = {"clean": clean, "spliced": spliced, "mlp_ablated": ablated,
          "recovered_gene_ce": loss_recovered(clean["gene_ce"], spliced["gene_ce"], ablated["gene_ce"]),
          "recovered_celltype_ce": loss_recovered(clean["celltype_ce"], spliced["celltype_ce"], ablated["celltype_ce"]),
          "per_layer": {}}
    for l in layers:
        one = lm_losses(model, ev_s, ev_l, transcoders={l: tcs[l]})
        abl = lm_losses(model, ev_s, ev_l, ablate=[l])
        lm["per_layer"][f"L{l}"] = {"spliced": one, "mlp_ablated": abl,
                                    "recovered_gene_ce": loss_recovered(clean["gene_ce"], one["gene_ce"], abl["gene_ce"]),
                                    "recovered_celltype_ce": loss_recovered(clean["celltype_ce"], one["celltype_ce"],
                                                                            abl["celltype_ce"])}
    metrics["lm"] = lm
    info = {"model": getattr(model, "source", None), "layers": layers, "n_train_cells": len(seqs),
            "n_eval_cells": len(ev_s), "seconds": time.perf_counter() - t0,
            "versions": package_versions(("sclens", "torch", "transformers", "numpy"))}
    return TranscoderSet(tcs, cfg, metrics, info)


def transcoder_table(ts: TranscoderSet) -> list[dict]:
    """One row per layer: L0, FVU, dead fraction, loss recovered when spliced alone."""
    rows = []
    lm = ts.metrics.get("lm", {})
    for l in sorted(ts.transcoders):
        m = ts.metrics[f"L{l}"]
        pl = lm.get("per_layer", {}).get(f"L{l}", {})
        rows.append({"layer": l, "d_sae": ts.transcoders[l].d_sae, "l0": m["l0"], "fvu": m["fvu"],
                     "dead_fraction": m["dead_fraction"], "recovered_gene_ce": pl.get("recovered_gene_ce"),
                     "recovered_celltype_ce": pl.get("recovered_celltype_ce")})
    return rows
