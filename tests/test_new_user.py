"""What a new user meets at the edges: outputs by suffix, too few shared genes, no spatial
term, clean errors before any work, interrupted writes, SpatialData and scanpy round trips."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from dflashdeconv import io, tl
from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.errors import DataWarning, InputError

TISSUE = SyntheticTissue(n_spots=600, n_genes=300, n_types=4, depth=500, seed=3,
                         markers_per_type=10)


def cli(*args, cwd, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "dflashdeconv.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    TISSUE.spots().write_h5ad(folder / "spots.h5ad")
    TISSUE.reference().write_h5ad(folder / "reference.h5ad")
    few = TISSUE.reference()[:, :5].copy()  # a reference sharing 5 of 300 genes
    few.write_h5ad(folder / "five_genes.h5ad")
    pd.DataFrame(np.zeros((2, 2))).to_csv(folder / "table.csv")
    (folder / "a_file").write_text("not a folder")
    return folder


def test_outputs_follow_their_suffix(files, tmp_path):
    for suffix in (".csv", ".parquet", ".h5ad"):
        done = cli("deconvolve", "spots.h5ad", "reference.h5ad", "--out", tmp_path / f"r{suffix}",
                   "-q", cwd=files)
        assert done.returncode == 0, done.stderr
    csv = pd.read_csv(tmp_path / "r.csv", index_col=0)
    parquet = pd.read_parquet(tmp_path / "r.parquet")
    h5ad = ad.read_h5ad(tmp_path / "r.h5ad")
    np.testing.assert_allclose(csv.to_numpy(), h5ad.obsm["flashdeconv"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(parquet.to_numpy(), csv.to_numpy())
    assert list(csv.columns) == list(TISSUE.cell_type_names) and csv.shape == (600, 4)
    assert "genes" in done.stdout and "used of 300 shared" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["spots.h5ad", "reference.h5ad", "--out", "x.txt"], r"suffix must be one of \('.h5ad', '.csv', '.parquet'\)"),
    (["spots.h5ad", "reference.h5ad", "--out", "no/such/folder/x.csv"], "folder .* does not exist"),
    (["spots.h5ad", "reference.h5ad", "--out", "x.csv", "--plot", "a_file"], "is a file; give a folder"),
    (["table.csv", "reference.h5ad", "--out", "x.csv"], "SPATIAL table.csv is neither an AnnData"),
    (["spots.h5ad", "table.csv", "--out", "x.csv"], "REFERENCE table.csv is neither an AnnData"),
    (["spots.h5ad", "five_genes.h5ad", "--out", "x.csv"], "only 5 genes are shared .*--min-shared-genes"),
    (["spots.h5ad", "reference.h5ad", "--out", "x.csv", "--lambda-spatial", "abc"], "'auto' or a number expected"),
])
def test_bad_input_exits_2_with_one_message_before_any_work(files, args, message):
    done = cli("deconvolve", *args, cwd=files, timeout=120)
    assert done.returncode == 2, done.stderr
    assert __import__("re").search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 3
    assert not (files / "x.csv").exists()


def test_other_commands_refuse_bad_input_cleanly(files, tmp_path):
    for args, message in ((["synth", tmp_path / "s.zarr", "--spots", "0"], "at least 1 expected, got 0"),
                          (["info", "spots.h5ad"], "is an AnnData, not a spot store"),
                          (["ingest", "table.csv", tmp_path / "t.zarr"], "cannot tell the format")):
        done = cli(*args, cwd=files, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_few_shared_genes_refused_unless_the_floor_is_lowered(files):
    spots, reference = TISSUE.spots(), ad.read_h5ad(files / "five_genes.h5ad")
    with pytest.raises(InputError, match="only 5 genes are shared"):
        tl.deconvolve(spots, reference)
    with pytest.warns(DataWarning, match="thin marker coverage"):
        tl.deconvolve(spots, reference, min_shared_genes=5)
    record = spots.uns["flashdeconv_params"]
    assert record["n_genes_shared"] == 5 and record["n_genes_used"] == 5


def test_k_neighbors_0_means_no_spatial_term(files):
    spots, reference = TISSUE.spots(), TISSUE.reference()
    tl.deconvolve(spots, reference, k_neighbors=0)
    assert spots.uns["flashdeconv_params"]["lambda_spatial"] == 0.0
    done = cli("deconvolve", "spots.h5ad", "reference.h5ad", "--out", "k0.csv", "--k-neighbors",
               "0", cwd=files)
    assert done.returncode == 0 and "none (lambda 0, k_neighbors=0)" in done.stdout, done.stdout


def _interrupt_when(process, ready, timeout=240):
    start = time.time()
    while not ready() and process.poll() is None and time.time() - start < timeout:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    return process.communicate(timeout=240)


def test_ctrl_c_in_synth_leaves_nothing_and_a_rerun_works(tmp_path):
    target = tmp_path / "big.zarr"
    process = subprocess.Popen([sys.executable, "-m", "dflashdeconv.cli", "synth", str(target),
                                "--spots", "400000", "--depth", "1500"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    _, err = _interrupt_when(process, lambda: (tmp_path / ".big.zarr.partial" / "X").exists())
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "dflashdeconv: interrupted" and "Traceback" not in err
    assert not target.exists() and not (tmp_path / ".big.zarr.partial").exists()
    small = ["--genes", "100", "--types", "3", "-q"]
    done = cli("synth", target, "--spots", "500", *small, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    again = cli("synth", target, "--spots", "500", *small, cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    replaced = cli("synth", target, "--spots", "700", "--overwrite", *small, cwd=tmp_path)
    assert replaced.returncode == 0 and ad.read_zarr(target).n_obs == 700


def test_ctrl_c_on_a_store_run_is_one_line_and_info_says_how_to_resume(files, tmp_path):
    store = tmp_path / "s.zarr"
    SyntheticTissue(n_spots=150_000, n_genes=1500, n_types=6, depth=1500, seed=1).write_store(
        store, chunk_rows=8192)
    process = subprocess.Popen([sys.executable, "-m", "dflashdeconv.cli", "deconvolve",
                                str(store), str(files / "reference.h5ad"), "--min-shared-genes",
                                "1"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_group = store / "uns" / "flashdeconv_run" / "projected"
    _, err = _interrupt_when(process, run_group.exists)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if "━" not in line and "dashboard" not in line]
    assert lines == ["dflashdeconv: interrupted (continue with --resume)"], err
    info = cli("info", store, cwd=tmp_path)
    assert "interrupted; `deconvolve --resume` continues it" in info.stdout
    rerun = cli("deconvolve", store, files / "reference.h5ad", "--min-shared-genes", "1",
                cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "the interrupted run under 'flashdeconv' is started over; --resume" in rerun.stderr
    again = cli("deconvolve", store, files / "reference.h5ad", "--min-shared-genes", "1",
                cwd=tmp_path)
    assert again.returncode == 2
    assert "--overwrite" in again.stderr and "--key-added" in again.stderr


def test_spatialdata_round_trip(tmp_path):
    import geopandas as gpd
    import shapely
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    spots, reference = TISSUE.spots(), TISSUE.reference()
    coords = spots.obsm["spatial"]
    circles = gpd.GeoDataFrame(geometry=shapely.points(coords[:, 0], coords[:, 1]),
                               index=np.arange(spots.n_obs))
    circles["radius"] = 0.5
    table = ad.AnnData(spots.X, obs=pd.DataFrame({"region": pd.Categorical(["spots"] * spots.n_obs),
                                                  "instance_id": np.arange(spots.n_obs)},
                                                 index=spots.obs_names), var=spots.var)
    sdata = sd.SpatialData(shapes={"spots": ShapesModel.parse(circles)},
                           tables={"table": TableModel.parse(table, region="spots",
                                                             region_key="region",
                                                             instance_key="instance_id")})
    tl.deconvolve(sdata, reference)  # coordinates from the shapes' centroids
    expected = tl.deconvolve(spots, reference, copy=True).obsm["flashdeconv"]
    result = sdata.tables["table"].obsm["flashdeconv"]
    np.testing.assert_allclose(result.to_numpy(), expected.to_numpy())
    assert "spatial" not in sdata.tables["table"].obsm  # only results were added
    path = tmp_path / "sdata.zarr"
    sdata.write(path)
    done = cli("deconvolve", path, tmp_path / "ref.h5ad", cwd=tmp_path)
    assert done.returncode == 2  # the reference file does not exist yet
    reference.write_h5ad(tmp_path / "ref.h5ad")
    done = cli("deconvolve", path, "ref.h5ad", "--key-added", "cli", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    back = sd.read_zarr(path).tables["table"]
    np.testing.assert_allclose(back.obsm["cli"].to_numpy(), expected.to_numpy())
    assert back.uns["cli_params"]["n_spots"] == spots.n_obs


def test_proportions_as_obs_columns_for_scanpy(files):
    spots, reference = TISSUE.spots(), TISSUE.reference()
    tl.deconvolve(spots, reference)
    columns = io.proportions_to_obs(spots)
    assert columns == list(TISSUE.cell_type_names)
    np.testing.assert_array_equal(spots.obs["Type00"], spots.obsm["flashdeconv"]["Type00"])
    import scanpy as sc

    spots.uns["spatial"] = {}
    sc.pl.embedding(spots, basis="spatial", color=columns[0], show=False)  # what pl.spatial draws
