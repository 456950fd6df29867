import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_file

from dflashdeconv import cli
from dflashdeconv.datasets import SyntheticTissue, starmap_cortex, synthetic


def test_bundled_starmap_equals_the_shared_copy():
    import anndata as ad

    spots, reference = starmap_cortex()
    assert spots.shape == (581, 1020) and reference.shape == (2002, 1020)
    np.testing.assert_allclose(spots.obsm["proportions"].sum(axis=1), 1.0)
    shared = ad.read_h5ad(shared_file("starmap_cortex", "pseudospots.h5ad"))
    assert (shared.X != spots.X).nnz == 0


def test_synthetic_tissue_is_chunk_invariant_and_realistic():
    tissue = SyntheticTissue(n_spots=3000, n_genes=800, n_types=6, depth=1000, seed=5,
                             markers_per_type=20)
    whole = tissue.counts()
    assert (tissue.counts(1000, 1700) != whole[1000:1700]).nnz == 0
    np.testing.assert_array_equal(tissue.proportions(2500), tissue.proportions()[2500:])
    P = tissue.proportions()
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    assert 0.4 < P.max(axis=1).mean() < 0.9  # mixtures, usually with a dominant type
    depth = np.asarray(whole.sum(axis=1)).ravel()
    assert abs(depth.mean() / 1000 - 1) < 0.05
    assert 0.05 < whole.nnz / (3000 * 800) < 0.6  # sparse, as real spots
    # neighbouring spots are more alike than distant ones (smooth tissue)
    near = np.abs(P[1:] - P[:-1]).sum(axis=1)[tissue.coords()[1:, 0] > 0].mean()
    far = np.abs(P - P[np.random.default_rng(0).permutation(3000)]).sum(axis=1).mean()
    assert near < 0.8 * far


def test_synthetic_seed_changes_data():
    a, ref_a = synthetic(n_spots=200, n_genes=300, n_types=4, seed=1, markers_per_type=10)
    b, ref_b = synthetic(n_spots=200, n_genes=300, n_types=4, seed=2, markers_per_type=10)
    assert (a.X != b.X).nnz > 0
    assert set(ref_a.obs["cell_type"].cat.categories) == {"Type00", "Type01", "Type02", "Type03"}
    with pytest.raises(ValueError, match="n_spots"):
        SyntheticTissue(n_spots=0)


def test_demo_command_prints_scores_and_writes_maps(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dflashdeconv.cli", "demo", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Pearson r" in result.stdout and "RMSE" in result.stdout
    r = float(result.stdout.split("Pearson r (all entries) = ")[1].split()[0])
    assert r >= 0.875
    for name in ("starmap_dominant.png", "starmap_proportions.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_help_and_bad_command():
    assert cli.main([]) == cli.EXIT_FAILURE
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
