"""Attribution through transcoders: weights-only connections, per-cell direct effects, head tracing, subgraphs.

Input-invariant (weights only, Dunefsky et al. 2024): a feature i of layer l writes ``W_dec[i]``; a later
feature j of layer l' reads ``W_enc[:, j]`` through ``post_attention_layernorm``. Up to the per-token LN scale,
the direct residual connection is ``center(W_dec[i]) * gamma_l' . W_enc[:, j]``, the path through head h is
the same with the head's OV map ``W_V^h W_O^h`` (read through ``input_layernorm``) in between, and the
de-embedding ``center(W_E[g]) * gamma . W_enc[:, j]`` says which gene tokens drive feature j directly.

Input-dependent (circuit-tracer's local replacement model): for one cell, the MLPs are replaced by their
transcoders plus an error term (true MLP output - reconstruction) so the forward pass is unchanged; the
LayerNorm scales and attention patterns are frozen at their values for this cell; token embeddings, feature
activations and error terms become leaves. The model is then affine in the leaves, and
``activation x gradient`` of a target (a feature's pre-activation or the cell-type logit contrast) with
respect to each leaf is that leaf's direct effect (through the residual stream and attention OV paths; QK
is frozen). :func:`trace_circuit` grows the top computational subgraph for a decision greedily from the
logit backwards.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..utils import write_json
from .lm import HookedCellLM, pad_batch
from .transcoders import Transcoder


def _center(W: torch.Tensor) -> torch.Tensor:
    return W - W.mean(-1, keepdim=True)


# ---------------------------------------------------------------------------------------- input-invariant


@torch.no_grad()
def feature_pair_weights(model: HookedCellLM, src: Transcoder, dst: Transcoder, dst_layer: int) -> torch.Tensor:
    """[d_sae_src, d_sae_dst] direct residual connection from src decoder rows into dst encoder columns."""
    gamma = model.layer(dst_layer).post_attention_layernorm.weight
    return (_center(src.W_dec) * gamma) @ dst.W_enc


@torch.no_grad()
def ov_pair_weights(model: HookedCellLM, src: Transcoder, head_layer: int, head: int, dst: Transcoder,
                    dst_layer: int) -> torch.Tensor:
    """[d_sae_src, d_sae_dst] connection through head ``head`` of ``head_layer`` (OV circuit; pattern = 1)."""
    if not head_layer < dst_layer:
        raise InputError("in a parallel-residual model a head feeds only MLPs of later layers")
    g1 = model.layer(head_layer).input_layernorm.weight
    g2 = model.layer(dst_layer).post_attention_layernorm.weight
    W_V, _ = model.W_V(head_layer)
    ov = W_V[head] @ model.W_O(head_layer)[head]  # [D, D]
    return _center((_center(src.W_dec) * g1) @ ov) * g2 @ dst.W_enc


@torch.no_grad()
def deembedding(model: HookedCellLM, tc: Transcoder, layer: int) -> torch.Tensor:
    """[vocab, d_sae]: direct drive of each token's embedding on each feature (through ln2 of ``layer``)."""
    gamma = model.layer(layer).post_attention_layernorm.weight
    return (_center(model.W_E) * gamma) @ tc.W_enc


def top_deembedding_genes(model: HookedCellLM, tc: Transcoder, layer: int, feature: int, n: int = 10) -> list[str]:
    """Gene tokens whose embedding most strongly drives ``feature`` (sclens gene-level models)."""
    if model.vocab is None:
        raise InputError("gene-level readouts need an sclens gene-level model")
    col = deembedding(model, tc, layer)[:, feature]
    v = model.vocab
    genes = col[v.gene_offset: v.label_offset]
    return [v.genes[i] for i in torch.argsort(genes, descending=True)[:n].tolist()]


# ------------------------------------------------------------------------------------- replacement model


@dataclass
class Replacement:
    """One cell through the local replacement model: leaves, cached clean values, and the graph's logits."""

    ids: torch.Tensor  # [S]
    tokens: list[str]
    logits: torch.Tensor  # [S, V], differentiable in the leaves
    embed: torch.Tensor  # leaf [S, D]
    acts: dict[int, torch.Tensor]  # leaf [S, d_sae] per transcoder layer
    errors: dict[int, torch.Tensor]  # leaf [S, D] per transcoder layer
    mlp_in: dict[int, torch.Tensor]  # ln2 output per layer (differentiable), for feature targets
    clean: dict[str, torch.Tensor] = field(default_factory=dict)

    def leaves(self) -> list[tuple[str, int | None, torch.Tensor]]:
        out = [("embed", None, self.embed)]
        out += [("feature", l, a) for l, a in sorted(self.acts.items())]
        out += [("error", l, e) for l, e in sorted(self.errors.items())]
        return out


def _token_names(model: HookedCellLM, ids: Sequence[int]) -> list[str]:
    if model.vocab is not None:
        return [model.vocab.tokens[i] for i in ids]
    return [model.tokenizer.convert_ids_to_tokens(int(i)) for i in ids]


def replacement_forward(model: HookedCellLM, transcoders: dict[int, Transcoder], ids: Sequence[int]) -> Replacement:
    """Build the local replacement model of one token sequence (see the module docstring)."""
    if not transcoders:
        raise InputError("attribution needs at least one transcoder")
    ids_t, mask = pad_batch([list(ids)])
    names = [n for n in model.hook_dict if n.endswith("hook_scale") or n.endswith("hook_pattern")
             or n.endswith("ln2.hook_normalized") or n.endswith("hook_mlp_out")]
    _, cache = model.run_with_cache(ids_t, mask, names=names)
    acts, errors = {}, {}
    with torch.no_grad():
        for l, tc in transcoders.items():
            a = tc.encode(cache[f"blocks.{l}.ln2.hook_normalized"][0])
            acts[l] = a.clone().requires_grad_(True)
            errors[l] = (cache[f"blocks.{l}.hook_mlp_out"][0] - tc.decode(a)).clone().requires_grad_(True)
    embed = model.W_E[ids_t[0]].detach().clone().requires_grad_(True)
    mlp_in: dict[int, torch.Tensor] = {}

    def frozen(act, hook):
        return cache[hook.name]

    hooks = [("hook_embed", lambda act, hook: embed[None])]
    hooks += [(n, frozen) for n in names if n.endswith("hook_scale") or n.endswith("hook_pattern")]
    for l in range(model.n_layers):
        def grab(act, hook, l=l):
            mlp_in[l] = act[0]

        hooks.append((f"blocks.{l}.ln2.hook_normalized", grab))
    for l, tc in transcoders.items():
        hooks.append((f"blocks.{l}.hook_mlp_out", lambda act, hook, l=l, tc=tc: (tc.decode(acts[l]) + errors[l])[None]))
    with model.hooks(hooks):
        logits = model(ids_t, mask)[0]
    return Replacement(ids=ids_t[0], tokens=_token_names(model, ids_t[0].tolist()), logits=logits, embed=embed,
                       acts=acts, errors=errors, mlp_in=mlp_in, clean=dict(cache.items()))


def direct_effects(rep: Replacement, target: torch.Tensor) -> dict[tuple, float]:
    """Direct effect of every active leaf on a scalar ``target`` of the replacement graph.

    Keys: ``("embed", None, pos, token_id)``, ``("feature", layer, pos, feature)``, ``("error", layer, pos, 0)``.
    Values: leaf value x gradient (summed over the hidden dimension for vectors), which sum with the bias
    terms to the target exactly, because the graph is affine in the leaves.
    """
    leaves = rep.leaves()
    grads = torch.autograd.grad(target, [t for _, _, t in leaves], retain_graph=True, allow_unused=True)
    out: dict[tuple, float] = {}
    for (kind, layer, leaf), g in zip(leaves, grads):
        if g is None:
            continue
        contrib = (leaf.detach() * g)
        if kind == "feature":
            for pos, f in zip(*torch.nonzero(leaf.detach() > 0, as_tuple=True)):
                v = float(contrib[pos, f])
                if v != 0.0:
                    out[("feature", layer, int(pos), int(f))] = v
        else:
            per_pos = contrib.sum(-1)
            for pos in range(per_pos.shape[0]):
                v = float(per_pos[pos])
                if v != 0.0:
                    key = ("embed", None, pos, int(rep.ids[pos])) if kind == "embed" else ("error", layer, pos, 0)
                    out[key] = v
    return out


def logit_contrast(model: HookedCellLM, rep: Replacement, label: str, pos: int | None = None) -> torch.Tensor:
    """Logit of ``label`` minus the mean logit of all cell-type labels, at the ``<celltype>`` position."""
    v = model.vocab
    if v is None:
        raise InputError("logit targets need an sclens gene-level model")
    if label not in v.labels:
        raise InputError(f"unknown cell type {label!r}; the model knows {v.labels}")
    pos = len(rep.ids) - 1 if pos is None else pos
    lab = torch.as_tensor(v.label_ids)
    row = rep.logits[pos]
    return row[v.id(f"[{label}]")] - row[lab].mean()


def feature_preact(rep: Replacement, transcoders: dict[int, Transcoder], layer: int, pos: int, feature: int):
    tc = transcoders[layer]
    return rep.mlp_in[layer][pos] @ tc.W_enc[:, feature] + tc.b_enc[feature]


# ---------------------------------------------------------------------------------------- head tracing


@torch.no_grad()
def trace_heads(model: HookedCellLM, transcoders: dict[int, Transcoder], ids: Sequence[int], layer: int, pos: int,
                feature: int, top: int = 10) -> dict:
    """Which attention heads (and source positions) carry a feature's input, through their OV circuits.

    For every head h of a layer below ``layer``: ``A_h[pos, src] * (v_src^h W_O^h)`` pushed through the frozen
    ``post_attention_layernorm`` of ``layer`` onto the feature's encoder direction. Contributions of heads,
    embeddings, earlier MLPs and biases add up to the feature's pre-activation.
    """
    if layer not in transcoders:
        raise InputError(f"no transcoder for layer {layer}")
    ids_t, mask = pad_batch([list(ids)])
    names = [f"blocks.{l}.attn.hook_{n}" for l in range(layer) for n in ("pattern", "v")]
    names.append(f"blocks.{layer}.ln2.hook_scale")
    _, cache = model.run_with_cache(ids_t, mask, names=names)
    enc = transcoders[layer].W_enc[:, feature]
    gamma = model.layer(layer).post_attention_layernorm.weight
    scale = cache[f"blocks.{layer}.ln2.hook_scale"][0, pos]
    read = lambda vec: float(((_center(vec) / scale) * gamma) @ enc)  # noqa: E731
    toks = _token_names(model, ids_t[0].tolist())
    rows, per_head = [], {}
    for l in range(layer):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][0]  # [H, S, S]
        v = cache[f"blocks.{l}.attn.hook_v"][0]  # [S, H, dh]
        W_O = model.W_O(l)
        for h in range(model.n_heads):
            out_src = (pattern[h, pos][:, None] * v[:, h]) @ W_O[h]  # [S, D] per source position
            contribs = [read(out_src[s]) for s in range(pos + 1)]
            per_head[f"L{l}H{h}"] = float(sum(contribs))
            rows += [{"layer": l, "head": h, "src_pos": s, "src_token": toks[s], "attention": float(pattern[h, pos, s]),
                      "contribution": c} for s, c in enumerate(contribs)]
    rows.sort(key=lambda r: -abs(r["contribution"]))
    heads = sorted(per_head.items(), key=lambda kv: -abs(kv[1]))
    return {"target": {"layer": layer, "pos": pos, "feature": feature, "token": toks[pos]},
            "heads": [{"head": k, "contribution": v} for k, v in heads[:top]],
            "paths": rows[:top]}


# --------------------------------------------------------------------------------------------- subgraph


def node_id(key: tuple) -> str:
    kind, layer, pos, idx = key
    if kind == "embed":
        return f"tok@{pos}"
    if kind == "error":
        return f"err:L{layer}@{pos}"
    if kind == "feature":
        return f"L{layer}.F{idx}@{pos}"
    return f"logit:{idx}"


@dataclass
class CircuitGraph:
    """The greedy subgraph of one decision: nodes, weighted direct-effect edges, scores."""

    target: dict
    nodes: list[dict]
    edges: list[dict]
    scores: dict
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "sclens-circuit", "version": 1, "target": self.target, "nodes": self.nodes,
                "edges": self.edges, "scores": self.scores, "info": self.info}

    def save(self, out_dir: str | Path, name: str = "circuit") -> dict[str, Path]:
        out_dir = Path(out_dir)
        paths = {"json": write_json(out_dir / f"{name}.json", self.to_dict())}
        paths["png"] = plot_circuit(self, out_dir / f"{name}.png")
        return paths

    @classmethod
    def from_dict(cls, d: dict) -> "CircuitGraph":
        if d.get("format") != "sclens-circuit":
            raise InputError("not an sclens circuit (format 'sclens-circuit' expected)")
        return cls(d["target"], d["nodes"], d["edges"], d["scores"], d.get("info", {}))

    @classmethod
    def load(cls, path: str | Path) -> "CircuitGraph":
        """Reload a circuit saved by :meth:`save` (its ``.json``)."""
        import json

        return cls.from_dict(json.loads(Path(path).read_text()))

    def features(self) -> list[dict]:
        return [n for n in self.nodes if n["type"] == "feature"]


def trace_circuit(model: HookedCellLM, transcoders: dict[int, Transcoder], sentence: Sequence[str], label: str, *,
                  max_nodes: int = 24, edges_per_node: int = 6, min_share: float = 0.02) -> CircuitGraph:
    """Greedy top computational subgraph of the decision "this cell is ``label``" for one cell.

    Start at the logit contrast of ``label`` (at the ``<celltype>`` position); repeatedly take the included
    node with the largest absolute influence on the target that has not been expanded, compute its direct
    effects, and add its strongest ``edges_per_node`` inputs (each at least ``min_share`` of the node's total
    absolute input). Feature nodes are expanded further; token, error nodes are leaves. A node's influence is
    the sum over its paths to the target of the products of edge weights divided by the child's value
    (the share of the child it explains), as in circuit-tracer's pruning.
    """
    ids = model.encode_cells([list(sentence)])[0]
    rep = replacement_forward(model, transcoders, ids)
    target_val = logit_contrast(model, rep, label)
    root = ("logit", None, len(ids) - 1, label)
    values = {root: float(target_val.detach())}
    influence = {root: 1.0}
    edges: dict[tuple, float] = {}
    expanded = set()
    queue = [(-1.0, 0, root)]
    counter = 1
    totals = {}
    while queue and len(expanded) < max_nodes:
        _, _, node = heapq.heappop(queue)
        if node in expanded:
            continue
        expanded.add(node)
        tgt = target_val if node == root else feature_preact(rep, transcoders, node[1], node[2], node[3])
        eff = direct_effects(rep, tgt)
        total = sum(abs(v) for v in eff.values())
        totals[node] = {"abs_input": total,
                        "error_share": sum(abs(v) for k, v in eff.items() if k[0] == "error") / total if total else 0.0}
        if node != root:
            values[node] = float(tgt.detach())
        for src, w in sorted(eff.items(), key=lambda kv: -abs(kv[1]))[:edges_per_node]:
            if total == 0 or abs(w) / total < min_share:
                break
            edges[(src, node)] = w
            share = abs(w) / total
            influence[src] = influence.get(src, 0.0) + influence[node] * share
            if src[0] == "feature" and src not in expanded:
                heapq.heappush(queue, (-influence[src], counter, src))
                counter += 1
    # describe the nodes
    nodes = []
    used = {k for e in edges for k in e} | {root}
    for key in sorted(used, key=lambda k: -influence.get(k, 0.0)):
        kind, layer, pos, idx = key
        d = {"id": node_id(key), "type": kind, "layer": layer, "pos": pos, "token": rep.tokens[pos],
             "influence": influence.get(key, 0.0)}
        if kind == "feature":
            d.update(feature=idx, activation=float(rep.acts[layer][pos, idx].detach()), preact=values.get(key))
        elif kind == "embed":
            gene = model.vocab.token_gene(idx) if model.vocab is not None else None
            d.update(gene=gene)
        elif kind == "logit":
            d.update(label=idx, value=values[root])
        nodes.append(d)
    edge_list = [{"source": node_id(s), "target": node_id(t), "weight": w} for (s, t), w in
                 sorted(edges.items(), key=lambda kv: -abs(kv[1]))]
    root_eff = totals.get(root, {})
    scores = {"target_value": values[root], "nodes": len(nodes), "edges": len(edge_list),
              "expanded": len(expanded), "root_error_share": root_eff.get("error_share"),
              "mean_error_share": float(np.mean([t["error_share"] for t in totals.values()])) if totals else None}
    pred = model.vocab.labels[int(rep.logits[len(ids) - 1][torch.as_tensor(model.vocab.label_ids)].argmax())]
    target = {"label": label, "predicted": pred, "n_genes": len(sentence), "genes": list(sentence)}
    return CircuitGraph(target=target, nodes=nodes, edges=edge_list, scores=scores,
                        info={"model": model.source, "layers": sorted(transcoders)})


def plot_circuit(graph: CircuitGraph, path: str | Path) -> Path:
    """Layered drawing: tokens at the bottom, features by layer, the logit on top; edge width ~ |weight|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_write

    nodes = {n["id"]: n for n in graph.nodes}
    layers = sorted({n["layer"] for n in graph.nodes if n["layer"] is not None})
    row = {None: 0}
    row.update({l: i + 1 for i, l in enumerate(layers)})
    top = len(layers) + 1
    by_row: dict[int, list[str]] = {}
    for nid, n in nodes.items():
        r = top if n["type"] == "logit" else (0 if n["type"] == "embed" else row[n["layer"]] + (0.4 if n["type"] == "error" else 0))
        by_row.setdefault(r, []).append(nid)
    xy = {}
    for r, ids in by_row.items():
        ids.sort(key=lambda i: (nodes[i]["pos"], i))
        for j, nid in enumerate(ids):
            xy[nid] = ((j + 1) / (len(ids) + 1), r)
    fig, ax = plt.subplots(figsize=(11, 1.6 * (top + 1)))
    wmax = max((abs(e["weight"]) for e in graph.edges), default=1.0) or 1.0
    for e in graph.edges:
        (x0, y0), (x1, y1) = xy[e["source"]], xy[e["target"]]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
            arrowstyle="-|>", lw=0.5 + 4 * abs(e["weight"]) / wmax, alpha=0.6,
            color="#c0392b" if e["weight"] > 0 else "#2471a3"))
    colors = {"embed": "#7f8c8d", "feature": "#f39c12", "error": "#bdc3c7", "logit": "#27ae60"}
    for nid, (x, y) in xy.items():
        n = nodes[nid]
        label = {"embed": f"{n.get('gene') or n['token']}\n@{n['pos']}", "error": f"err L{n['layer']}",
                 "feature": f"L{n['layer']} F{n.get('feature')}\n@{n['pos']}",
                 "logit": f"logit [{n.get('label')}]"}[n["type"]]
        ax.scatter([x], [y], s=600, color=colors[n["type"]], zorder=3, edgecolor="k", linewidth=0.5)
        ax.text(x, y - 0.32, label, ha="center", va="top", fontsize=7)
    ax.set_yticks([0] + [row[l] for l in layers] + [top])
    ax.set_yticklabels(["tokens"] + [f"layer {l}" for l in layers] + ["output"])
    ax.set_xticks([])
    ax.set_ylim(-0.9, top + 0.5)
    t = graph.target
    ax.set_title(f"circuit for '{t['label']}' (predicted {t['predicted']}); red = excitatory, blue = inhibitory")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path
