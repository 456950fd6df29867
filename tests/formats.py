"""Writers of real vendor file layouts for the converter tests (10x HDF5 + parquet, GEM, GEF)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse


def write_visium_hd(folder: Path, counts: sparse.csr_matrix, gene_ids, gene_names, coords,
                    in_tissue, bin_um: int = 8) -> Path:
    """A Space Ranger ``square_XXXum`` folder: feature-barcode HDF5 (CSC genes x barcodes,
    i.e. the CSR arrays of barcodes x genes), tissue_positions.parquet, scalefactors."""
    import h5py

    folder = Path(folder)
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    n = counts.shape[0]
    rows = np.asarray(coords[:, 1], np.int64)
    cols = np.asarray(coords[:, 0], np.int64)
    barcodes = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)]
    counts = sparse.csr_matrix(counts)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"sample"])
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=counts.data.astype(np.uint32))
        m.create_dataset("indices", data=counts.indices.astype(np.int64))
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([counts.shape[1], n], dtype=np.uint64))
        feat = m.create_group("features")
        feat.create_dataset("id", data=np.array(gene_ids, dtype="S"))
        feat.create_dataset("name", data=np.array(gene_names, dtype="S"))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * counts.shape[1]))
        feat.create_dataset("genome", data=np.array([b"GRCh38"] * counts.shape[1]))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    microns_per_pixel = 0.25
    positions = pd.DataFrame({
        "barcode": barcodes, "in_tissue": np.asarray(in_tissue, np.int32),
        "array_row": rows, "array_col": cols,
        "pxl_row_in_fullres": rows * bin_um / microns_per_pixel + 3.5,
        "pxl_col_in_fullres": cols * bin_um / microns_per_pixel + 7.25})
    positions.to_parquet(folder / "spatial" / "tissue_positions.parquet")
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "bin_size_um": bin_um, "microns_per_pixel": microns_per_pixel,
        "spot_diameter_fullres": bin_um / microns_per_pixel, "tissue_hires_scalef": 0.1,
        "tissue_lowres_scalef": 0.01, "fiducial_diameter_fullres": 100.0,
        "regist_target_img_scalef": 0.1}))
    return folder


def dnb_records(counts: sparse.csr_matrix, grid_xy, bin_size: int, seed: int = 0):
    """DNB-level (gene index, x, y, count) rows that bin (at ``bin_size``) to ``counts``:
    each non-zero (spot, gene) count is split over up to three random DNBs inside the
    spot's bin, so binning must sum rows to recover it."""
    rng = np.random.default_rng(seed)
    coo = sparse.coo_matrix(counts)
    records = []
    for spot, gene, value in zip(coo.row, coo.col, coo.data.astype(np.int64)):
        parts = rng.multinomial(value, [0.5, 0.3, 0.2]) if value > 2 else [value]
        for part in parts:
            if part == 0:
                continue
            x = int(grid_xy[spot, 0]) * bin_size + int(rng.integers(bin_size))
            y = int(grid_xy[spot, 1]) * bin_size + int(rng.integers(bin_size))
            records.append((int(gene), x, y, int(part)))
    return records, rng


def write_gem(path: Path, counts: sparse.csr_matrix, gene_names, grid_xy, bin_size: int,
              seed: int = 0, count_column: str = "MIDCount") -> Path:
    """A gzipped GEMv0.1 file of :func:`dnb_records` rows, in random order."""
    records, rng = dnb_records(counts, grid_xy, bin_size, seed)
    lines = [f"{gene_names[g]}\t{x}\t{y}\t{c}" for g, x, y, c in records]
    order = rng.permutation(len(lines))
    header = ["#FileFormat=GEMv0.1", "#SortedBy=None", "#BinType=Bin", "#BinSize=1",
              "#Omics=Transcriptomics", "#Stereo-seqChip=SS200000135TL_D1", "#OffsetX=0",
              "#OffsetY=0", f"geneID\tx\ty\t{count_column}"]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(header) + "\n")
        f.write("\n".join(lines[i] for i in order) + "\n")
    return Path(path)


def write_gef(path: Path, counts: sparse.csr_matrix, gene_ids, grid_xy, bin_size: int,
              seed: int = 0, gene_names=None) -> Path:
    """A square-bin GEF (HDF5) with a ``/geneExp/bin1`` group holding the same DNB rows as
    :func:`write_gem` (same seed): expression (x, y, count) contiguous per gene, gene table
    (geneID, geneName, offset, count) as in GEF version 4, or (gene, offset, count) as in
    version 3 when ``gene_names`` is None."""
    import h5py

    records, _ = dnb_records(counts, grid_xy, bin_size, seed)
    records = sorted(records, key=lambda r: r[0])
    expression = np.array([(x, y, c) for _, x, y, c in records],
                          dtype=[("x", np.int32), ("y", np.int32), ("count", np.uint16)])
    per_gene = np.bincount([r[0] for r in records], minlength=len(gene_ids)).astype(np.uint32)
    offset = (np.cumsum(per_gene) - per_gene).astype(np.uint32)
    if gene_names is None:
        genes = np.array(list(zip(np.asarray(gene_ids, dtype="S64"), offset, per_gene)),
                         dtype=[("gene", "S64"), ("offset", np.uint32), ("count", np.uint32)])
    else:
        genes = np.array(list(zip(np.asarray(gene_ids, dtype="S64"),
                                  np.asarray(gene_names, dtype="S64"), offset, per_gene)),
                         dtype=[("geneID", "S64"), ("geneName", "S64"), ("offset", np.uint32),
                                ("count", np.uint32)])
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.uint32(3 if gene_names is None else 4)
        f.attrs["geftool_ver"] = np.array([0, 7, 5], dtype=np.uint32)
        group = f.create_group("geneExp/bin1")
        data = group.create_dataset("expression", data=expression, chunks=True)
        for name, value in (("minX", expression["x"].min()), ("minY", expression["y"].min()),
                            ("maxX", expression["x"].max()), ("maxY", expression["y"].max()),
                            ("maxExp", expression["count"].max()), ("resolution", 500)):
            data.attrs[name] = np.uint32(value)
        group.create_dataset("gene", data=genes)
    return Path(path)
