"""CIBHash (Qiu et al., IJCAI 2021), unsupervised: contrastive learning of stochastic binary codes of two augmented
views, on the relaxed codes of a HashHead (models.py) trained by train.py's loop on frozen features.

    loss = cibhash_loss(hv(view1), hv(view2))    # two augmented views of the same images
"""
import torch
import torch.nn.functional as F

# CIBHash (Qiu et al., IJCAI 2021): NT-Xent on the straight-through codes of two views + beta * KL
CIB_TEMPERATURE = 0.3  # NT-Xent temperature (the CIBHash code's --temperature 0.3)
CIB_BETA = 0.001     # weight of the KL term between the two views' code distributions (its --weight 0.001)


class _SignSTE(torch.autograd.Function):
    """sign() forward (+1 at 0), identity backward: the straight-through estimator of CIBHash."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def nt_xent(z1, z2, temperature=CIB_TEMPERATURE):
    """NT-Xent (SimCLR): for each of the 2N codes, -log of the softmax over the other 2N - 1 codes
    (cosine similarity / temperature) at its other view; the mean over the 2N."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = (z @ z.T / temperature).fill_diagonal_(float('-inf'))  # a code is not its own candidate
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _bernoulli_kl(p, q, eps=1e-8):
    """KL(Bernoulli(p) || Bernoulli(q)) summed over the bits, mean over items; q is held fixed."""
    q = q.detach()
    kl = p * (torch.log(p + eps) - torch.log(q + eps)) + (1 - p) * (torch.log(1 - p + eps) - torch.log(1 - q + eps))
    return kl.sum(1).mean()


def cibhash_loss(h1, h2, temperature=CIB_TEMPERATURE, beta=CIB_BETA):
    """CIBHash on the relaxed codes h in (-1, 1)^L of two views (HashHead's tanh): the probability of
    bit +1 is p = (1 + h) / 2 (a sigmoid of the head's last layer); the codes b = sign(p - 1/2) pass
    the gradient straight through. Loss: NT-Xent(b1, b2) + beta * (KL(p1 || p2) + KL(p2 || p1)) / 2,
    each KL with its second argument held fixed, as the CIBHash code."""
    p1, p2 = (1 + h1) / 2, (1 + h2) / 2
    b1, b2 = _SignSTE.apply(p1 - 0.5), _SignSTE.apply(p2 - 0.5)
    kl = (_bernoulli_kl(p1, p2) + _bernoulli_kl(p2, p1)) / 2
    return nt_xent(b1, b2, temperature) + beta * kl

