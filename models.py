"""Frozen backbones (Section 4.1.2) and the hashing heads Hv and He (Section 3.3).

A backbone always comes with its own preprocessing, like openai/CLIP's `load`:
`load_backbone(name, pretrained, device)` returns (encode_image, preprocess, dim).
"""
import os
import socket

import torch
import torch.nn as nn

CLIP_MODELS = ('ViT-B-16', 'ViT-B-32', 'tiny-test')  # open_clip names; tiny-test is for tests
VGG_MODELS = ('vgg16',)
# tiny-test: a randomly initialised CLIP of the same open_clip code path, small enough for CI
TINY_CLIP_CFG = dict(embed_dim=32,
                     vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
MODEL_SEED = 0  # seed for randomly initialised weights (pretrained='random'), so all steps share them


class WeightsUnavailable(RuntimeError):
    pass


def _online(host, port=443, timeout=3.0):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_device(name='auto'):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is passed to torch."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if str(name).startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but no CUDA GPU is visible; use --device=cpu or auto")
    return name


def hardware(device=None):
    """'<CPU model> (<n> CPU threads), <GPU>' for the record of a timing: the GPU of `device`
    ('cuda', 'cuda:1'), 'no GPU used' for a CPU device, every visible GPU when device is None."""
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), cpu)
    except OSError:
        pass
    if device is not None and not str(device).startswith('cuda'):
        gpu = 'no GPU used'
    elif not torch.cuda.is_available():
        gpu = 'no GPU'
    elif device is None:
        gpu = ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpu = torch.cuda.get_device_name(torch.device(device))
    return f'{cpu} ({os.cpu_count()} CPU threads), {gpu}'


def default_weights(backbone):
    """The weights a backbone gets when none are named: ImageNet for VGG-16, OpenAI's for CLIP."""
    return 'imagenet' if backbone in VGG_MODELS else 'openai'


def pretrained_tag(pretrained):
    """A short name for a weights setting, used in cache paths: 'openai', 'random', or
    'file-<name>' for a local checkpoint."""
    if pretrained in (None, '', 'none', 'random'):
        return 'random'
    if os.path.sep in str(pretrained) or os.path.exists(str(pretrained)):
        return 'file-' + os.path.splitext(os.path.basename(str(pretrained)))[0]
    return str(pretrained)


def _register_tiny():
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS
    _MODEL_CONFIGS.setdefault('tiny-test', TINY_CLIP_CFG)
    return open_clip


def load_clip(name='ViT-B-16', pretrained='openai', device='cpu'):
    """open_clip model (eval mode, frozen), its validation preprocess and its tokenizer.
    `pretrained`: an open_clip tag ('openai'), a local checkpoint file, or 'random'."""
    open_clip = _register_tiny()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {name!r}; choose one of {', '.join(CLIP_MODELS)} "
                         f"(or any of open_clip.list_models())")
    tag = pretrained_tag(pretrained)
    if tag == 'random':
        torch.manual_seed(MODEL_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    else:
        if tag.startswith('file-') and not os.path.isfile(pretrained):
            raise WeightsUnavailable(f"CLIP checkpoint {pretrained!r} does not exist")
        if not tag.startswith('file-') and not (_online('huggingface.co') or _online('openaipublic.azureedge.net')):
            import huggingface_hub.constants
            huggingface_hub.constants.HF_HUB_OFFLINE = True  # use a cached copy if there is one, fail fast if not
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            url = open_clip.get_pretrained_url(name, pretrained) or f'the {pretrained} weights of {name}'
            raise WeightsUnavailable(
                f"cannot load CLIP {name} weights {pretrained!r} ({type(e).__name__}: {str(e)[:200]}). "
                f"With no network, download {url} on another machine and pass its path: "
                f"--clip_pretrained=/path/to/{name}.pt") from e
    model = model.to(device).eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(name)


def load_vgg16(pretrained='imagenet', device='cpu'):
    """torchvision VGG-16 up to fc7 (after its ReLU), F = 4096, with its preprocessing."""
    import torchvision
    from torchvision.models import VGG16_Weights
    weights = VGG16_Weights.IMAGENET1K_V1
    tag = pretrained_tag(pretrained)
    if tag == 'random':
        torch.manual_seed(MODEL_SEED)
        net = torchvision.models.vgg16(weights=None)
    elif tag.startswith('file-'):
        if not os.path.isfile(pretrained):
            raise WeightsUnavailable(f"VGG-16 checkpoint {pretrained!r} does not exist")
        net = torchvision.models.vgg16(weights=None)
        net.load_state_dict(torch.load(pretrained, map_location='cpu', weights_only=True))
    else:
        try:
            net = torchvision.models.vgg16(weights=weights)
        except Exception as e:  # noqa: BLE001
            raise WeightsUnavailable(
                f"cannot download VGG-16 ImageNet weights ({type(e).__name__}: {e}). With no network, "
                f"download {weights.url} on another machine and pass its path: --backbone_pretrained=/path/to/"
                f"{os.path.basename(weights.url)} (or put it in ~/.cache/torch/hub/checkpoints/)") from e
    net.classifier = net.classifier[:5]  # fc6, ReLU, Dropout, fc7, ReLU -> the fc7 output
    return net.to(device).eval().requires_grad_(False), weights.transforms()


def load_backbone(name, pretrained, device='cpu'):
    """(encode_image, preprocess, F): the frozen image encoder that feeds Hv."""
    if name in VGG_MODELS:
        net, preprocess = load_vgg16(pretrained, device)
        return net, preprocess, 4096
    model, preprocess, _ = load_clip(name, pretrained, device)
    return model.encode_image, preprocess, model.visual.output_dim


def preprocess_params(preprocess):
    """(image_size, mean, std, interpolation) of a torchvision preprocessing pipeline, so the
    augmented views use exactly the backbone's normalisation."""
    from torchvision import transforms as T
    if isinstance(preprocess, T.Compose):
        size = mean = std = None
        interp = T.InterpolationMode.BICUBIC
        for t in preprocess.transforms:
            if isinstance(t, T.CenterCrop):
                size = t.size[0] if isinstance(t.size, (tuple, list)) else t.size
            if isinstance(t, T.Resize):
                interp = t.interpolation
            if isinstance(t, T.Normalize):
                mean, std = tuple(t.mean), tuple(t.std)
        return size, mean, std, interp
    # torchvision weights' ImageClassification preset
    return preprocess.crop_size[0], tuple(preprocess.mean), tuple(preprocess.std), preprocess.interpolation


@torch.no_grad()
def encode_text_cut(model, tokens):
    """CLIP text features of a batch whose token tensor is cut after its longest end-of-text
    token. Text attention is causal, so this equals encoding the 77-token padded batch."""
    n = tokens.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    mask = model.attn_mask[:n, :n] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # the eot token's output
    if isinstance(model.text_projection, nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


class HashHead(nn.Module):
    """Hv (F -> 512 -> L) or He (512 -> 512 -> L): Linear, BatchNorm1d, ReLU, Linear, tanh
    (Section 4.1.2); tanh relaxes the codes in {-1, +1}^L."""

    def __init__(self, in_dim, bits, hidden=512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, bits))

    def forward(self, x):
        return torch.tanh(self.net(x))
