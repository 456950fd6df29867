"""STFlow on real data: HER2ST, train on sections C2, C3, C4 and predict C5 from its H&E.

Per-gene Pearson between predicted and measured log1p counts over C5's 181 spots, mean
over the 50 most variable genes of C5 (log1p variance, among genes all four sections
measure), for STFlow against (a) ridge regression from the same features and (b) the
training-mean predictor (constant: Pearson 0 by convention; its MSE is the yardstick).
Reference patches and C5's query patches share one tile spec (224 px at 0.5 um/px). No
choice looks at C5: ridge's alpha and STFlow's schedule are chosen by leave-one-section-
out on C2-C4 (``--select`` reruns that selection; its result is the default).

    python benchmarks/bench_stflow.py [--seeds 3] [--encoder morphology]
    python benchmarks/bench_stflow.py --select      # the schedule selection on C2-C4 only
    python benchmarks/bench_stflow.py --timing      # tile + embed + train + predict, ~4k spots
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import Ridge

from dflashdeconv.engine.cluster import connect
from dflashdeconv.histo import pool
from dflashdeconv.histo.predict import predict_expression, train_expression_model
from dflashdeconv.histo.slide import TileSpec, open_slide, slide_image, spots_table
from dflashdeconv.histo.stflow import STFlow
from dflashdeconv.metrics import pearson

DATA = "../shared/data/her2st"
TRAIN, TEST = ("C2", "C3", "C4"), "C5"
SPEC = TileSpec(224, 0.5)
#: Chosen by leave-one-section-out on C2-C4 (``--select``); never on C5.
STFLOW_PARAMS = dict(epochs=60, learning_rate=2.5e-4, chunks_per_slide=16, n_samples=8)
SCHEDULES = [dict(epochs=30, learning_rate=5e-4, n_samples=4),
             dict(epochs=60, learning_rate=2.5e-4, n_samples=4),
             dict(epochs=100, learning_rate=2.5e-4, n_samples=4),
             STFLOW_PARAMS]
ALPHAS = (1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0)


def per_gene_pearson(predicted, observed) -> float:
    return float(np.mean(pearson(predicted, observed, per_cell_type=True)))


def standardise(features, slide_ids, per_slide: bool, reference=None):
    """Features standardised per slide, or with ``reference`` (training) statistics."""
    if per_slide:
        out = np.empty_like(features)
        for s in np.unique(slide_ids):
            block = features[slide_ids == s]
            out[slide_ids == s] = (block - block.mean(0)) / np.where(block.std(0) > 1e-8, block.std(0), 1)
        return out
    ref = features if reference is None else reference
    return (features - ref.mean(0)) / np.where(ref.std(0) > 1e-8, ref.std(0), 1)


def ridge_predict(train, test, alpha, per_slide):
    (f, _, y, ids), (f_test, _, _, ids_test) = train, test
    model = Ridge(alpha=alpha).fit(standardise(f, ids, per_slide), y)
    return model.predict(standardise(f_test, ids_test, per_slide, reference=f))


def stack(sections, data, genes):
    features = np.vstack([data[s]["features"] for s in sections])
    coords = np.vstack([data[s]["coords"] for s in sections])
    expression = np.vstack([np.log1p(data[s]["counts"][genes].to_numpy()) for s in sections])
    ids = np.concatenate([np.full(len(data[s]["coords"]), i) for i, s in enumerate(sections)])
    return features, coords, expression, ids


def leave_one_out(data, genes, score):
    """Mean score of ``score(train, validation)`` over the three C2-C4 folds."""
    results = []
    for held in TRAIN:
        rest = [s for s in TRAIN if s != held]
        results.append(score(stack(rest, data, genes), stack([held], data, genes)))
    return float(np.mean(results))


def load(client, encoder, weights, cache):
    data = {}
    for section in TRAIN + (TEST,):
        spots = ad.read_h5ad(f"{DATA}/{section}.h5ad")
        sdata = open_slide(f"{DATA}/{section}_HE.jpg", spots=spots, cache=cache)
        located = spots_table(sdata)
        features, _ = pool.embed_tiles(client, slide_image(sdata), located.centres, SPEC, encoder,
                                       weights=weights, cache=cache)
        counts = pd.DataFrame(spots.X.toarray(), columns=spots.var_names.astype(str))
        data[section] = {"sdata": sdata, "features": features, "coords": located.centres,
                         "counts": counts}
    return data


def most_variable(data, sections, n=50):
    shared = sorted(set.intersection(*[set(data[s]["counts"].columns) for s in TRAIN + (TEST,)]))
    variance = np.log1p(pd.concat([data[s]["counts"][shared] for s in sections])).var(0)
    return variance.sort_values(ascending=False, kind="stable").index[:n].to_list()


def evaluate(data, genes, params, seeds, client, encoder, weights, cache, label):
    train = stack(TRAIN, data, genes)
    test = stack([TEST], data, genes)
    observed = test[2]
    rows = []
    for per_slide in (False, True):
        alpha = max(ALPHAS, key=lambda a: leave_one_out(
            data, genes, lambda tr, va: per_gene_pearson(ridge_predict(tr, va, a, per_slide), va[2])))
        predicted = ridge_predict(train, test, alpha, per_slide)
        rows.append((f"ridge (alpha {alpha:g}, {'per-slide' if per_slide else 'global'} "
                     "standardised)", per_gene_pearson(predicted, observed),
                     float(np.mean((predicted - observed) ** 2)), ""))
    mean = np.broadcast_to(train[2].mean(0), observed.shape)
    rows.append(("training mean", 0.0, float(np.mean((mean - observed) ** 2)), "constant"))
    scores, errors, seconds = [], [], []
    for seed in seeds:
        start = time.perf_counter()
        model = train_expression_model([data[s]["sdata"] for s in TRAIN], genes=genes,
                                       encoder=encoder, encoder_weights=weights, tile_spec=SPEC,
                                       model=STFlow(**params, random_state=seed),
                                       scheduler=client, cache=cache)
        result = predict_expression(data[TEST]["sdata"], model=model, encoder=encoder,
                                    encoder_weights=weights, locations="spots",
                                    tile_size=SPEC.size, tile_mpp=SPEC.mpp, scheduler=client,
                                    cache=cache)
        seconds.append(time.perf_counter() - start)
        predicted = result[:, genes].X
        scores.append(per_gene_pearson(predicted, observed))
        errors.append(float(np.mean((predicted - observed) ** 2)))
    rows.insert(0, ("STFlow", float(np.mean(scores)), float(np.mean(errors)),
                    f"mean of seeds {list(seeds)} (sd {np.std(scores):.3f}), "
                    f"{np.mean(seconds):.0f} s/run"))
    print(f"\n{label}: {len(genes)} genes, encoder {encoder!r}, tiles {SPEC.size} px at "
          f"{SPEC.mpp} um/px; train {'+'.join(TRAIN)} ({len(train[0])} spots) -> {TEST} "
          f"({len(observed)} spots); STFlow {params}")
    print(f"  {'method':<46} {'Pearson':>8} {'MSE':>7}")
    for name, r, mse, note in rows:
        print(f"  {name:<46} {r:>8.3f} {mse:>7.3f}  {note}")
    return rows


def select(data, genes):
    print("\nSTFlow schedule by leave-one-section-out on C2-C4 (mean per-gene Pearson):")
    for params in SCHEDULES:
        score = leave_one_out(data, genes, lambda tr, va: per_gene_pearson(
            STFlow(**params).fit(*tr).predict(va[0], va[1], va[3]), va[2]))
        print(f"  {params}: {score:.3f}")


def timing(client, cache, epochs):
    """tile + embed + train + predict on one ~4k-spot slide (synthetic, 50 genes)."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from dflashdeconv.histo.synthetic import synthetic_slide

    slide = synthetic_slide(9000, spot_spacing=100, seed=0, n_genes=60)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "synthetic.png"
        Image.fromarray(slide.image).save(path)
        start = time.perf_counter()
        sdata = open_slide(path, spots=slide.spots, cache=folder)
        converted = time.perf_counter() - start
        start = time.perf_counter()
        result = predict_expression(sdata, [sdata], genes=50, locations="spots",
                                    scheduler=client, cache=folder, use_cache=False,
                                    stflow=STFlow(**{**STFLOW_PARAMS, "epochs": epochs}),
                                    tile_size=SPEC.size, tile_mpp=SPEC.mpp)
        total = time.perf_counter() - start
    uns = result.uns["stflow"]
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in uns["timings"].items())
    print(f"\ntiming: {result.n_obs} spots x {result.n_vars} genes, {epochs} epochs on "
          f"{uns['devices']}: {total:.1f} s ({steps}; training includes embedding the "
          f"training spots); one-off PNG -> zarr conversion {converted:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--encoder", default="morphology")
    parser.add_argument("--encoder-weights", default=None)
    parser.add_argument("--cache", default=None, help="cache folder (default: DFLASHDECONV_CACHE)")
    parser.add_argument("--select", action="store_true",
                        help="only rerun the schedule selection (leave-one-out on C2-C4)")
    parser.add_argument("--timing", action="store_true", help="time one ~4k-spot slide")
    parser.add_argument("--timing-epochs", type=int, default=STFLOW_PARAMS["epochs"])
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address")
    args = parser.parse_args()
    with connect(args.scheduler) as client:
        if args.timing:
            timing(client, args.cache, args.timing_epochs)
            return
        data = load(client, args.encoder, args.encoder_weights, args.cache)
        genes = most_variable(data, [TEST])
        if args.select:
            select(data, genes)
            return
        seeds = range(args.seeds)
        evaluate(data, genes, STFLOW_PARAMS, seeds, client, args.encoder, args.encoder_weights,
                 args.cache, "evaluation genes: the 50 most variable of C5")
        evaluate(data, most_variable(data, TRAIN), STFLOW_PARAMS, seeds, client, args.encoder,
                 args.encoder_weights, args.cache,
                 "panel chosen without C5: the 50 most variable of C2-C4")


if __name__ == "__main__":
    main()
