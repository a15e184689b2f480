"""Frozen backbones (Section 4.1.2) and the hashing heads Hv and He (Section 3.3).

A backbone always comes with its own preprocessing, like openai/CLIP's `load`:
`load_backbone(name, pretrained, device)` returns (encode_image, preprocess, dim).
"""
import os
import socket

import torch
import torch.nn as nn

CLIP_MODELS = ('ViT-B-16', 'ViT-B-32', 'tiny-test')  # open_clip names; tiny-test: quick runs and tests
VGG_MODELS = ('vgg16',)
# tiny-test: a CLIP of the same open_clip code path, small enough for CI and the offline quick start (with
# pretrained='random': no download, and features that mean nothing about the images)
TINY_CLIP_CFG = dict(embed_dim=32,
                     vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
MODEL_SEED = 0  # seed for randomly initialised weights (pretrained='random'), so all steps share them
# the settings a weights error names: (the model's, its weights'); None: the weights a run was trained
# with (search.py), which no setting of that script changes
CLIP_FLAGS = ('--clip_model', '--clip_pretrained')
BACKBONE_FLAGS = ('--backbone', '--backbone_pretrained')


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
    'file-<name>' for a local checkpoint file or folder (a model hub cache folder
    'models--org--repo' is named by its repo)."""
    if pretrained in (None, '', 'none', 'random'):
        return 'random'
    p = str(pretrained)
    if os.path.sep in p or os.path.exists(p):
        hub = [part for part in os.path.normpath(p).split(os.path.sep) if part.startswith('models--')]
        name = hub[-1].split('--')[-1] if hub else os.path.splitext(os.path.basename(os.path.normpath(p)))[0]
        return 'file-' + name
    return p


# -----------------------------------------------------------------------------
# weights files: every form a user may hold, read without running code from the file
OPENAI_EXTRA_KEYS = ('input_resolution', 'context_length', 'vocab_size')  # ints kept in OpenAI's archives
HUB_WEIGHTS = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors', 'open_clip_pytorch_model.bin')


def is_torchscript(path):
    """True for a TorchScript archive (OpenAI's CLIP downloads): a zip with code/ and constants.pkl,
    where torch.save's zip files hold data.pkl alone."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())


def weights_file(path):
    """The weights file of `path`: the path itself, or in a folder the model hub's open_clip weights,
    also inside a hub cache folder (models--org--repo/snapshots/<revision>/, refs/main first)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise WeightsUnavailable(f"weights file {path!r} does not exist")
        return path
    folders = [path]
    snaps = os.path.join(path, 'snapshots')
    if os.path.isdir(snaps):
        main = os.path.join(path, 'refs', 'main')
        first = open(main).read().strip() if os.path.isfile(main) else None
        folders += sorted((os.path.join(snaps, d) for d in os.listdir(snaps)),
                          key=lambda d: os.path.basename(d) != first)
    for folder in folders:
        for name in HUB_WEIGHTS:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise WeightsUnavailable(f"no weights in the folder {path}: expected one of {', '.join(HUB_WEIGHTS)} (the model "
                             f"hub's open_clip files), also under snapshots/<revision>/ of a hub cache folder")


def read_state_dict(path):
    """The tensors of a checkpoint, in float32, whatever its form: OpenAI's TorchScript archive (read
    with torch.jit.load for its state dict only), .safetensors, or a torch.save'd state dict (.pt,
    .pth, .bin; read with weights_only=True, also {'state_dict': ...} and 'module.' prefixes)."""
    path = weights_file(path)
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(path)
        elif is_torchscript(path):
            sd = dict(torch.jit.load(path, map_location='cpu').state_dict())
        else:
            sd = torch.load(path, map_location='cpu', weights_only=True)
            sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd
    except Exception as e:  # noqa: BLE001 - any reader's failure means the file is not usable weights
        raise WeightsUnavailable(f"cannot read weights from {path} ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailable(f"{path} holds no state dict of tensors (a whole pickled model is not read, "
                                 f"as that would run code from the file): save model.state_dict() instead")
    sd = {k.removeprefix('module.'): v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def clip_quick_gelu(name, pretrained):
    """Whether the CLIP `name` with weights `pretrained` is built with QuickGELU, the activation
    its weights were trained with: open_clip's record for a tag ('openai': True); for a file or
    folder, the model hub's open_clip_config.json beside it when there is one, else True for
    OpenAI's TorchScript archives and for ViT-B-16 / ViT-B-32 state dicts (OpenAI's weights,
    the paper's); a '-quickgelu' model name always; random weights keep the model's default."""
    if name.endswith('-quickgelu'):
        return True
    tag = pretrained_tag(pretrained)
    if tag == 'random':
        return False
    if not tag.startswith('file-'):
        import open_clip  # here only: importing it costs 1.4 s of every train.py run
        return bool(open_clip.get_pretrained_cfg(name, pretrained).get('quick_gelu', False))
    path = weights_file(pretrained)
    cfg = os.path.join(os.path.dirname(path), 'open_clip_config.json')
    if os.path.isfile(cfg):
        import json
        with open(cfg) as f:
            return bool(json.load(f).get('model_cfg', {}).get('quick_gelu', False))
    return is_torchscript(path) or name in ('ViT-B-16', 'ViT-B-32')


def clip_build(name, pretrained, flags=CLIP_FLAGS):
    """What the features of this CLIP depend on besides its weights, for the caches' settings. A
    weights file that is not there is an error naming `flags` (as load_clip's)."""
    try:
        quick = clip_quick_gelu(name, pretrained)
    except WeightsUnavailable as e:
        raise _weights_error(e, name, pretrained, flags) from e
    return dict(activation='QuickGELU' if quick else 'GELU', loader=2)


def _register_tiny():
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS
    _MODEL_CONFIGS.setdefault('tiny-test', TINY_CLIP_CFG)
    return open_clip


def _weights_error(e, name, pretrained, flags):
    """A WeightsUnavailable that opens with the setting at fault: '--backbone_pretrained='x': ...'."""
    who = f"{flags[1]}={pretrained!r}" if flags else f"the weights {pretrained!r} of {name} its run was trained with"
    return WeightsUnavailable(f"{who}: {e}")


def _offline_advice(name, pretrained, flags):
    import open_clip
    cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained_tag(pretrained) != 'random' else {}
    url, hub = cfg.get('url'), cfg.get('hf_hub', '').strip('/')
    if url:
        file = os.path.basename(url)
        return (f"With no network, download {url} on another machine (OpenAI's own file: only its weights are "
                f"read) and put it in {os.path.join(OPENAI_CACHE, file)}, where it is found by itself"
                + (f", or anywhere and pass {flags[1]}=/path/to/{file}" if flags else '')
                + (f"; the model hub's folder of {hub} (open_clip_pytorch_model.bin) works too" if hub and flags
                   else ''))
    if hub and flags:
        return (f"With no network, copy the model hub's folder of {hub} (open_clip_pytorch_model.bin or .safetensors) "
                f"to this machine and pass {flags[1]}=/path/to/that/folder")
    return (f"pass a local weights file or folder: {flags[1]}=/path/to/{name}.pt" if flags else
            "it needs a download: search with a run whose weights are a local file")


OPENAI_CACHE = os.path.expanduser('~/.cache/clip')  # where OpenAI's clip package keeps its downloads


def _create(open_clip, name, pretrained, quick):
    """open_clip's model and transforms, without its warning that no weights were loaded (expected: the
    weights are read next from a file, or random on purpose)."""
    import logging

    def expected(record):
        return not record.getMessage().startswith('No pretrained weights loaded')
    root = logging.getLogger()
    root.addFilter(expected)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                     force_quick_gelu=quick)
    finally:
        root.removeFilter(expected)
    return model, preprocess


def load_clip(name='ViT-B-16', pretrained='openai', device='cpu', flags=CLIP_FLAGS):
    """open_clip model (eval mode, frozen, float32), its validation preprocess and its tokenizer.
    `pretrained`: an open_clip tag ('openai'), a weights file or folder in any form read_state_dict
    reads, or 'random'. Built with the activation the weights were trained with (clip_quick_gelu).
    Errors name the settings `flags` (CLIP_FLAGS, BACKBONE_FLAGS; None: a run's weights)."""
    open_clip = _register_tiny()
    if name not in open_clip.list_models():
        raise ValueError(f"{flags[0] + '=' if flags else 'the CLIP '}{name!r} is not a CLIP model: choose one of "
                         f"{', '.join(CLIP_MODELS)} (or any of open_clip.list_models())")
    try:
        model, preprocess = _build_clip(open_clip, name, pretrained, flags)
    except WeightsUnavailable as e:
        raise _weights_error(e, name, pretrained, flags) from e
    model = model.float().to(device).eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(name)


def _build_clip(open_clip, name, pretrained, flags):
    """(model, preprocess) of load_clip: random, read from a file or folder, or open_clip's download."""
    base, tag = name.removesuffix('-quickgelu'), pretrained_tag(pretrained)
    if tag != 'random' and not tag.startswith('file-'):
        cfg = open_clip.get_pretrained_cfg(base, pretrained)
        if not cfg:
            raise WeightsUnavailable(f"neither a file nor a folder nor an open_clip tag of {name} "
                                     f"({', '.join(t for m, t in open_clip.list_pretrained() if m == base)})")
        local = os.path.join(OPENAI_CACHE, os.path.basename(cfg['url'])) if cfg.get('url') else ''
        if local and os.path.isfile(local):  # OpenAI's clip package already downloaded it: read that file
            pretrained = local
    quick = clip_quick_gelu(name, pretrained)
    if tag == 'random':
        torch.manual_seed(MODEL_SEED)
        return _create(open_clip, name, None, quick)
    if os.path.exists(str(pretrained)) or tag.startswith('file-'):
        sd = read_state_dict(pretrained)
        model, preprocess = _create(open_clip, name, None, quick)
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
        if missing or unexpected or shape:
            raise WeightsUnavailable(f"{pretrained} does not hold {name} weights: {len(missing)} missing (e.g. "
                                     f"{', '.join(missing[:3])}), {len(unexpected)} unexpected (e.g. "
                                     f"{', '.join(unexpected[:3])}), {len(shape)} of another shape (e.g. "
                                     f"{', '.join(shape[:3])}); check {flags[0] if flags else 'the run'}")
        model.load_state_dict(sd)
        return model, preprocess
    if not (_online('huggingface.co') or _online('openaipublic.azureedge.net')):
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True  # use a cached copy if there is one, fail fast if not
    import logging
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # open_clip logs its own 'ERROR:root:Failed to download' before raising
    try:
        return _create(open_clip, name, pretrained, quick)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
        why = ' '.join(str(e).split())
        why = why if len(why) <= 200 else why[:200].rsplit(' ', 1)[0] + ' …'  # cut between words
        raise WeightsUnavailable(f"cannot load CLIP {name} weights {pretrained!r} ({type(e).__name__}: "
                                 f"{why}). {_offline_advice(name, pretrained, flags)}") from e
    finally:
        root.setLevel(level)


def load_vgg16(pretrained='imagenet', device='cpu', flags=BACKBONE_FLAGS):
    """torchvision VGG-16 up to fc7 (after its ReLU), F = 4096, with its preprocessing.
    `pretrained`: 'imagenet' (torchvision's download, or its cache ~/.cache/torch/hub/checkpoints),
    a weights file (torchvision's vgg16-397923af.pth, any state dict or .safetensors), or 'random'."""
    try:
        net = _build_vgg16(pretrained, flags)
    except WeightsUnavailable as e:
        raise _weights_error(e, 'vgg16', pretrained, flags) from e
    from torchvision.models import VGG16_Weights
    net.classifier = net.classifier[:5]  # fc6, ReLU, Dropout, fc7, ReLU -> the fc7 output
    return net.to(device).eval().requires_grad_(False), VGG16_Weights.IMAGENET1K_V1.transforms()


def _build_vgg16(pretrained, flags):
    import torchvision
    from torchvision.models import VGG16_Weights
    weights = VGG16_Weights.IMAGENET1K_V1
    tag = pretrained_tag(pretrained)
    if tag == 'random':
        torch.manual_seed(MODEL_SEED)
        return torchvision.models.vgg16(weights=None)
    if tag.startswith('file-'):
        net = torchvision.models.vgg16(weights=None)
        try:
            net.load_state_dict(read_state_dict(pretrained))
        except RuntimeError as e:
            raise WeightsUnavailable(f"{pretrained} does not hold torchvision VGG-16 weights ({str(e)[:200]})") from e
        return net
    if tag != 'imagenet':
        raise WeightsUnavailable("VGG-16 weights are 'imagenet', a weights file, or 'random'")
    try:
        return torchvision.models.vgg16(weights=weights)
    except Exception as e:  # noqa: BLE001
        where = (f", or anywhere and pass {flags[1]}=/path/to/{os.path.basename(weights.url)}" if flags else '')
        raise WeightsUnavailable(
            f"cannot download VGG-16 ImageNet weights ({type(e).__name__}: {e}). With no network, download "
            f"{weights.url} on another machine and put it in ~/.cache/torch/hub/checkpoints/, where it is found "
            f"by itself{where}") from e


def load_backbone(name, pretrained, device='cpu', flags=BACKBONE_FLAGS):
    """(encode_image, preprocess, F): the frozen image encoder that feeds Hv. Errors name the settings
    `flags` (BACKBONE_FLAGS; CLIP_FLAGS for the CLIP beside a VGG-16; None: a run's weights)."""
    if name in VGG_MODELS:
        net, preprocess = load_vgg16(pretrained, device, flags)
        return net, preprocess, 4096
    model, preprocess, _ = load_clip(name, pretrained, device, flags)
    return model.encode_image, preprocess, model.visual.output_dim


def backbone_build(name, pretrained, flags=BACKBONE_FLAGS):
    """clip_build for a CLIP backbone; VGG-16's build has no choice in it."""
    return {} if name in VGG_MODELS else clip_build(name, pretrained, flags)


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
