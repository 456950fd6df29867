"""``dflashdeconv predict-expression``: H&E -> expression (and cell types) from the shell."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import EXIT_OK, add_deprecated_flag, add_output_options


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the ``predict-expression`` sub-command to ``commands`` (argparse subparsers)."""
    parser = commands.add_parser(
        "predict-expression",
        help="predict gene expression (and cell types) from an H&E slide with STFlow",
        description="Tile an H&E slide, embed the tiles and predict a gene panel with STFlow "
                    "trained on paired slides (H&E + spot counts), on the Dask pool (GPU "
                    "workers declare --resources GPU=1). Writes tiles x genes as .h5ad.")
    parser.add_argument("query", help="query slide: TIFF/OME-TIFF/SVS/JPEG/PNG or a SpatialData "
                                      ".zarr store")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train", nargs=2, action="append", metavar=("IMAGE", "H5AD"),
                        help="a training slide: its H&E image and an AnnData of raw counts with "
                             "obsm['spatial'] in full-resolution pixels (repeat for more)")
    source.add_argument("--model", help="a saved STFlow model (from --save-model)")
    parser.add_argument("--out", required=True, help="output .h5ad (tiles x genes)")
    parser.add_argument("--save-model", help="save the trained STFlow model here")
    parser.add_argument("--sdata-out", help="also write the query SpatialData with the prediction "
                                            "table to this .zarr store")
    parser.add_argument("--query-spots", help="AnnData of the query's spots: predict at them "
                                              "instead of on a tile grid")
    parser.add_argument("--slide-mpp", type=float, help="microns per full-resolution pixel of "
                                                        "the query (when the file has none)")
    parser.add_argument("--genes", default="50", help="how many most variable genes, a comma-"
                                                      "separated list, or @FILE with one per line")
    parser.add_argument("--target", choices=("cp10k", "log1p"), default="cp10k",
                        help="what STFlow learns: log1p counts per 10k (default; counts are "
                        "written as the layer log1p_counts) or raw log1p counts")
    parser.add_argument("--encoder", default="morphology", help="patch encoder (default: %(default)s)")
    parser.add_argument("--encoder-weights", help="local weights file of a torch encoder")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (default: the "
                        "model's, else the encoder's: 448 for morphology, 224 for ViTs)")
    parser.add_argument("--tile-mpp", type=float, help="tile microns per pixel (default: the "
                        "model's, else the encoder's: 0.5)")
    parser.add_argument("--stride-um", type=float, help="grid step in microns (default: tile side)")
    parser.add_argument("--epochs", type=int, help="STFlow training epochs (default: STFlow's)")
    parser.add_argument("--feature-norm", choices=("both", "global", "slide"),
                        help="how STFlow's networks see the image features (default: STFlow's, "
                        "'both'); 'global' scored higher across patients (README)")
    parser.add_argument("--random-state", type=int, default=0,
                        help="seed of STFlow's training and sampling (default: %(default)s)")
    add_deprecated_flag(parser, "--seed", "--random-state", "random_state", type=int)
    parser.add_argument("--reference", help="single-cell reference .h5ad: add per-tile cell-type "
                                            "proportions (obsm['cell_types'])")
    parser.add_argument("--cell-type-key", default="cell_type")
    parser.add_argument("--scheduler", help="Dask scheduler address (default: a LocalCluster)")
    parser.add_argument("--cache", help="cache folder for converted slides and features")
    add_output_options(parser)
    parser.set_defaults(run=run)
    return parser


def _genes(text: str):
    if text.startswith("@"):
        return [line.strip() for line in Path(text[1:]).read_text().splitlines() if line.strip()]
    if text.isdigit():
        return int(text)
    return [g.strip() for g in text.split(",") if g.strip()]


def run(args) -> int:
    """Run ``predict-expression``; bad input raises :class:`InputError` (exit code 2)."""
    from ..engine.cluster import connect
    from ..histo.predict import (
        predict_expression,
        resolve_tile_spec,
        train_expression_model,
    )
    from ..histo.slide import open_slide
    from ..histo.stflow import STFlow
    from ..io import check_labels, read_anndata
    from ..tl import predict_cell_types

    genes = _genes(args.genes)
    reference = read_anndata(args.reference) if args.reference else None
    if reference is not None:
        check_labels(reference, args.cell_type_key)
    query_spots = read_anndata(args.query_spots) if args.query_spots else None
    query = open_slide(args.query, slide_mpp=args.slide_mpp, spots=query_spots, cache=args.cache)
    spec = resolve_tile_spec(args.tile_size, args.tile_mpp, args.encoder)
    model = STFlow.load(args.model) if args.model else None
    with connect(args.scheduler) as client:
        if model is None:
            training = [open_slide(image, spots=read_anndata(table), cache=args.cache)
                        for image, table in args.train]
            model = train_expression_model(
                training, genes=genes, target=args.target, encoder=args.encoder,
                encoder_weights=args.encoder_weights,
                genes_within=None if reference is None else reference.var_names,
                tile_spec=spec, model=STFlow(random_state=args.random_state, **{
                    name: value for name, value in (("epochs", args.epochs),
                                                    ("feature_norm", args.feature_norm))
                    if value is not None}),
                scheduler=client, cache=args.cache, progress=True)
            if args.save_model:
                model.save(args.save_model)
        result = predict_expression(
            query, model=model, encoder=args.encoder, encoder_weights=args.encoder_weights,
            tile_size=args.tile_size, tile_mpp=args.tile_mpp,
            locations="spots" if query_spots is not None else "tiles", stride_um=args.stride_um,
            scheduler=client, cache=args.cache, progress=True)
    if reference is not None:
        predict_cell_types(result, reference, args.cell_type_key)
    result.write_h5ad(args.out)
    if args.sdata_out:
        query.write(args.sdata_out)
    print(f"{result.n_obs} {'spots' if query_spots is not None else 'tiles'} x {result.n_vars} "
          f"genes -> {args.out}", file=sys.stderr)
    return EXIT_OK
