"""The command line: every subcommand's help, lazy imports, exit codes, end-to-end runs."""

import hashlib
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from dflashdeconv import cli
from dflashdeconv.datasets import SyntheticTissue

SUBCOMMANDS = sorted(cli.build_parser()._subparsers._group_actions[0].choices)


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dflashdeconv.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_all_commands_are_there():
    assert {"deconvolve", "ingest", "synth", "info", "demo", "predict-expression"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dflashdeconv {command}") and len(out.splitlines()) > 3


def test_help_imports_no_heavy_module():
    code = ("import sys; from dflashdeconv import cli; cli.build_parser().format_help(); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    assert not loaded & {"numpy", "numba", "dask", "distributed", "anndata", "zarr", "torch",
                         "scipy", "pandas", "spatialdata", "matplotlib"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    tissue = SyntheticTissue(n_spots=800, n_genes=300, n_types=4, depth=500, seed=3,
                             markers_per_type=10)
    tissue.spots().write_h5ad(folder / "spots.h5ad")
    tissue.reference().write_h5ad(folder / "reference.h5ad")
    return folder


def test_deconvolve_h5ad_writes_results_maps_and_a_summary(files, tmp_path):
    before = sha(files / "spots.h5ad")
    done = run("deconvolve", files / "spots.h5ad", files / "reference.h5ad", "--out",
               tmp_path / "out.h5ad", "--plot", tmp_path / "maps")
    assert done.returncode == 0, done.stderr
    assert "spots" in done.stdout and "converged after" in done.stdout
    assert sha(files / "spots.h5ad") == before
    result = ad.read_h5ad(tmp_path / "out.h5ad")
    truth = result.obsm["proportions"].to_numpy()
    assert np.corrcoef(result.obsm["flashdeconv"].to_numpy().ravel(), truth.ravel())[0, 1] > 0.9
    for name in ("flashdeconv_dominant.png", "flashdeconv_proportions.png"):
        assert (tmp_path / "maps" / name).read_bytes()[:4] == b"\x89PNG"


def test_ingest_info_and_deconvolve_a_store(files, tmp_path):
    store = tmp_path / "spots.zarr"
    done = run("ingest", files / "spots.h5ad", store, "--chunk-rows", "256", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "800" in done.stdout and "blocks" in done.stdout
    done = run("deconvolve", store, files / "reference.h5ad", "--out", tmp_path / "p.csv",
               "--plot", tmp_path / "maps", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.csv").read_text().count("\n") == 801
    from dflashdeconv.io import read_results

    csv = pd.read_csv(tmp_path / "p.csv", index_col=0)
    np.testing.assert_allclose(csv.to_numpy(), read_results(str(store)).to_numpy(), rtol=1e-12)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "flashdeconv_dominant.png", "flashdeconv_proportions.png"]
    info = run("info", store)
    assert "result 'flashdeconv'" in info.stdout and "converged" in info.stdout


def test_synth_writes_store_reference_and_truth(tmp_path):
    done = run("synth", tmp_path / "s.zarr", "--spots", "500", "--genes", "200", "--types", "3",
               "--depth", "300", "--quiet")
    assert done.returncode == 0, done.stderr
    reference = ad.read_h5ad(tmp_path / "s_reference.h5ad")
    assert reference.obs["cell_type"].nunique() == 3
    stored = ad.read_zarr(tmp_path / "s.zarr")
    assert stored.n_obs == 500 and stored.obsm["proportions"].shape == (500, 3)


@pytest.mark.parametrize("args, code, message", [
    (["deconvolve", "missing.h5ad", "reference.h5ad", "--out", "x.h5ad"], 2, "not found"),
    (["deconvolve", "spots.h5ad", "reference.h5ad"], 2, r"--out OUT.h5ad .* is needed"),
    (["deconvolve", "spots.h5ad", "reference.h5ad", "--out", "x.h5ad", "--cell-type-key", "x"],
     2, "cell type key 'x' not found"),
    (["deconvolve", "spots.h5ad", "reference.h5ad", "--out", "x.h5ad", "--max-iter", "1",
      "--tol", "1e-12"], 3, "NOT converged"),
    (["ingest", "spots.h5ad", "spots.h5ad.zarr", "--format", "gem"], 2, "GEM"),
    (["info", "nowhere.zarr"], 2, "STORE nowhere.zarr not found"),
])
def test_exit_codes_a_batch_system_can_act_on(files, tmp_path, args, code, message):
    done = subprocess.run([sys.executable, "-m", "dflashdeconv.cli", *args], capture_output=True,
                          text=True, cwd=files, timeout=600)
    assert done.returncode == code, done.stderr
    assert __import__("re").search(message, done.stderr + done.stdout)
