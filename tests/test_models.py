"""models.py: backbones with their preprocessing, offline errors that say what to fetch, Hv / He."""
import urllib.error

import pytest
import torch

import models


def test_hash_head_shapes_and_range():
    head = models.HashHead(40, 16)
    h = head(torch.randn(8, 40, generator=torch.Generator().manual_seed(0)) * 100)
    assert h.shape == (8, 16) and h.abs().max() <= 1
    layers = [type(m).__name__ for m in head.net]
    assert layers == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear'] and head.net[0].out_features == 512


def test_random_clip_is_the_same_in_every_step():
    a, pre, _ = models.load_clip('tiny-test', 'random')
    b, _, _ = models.load_clip('tiny-test', 'random')
    assert torch.equal(a.visual.conv1.weight, b.visual.conv1.weight)
    assert models.preprocess_params(pre)[:3] == (32, (0.48145466, 0.4578275, 0.40821073),
                                                 (0.26862954, 0.26130258, 0.27577711))


def test_clip_offline_fails_fast_naming_the_file_and_the_setting(monkeypatch):
    import huggingface_hub.constants
    tried = []
    monkeypatch.setattr(models, '_online', lambda *a, **k: tried.append(a[0]) or False)  # as with no network
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    with pytest.raises(models.WeightsUnavailable,
                       match=r'openaipublic.*ViT-B-32\.pt.*--clip_pretrained=/path/to/ViT-B-32\.pt'):
        models.load_clip('ViT-B-32', 'openai')
    # one quick look at each host, then the hub is told it is offline: no download is attempted
    assert tried == ['huggingface.co', 'openaipublic.azureedge.net'] and huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(models.WeightsUnavailable, match='does not exist'):
        models.load_clip('tiny-test', '/nonexistent/ViT-B-16.pt')


def test_every_weights_error_names_the_setting_at_fault(monkeypatch):
    """The same CLIP loaded as the backbone names --backbone_pretrained, as the CLIP --clip_pretrained, for a
    run's weights (search.py) none that the script does not have."""
    import huggingface_hub.constants
    monkeypatch.setattr(models, '_online', lambda *a, **k: False)  # as with no network
    monkeypatch.setattr(models, 'OPENAI_CACHE', '/nonexistent/clip-cache')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(models.WeightsUnavailable) as e:
        models.load_backbone('ViT-B-32', 'openai')
    assert str(e.value).startswith("--backbone_pretrained='openai': cannot load CLIP ViT-B-32 weights 'openai'")
    assert 'pass --backbone_pretrained=/path/to/ViT-B-32.pt' in str(e.value) and '--clip_pretrained' not in str(e.value)
    with pytest.raises(models.WeightsUnavailable) as e:
        models.load_backbone('ViT-B-32', 'openai', flags=None)  # search.py: the weights its run was trained with
    assert str(e.value).startswith("the weights 'openai' of ViT-B-32 its run was trained with: cannot load")
    assert 'found by itself' in str(e.value) and 'pass --' not in str(e.value)
    for call, flag in ((lambda: models.load_clip('tiny-test', '/nonexistent/w.pt'), '--clip_pretrained'),
                       (lambda: models.load_backbone('tiny-test', '/nonexistent/w.pt'), '--backbone_pretrained'),
                       (lambda: models.clip_build('tiny-test', '/nonexistent/w.pt'), '--clip_pretrained'),
                       (lambda: models.backbone_build('tiny-test', '/nonexistent/w.pt'), '--backbone_pretrained'),
                       (lambda: models.load_backbone('vgg16', 'laion'), '--backbone_pretrained')):
        with pytest.raises(models.WeightsUnavailable, match=f"^{flag}='"):
            call()
    with pytest.raises(ValueError, match="^--backbone='ViT-X' is not a CLIP model: choose one of ViT-B-16"):
        models.load_backbone('ViT-X', 'openai')


def test_random_and_file_weights_load_without_open_clips_warning(caplog, tmp_path):
    """open_clip warns that it loaded no weights whenever it builds a model it is not given weights for:
    expected here (random on purpose, or read from a file next), so not shown; a file's weights load."""
    import logging
    with caplog.at_level(logging.WARNING):
        model, _, _ = models.load_clip('tiny-test', 'random')
        torch.save(model.state_dict(), tmp_path / 'tiny.pt')
        again, _, _ = models.load_clip('tiny-test', str(tmp_path / 'tiny.pt'))
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert torch.equal(model.visual.conv1.weight, again.visual.conv1.weight)
    logging.getLogger().warning('news')  # the filter is gone afterwards: other warnings still show
    assert [r.getMessage() for r in caplog.records] == ['news']


def test_vgg_offline_error_and_fc7_output(monkeypatch):
    import torchvision.models._api as api

    def no_network(*a, **k):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(api.WeightsEnum, 'get_state_dict', lambda self, *a, **k: no_network())
    with pytest.raises(models.WeightsUnavailable, match=r'vgg16-397923af\.pth.*--backbone_pretrained='):
        models.load_vgg16('imagenet')
    encode, preprocess, dim = models.load_backbone('vgg16', 'random')
    assert dim == 4096 and models.preprocess_params(preprocess)[0] == 224
    with torch.no_grad():
        # any size works: VGG pools adaptively to 7 x 7
        f = encode(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert f.shape == (1, 4096) and (f >= 0).all()  # fc7 after its ReLU


def test_resolve_device():
    assert models.resolve_device('cpu') == 'cpu'
    assert models.resolve_device('auto') == ('cuda' if torch.cuda.is_available() else 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='no CUDA GPU'):
            models.resolve_device('cuda')
