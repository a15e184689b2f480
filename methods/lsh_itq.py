"""The training-free floors of every table: LSH (random hyperplanes) and PCA-ITQ, fitted in closed form on the
training features (baselines.untrained_codes); train.py signs their outputs like any code (eval_hash.to_codes).

    h_q = itq_codes(x_train, x_query, bits)
"""
import numpy as np

# ITQ (Gong & Lazebnik, CVPR 2011)
ITQ_ITERS = 50       # alternating B / R updates (the paper's 50 iterations)


def lsh_codes(x_train, x, bits, seed=0):
    """LSH (random hyperplanes, Charikar 2002): projections of the features, centred by the
    training mean, onto `bits` Gaussian random directions; their signs are the codes. float32."""
    x_train = np.asarray(x_train, np.float64)
    w = np.random.default_rng(seed).standard_normal((x_train.shape[1], bits))
    return _project(x, x_train.mean(0), w)


def _project(x, mean, w, chunk=16384):
    """(x - mean) @ w, block by block in float64 (x may be a large float32 retrieval set); float32."""
    out = np.empty((len(x), w.shape[1]), np.float32)
    for a in range(0, len(x), chunk):
        out[a:a + chunk] = (np.asarray(x[a:a + chunk], np.float64) - mean) @ w
    return out


def _pca(x_train, bits):
    """(mean, P): the top `bits` principal directions of x_train as the columns of P, each with
    its largest-magnitude entry positive so the result does not depend on the eigen-solver."""
    from scipy.linalg import eigh
    mean = x_train.mean(0)
    xc = x_train - mean
    f = xc.shape[1]
    _, p = eigh(xc.T @ xc, subset_by_index=[f - bits, f - 1])
    p = p[:, ::-1]  # largest variance first
    p *= np.sign(p[np.abs(p).argmax(0), np.arange(bits)])
    return mean, p


def itq_codes(x_train, x, bits, iters=ITQ_ITERS, seed=0):
    """ITQ (Gong & Lazebnik, CVPR 2011): V = PCA projection of the centred features to
    `bits` dimensions (fitted on x_train); an orthogonal R, from a random start, minimising the
    quantization loss ||B - V R||_F^2 by alternating B = sign(V R) and R = U W^T from the SVD
    V^T B = U S W^T (the orthogonal Procrustes solution). Returns V R of x (float32)."""
    x_train = np.asarray(x_train, np.float64)
    if not 1 <= bits <= min(x_train.shape):
        raise ValueError(f'ITQ needs 1 <= bits <= min(train items, feature dim) = {min(x_train.shape)}, got {bits}')
    mean, p = _pca(x_train, bits)
    v = (x_train - mean) @ p
    r, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))  # random rotation
    for _ in range(iters):
        b = np.where(v @ r >= 0, 1.0, -1.0)  # fix R, update B
        u, _, wt = np.linalg.svd(v.T @ b)  # fix B, update R
        r = u @ wt
    return _project(x, mean, p @ r)

