"""Would self-supervised tile features help? A screen on HER2ST's development sections.

Issue 10 suggested pretraining a small encoder on the user's own tiles without labels.
This script measures that idea on the protocol STFlow's defaults were chosen on, so its
answer can be reproduced; it changes nothing in the package.

What it does, exactly:

- Tiles: the pipeline's (the morphology encoder's spec, 448 px at 0.5 um/px, Macenko
  stain-normalised per slide as the pipeline does), box-resized to 224 px, of every spot of
  C2, C3, C4, C5 and B4. Features: the morphology encoder's, from the histology pool
  (``bench_stflow.load``, cached).
- Pretraining (no labels): a 4-stage CNN (two 3x3 convolutions, batch norm and ReLU per
  stage, 32-64-128-128 channels, global average pool: 128 features) trained with SimCLR's
  contrastive loss (temperature 0.2, 256 images a step: two views of 128 tiles) on the
  tiles of all five sections at ``--size`` px for ``--epochs`` epochs; views are random
  crops of 50-100 % of the area, flips, quarter turns and small brightness, offset and
  per-channel shifts, drawn in one batched affine resampling. No expression is read. The
  held-out sections' tiles are in the pretraining set (the issue's "training + query"
  tiles).
- Scoring: leave one section out within C2-C4 only (C5 and B4 expression is never read):
  log1p counts per 10k, panel = the 50 most variable genes of the two training sections,
  per-gene Pearson within the held-out section, mean over the panel and the three folds.
  Rows: the benchmark's ridge + 6-NN features and reduced-rank ridge + 6-NN features (per
  slide standardised and by training statistics; hyper-parameters by leave-one-section-out
  inside the training sections, as in ``bench_stflow.py``) on the morphology features, the
  CNN features, and both; STFlow with its defaults on the morphology features and on both;
  and STFlow's networks on the morphology features with its linear part (the same
  reduced-rank ridge, ``linear_weight=0.4``) on both. Each STFlow row is fitted as its two
  parts (the networks with ``linear_weight=0``, the linear part alone with ``epochs=0``)
  blended at the default weight in the standardised space, which is what ``STFlow.sample``
  does in one fit.

    python benchmarks/screen_contrastive.py [--size 64] [--epochs 40] [--seeds 2]

Measured on the 2-core development machine (2026-12-02; 40 epochs at 64 px: 18 min of
pretraining; 2 STFlow seeds): ridge + 6-NN (per slide) 0.465 on the morphology features,
0.470 on the CNN's, 0.495 on both; reduced-rank ridge 0.480 / 0.471 / 0.498; STFlow 0.507
on the morphology features, 0.510 on both, 0.515 with the CNN features given to its linear
part only. The features lift the linear probes more than STFlow (its lead over the best
probe: 1.056x -> 1.034x), and pretraining costs 18 CPU minutes: not adopted as a default
(see the README). The pretraining is what helps: after one epoch the CNN's features alone
score 0.388 with ridge + 6-NN (0.470 after 40).
"""

from __future__ import annotations

import argparse
import math
import time

import bench_stflow as bench
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional

from dflashdeconv.core.scores import mean_column_pearson
from dflashdeconv.engine.cluster import connect
from dflashdeconv.histo.encoders import default_tile_spec
from dflashdeconv.histo.slide import open_slide, slide_image
from dflashdeconv.histo.stain import normalize_stains, slide_stains
from dflashdeconv.histo.stflow import STFlow

DEV = ("C2", "C3", "C4")
PROBES = (bench.BASELINES[1], bench.BASELINES[2])  # ridge + 6-NN, reduced-rank ridge + 6-NN


def tiles_224(data, cache) -> dict[str, np.ndarray]:
    """The pipeline's stain-normalised tiles of every spot, box-resized to 224 px."""
    spec = default_tile_spec("morphology")
    out = {}
    for section in bench.SECTIONS:
        image = slide_image(open_slide(f"{bench.DATA}/{section}_HE.jpg",
                                       spots=bench.counts(section), cache=cache))
        centres = data[section]["coords"]
        tiles = normalize_stains(image.read_tiles(centres, spec),
                                 slide_stains(image, spec, centres))
        out[section] = np.stack([np.asarray(Image.fromarray(t).resize(
            (224, 224), Image.Resampling.BOX)) for t in tiles])
    return out


def _stage(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1), nn.BatchNorm2d(n_out), nn.ReLU(),
                         nn.Conv2d(n_out, n_out, 3, padding=1), nn.BatchNorm2d(n_out),
                         nn.ReLU(), nn.MaxPool2d(2))


def views(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image (n, 3, H, W) in [0, 1], at ``size`` px, batched."""
    n = images.shape[0]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    side = uniform(0.5, 1.0).sqrt()  # crop of 50-100 % of the area
    shift = (1 - side)[:, None] * uniform(-1.0, 1.0, 2)
    turn = torch.randint(4, (n,), generator=generator) * (math.pi / 2)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(turn) * side, torch.sin(turn) * side
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = functional.affine_grid(theta, (n, 3, size, size), align_corners=False)
    # sampled from the image halved towards the view's scale (an anti-aliasing step)
    small = functional.interpolate(images, scale_factor=0.5, mode="area")
    out = functional.grid_sample(small, grid, mode="bilinear", align_corners=False)
    out = out * uniform(0.9, 1.1, 1, 1, 1) + uniform(-0.05, 0.05, 1, 1, 1) \
        + uniform(-0.03, 0.03, 3, 1, 1)
    return out.clamp(0, 1)


def pretrain(tiles: dict[str, np.ndarray], size: int, epochs: int, seed: int = 0) -> nn.Module:
    """The CNN, trained with SimCLR on the tiles of every section (no labels)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(np.concatenate(list(tiles.values()))).permute(0, 3, 1, 2) / 255.0
    encoder = nn.Sequential(_stage(3, 32), _stage(32, 64), _stage(64, 128), _stage(128, 128),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    batch = 128
    pairs = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch + 1, batch):
            chosen = images[order[start:start + batch]]
            z = functional.normalize(head(encoder(torch.cat([views(chosen, size, generator),
                                                             views(chosen, size, generator)]))))
            similarity = (z @ z.T / 0.2).fill_diagonal_(-1e9)
            loss = functional.cross_entropy(similarity, pairs)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return encoder.eval()


@torch.no_grad()
def embed(encoder: nn.Module, tiles: np.ndarray, size: int) -> np.ndarray:
    images = torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255.0
    return encoder(functional.interpolate(images, size=(size, size), mode="area")).numpy()


def probes(data) -> dict[str, float]:
    """The two ridge probes, both feature standardisations, leave one section out on DEV."""
    out = {}
    for method in PROBES:
        for norm in bench.NORMS:
            scores = []
            for held in DEV:
                training = [s for s in DEV if s != held]
                genes = bench.panel(training, "cp10k")
                predicted, _ = bench.tuned_baseline(method, norm, data, training, held, genes,
                                                    "cp10k")
                scores.append(mean_column_pearson(predicted, bench.target(held, genes, "cp10k")))
            out[f"{method} ({bench.NORMS[norm]})"] = float(np.mean(scores))
    return out


def stflow_scores(networks, linear, seeds: int) -> float:
    """STFlow (defaults) with its networks fitted on ``networks``' features and its linear
    part on ``linear``'s; leave one section out on DEV, mean over ``seeds`` seeds."""
    scores = []
    for held in DEV:
        training = [s for s in DEV if s != held]
        genes = bench.panel(training, "cp10k")
        y = np.vstack([bench.target(s, genes, "cp10k") for s in training]).astype(np.float32)
        coords = np.vstack([networks[s]["coords"] for s in training])
        ids = np.concatenate([np.full(len(networks[s]["coords"]), i)
                              for i, s in enumerate(training)])

        def stack(data):
            return np.vstack([data[s]["features"] for s in training])

        weight = STFlow().linear_weight
        # the linear part alone: untrained networks weighted 0, sampled as little as allowed
        part = STFlow(epochs=0, n_models=1, linear_weight=1.0, n_samples=1, n_sample_steps=2)
        part = part.fit(stack(linear), coords, y, ids)
        part = part.sample(linear[held]["features"], linear[held]["coords"])
        for seed in range(seeds):
            model = STFlow(random_state=100 * seed, linear_weight=0.0).fit(stack(networks),
                                                                           coords, y, ids)
            nets = model.sample(networks[held]["features"], networks[held]["coords"])
            scores.append(mean_column_pearson(
                model.to_expression((1 - weight) * nets + weight * part),
                bench.target(held, genes, "cp10k")))
    return float(np.mean(scores))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="view side in px")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=2, help="STFlow seeds per fold")
    parser.add_argument("--cache", default=None, help="cache folder (default: DFLASHDECONV_CACHE)")
    args = parser.parse_args()
    with connect(None) as client:
        morphology = bench.load(client, "morphology", None, args.cache)
    tiles = tiles_224(morphology, args.cache)
    start = time.perf_counter()
    encoder = pretrain(tiles, args.size, args.epochs)
    print(f"pretraining: {time.perf_counter() - start:.0f} s")
    sections = bench.SECTIONS
    cnn = {s: dict(morphology[s], features=embed(encoder, tiles[s], args.size)) for s in sections}
    both = {s: dict(morphology[s], features=np.hstack(
        [morphology[s]["features"], cnn[s]["features"]]).astype(np.float32)) for s in sections}
    print("\nleave one section out within C2-C4, log1p CP10k, per-gene Pearson")
    for name, data in (("morphology", morphology), ("CNN", cnn), ("morphology + CNN", both)):
        for probe, score in probes(data).items():
            print(f"  {probe + ' on ' + name:<82} {score:.3f}", flush=True)
    for name, networks, linear in (("morphology", morphology, morphology),
                                   ("morphology + CNN", both, both),
                                   ("networks: morphology, linear part: + CNN", morphology, both)):
        score = stflow_scores(networks, linear, args.seeds)
        print(f"  {'STFlow on ' + name:<82} {score:.3f}", flush=True)


if __name__ == "__main__":
    main()
