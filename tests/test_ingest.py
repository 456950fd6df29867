"""Streaming converters: real h5ad, SpatialData, Visium HD and GEM files to spot stores."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from formats import write_gef, write_gem, write_visium_hd
from scipy import sparse

from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.engine import ingest
from dflashdeconv.errors import InputError

TISSUE = SyntheticTissue(n_spots=1500, n_genes=300, n_types=5, depth=300, seed=9,
                         markers_per_type=10)


@pytest.fixture(scope="module")
def spots():
    return TISSUE.spots()


def _same_spots(store, counts, coords, names=None):
    """The store holds ``counts`` (rows in source order) re-ordered by its input_row."""
    order = store.input_rows()
    stored = ad.read_zarr(store.path)
    assert (stored.X != sparse.csr_matrix(counts)[order]).nnz == 0
    np.testing.assert_allclose(stored.obsm["spatial"], np.asarray(coords)[order])
    if names is not None:
        assert stored.obs_names.tolist() == list(np.asarray(names)[order])


def test_h5ad_backed_streaming(spots, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "SOURCE_CHUNK_ROWS", 400)  # several source chunks
    spots.write_h5ad(tmp_path / "spots.h5ad")
    store = ingest.from_h5ad(tmp_path / "spots.h5ad", tmp_path / "s.zarr", chunk_rows=256)
    assert store.n_blocks == 6 and store.source.endswith("spots.h5ad")
    _same_spots(store, spots.X, spots.obsm["spatial"], spots.obs_names)


def test_anndata_dense_layer(spots, tmp_path):
    adata = spots.copy()
    adata.layers["counts"] = adata.X.toarray()
    store = ingest.from_anndata(adata, tmp_path / "s.zarr", layer="counts")
    _same_spots(store, spots.X, spots.obsm["spatial"])


def test_spatialdata_table_with_circle_shapes(spots, tmp_path):
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel

    xy = spots.obsm["spatial"] * 100.0
    circles = ShapesModel.parse(gpd.GeoDataFrame(
        {"radius": np.full(len(xy), 27.5)}, geometry=[Point(x, y) for x, y in xy],
        index=pd.RangeIndex(len(xy))))
    table = ad.AnnData(spots.X.copy(), obs=pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(xy)), "instance_id": np.arange(len(xy))[::-1]},
        index=spots.obs_names), var=spots.var.copy())
    table = table[::-1].copy()  # rows in another order than the shapes
    table.obs["instance_id"] = np.arange(len(xy))[::-1]
    sdata = sd.SpatialData(shapes={"spots": circles}, tables={"table": TableModel.parse(
        table, region="spots", region_key="region", instance_key="instance_id")})
    sdata.write(tmp_path / "sdata.zarr")
    read = sd.read_zarr(tmp_path / "sdata.zarr")
    store = ingest.from_spatialdata(read, tmp_path / "s.zarr")
    _same_spots(store, table.X, xy[::-1], table.obs_names)
    assert "spatial" not in read.tables["table"].obsm  # the input is not modified
    from dflashdeconv import io

    by_path = io.to_store(tmp_path / "sdata.zarr", tmp_path / "by_path.zarr")
    _same_spots(by_path, table.X, xy[::-1], table.obs_names)
    with pytest.raises(InputError, match="cannot tell the format of .*format="):
        io.to_store(tmp_path / "counts.csv", tmp_path / "csv.zarr")

    # one table over two shapes elements, each row locating its spot in its own element
    half = len(xy) // 2
    two = ad.AnnData(spots.X.copy(), obs=pd.DataFrame(
        {"region": pd.Categorical(["left"] * half + ["right"] * (len(xy) - half)),
         "instance_id": np.r_[np.arange(half), np.arange(len(xy) - half)]},
        index=spots.obs_names), var=spots.var.copy())
    elements = {name: ShapesModel.parse(gpd.GeoDataFrame(
        {"radius": np.full(len(part), 27.5)}, geometry=[Point(x, y) for x, y in part],
        index=pd.RangeIndex(len(part)))) for name, part in (("left", xy[:half]), ("right", xy[half:]))}
    both = sd.SpatialData(shapes=elements, tables={"table": TableModel.parse(
        two, region=["left", "right"], region_key="region", instance_key="instance_id")})
    _same_spots(ingest.from_spatialdata(both, tmp_path / "two.zarr"), spots.X, xy, spots.obs_names)
    with pytest.raises(InputError, match="no table 'other'"):
        ingest.from_spatialdata(sdata, tmp_path / "t.zarr", table_key="other")


def test_visium_hd_binned_output(spots, tmp_path):
    grid = spots.obsm["spatial"].astype(int)
    in_tissue = (np.arange(len(grid)) % 7 != 0).astype(int)
    names = TISSUE.gene_names.copy()
    names[5] = names[4]  # a repeated symbol, as in real 10x feature lists
    folder = write_visium_hd(tmp_path / "square_008um", spots.X, [f"ENSG{i:08d}" for i in range(300)],
                             names, grid, in_tissue)
    store = ingest.from_visium_hd(folder, tmp_path / "s.zarr")
    keep = in_tissue == 1
    stored = ad.read_zarr(store.path)
    assert stored.n_obs == keep.sum() and stored.var_names[5] == f"{names[4]}-1"
    pixel = np.column_stack([grid[:, 0] * 32 + 7.25, grid[:, 1] * 32 + 3.5])
    _same_spots(store, spots.X[keep], pixel[keep])
    ids = ingest.from_visium_hd(folder, tmp_path / "ids.zarr", gene_ids=True, in_tissue_only=False)
    assert ids.n_spots == len(grid) and ids.gene_names[0] == "ENSG00000000"


def test_visium_hd_errors(spots, tmp_path):
    grid = spots.obsm["spatial"].astype(int)
    folder = write_visium_hd(tmp_path / "hd", spots.X, [f"E{i}" for i in range(300)],
                             TISSUE.gene_names, grid, np.ones(len(grid)))
    positions = pd.read_parquet(folder / "spatial" / "tissue_positions.parquet")
    positions.iloc[:-1].to_parquet(folder / "spatial" / "tissue_positions.parquet")
    with pytest.raises(InputError, match="1 barcode\\(s\\) not in"):
        ingest.from_visium_hd(folder, tmp_path / "s.zarr")
    with pytest.raises(InputError, match="not a Visium HD binned output folder"):
        ingest.from_visium_hd(tmp_path, tmp_path / "t.zarr")


@pytest.mark.parametrize("bin_size", [50, 20])
def test_gem_binning_recovers_the_spots(spots, tmp_path, bin_size):
    grid = spots.obsm["spatial"].astype(int)
    gem = write_gem(tmp_path / "chip.gem.gz", spots.X, TISSUE.gene_names, grid, bin_size)
    store = ingest.from_gem(gem, tmp_path / "s.zarr", bin_size=bin_size, chunk_lines=20_000,
                            n_buckets=8)
    stored = ad.read_zarr(store.path)
    corner = grid * bin_size
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(corner)}
    rows = np.array([lookup[(int(x), int(y))] for x, y in stored.obsm["spatial"]])
    nonempty = np.asarray(spots.X.sum(axis=1)).ravel() > 0
    assert stored.n_obs == nonempty.sum()
    assert (stored.X != spots.X[rows]).nnz == 0
    expected = [str((int(x) << 32) | int(y)) for x, y in corner[rows]]
    assert stored.obs_names.tolist() == expected


def test_gef_gives_the_store_of_the_same_gem(spots, tmp_path):
    grid = spots.obsm["spatial"].astype(int)
    gem = write_gem(tmp_path / "chip.gem.gz", spots.X, TISSUE.gene_names, grid, 50)
    gef = write_gef(tmp_path / "chip.gef", spots.X, TISSUE.gene_names, grid, 50)
    from_gem = ad.read_zarr(ingest.from_gem(gem, tmp_path / "gem.zarr", n_buckets=8).path)
    # small slices: expression rows of one gene are split over several reads
    from_gef = ad.read_zarr(ingest.from_gef(gef, tmp_path / "gef.zarr", read_rows=997,
                                            n_buckets=8).path)
    assert from_gef.obs_names.tolist() == from_gem.obs_names.tolist()
    assert from_gef.var_names.tolist() == from_gem.var_names.tolist()
    np.testing.assert_array_equal(from_gef.obsm["spatial"], from_gem.obsm["spatial"])
    assert (from_gef.X != from_gem.X).nnz == 0 and from_gef.X.sum() == spots.X.sum()
    from dflashdeconv import cli, io

    assert io.to_store(gef, tmp_path / "io.zarr", bin_size=50).nnz == from_gef.X.nnz
    assert cli.main(["ingest", str(gef), str(tmp_path / "cli.zarr"), "--quiet"]) == 0
    assert ad.read_zarr(tmp_path / "cli.zarr").n_obs == from_gef.n_obs


def test_gef_version_4_gene_names_made_unique(spots, tmp_path):
    grid = spots.obsm["spatial"].astype(int)
    symbols = np.array([f"SYM{g // 2}" for g in range(len(TISSUE.gene_names))])  # pairs repeat
    gef = write_gef(tmp_path / "v4.gef", spots.X, TISSUE.gene_names, grid, 25, gene_names=symbols)
    by_id = ad.read_zarr(ingest.from_gef(gef, tmp_path / "id.zarr", bin_size=25).path)
    assert sorted(by_id.var_names) == sorted(TISSUE.gene_names)
    by_name = ad.read_zarr(ingest.from_gef(gef, tmp_path / "name.zarr", bin_size=25,
                                           gene_names=True).path)
    assert {"SYM0", "SYM0-1"} <= set(by_name.var_names) and by_name.n_vars == by_id.n_vars
    column = {name: i for i, name in enumerate(by_name.var_names)}
    expected = spots.X[:, 1].toarray().sum()  # the second gene is the repeat of SYM0
    assert by_name.X[:, column["SYM0-1"]].sum() == expected


def test_gef_bad_files_are_named(spots, tmp_path):
    import h5py

    grid = spots.obsm["spatial"].astype(int)
    not_hdf5 = tmp_path / "text.gef"
    not_hdf5.write_text("geneID\tx\ty\tMIDCount\n")
    with pytest.raises(InputError, match="cannot be read as a GEF"):
        ingest.from_gef(not_hdf5, tmp_path / "a.zarr")
    cells = tmp_path / "cells.gef"
    with h5py.File(cells, "w") as f:
        f.create_group("cellBin")
    with pytest.raises(InputError, match="cell-bin GEF"):
        ingest.from_gef(cells, tmp_path / "b.zarr")
    gef = write_gef(tmp_path / "chip.gef", spots.X, TISSUE.gene_names, grid, 50)
    with pytest.raises(InputError, match="positive integer"):
        ingest.from_gef(gef, tmp_path / "c.zarr", bin_size=0)
    with h5py.File(gef, "a") as f:
        f.move("geneExp/bin1", "geneExp/bin2")
    with pytest.raises(InputError, match=r"no bin group divides bin_size 25 \(groups: \['bin2'\]\)"):
        ingest.from_gef(gef, tmp_path / "d.zarr", bin_size=25)
    with h5py.File(gef, "a") as f:
        genes = f["geneExp/bin2/gene"][...]
        genes["offset"][3] += 1
        f["geneExp/bin2/gene"][...] = genes
    with pytest.raises(InputError, match="offsets and counts do not tile"):
        ingest.from_gef(gef, tmp_path / "e.zarr", bin_size=50)
    assert not any((tmp_path / f"{n}.zarr").exists() for n in "abcde")


def _gem_lines(tmp_path, body, header="geneID\tx\ty\tMIDCount"):
    path = tmp_path / "bad.gem"
    path.write_text(f"#FileFormat=GEMv0.1\n#BinSize=1\n{header}\n" + body)
    return path


@pytest.mark.parametrize("body, message", [
    ("A\t1\t2\t3\nB\t4\t5\t-1\n", "line 5: negative MIDCount -1"),
    ("A\t1\t2\t3\nB\t4\t5\tmany\n", "line 5: MIDCount 'many' is not a number"),
    ("A\t1\tq\t3\n", "line 4: y 'q' is not a number"),
    ("", "no data lines"),
])
def test_gem_bad_rows_are_named(tmp_path, body, message):
    with pytest.raises(InputError, match=message):
        ingest.from_gem(_gem_lines(tmp_path, body), tmp_path / "s.zarr")


def test_gem_missing_columns(tmp_path):
    with pytest.raises(InputError, match="need geneID, x, y"):
        ingest.from_gem(_gem_lines(tmp_path, "A\t1\t2\n", "geneID\tx\ty"), tmp_path / "s.zarr")


def test_duplicate_barcodes_and_bad_values(spots, tmp_path):
    dup = spots.copy()
    dup.obs_names = list(spots.obs_names[:-1]) + [spots.obs_names[10]]
    with pytest.raises(InputError, match=r"duplicate barcode 'spot000000010' in rows \[10, 1499\]"):
        ingest.from_anndata(dup, tmp_path / "a.zarr")
    bad = spots.copy()
    bad.X = bad.X.astype(np.float32)
    bad.X.data[bad.X.indptr[77]] = -3
    with pytest.raises(InputError, match="negative count -3.0 in row 77"):
        ingest.from_anndata(bad, tmp_path / "b.zarr")
    bad = spots.copy()
    bad.obsm["spatial"][12, 0] = np.nan
    with pytest.raises(InputError, match=r"spot coordinates contain NaN or infinite values in 1 spot\(s\), e.g. rows \[12\]"):
        ingest.from_anndata(bad, tmp_path / "c.zarr")
    del bad.obsm["spatial"]
    with pytest.raises(InputError, match="coordinates missing"):
        ingest.from_anndata(bad, tmp_path / "d.zarr")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    ingest.from_anndata(spots, tmp_path / "e.zarr")
    for target in (tmp_path / "e.zarr", f"file://{tmp_path / 'e.zarr'}"):
        with pytest.raises(InputError, match="already exists: pass --overwrite"):
            ingest.from_anndata(spots, target)


def test_formats_are_found_by_their_readers_hooks(tmp_path):
    from dflashdeconv.engine.ingest import (
        READERS,
        Reader,
        guess_format,
        register_reader,
    )

    assert list(READERS) == ["h5ad", "gem", "gef", "visium-hd", "spatialdata"]
    assert guess_format(tmp_path / "x.h5ad") == "h5ad"
    assert guess_format(tmp_path / "x.gem.gz") == "gem"
    (tmp_path / "sd.zarr").mkdir()
    (tmp_path / "sd.zarr" / "zarr.json").write_text("{}")
    assert guess_format(tmp_path / "sd.zarr") == "spatialdata"
    with pytest.raises(InputError, match=r"cannot tell the format of .*\.h5ad, \.gem\[\.gz\]"):
        guess_format(tmp_path / "x.csv")
    with pytest.raises(InputError, match="unknown format 'csv'"):
        ingest.from_path(tmp_path / "x.csv", tmp_path / "s.zarr", format="csv")
    with pytest.raises(InputError, match="a reader for 'h5ad' is registered"):
        register_reader(Reader("h5ad", lambda p: False, ingest.from_h5ad, ".h5ad"))
