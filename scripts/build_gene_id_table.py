"""Rebuild ``src/sclens/resources/gene_ids.tsv.gz``: HGNC symbol <-> Ensembl gene id (human).

Source: the official Geneformer V1 dictionary ``gene_name_id_dict_gc30M.pkl`` (Apache-2.0), kept in
``../shared/data/geneformer_v1_dicts``. The pickle is read with a restricted unpickler that only accepts
plain containers and numpy scalars, so a tampered file cannot run code. Only the facts (the id pairs)
are carried over, as a plain gzip'd TSV.

    python scripts/build_gene_id_table.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
from pathlib import Path


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dictionary pickle")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    args = ap.parse_args()
    src = Path(args.shared) / "data/geneformer_v1_dicts/gene_name_id_dict_gc30M.pkl"
    mapping = _SafeUnpickler(io.BytesIO(src.read_bytes())).load()
    rows = sorted((str(k), str(v)) for k, v in mapping.items() if str(k).strip() and str(v).startswith("ENSG"))
    out = Path(__file__).resolve().parents[1] / "src/sclens/resources/gene_ids.tsv.gz"
    text = "symbol\tensembl_id\n" + "".join(f"{s}\t{e}\n" for s, e in rows)
    # mtime=0 keeps the gzip bytes identical across rebuilds
    with open(out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        gz.write(text.encode())
    print(f"wrote {len(rows)} symbol/Ensembl pairs to {out}")


if __name__ == "__main__":
    main()
