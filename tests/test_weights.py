"""CLIP and VGG-16 features equal the reference code's on the same weights, in every file form a user
may hold. References no one here wrote: OpenAI's own CLIP code (the `clip-anytorch` package) and
torchvision. Random weights are built in the reference code, saved the way the real files are saved
(OpenAI's TorchScript archive in fp16, torch.save'd state dicts, .safetensors, the model hub's folder
and its cache layout, torchvision's .pth), loaded through models.py and compared."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

import cache
import models

clip = pytest.importorskip('clip', reason='clip-anytorch (OpenAI CLIP code) is a test dependency')
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

TOL = 1e-4  # largest absolute difference allowed in fp32
ARCH = {  # OpenAI's ViT-B/16 and ViT-B/32 (clip/model.py build_model's numbers for the released files)
    'ViT-B-16': dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    'ViT-B-32': dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
}
PROMPTS = ['itap of a tabby cat.', 'a bad photo of the golden retriever.', 'art of the cat\'s foot.', 'a x.']


def _reference(name, seed=0):
    """A randomly initialised OpenAI CLIP built by OpenAI's code, its weights rounded to fp16
    (as OpenAI's files hold them) so every file form below holds exactly the same values."""
    torch.manual_seed(seed)
    ref = clip.model.CLIP(**ARCH[name]).eval()
    for p in ref.parameters():
        p.data = p.data.half().float()
    return ref


def _save_torchscript(ref, path):
    """OpenAI's download: a traced TorchScript CLIP in fp16 with input_resolution, context_length and
    vocab_size kept in its state dict (clip.load drops those three before building)."""
    import copy
    ref = copy.deepcopy(ref)  # a trace shares its parameters: halving it must not halve the reference
    for k in ('input_resolution', 'context_length', 'vocab_size'):
        ref.__dict__.pop(k, None)  # plain ints in OpenAI's Python class, tensors in its archive
    for k, v in (('input_resolution', 224), ('context_length', 77), ('vocab_size', 49408)):
        ref.register_buffer(k, torch.tensor(v))
    image, text = torch.zeros(1, 3, 224, 224), clip.tokenize(['a'])
    with torch.no_grad():
        traced = torch.jit.trace(ref, (image, text), check_trace=False)
    traced.half()
    torch.jit.save(traced, path)


def _images(n=3, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    sizes = [(320, 240), (224, 224), (97, 150)][:n]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope='module')
def b16(tmp_path_factory):
    """The reference ViT-B/16, its outputs, and the same weights saved in every form."""
    d = tmp_path_factory.mktemp('clip_b16')
    ref = _reference('ViT-B-16')
    pre = clip.clip._transform(224)
    x = torch.stack([pre(im) for im in _images()])
    with torch.no_grad():
        out = dict(image=ref.encode_image(x), text=ref.encode_text(clip.tokenize(PROMPTS)), x=x)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    files = {}
    files['torchscript'] = str(d / 'ViT-B-16.pt')
    _save_torchscript(ref, files['torchscript'])
    files['state_dict_pt'] = str(d / 'clip_state_dict.pt')
    torch.save(sd, files['state_dict_pt'])
    files['wrapped_bin'] = str(d / 'checkpoint.bin')  # a training checkpoint: {'state_dict': {'module.' ...}}
    torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in sd.items()}}, files['wrapped_bin'])
    from safetensors.torch import save_file
    files['safetensors'] = str(d / 'open_clip_model.safetensors')
    save_file(sd, files['safetensors'])
    # the model hub's folder (timm/vit_base_patch16_clip_224.openai) and the hub cache that downloading it leaves
    hub = d / 'hub' / 'models--timm--vit_base_patch16_clip_224.openai'
    snap = hub / 'snapshots' / '0123abc'
    snap.mkdir(parents=True)
    (hub / 'refs').mkdir()
    (hub / 'refs' / 'main').write_text('0123abc')
    torch.save(sd, snap / 'open_clip_pytorch_model.bin')
    (snap / 'open_clip_config.json').write_text(json.dumps({'model_cfg': {'embed_dim': 512, 'quick_gelu': True}}))
    files['hub_snapshot_folder'] = str(snap)
    files['hub_cache_folder'] = str(hub)
    return ref, out, files, d


def _check(model, out, tok):
    with torch.no_grad():
        di = (model.encode_image(out['x']) - out['image']).abs().max().item()
        dt = (model.encode_text(tok(PROMPTS)) - out['text']).abs().max().item()
    assert di <= TOL and dt <= TOL, (di, dt)
    return di, dt


def _uses_quick_gelu(model):
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    return all(type(b.mlp.gelu).__name__ == 'QuickGELU' for b in blocks)


@pytest.mark.parametrize('form', ['torchscript', 'state_dict_pt', 'wrapped_bin', 'safetensors',
                                  'hub_snapshot_folder', 'hub_cache_folder'])
def test_clip_b16_equals_openai_code_from_every_file_form(b16, form):
    ref, out, files, _ = b16
    model, preprocess, tok = models.load_clip('ViT-B-16', files[form])
    assert _uses_quick_gelu(model)
    _check(model, out, tok)


def test_openai_tag_offline_reads_the_hub_cache_and_openais_own_cache(b16, monkeypatch, tmp_path):
    """pretrained='openai' with no network: open_clip's own download path finds the model hub cache
    (HF_HUB_OFFLINE); and a ViT-B-16.pt that OpenAI's clip package left in ~/.cache/clip is used first."""
    import huggingface_hub.constants
    ref, out, files, d = b16
    monkeypatch.setattr(models, '_online', lambda *a, **k: False)
    monkeypatch.setattr(models, 'OPENAI_CACHE', str(tmp_path / 'no-clip-cache'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(d / 'hub'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    model, _, tok = models.load_clip('ViT-B-16', 'openai')
    assert _uses_quick_gelu(model)
    _check(model, out, tok)
    cache = tmp_path / 'clip-cache'
    cache.mkdir()
    os.symlink(files['torchscript'], cache / 'ViT-B-16.pt')
    monkeypatch.setattr(models, 'OPENAI_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-hub'))
    model, _, tok = models.load_clip('ViT-B-16', 'openai')
    _check(model, out, tok)


def test_gelu_build_differs_from_openai_code(b16):
    """What the old loader built (plain GELU on OpenAI's weights) is measurably another network,
    so the equivalence tests above would catch it."""
    import open_clip
    ref, out, files, _ = b16
    model = open_clip.create_model('ViT-B-16', pretrained=None).eval()
    model.load_state_dict(models.read_state_dict(files['state_dict_pt']), strict=False)
    assert not _uses_quick_gelu(model)
    with torch.no_grad():
        assert (model.encode_image(out['x']) - out['image']).abs().max().item() > 100 * TOL


def test_preprocess_equals_openai_preprocess(b16):
    ref, out, files, _ = b16
    _, preprocess, _ = models.load_clip('ViT-B-16', files['state_dict_pt'])
    pre = clip.clip._transform(224)
    for im in _images():
        assert (preprocess(im) - pre(im)).abs().max().item() <= 1e-6


def test_tokens_and_length_cut_text_batches_equal_openai_code(b16):
    """nouns_embed.py encodes prompts cut after their longest end-of-text token; the result equals
    OpenAI's encode_text on the 77-token padded batch, and so does its Eq. 2 mean."""
    import nouns_embed
    ref, out, files, _ = b16
    model, _, tok = models.load_clip('ViT-B-16', files['torchscript'])
    tokens = tok(PROMPTS)
    assert torch.equal(tokens, clip.tokenize(PROMPTS))
    n = int(tokens.argmax(-1).max()) + 1
    with torch.no_grad():
        cut = models.encode_text_cut(model, tokens[:, :n])
    assert n < 20 and (cut - out['text']).abs().max().item() <= TOL
    words = ['tabby cat', 'golden retriever', 'cat\'s-foot']
    t_w = nouns_embed.embed_words(words, model, tok, batch_size=5, prompts=nouns_embed.PROMPTS)
    with torch.no_grad():
        f = ref.encode_text(clip.tokenize([p.format(w) for w in words for p in nouns_embed.PROMPTS]))
    f = torch.nn.functional.normalize(f, dim=-1).reshape(len(words), len(nouns_embed.PROMPTS), -1).mean(1)
    want = torch.nn.functional.normalize(f, dim=-1).numpy()
    assert np.abs(t_w - want).max() <= TOL


def test_clip_b32_equals_openai_code(tmp_path):
    ref = _reference('ViT-B-32', seed=1)
    x = torch.stack([clip.clip._transform(224)(im) for im in _images(2)])
    with torch.no_grad():
        out = dict(image=ref.encode_image(x), text=ref.encode_text(clip.tokenize(PROMPTS)), x=x)
    torch.save(ref.state_dict(), tmp_path / 'b32.pt')
    _save_torchscript(ref, str(tmp_path / 'ViT-B-32.pt'))
    for path in (tmp_path / 'ViT-B-32.pt', tmp_path / 'b32.pt'):
        model, _, tok = models.load_clip('ViT-B-32', str(path))
        assert _uses_quick_gelu(model)
        _check(model, out, tok)
    with pytest.raises(models.WeightsUnavailable, match='does not hold ViT-B-16 weights'):
        models.load_clip('ViT-B-16', str(tmp_path / 'b32.pt'))


def test_other_open_clip_tags_keep_their_activation_and_the_build_is_in_the_caches(tmp_path):
    assert models.clip_quick_gelu('ViT-B-16', 'openai') and models.clip_quick_gelu('ViT-B-32', 'openai')
    assert not models.clip_quick_gelu('ViT-B-16', 'laion2b_s34b_b88k')
    assert models.clip_build('ViT-B-16', 'openai')['activation'] == 'QuickGELU'
    assert models.clip_build('ViT-B-16', 'laion2b_s34b_b88k')['activation'] == 'GELU'
    folder = tmp_path / 'laion'
    folder.mkdir()
    torch.save({}, folder / 'open_clip_pytorch_model.bin')
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': {'embed_dim': 512}}))
    assert not models.clip_quick_gelu('ViT-B-16', str(folder))  # the hub folder's config decides


def test_loading_runs_no_code_from_a_file(tmp_path):
    """A pickled object (which torch.load without weights_only would execute) is refused."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path}/pwned',))
    path = tmp_path / 'evil.pt'
    torch.save({'state_dict': Evil()}, path)
    with pytest.raises(models.WeightsUnavailable, match='cannot read weights'):
        models.read_state_dict(str(path))
    assert not (tmp_path / 'pwned').exists()


def test_vgg16_pth_gives_torchvisions_fc7(tmp_path, monkeypatch):
    import torchvision
    torch.manual_seed(3)
    ref = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path / 'vgg16-397923af.pth'
    torch.save(ref.state_dict(), path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.classifier[:5](torch.flatten(ref.avgpool(ref.features(x)), 1))
        net, _ = models.load_vgg16(str(path))
        assert (net(x) - want).abs().max().item() <= TOL
        # torchvision's own cache: 'imagenet' finds the file there and downloads nothing
        (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
        os.symlink(path, tmp_path / 'hub' / 'checkpoints' / 'vgg16-397923af.pth')
        monkeypatch.setenv('TORCH_HOME', str(tmp_path))
        net, _ = models.load_vgg16('imagenet')
        assert (net(x) - want).abs().max().item() <= TOL


def test_scripts_stop_on_unusable_weights_with_one_clean_line(tmp_path, image_folder):
    from conftest import run_script
    cases = [('nouns_embed.py', '--vocab=imagenet', '--clip_model=tiny-test',
              '--clip_pretrained=/nonexistent/ViT-B-16.pt'),
             ('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}', '--backbone=vgg16',
              '--backbone_pretrained=/nonexistent/vgg16-397923af.pth', '--query=2', '--train=2'),
             ('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}', '--backbone=tiny-test',
              f'--backbone_pretrained={tmp_path}', '--query=2', '--train=2')]  # a folder without weights
    for script, *args in cases:
        proc = run_script(script, *args, f'--cache_dir={tmp_path}/cache', check=False)
        lines = [l for l in proc.stderr.splitlines() if l.strip() and 'Warning' not in l and 'warn(' not in l
                 and not l.startswith('WARNING')]
        assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-1500:]
        assert len(lines) == 1 and lines[0].startswith('error: '), lines
        assert 'does not exist' in lines[0] or 'no weights in the folder' in lines[0]


def test_features_of_an_older_build_are_stale_not_reused(tmp_path):
    """Caches made before the build was recorded (the GELU loader) are refused by train.py."""
    from conftest import run_script, write_feature_set
    write_feature_set(str(tmp_path))
    path = os.path.join(tmp_path, 'folder', 'tiny-test-random', 'images.npy')
    cache.save_array(path, np.load(path), {}, 'an older dataset_extract.py')
    proc = run_script('train.py', '--dataset=folder', f'--cache_dir={tmp_path}', '--backbone=tiny-test',
                      '--backbone_pretrained=random', '--method=lsh', '--bits=8', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert "was made with build='<not recorded>'" in proc.stderr and "'activation': 'GELU'" in proc.stderr
