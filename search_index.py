"""The index of a user's images that search.py searches: a trained run's encoders (its backbone and
preprocessing, Hv, and for words Eq. 2, Eq. 5-6 and He), the images to index (a folder, a list file or a
dataset's retrieval set), and the index on disk (codes.npy, index.json), updated in place: new and changed
images encoded, vanished ones dropped, an interrupted build resumed.
"""
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import baselines
import cache
import dataset
import eval_hash
import external
import models
import nouns_embed
import runs
import views
from cache import CacheError, atomic_write, save_json, sha256_file
from dataset import DataError


# -----------------------------------------------------------------------------
# the run: its heads, how its features were made, its vocabulary
_LOADED = {}  # what a process loads once and the search page reuses: models, vocabularies, indexes


def once(key, make):
    """make(), computed on the first call with `key` and kept for the process."""
    if key not in _LOADED:
        _LOADED[key] = make()
    return _LOADED[key]


def load_run(run, bits):
    """(config, Hv, He or None) of <run>/<bits>bits/heads.pt (read with weights_only: no code runs)."""
    path = os.path.join(run, f'{bits}bits', 'heads.pt')
    if not os.path.isfile(path):
        have = sorted(d for d in os.listdir(run) if d.endswith('bits')) if os.path.isdir(run) else []
        raise DataError(f"{path} does not exist: --run names a train.py run folder; its code lengths: {have or 'none'}")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    cfg = ckpt['config']
    if ckpt.get('hv') is None:
        raise DataError(f"{path} holds no trained Hv (method {cfg.get('METHOD')}: codes without a network); "
                        f"index a DUH-EG or trained baseline run")
    if ckpt.get('codebooks') is not None:
        raise DataError(f"{path} is a {cfg.get('METHOD')} run: product-quantized codes ranked by asymmetric quantizer "
                        f"distance, not binary codes; search.py indexes binary codes: index a DUH-EG or hashing run")
    hv = baselines.load_head(ckpt, bits)  # Hv, or a competitor's own head (HHCH, CGHash)
    he = None
    if ckpt.get('he') is not None:
        he = models.HashHead(ckpt['e_dim'], bits)
        he.load_state_dict(ckpt['he'])
    return cfg, hv, (he.eval() if he is not None else None), sha256_file(path)


def run_identity(run, bits, run_sha, cfg):
    """What an index's codes depend on: a query's code must come from the same."""
    return dict(run=os.path.abspath(run), bits=bits, heads_sha256=run_sha, backbone=cfg['BACKBONE'],
                backbone_pretrained=cfg['BACKBONE_PRETRAINED'], view_recipe=cfg.get('VIEW_RECIPE') or 'simclr',
                norm_inputs=bool(cfg.get('NORM_INPUTS')))


def image_encoder(cfg, device):
    """(encode, preprocess) of the run's backbone: the plain view its features were extracted with."""
    encode, preprocess, _ = once(('backbone', cfg['BACKBONE'], cfg['BACKBONE_PRETRAINED'], device),  # the run's weights
                                 lambda: models.load_backbone(cfg['BACKBONE'], cfg['BACKBONE_PRETRAINED'], device,
                                                              flags=None))
    if (cfg.get('VIEW_RECIPE') or 'simclr') == 'released':
        preprocess = views.released_views(cfg['DATASET'], models.preprocess_params(preprocess)[0])[0]
    return encode, preprocess


@torch.no_grad()
def hash_features(x, hv, cfg):
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if cfg.get('NORM_INPUTS'):
        x = torch.nn.functional.normalize(x, dim=1)
    return eval_hash.pack(torch.cat([hv(x[a:a + 4096]) for a in range(0, len(x), 4096)]).numpy())


def run_vocabulary(cfg):
    """(features, words) the run built its external features from (Eq. 5-6), loaded once; for
    EXTERNAL=imgk the training images' CLIP features and names."""
    if cfg['EXTERNAL'] not in ('efc', 'ek', 'imgk'):
        raise DataError(f"word queries are not supported for EXTERNAL={cfg['EXTERNAL']} runs (use efc, ek or imgk)")
    return once(('vocabulary', runs.digest(cfg)), lambda: external.run_vocabulary(cfg, words=True))


def text_features(words, cfg, device):
    """CLIP text features of free text, as Eq. 2 embeds a noun: the run's CLIP, its prompts."""
    model, _, tok = once(('clip', cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'], device),
                         lambda: models.load_clip(cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'], device, flags=None))
    return nouns_embed.embed_words(list(words), model, tok, device=device, keep_underscores=bool(cfg['RELEASED']),
                                   raw_mean=bool(cfg['RELEASED']))


def word_codes(words, cfg, he, device):
    """Codes of word queries: text feature -> external feature (Eq. 5-6 on the run's vocabulary) -> He."""
    return text_codes(text_features(words, cfg, device), cfg, he)


@torch.no_grad()
def text_codes(t, cfg, he):
    """Codes of CLIP text features t (text_features): Eq. 5-6 on the run's vocabulary, then He."""
    if he is None:
        raise DataError(f"this run ({cfg.get('METHOD')}, EXTERNAL={cfg.get('EXTERNAL')}) has no He, the head that "
                        f"maps an external feature to a code: word queries need a DUH-EG run with a vocabulary")
    e = external.external_features(t, run_vocabulary(cfg)[0], cfg['TAU1'])
    return eval_hash.pack(he(e).numpy())


# -----------------------------------------------------------------------------
# the images to index
def list_images(spec):
    """[(name, path)] of a folder (every image below it, any nesting, sorted) or of a list file."""
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        out = []
        for d, dirs, files in os.walk(spec):
            dirs.sort()
            out += [os.path.join(d, f) for f in sorted(files) if f.lower().endswith(dataset.IMAGE_EXTS)]
        if not out:
            raise DataError(f"--images={spec}: the folder holds no images ({', '.join(dataset.IMAGE_EXTS)}, any "
                            f"nesting); nothing to index")
        return sorted((os.path.relpath(p, spec), p) for p in out)
    if os.path.isfile(spec):
        root = os.path.dirname(os.path.abspath(spec))
        names = []
        for line in dataset.read_lines(spec):
            if line.strip():
                m = dataset._LIST_PATH.match(line)
                names.append(m.group(1).strip() if m else line.strip())
        out = sorted(dict.fromkeys((n, os.path.join(root, n)) for n in names))
        if not out:
            raise DataError(f"--images={spec}: the list file names no images")
        return out
    raise DataError(f"--images={spec!r} is neither a folder, a list file nor dataset:<name>")


def stat_key(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


@torch.no_grad()
def encode_images(imgs, cfg, device):
    """Backbone features of PIL images, with the run's own preprocessing (its plain view)."""
    encode, preprocess = image_encoder(cfg, device)
    return encode(torch.stack([preprocess(im) for im in imgs]).to(device)).float().cpu().numpy()


def encode_files(paths, cfg, hv, device, batch_size=64):
    """(codes of the readable images, [(path, why)] of the unreadable ones, how many of `paths` were
    handled: all, or after Ctrl-C those before the batch it interrupted, whose codes are kept)."""
    encode, preprocess = image_encoder(cfg, device)
    from PIL import Image
    bad, batch, feats, done = [], [], [], 0

    def flush(upto):
        nonlocal done
        if batch:
            feats.append(encode(torch.stack(batch).to(device)).float().cpu().numpy())
            batch.clear()
        done = upto
    try:
        for i, p in enumerate(tqdm(paths, desc='encoding images', unit='image', disable=len(paths) < 20)):
            try:
                with Image.open(p) as im:
                    batch.append(preprocess(dataset.to_rgb(im)))
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
                bad.append((i, p, f'{type(e).__name__}: {str(e)[:120]}'))
                continue
            if len(batch) == batch_size:
                flush(i + 1)
        flush(len(paths))
    except KeyboardInterrupt:  # the batches encoded so far are kept
        pass
    x = np.concatenate(feats) if feats else np.zeros((0, hv.net[0].in_features), np.float32)
    codes = hash_features(x, hv, cfg) if len(x) else np.zeros((0, codes_width(hv)), np.uint8)
    return codes, [(p, why) for i, p, why in bad if i < done], done


def dataset_entries(name, cfg, hv):
    """Index entries and codes of a dataset's retrieval set, from the run's cached features."""
    if name != cfg['DATASET']:
        raise DataError(f"--images=dataset:{name}, but the run was trained on {cfg['DATASET']}")
    feats = cache.load_features(cfg['CACHE_DIR'], name, cfg['BACKBONE'], cfg['BACKBONE_PRETRAINED'],
                                cfg.get('VIEW_RECIPE') or 'simclr', mmap=True)
    split = cache.split_paths(cfg['CACHE_DIR'], name, cache.split_tag(cfg['SPLIT_SEED'], cfg.get('SPLIT_DIR')))
    retrieval = cache.load_array(split['retrieval'], producer='dataset_extract.py')
    names = cache.image_names(cfg['CACHE_DIR'], cfg['DATASET'], len(feats))
    entries = [dict(name=names[i], dataset=name, row=int(i)) for i in retrieval]
    return entries, hash_features(feats[retrieval], hv, cfg)


# -----------------------------------------------------------------------------
# the index on disk
def read_index(index):
    """(meta, codes) of an index folder, checked against its checksum; (None, None) when there is none."""
    meta_path, codes_path = os.path.join(index, 'index.json'), os.path.join(index, 'codes.npy')
    if not os.path.exists(meta_path):
        return None, None
    meta = cache.read_json(meta_path, 'index again with --run and --images (the index is built anew)')
    if not os.path.isfile(codes_path) or sha256_file(codes_path) != meta.get('codes_sha256'):
        raise CacheError(f"{codes_path} is missing or does not match {meta_path} (a killed write?): index again "
                         f"with --run and --images (the index is built anew)")
    codes = np.load(codes_path, allow_pickle=False)
    if codes.shape != (len(meta['images']), meta['bits'] // 8 + (meta['bits'] % 8 > 0)):
        raise CacheError(f"{codes_path} has shape {codes.shape}, {meta_path} lists {len(meta['images'])} images")
    return meta, codes


def write_index(index, meta, codes):
    """codes.npy first, then index.json with its checksum (renamed into place last)."""
    codes_path = os.path.join(index, 'codes.npy')
    atomic_write(codes_path, lambda f: np.save(f, np.ascontiguousarray(codes, dtype=np.uint8), allow_pickle=False))
    save_json(os.path.join(index, 'index.json'), dict(meta, codes_sha256=sha256_file(codes_path), count=len(codes),
                                                      written=time.strftime('%Y-%m-%d %H:%M:%S')))


def update_index(index, spec, run, bits, device, batch_size=64):
    """Build or update the index of `spec` with the run's codes: new and changed images are encoded,
    vanished ones dropped, unreadable ones listed and skipped; a damaged index is built anew. Stopped
    by Ctrl-C, it keeps the images encoded so far, and the same command resumes. Returns (meta, codes)."""
    cfg, hv, he, run_sha = load_run(run, bits)
    ident = run_identity(run, bits, run_sha, cfg)
    try:
        meta, codes = read_index(index)
    except CacheError as e:
        print(f"note: {str(e).split(': index again')[0]}: building the index anew")
        meta, codes = None, None
    if meta is not None and meta['identity'] != ident:
        diff = ', '.join(f"{k}: {meta['identity'].get(k)} -> {v}" for k, v in ident.items()
                         if meta['identity'].get(k) != v)
        raise DataError(f"the index {index} holds codes of another run or code length ({diff}); use another --index "
                        f"or delete {index}")
    t0 = time.time()
    stopped = ''
    if spec.startswith('dataset:'):
        entries, new_codes = dataset_entries(spec.split(':', 1)[1], cfg, hv)
        skipped = []
    else:
        entries, new_codes, skipped, stopped = index_files(index, list_images(spec), meta, codes, cfg, hv, device,
                                                              batch_size)
    meta = dict(identity=ident, bits=bits, images=entries, skipped=skipped, source=spec, dataset=cfg['DATASET'],
                dataset_cache=os.path.abspath(cfg['CACHE_DIR']), seconds=round(time.time() - t0, 2))
    write_index(index, meta, new_codes)
    if stopped:
        raise SystemExit(f"error: {stopped}")
    return meta, new_codes


def index_files(index, files, meta, codes, cfg, hv, device, batch_size=64):
    """(entries, codes, skipped, '' or why it stopped) of the image files [(name, path)]: those of the old
    index (meta, codes) with the same name, size and time kept, the others encoded."""
    old = {(e['name'], tuple(e.get('stat', ()))): i for i, e in enumerate(meta['images'])} if meta else {}
    keys = [(n, tuple(stat_key(p))) for n, p in files]
    todo = [f for f, k in zip(files, keys) if k not in old]
    fresh, bad, done = encode_files([p for _, p in todo], cfg, hv, device, batch_size)
    bad_paths = {p for p, _ in bad}
    fresh_rows = iter(range(len(fresh)))
    new_of = {n: next(fresh_rows) for n, p in todo[:done] if p not in bad_paths}
    entries, rows = [], []
    for (n, p), k in zip(files, keys):
        if k in old:
            entries.append(dict(meta['images'][old[k]]))
            rows.append(codes[old[k]])
        elif n in new_of:
            entries.append(dict(name=n, path=os.path.abspath(p), stat=list(k[1])))
            rows.append(fresh[new_of[n]])
    new_codes = np.array(rows, np.uint8).reshape(len(rows), -1) if rows else np.zeros((0, codes_width(hv)), np.uint8)
    kept = len(files) - len(todo)
    print(f"index {index}: {done - len(bad)} images encoded, {kept} kept from before, "
          f"{(len(meta['images']) if meta else 0) - kept} dropped (vanished or changed), {len(bad)} unreadable skipped"
          + (f" (listed in {index}/index.json, e.g. {cache.shown(bad[0][0])}: {bad[0][1]})" if bad else ''))
    stopped = '' if done == len(todo) else (
        f"interrupted (Ctrl-C) after {done} of the {len(todo)} images to encode: the index {index} keeps them; "
        f"run the same command again to encode the other {len(todo) - done}")
    return entries, new_codes, [dict(path=p, why=w) for p, w in bad], stopped


def codes_width(hv):
    """Bytes of one packed code of the head hv."""
    return (hv.net[-1].out_features + 7) // 8
