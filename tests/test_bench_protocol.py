"""The H&E benchmark's protocol: nothing about a test section but its gene names is read
before its predictions exist (HEST-Bench rules; benchmarks/bench_stflow.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stflow.py"


class NamesOnly:
    """A section of which only the gene and spot names may be read."""

    def __init__(self, adata):
        self.var_names, self.obs_names = adata.var_names, adata.obs_names

    def __getitem__(self, key):
        raise AssertionError("the test section's expression was read before prediction")

    def __getattr__(self, name):
        raise AssertionError(f"the test section's {name} was read before prediction")


@pytest.fixture()
def bench(monkeypatch):
    shared_file("her2st", "C5.h5ad")
    monkeypatch.chdir(BENCH.parents[1])  # the benchmark reads ../shared/data from the root
    spec = importlib.util.spec_from_file_location("bench_stflow", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("test,training", [("C5", ("C2", "C3", "C4")),
                                           ("B4", ("C2", "C3", "C4", "C5"))])
def test_panel_and_baseline_choices_never_read_the_test_section(bench, monkeypatch, test,
                                                                training):
    real = bench.counts
    test_panel = bench.panel((test,), "cp10k")  # what choosing on the test section would give
    monkeypatch.setattr(bench, "counts",
                        lambda section: NamesOnly(real(section)) if section == test else real(section))
    bench.shared_genes.cache_clear()
    rng = np.random.default_rng(0)
    data = {s: {"features": rng.normal(size=(real(s).n_obs, 8)),
                "coords": np.asarray(real(s).obsm["spatial"], float)} for s in bench.SECTIONS}
    try:
        genes = bench.panel(training, "cp10k")
        assert len(genes) == bench.N_GENES and set(genes) <= set(bench.shared_genes())
        predicted, params = bench.tuned_baseline("ridge", "training", data, training, test,
                                                   genes, "cp10k")
        assert predicted.shape == (real(test).n_obs, bench.N_GENES) and "alpha" in params
        with pytest.raises(AssertionError, match="expression was read"):  # the guard works
            bench.target(test, genes, "cp10k")
    finally:
        bench.shared_genes.cache_clear()
    assert genes != test_panel  # the training sections' own panel
