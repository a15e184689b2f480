"""Spherical K-means at the size of Algorithm 1, line 4: 117,798 WordNet noun features x 512
(CLIP ViT-B/16) into N_k = 800 clusters, on generated clustered unit-norm data.

Times nouns_embed.spherical_kmeans with its default settings (the requirement is < 60 s on a
2-core CPU) and prints its objective, the mean cosine of a point to its own unit-norm centre,
beside scikit-learn's KMeans run on the same unit-norm rows with the same iteration budget and
one initialisation (k-means++), whose centres are normalised and scored the same way.

    python benchmarks/bench_kmeans.py
    python benchmarks/bench_kmeans.py --kmeans_iters=300 --kmeans_tol=0 --sklearn=false   # converged reference
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nouns_embed  # noqa: E402
from configurator import configure  # noqa: E402

# data: CLIP-text-like rows (a shared direction, topics, leaves within topics, per-point noise)
N = 117798                 # points (WordNet nouns)
DIM = 512                  # feature size (CLIP ViT-B/16)
TOPICS = 100               # coarse groups
LEAVES = 20                # fine groups per topic (2,000 in all, more than N_K, sizes drawn from a Gamma(0.7))
DATA_SEED = 0              # seed of the generated data
# K-means (defaults: nouns_embed.py's)
N_K = nouns_embed.N_K       # clusters
KMEANS_ITERS = nouns_embed.RELEASED_DEFAULTS['KMEANS_ITERS'][0]     # most iterations per restart
KMEANS_RESTARTS = nouns_embed.RELEASED_DEFAULTS['KMEANS_RESTARTS'][0]  # restarts
KMEANS_TOL = nouns_embed.RELEASED_DEFAULTS['KMEANS_TOL'][0]      # relative objective gain that stops a restart
KMEANS_INIT = nouns_embed.RELEASED_DEFAULTS['KMEANS_INIT'][0]     # 'k-means++' (on a sample) or 'random'
KMEANS_SEED = 0            # seed
# comparison
SKLEARN = True             # also run scikit-learn's KMeans (Lloyd, k-means++, n_init=1, same max_iter)
THREADS = 0                # torch threads; 0 leaves torch's default


def clustered(n, d, topics, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, d, generator=g), dim=-1)  # noqa: E731
    common, topic = unit(1)[0], unit(topics)
    leaf = torch.nn.functional.normalize(0.8 * topic.repeat_interleave(leaves, 0) + 0.6 * unit(topics * leaves), dim=1)
    w = torch.distributions.Gamma(torch.full((topics * leaves,), 0.7), torch.ones(topics * leaves)).sample()
    label = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    a = torch.rand(n, generator=g) * 0.5 + 0.35  # cosine of a point to its leaf, 0.35 .. 0.85
    x = torch.nn.functional.normalize(a[:, None] * leaf[label] + (1 - a[:, None] ** 2).sqrt() * unit(n), dim=1)
    return torch.nn.functional.normalize(0.75 * common + 0.66 * x, dim=1).numpy()


def mean_cos(x, centres, assign):
    c = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return float(np.einsum('ij,ij->i', x, c[assign]).mean())


def main():
    configure(globals())
    torch.manual_seed(DATA_SEED)
    if THREADS:
        torch.set_num_threads(THREADS)
    x = clustered(N, DIM, TOPICS, LEAVES, DATA_SEED)
    print(f"data: {N} x {DIM} unit rows, mean pairwise cos {float((x[:2000] @ x[:2000].T).mean()):.3f}; "
          f"torch threads {torch.get_num_threads()}")
    t0 = time.time()
    centres, assign = nouns_embed.spherical_kmeans(x, N_K, KMEANS_ITERS, KMEANS_RESTARTS, KMEANS_SEED, KMEANS_TOL,
                                                   KMEANS_INIT)
    ours_s, ours = time.time() - t0, mean_cos(x, centres, assign)
    empty = N_K - len(np.unique(assign))
    print(f"ours: {ours_s:.1f} s, mean cos {ours:.6f}, empty clusters {empty}")
    sk_s = sk = float('nan')
    if SKLEARN:
        from sklearn.cluster import KMeans
        t0 = time.time()
        km = KMeans(N_K, init='k-means++', n_init=KMEANS_RESTARTS, max_iter=KMEANS_ITERS, algorithm='lloyd',
                    random_state=KMEANS_SEED).fit(x)
        sk_s, sk = time.time() - t0, mean_cos(x, km.cluster_centers_, km.labels_)
        print(f"scikit-learn KMeans: {sk_s:.1f} s, {km.n_iter_} iterations, mean cos {sk:.6f} "
              f"(its centres normalised, its labels)")
    print(f"bench_kmeans n={N} dim={DIM} k={N_K} iters={KMEANS_ITERS} restarts={KMEANS_RESTARTS} tol={KMEANS_TOL} "
          f"init={KMEANS_INIT} seconds={ours_s:.1f} mean_cos={ours:.6f} sklearn_seconds={sk_s:.1f} "
          f"sklearn_mean_cos={sk:.6f}")


if __name__ == '__main__':
    main()
