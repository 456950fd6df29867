import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import digest, shared_file
from scipy import sparse

from dflashdeconv import io, metrics, tl
from dflashdeconv.errors import DataWarning, InputError


def _pair(seed=0, n=60, genes=("a", "b", "c", "d", "e", "f")):
    rng = np.random.default_rng(seed)
    st = ad.AnnData(sparse.csr_matrix(rng.poisson(3, (n, len(genes))).astype(np.float32)),
                    var=pd.DataFrame(index=list(genes)))
    st.obsm["spatial"] = rng.uniform(0, 10, (n, 2))
    labels = pd.Categorical(rng.choice(["T1", "T2", "T3"], 40))
    ref = ad.AnnData(sparse.csr_matrix(rng.poisson(2, (40, len(genes))).astype(np.float32)),
                     obs=pd.DataFrame({"cell_type": labels}),
                     var=pd.DataFrame(index=list(genes)[::-1]))
    return st, ref


def test_load_reference_means_per_type():
    _, ref = _pair()
    X, types, genes = io.load_reference(ref)
    dense = ref.X.toarray()
    for k, t in enumerate(types):
        np.testing.assert_allclose(X[k], dense[(ref.obs["cell_type"] == t).to_numpy()].mean(0))
    X_sum, _, _ = io.load_reference(ref, method="sum")
    assert X_sum.sum() == pytest.approx(dense.sum())


def test_align_genes_uses_sorted_common_names():
    st, ref = _pair()
    ref = ref[:, ["f", "e", "b"]]  # reversed order, a subset
    Y, X, coords, types, genes = io.prepare_data(st, ref)
    assert genes.tolist() == ["b", "e", "f"]
    np.testing.assert_array_equal(Y.toarray(), st[:, ["b", "e", "f"]].X.toarray())
    full, _, _ = io.load_reference(ref)
    np.testing.assert_allclose(X, full[:, [2, 1, 0]])


def test_tl_deconvolve_writes_scanpy_style_results():
    spots = ad.read_h5ad(shared_file("starmap_cortex", "pseudospots.h5ad"))
    reference = ad.read_h5ad(shared_file("starmap_cortex", "reference.h5ad"))
    before = digest(spots.X, reference.X, spots.obsm["spatial"])
    assert tl.deconvolve(spots, reference, cell_type_key="cell_type", key_added="fd") is None
    assert digest(spots.X, reference.X, spots.obsm["spatial"]) == before
    result = spots.obsm["fd"]
    truth = spots.obsm["proportions"]
    assert list(result.columns) == sorted(truth.columns)
    np.testing.assert_allclose(result.sum(axis=1), 1.0)
    assert metrics.pearson(result[truth.columns].to_numpy(), truth.to_numpy()) >= 0.875
    assert isinstance(spots.obs["fd_dominant"].dtype, pd.CategoricalDtype)
    assert (spots.obs["fd_dominant"].astype(str) == result.idxmax(axis=1)).all()
    params = spots.uns["fd_params"]
    assert params["n_cell_types"] == 12 and params["converged"]
    assert not spots.obs["fd_zero_signal"].any()


def test_tl_copy_leaves_the_original_alone(small_tissue):
    spots, reference = small_tissue
    out = tl.deconvolve(spots, reference, copy=True)
    assert "flashdeconv" in out.obsm and "flashdeconv" not in spots.obsm
    assert metrics.pearson(out.obsm["flashdeconv"].to_numpy(),
                           spots.obsm["proportions"].to_numpy()) > 0.9


def test_results_round_trip_through_h5ad(small_tissue, tmp_path):
    spots, reference = small_tissue
    out = tl.deconvolve(spots, reference, copy=True)
    out.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    pd.testing.assert_frame_equal(back.obsm["flashdeconv"], out.obsm["flashdeconv"])
    assert back.uns["flashdeconv_params"]["n_iterations"] >= 1


def test_no_common_genes():
    st, ref = _pair()
    ref.var_names = [f"ENSG{i}" for i in range(ref.n_vars)]
    with pytest.raises(InputError, match="no genes in common"):
        tl.deconvolve(st, ref)


def test_duplicate_gene_names():
    st, ref = _pair(genes=("a", "b", "b", "c"))
    with pytest.raises(InputError, match="duplicate gene names"):
        tl.deconvolve(st, ref)


def test_missing_coordinates():
    st, ref = _pair()
    del st.obsm["spatial"]
    with pytest.raises(InputError, match="spatial coordinates missing"):
        tl.deconvolve(st, ref)


def test_missing_cell_type_key_and_labels():
    st, ref = _pair()
    with pytest.raises(InputError, match="not found in the reference"):
        tl.deconvolve(st, ref, cell_type_key="celltype")
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(object)
    ref.obs.iloc[3, 0] = None
    with pytest.raises(InputError, match="have no 'cell_type' label"):
        tl.deconvolve(st, ref)


def test_cell_type_without_cells():
    st, ref = _pair()
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.add_categories(["Ghost"])
    with pytest.raises(InputError, match=r"\['Ghost'\] have no cells"):
        tl.deconvolve(st, ref)


def test_fewer_than_two_cell_types():
    st, ref = _pair()
    ref.obs["cell_type"] = pd.Categorical(["T1"] * ref.n_obs)
    with pytest.raises(InputError, match="at least 2 cell types"):
        tl.deconvolve(st, ref)


def test_unknown_like_labels_warn():
    st, ref = _pair()
    labels = ref.obs["cell_type"].astype(str).to_numpy()
    labels[:5] = "Unassigned"
    ref.obs["cell_type"] = pd.Categorical(labels)
    with pytest.warns(DataWarning, match="Unassigned"):
        tl.deconvolve(st, ref, min_shared_genes=6)


def test_merfish_reference_with_ambiguous_labels_warns():
    ref = ad.read_h5ad(shared_file("merfish_hypothalamus", "reference.h5ad"))
    with pytest.warns(DataWarning, match="Ambiguous"):
        io.load_reference(ref)


def test_layer_and_missing_layer():
    st, ref = _pair()
    st.layers["counts"] = st.X.copy()
    tl.deconvolve(st, ref, layer="counts", key_added="layered", min_shared_genes=6)
    assert "layered" in st.obsm
    with pytest.raises(InputError, match="layer 'raw' not found"):
        tl.deconvolve(st, ref, layer="raw")


def test_result_to_anndata_shape_check():
    st, _ = _pair()
    with pytest.raises(InputError, match="do not fit"):
        io.result_to_anndata(np.zeros((3, 2)), st)
