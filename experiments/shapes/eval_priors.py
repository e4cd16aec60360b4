"""Compare priors on held-out (test-split) shapes captions; results go to experiments/RESULTS.md.

For each caption of the test split (first ``--num``), a prior produces a CLIP image embedding
from the caption's CLIP text features. Metrics against the cached true image embeddings:

* ``cos``: mean cosine similarity between the produced and the true image embedding;
* ``retr_exact``: fraction whose nearest test-set image embedding (over the whole split) shows
  the caption's attributes — same number of objects and relation, same colour and shape per
  object, same size wherever the caption names one;
* ``retr_colour_shape``: the same with colour and shape only (and the object count).

Methods: the diffusion prior (``--prior``), the AR prior (``--prior-ar``, through
``unclip_jax.train.runs.load_prior_ar`` when that workdir exists), and the
baseline that uses the CLIP *text* embedding itself as the image embedding.

    python experiments/shapes/eval_priors.py --cache runs/demo/embeddings \\
        --prior runs/demo/prior --prior-ar runs/demo/prior_ar --out runs/demo/eval_priors.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from unclip_jax.train import embeddings

COND_KEYS = ("text_emb", "text_states", "text_tokens")


# "A left of B" shows the same scene as "B right of A": RELATIONS[i] ↔ RELATIONS[INVERSE[i]].
INVERSE_RELATION = np.array([1, 0, 3, 2])


def attribute_match(q: dict, r: dict) -> tuple[np.ndarray, np.ndarray]:
    """(exact, colour+shape) bool ``[N]``: do the retrieved rows ``r`` show the attributes of
    the query rows ``q`` (arrays ``colour``/``shape``/``size`` ``[N, 2]``, ``num_objects``,
    ``relation`` ``[N]``)? A query size of -1 (not named) matches any size. A two-object scene
    is the same with its objects listed in the other order and the relation inverted, so a
    retrieved "blue circle to the right of a red square" matches "a red square to the left of a
    blue circle"."""
    present = np.arange(2)[None, :] < q["num_objects"][:, None]
    same_n = q["num_objects"] == r["num_objects"]

    def match(r_obj: dict, relation: np.ndarray):
        cs = np.all(~present | ((q["colour"] == r_obj["colour"])
                                & (q["shape"] == r_obj["shape"])), axis=1)
        size = np.all(~present | (q["size"] < 0) | (q["size"] == r_obj["size"]), axis=1)
        return cs & size & (q["relation"] == relation), cs

    exact, cs = match(r, r["relation"])
    two = same_n & (q["num_objects"] == 2)
    swapped = {k: r[k][:, ::-1] for k in ("colour", "shape", "size")}
    exact_sw, cs_sw = match(swapped, INVERSE_RELATION[np.maximum(r["relation"], 0)])
    exact = same_n & (exact | (two & exact_sw))
    colour_shape = same_n & (cs | (two & cs_sw))
    return exact, colour_shape


ATTRS = ("colour", "shape", "size", "num_objects", "relation")


def retrieved_attributes(pred: np.ndarray, test: dict, n: int, exclude_self: bool = False):
    """(exact, colour+shape) bool ``[n]`` for the nearest test image embedding of each row of
    ``pred`` (``exclude_self``: the query's own image is not in the pool)."""
    pred = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
    sim = pred @ test["image_emb"].T
    if exclude_self:
        sim[np.arange(n), np.arange(n)] = -np.inf
    nearest = np.argmax(sim, axis=1)
    return attribute_match({k: test[k][:n] for k in ATTRS},
                           {k: test[k][nearest] for k in ATTRS})


def score(pred: np.ndarray, test: dict, n: int, baseline: np.ndarray | None = None) -> dict:
    """cos, retrieval fractions with binomial s.e.; with the baseline's per-caption exact hits,
    the paired counts (captions only this method gets right, only the baseline gets right)."""
    unit = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
    exact, cs = retrieved_attributes(pred, test, n)
    out = {"cos": float(np.mean(np.sum(unit * test["image_emb"][:n], axis=-1))),
           "retr_exact": float(exact.mean()), "retr_colour_shape": float(cs.mean()),
           "retr_exact_se": float(np.sqrt(exact.mean() * (1 - exact.mean()) / n))}
    if baseline is not None:
        out["exact_only_this"] = int(np.sum(exact & ~baseline))
        out["exact_only_baseline"] = int(np.sum(~exact & baseline))
    return out


def run_sampler(sampler, test: dict, n: int, batch: int, seed: int) -> np.ndarray:
    out = []
    for i, lo in enumerate(range(0, n, batch)):
        inputs = {k: test[k][lo:lo + batch] for k in COND_KEYS}
        inputs["text_states"] = inputs["text_states"].astype(np.float32)
        out.append(np.asarray(sampler(inputs, jax.random.PRNGKey(seed + i))))
    return np.concatenate(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="embedding cache holding the test split")
    p.add_argument("--clip", default=None, help="CLIP workdir (to build the cache if missing)")
    p.add_argument("--split", default="test")
    p.add_argument("--prior", default=None, help="diffusion-prior workdir")
    p.add_argument("--prior-ar", default=None, help="AR-prior workdir")
    p.add_argument("--num", type=int, default=1000, help="captions to evaluate")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--num-candidates", type=int, default=None)
    p.add_argument("--ar-temperature", type=float, default=None)
    p.add_argument("--ar-candidates", type=int, default=None,
                   help="AR prior: draws per caption, reranked by text dot product (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)

    try:
        test = embeddings.load_split(args.cache, args.split)
    except FileNotFoundError:
        if not args.clip:
            raise
        embeddings.cache_embeddings(args.clip, None, args.split, args.cache)
        test = embeddings.load_split(args.cache, args.split)
    n = min(args.num, len(test["index"]))
    results = {"split": args.split, "num_captions": n, "retrieval_pool": len(test["index"]),
               "methods": {}}
    results["methods"]["text_emb_baseline"] = score(test["text_emb"][:n], test, n)
    base_exact, _ = retrieved_attributes(test["text_emb"][:n], test, n)
    # What a perfect sampler would score: each caption's own true image embedding, retrieved
    # from the pool without that image (another draw of p(z_i | caption) in its place).
    oracle_exact, oracle_cs = retrieved_attributes(test["image_emb"][:n], test, n,
                                                   exclude_self=True)
    results["true_image_emb_leave_one_out"] = {"retr_exact": float(oracle_exact.mean()),
                                               "retr_colour_shape": float(oracle_cs.mean())}

    if args.prior:
        from unclip_jax.train import runs

        settings = {k: v for k, v in dict(guidance_scale=args.guidance_scale,
                                          num_candidates=args.num_candidates).items()
                    if v is not None}
        sampler = runs.load_prior(args.prior, **settings)
        t0 = time.perf_counter()
        pred = run_sampler(sampler, test, n, args.batch, args.seed)
        results["methods"]["diffusion_prior"] = dict(
            score(pred, test, n, base_exact), seconds=time.perf_counter() - t0,
            settings=dict(steps=sampler.steps, method=sampler.method, eta=sampler.eta,
                          guidance_scale=sampler.guidance_scale,
                          num_candidates=sampler.num_candidates))
    if args.prior_ar:
        if not Path(args.prior_ar).is_dir():
            results["methods"]["ar_prior"] = "not available (module or workdir missing)"
        else:
            settings = {k: v for k, v in dict(temperature=args.ar_temperature,
                                              num_candidates=args.ar_candidates).items()
                        if v is not None}
            sampler = runs.load_prior_ar(args.prior_ar, **settings)
            t0 = time.perf_counter()
            pred = run_sampler(sampler, test, n, args.batch, args.seed)
            results["methods"]["ar_prior"] = dict(score(pred, test, n, base_exact),
                                                  seconds=time.perf_counter() - t0,
                                                  settings=settings)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
