"""The out-of-core engine on real LocalClusters and real zarr stores."""

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import store_digest
from scipy import sparse

from dflashdeconv import FlashDeconv
from dflashdeconv.core.graph import spatial_graph
from dflashdeconv.core.order import spatial_order
from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.engine.blocks import build_graph
from dflashdeconv.engine.ingest import from_anndata
from dflashdeconv.engine.results import read_results
from dflashdeconv.engine.run import deconvolve_store
from dflashdeconv.engine.store import SpotStore
from dflashdeconv.engine.writer import BlockRows, StoreTarget, write_store
from dflashdeconv.errors import InputError
from dflashdeconv.io import load_reference

TISSUE = SyntheticTissue(n_spots=3000, n_genes=500, n_types=6, depth=600, seed=4,
                         markers_per_type=15)


@pytest.fixture(scope="module")
def reference():
    return load_reference(TISSUE.reference())


@pytest.fixture(scope="module")
def tissue_store(tmp_path_factory):
    """The tissue as a store of 12 blocks of 256 spots."""
    return TISSUE.write_store(tmp_path_factory.mktemp("stores") / "tissue.zarr", chunk_rows=256)


def _fresh_copy(store, tmp_path, name="copy.zarr"):
    target = tmp_path / name
    shutil.copytree(store.path, target)
    return SpotStore.open(target)


def test_store_is_anndata_with_compact_blocks(tissue_store):
    adata = ad.read_zarr(tissue_store.path)
    assert adata.shape == (3000, 500)
    order = tissue_store.input_rows()
    assert (adata.X != TISSUE.counts()[order]).nnz == 0
    np.testing.assert_array_equal(adata.obsm["spatial"], TISSUE.coords()[order])
    np.testing.assert_allclose(adata.obsm["proportions"], TISSUE.proportions()[order])
    # each block is a compact patch: its bounding box is a few times its share of the tissue
    share = np.prod(np.ptp(adata.obsm["spatial"], axis=0)) / tissue_store.n_blocks
    for b in range(tissue_store.n_blocks):
        start, stop = tissue_store.block_rows(b)
        assert np.prod(np.ptp(adata.obsm["spatial"][start:stop], axis=0) + 1) < 6 * share


@pytest.mark.parametrize("nnz_chunk, chunk_rows", [(997, 512), (20_000, 64), (4093, 7)])
def test_blocks_and_chunks_of_x_in_any_alignment(nnz_chunk, chunk_rows, dask_client, tmp_path,
                                                 monkeypatch):
    """X's chunks inside a block, shared by two blocks or by many small ones, and blocks
    without counts: the store holds exactly the counts (~31 non-zeros per spot: blocks of
    ~16 chunks of X, and chunks of ~10 and ~19 blocks)."""
    from dflashdeconv.engine import writer

    monkeypatch.setattr(writer, "NNZ_CHUNK", nnz_chunk)  # the client's placement and X's chunks
    tissue = SyntheticTissue(n_spots=900, n_genes=200, n_types=4, depth=60, seed=2)
    store = tissue.write_store(tmp_path / "s.zarr", chunk_rows=chunk_rows, scheduler=dask_client)
    adata = ad.read_zarr(store.path)
    assert adata.X.nnz == store.nnz and store.root()["X"]["data"].chunks == (nnz_chunk,)
    assert (adata.X != tissue.counts()[store.input_rows()]).nnz == 0
    blocks = [(0, 50), (50, 100), (100, 140)]  # the middle block without counts
    counts = tissue.counts()[:140].tolil()
    counts[50:100] = 0
    counts = counts.tocsr()
    counts.eliminate_zeros()

    def make(start, stop):
        ids = np.arange(start, stop)
        return BlockRows(ids.astype(str), ids, np.c_[ids, ids].astype(float), counts[start:stop])

    with StoreTarget(tmp_path / "gap.zarr") as target:
        gap = write_store(target, make, blocks, n_spots=140, gene_names=tissue.gene_names,
                          chunk_rows=50, coords_dim=2, source="test", scheduler=dask_client)
    assert gap.nnz == counts.nnz
    assert (ad.read_zarr(gap.path).X != counts).nnz == 0


def test_spatial_order_sorts_ties_by_key():
    coords = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [5.0, 5.0]])
    order = spatial_order(coords)
    assert order.tolist() in ([0, 2, 1, 3], [1, 3, 0, 2])


@pytest.mark.parametrize("method, radius", [("knn", None), ("radius", 1.5), ("grid", None)])
def test_halo_graph_union_equals_the_global_graph(dask_client, tmp_path, method, radius):
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(40), np.arange(30)), -1).reshape(-1, 2).astype(float)
    # a grid (many ties), a dense irregular patch and a few remote spots: halos must grow
    coords = np.vstack([grid, rng.uniform(10, 20, (300, 2)), [[200.0, 200.0], [205.0, 190.0],
                                                              [-80.0, 15.0]]])
    n = len(coords)
    adata = ad.AnnData(sparse.csr_matrix(rng.poisson(1.0, (n, 5)).astype(np.float32)))
    adata.obsm["spatial"] = coords
    store = from_anndata(adata, tmp_path / "graph.zarr", chunk_rows=96)
    assert store.n_blocks == 16
    graphs, mean_degree, _ = build_graph(dask_client, store, method, 6, radius, progress=False)
    rows, cols = [], []
    for g in dask_client.gather(graphs):
        rows.append(np.repeat(np.arange(g.row_start, g.row_start + len(g.indptr) - 1),
                              np.diff(g.indptr)))
        cols.append(g.columns)
    blocks = sparse.csr_matrix((np.ones(sum(map(len, rows))), (np.concatenate(rows),
                                np.concatenate(cols))), shape=(n, n))
    whole = spatial_graph(store.coords(), method, 6, radius, tie_key=store.input_rows())
    assert (blocks != whole).nnz == 0
    assert mean_degree == pytest.approx(whole.nnz / n)


def test_engine_equals_the_in_memory_estimator(dask_client, tissue_store, reference, tmp_path):
    X, types, genes = reference
    store = _fresh_copy(tissue_store, tmp_path)
    before = store_digest(store.path)
    summary = deconvolve_store(store.path, X, types, genes, scheduler=dask_client, tol=1e-7,
                               progress=False)
    assert store_digest(store.path) == before  # the input arrays are untouched
    engine = read_results(store.path).to_numpy()
    memory = FlashDeconv(tol=1e-7).fit(TISSUE.counts(), X, TISSUE.coords())
    order = store.input_rows()
    # one solver step per exchange is the in-memory iteration: equal up to rounding
    assert np.abs(engine - memory.proportions_[order]).max() < 1e-12
    assert summary["n_iterations"] == memory.info_["n_iterations"]
    assert summary["final_objective"] == pytest.approx(memory.info_["final_objective"], rel=1e-12)
    assert summary["lambda_spatial"] == pytest.approx(memory.lambda_used_, rel=1e-12)
    # several steps per exchange: a different path to the same optimum
    deconvolve_store(store.path, X, types, genes, scheduler=dask_client, tol=1e-7,
                     inner_sweeps=4, overwrite=True, progress=False, key_added="inner4")
    assert np.abs(read_results(store.path, "inner4").to_numpy()
                  - memory.proportions_[order]).max() < 1e-4


def test_engine_is_deterministic_for_any_worker_count(tissue_store, reference, tmp_path):
    import logging

    from distributed import Client, LocalCluster

    X, types, genes = reference
    results = []
    for workers in (1, 3):
        store = _fresh_copy(tissue_store, tmp_path, f"w{workers}.zarr")
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            deconvolve_store(store.path, X, types, genes, scheduler=client, inner_sweeps=3,
                             progress=False)
        results.append(read_results(store.path).to_numpy())
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("preprocess, weighting", [("pearson", "countsketch"), ("raw", "expected")])
def test_engine_modes_and_gene_subset(dask_client, tissue_store, reference, tmp_path,
                                      preprocess, weighting):
    X, types, genes = reference
    keep = np.arange(0, len(genes), 2)  # a reference with half of the store's genes, reversed
    X_sub, genes_sub = X[:, keep[::-1]], genes[keep[::-1]]
    store = _fresh_copy(tissue_store, tmp_path)
    deconvolve_store(store.path, X_sub, types, genes_sub, scheduler=dask_client, tol=1e-7,
                     preprocess=preprocess, gene_weighting=weighting, progress=False)
    from dflashdeconv.io import align_genes

    Y, X_aligned, _ = align_genes(TISSUE.counts(), X_sub, TISSUE.gene_names, genes_sub)
    memory = FlashDeconv(tol=1e-7, preprocess=preprocess, gene_weighting=weighting)
    expected = memory.fit_transform(Y, X_aligned, TISSUE.coords())[store.input_rows()]
    assert np.abs(read_results(store.path).to_numpy() - expected).max() < 1e-12


def test_results_are_anndata_readable_and_keys_protected(dask_client, tissue_store, reference,
                                                          tmp_path):
    X, types, genes = reference
    store = _fresh_copy(tissue_store, tmp_path)
    deconvolve_store(store.path, X, types, genes, scheduler=dask_client, progress=False)
    adata = ad.read_zarr(store.path)
    table = adata.obsm["flashdeconv"]
    assert list(table.columns) == list(types) and table.index.equals(adata.obs_names)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    assert isinstance(adata.obs["flashdeconv_dominant"].dtype, pd.CategoricalDtype)
    assert (adata.obs["flashdeconv_dominant"].astype(str) == table.idxmax(axis=1)).all()
    assert adata.uns["flashdeconv_params"]["converged"]
    truth = adata.obsm["proportions"]
    assert np.corrcoef(table.to_numpy().ravel(), np.asarray(truth).ravel())[0, 1] > 0.9
    with pytest.raises(InputError, match="already holds results"):
        deconvolve_store(store.path, X, types, genes, scheduler=dask_client, progress=False)
    for reserved in ("spatial", "a/b"):
        with pytest.raises(InputError, match="not allowed"):
            deconvolve_store(store.path, X, types, genes, scheduler=dask_client,
                             key_added=reserved, progress=False)


def test_store_without_coordinates_or_shared_genes(dask_client, tissue_store, reference, tmp_path):
    X, types, genes = reference
    store = _fresh_copy(tissue_store, tmp_path)
    with pytest.raises(InputError, match="no genes in common"):
        deconvolve_store(store.path, X, types, np.char.add("ENSG", genes.astype(str)),
                         scheduler=dask_client, progress=False)
    shutil.rmtree(tmp_path / "copy.zarr" / "obsm" / "spatial")
    with pytest.raises(InputError, match="obsm/spatial: spot coordinates are missing"):
        deconvolve_store(store.path, X, types, genes, scheduler=dask_client, progress=False)
    with pytest.raises(InputError, match="no zarr store|not a complete"):
        SpotStore.open(tmp_path / "nothing.zarr")


def test_missing_and_corrupt_chunks_are_named(dask_client, tissue_store, reference, tmp_path):
    X, types, genes = reference
    store = _fresh_copy(tissue_store, tmp_path)
    chunk = tmp_path / "copy.zarr" / "X" / "indices" / "c" / "0"
    chunk.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(InputError, match=r"X of block \d+ \(rows \d+-\d+\) cannot be read"):
        deconvolve_store(store.path, X, types, genes, scheduler=dask_client, progress=False)
    chunk.unlink()
    with pytest.raises(InputError, match=r"X/indices is missing 1 chunk\(s\), e.g. chunk 0"):
        SpotStore.open(store.path)


def test_bad_counts_in_a_store_name_the_block(dask_client, reference, tmp_path):
    X, types, genes = reference
    counts = TISSUE.counts(0, 600).astype(np.float32)
    counts.data[counts.indptr[400] + 1] = np.nan  # row 400 -> block 1 of 256-row blocks
    names, coords = np.array([f"s{i}" for i in range(600)]), TISSUE.coords(0, 600)
    blocks = [(names[s:s + 256], np.arange(s, min(s + 256, 600)), coords[s:s + 256],
               counts[s:s + 256]) for s in range(0, 600, 256)]
    store = write_store(StoreTarget(tmp_path / "nan.zarr"), BlockRows, blocks, n_spots=600,
                        gene_names=TISSUE.gene_names, chunk_rows=256, coords_dim=2,
                        source="test", scheduler=dask_client)
    with pytest.raises(InputError, match=r"block 1 \(rows 256-511\): counts contains 1 NaN"):
        deconvolve_store(store.path, X, types, genes, scheduler=dask_client, progress=False)


def test_result_does_not_depend_on_the_block_size(dask_client, reference, tmp_path):
    X, types, genes = reference
    results = []
    for rows in (128, 1024):
        store = TISSUE.write_store(tmp_path / f"b{rows}.zarr", chunk_rows=rows)
        deconvolve_store(store.path, X, types, genes, scheduler=dask_client, progress=False)
        table = read_results(store.path)
        results.append(table.loc[sorted(table.index)].to_numpy())
        run = store.root()["uns"]["flashdeconv_run"]
        indptr = np.asarray(run["halo_indptr"][...])
        assert indptr.size == store.n_blocks + 1 and indptr[-1] > 0  # halos recorded
        blocks = np.asarray(store.root()["obs"]["block"][...])
        assert np.array_equal(blocks, np.arange(store.n_spots) // rows)
    assert np.abs(results[0] - results[1]).max() < 1e-13


def test_store_at_an_fsspec_url(reference):
    """A store in an fsspec file system (here ``memory://``, shared by threads)."""
    import logging

    from distributed import Client, LocalCluster

    from dflashdeconv.engine.ingest import from_anndata

    X, types, genes = reference
    spots = TISSUE.spots(0, 1200)
    url = "memory://dflashdeconv-test/spots.zarr"
    store = from_anndata(spots, url, chunk_rows=256)
    assert store.n_blocks == 5
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        summary = deconvolve_store(url, X, types, genes, scheduler=client, progress=False)
    assert summary["converged"]
    memory = FlashDeconv().fit(spots.X, X, spots.obsm["spatial"])
    table = read_results(url)
    expected = pd.DataFrame(memory.proportions_, index=spots.obs_names)
    assert np.abs(table.to_numpy() - expected.loc[table.index].to_numpy()).max() < 1e-10
