"""Step 5, our extension (not in the paper): index your own images with a trained run's hash codes,
then search them by an image, by an image already indexed, or by words.

    python search.py --run=runs/cifar10/<run> --images=~/Pictures      # index a folder (again: updates it)
    python search.py --query=cat.jpg                                    # the images nearest in Hamming distance
    python search.py --item=holiday/0042.jpg                            # ... to an image of the index
    python search.py --words="a red sports car"                         # ... to words (DUH-EG runs)
    python search.py --serve                                            # a search page on http://127.0.0.1:8765

The index (the folder INDEX) holds codes.npy, every image's code packed into L/8 bytes, and
index.json: the run, its backbone and weights, the code length, every image with its size and
modification time, the images that could not be read, checksums. Indexing again adds new and
changed images and drops vanished ones; the others are not encoded again. Words become a code
through the run's own machinery: their CLIP text feature (Eq. 2's prompts) is turned into an
external feature by Eq. 5-6 over the run's vocabulary, which He maps to a code, so a DUH-EG run
searches images by words with no further training. Each search writes a folder of its own below
OUT, <NNN>_<query>: results.json (top-k with Hamming distances, ties by index order) and one contact
sheet PNG per query.

The page (--serve) takes words, an upload or a dropped image, or a click on a hit, and shows the
query back with its code (hex and bits), the five nouns that weigh most in its external feature
(Eq. 6), the hits with their distances, links and (on a dataset index) Figure 6's frames, the time,
and results.json and the contact sheet to download. It answers this machine only (127.0.0.1, and a
Host header naming it), takes uploads up to MAX_UPLOAD_MB that are images, and keeps thumbnails in
INDEX/thumbs. From another machine: ssh -L 8765:127.0.0.1:8765 <this machine>. Its addresses take
/search?words=<text>&k=<hits> (words), /search?item=<i>&k=<hits> (the index's image i, 0 .. count - 1,
as each hit links: more like it); k defaults to --topk; /thumb/<i> and /image/<i> are the pictures.
"""
import errno
import html
import io
import json
import os
import re
import shutil
import signal
import textwrap
import time
import traceback
import urllib.parse
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler

import numpy as np
import torch

import cache
import dataset
import eval_hash
import external
import models
import nouns_embed
from cache import CacheError, atomic_write, save_json
from configurator import check_choice, check_ranges, configure
from dataset import DataError
from search_index import (encode_files, encode_images, hash_features, load_run, once, read_index, run_identity,
                          run_vocabulary, text_codes, text_features, update_index, word_codes)

# -----------------------------------------------------------------------------
# the index
RUN = ''                  # a train.py run folder holding <bits>bits/heads.pt: needed to build or update an index
BITS = 64                 # which of the run's code lengths
IMAGES = ''               # what to index: a folder of images (any nesting), a list file (a path a line, relative to
                          # the file; labels after it are ignored), or dataset:<name> (the run's retrieval set,
                          # from its cached features); '' searches the index as it is
INDEX = 'runs/index'      # the index folder (codes.npy, index.json)
# queries
QUERY = ()                # image files to search with
ITEM = ()                 # images of the index (their path as index.json lists it) to search with
WORDS = ()                # words to search with (Eq. 2 prompts, Eq. 5-6 on the run's vocabulary, then He)
TOPK = 10                 # hits per query
OUT = ''                  # each search's results.json and contact sheets go to a new folder below it,
                          # <NNN>_<query>; '' -> INDEX/results
# search
SEARCH = 'exact'          # exact (every code, ties by index) | ivf | hnsw (faiss's approximate binary indexes)
IVF_LISTS = 0             # IVF: inverted lists; 0 -> 4 x sqrt(number of codes)
IVF_PROBE = 16            # IVF: lists visited per query
HNSW_M = 32               # HNSW: neighbours of a node in the graph
HNSW_EF = 64              # HNSW: candidates kept while searching
# the search page
SERVE = False             # serve a search page on HOST:PORT until interrupted
HOST = '127.0.0.1'        # the page's address (this machine only)
PORT = 8765               # its port
MAX_UPLOAD_MB = 20.0      # the largest image the page takes, in MB (a larger upload is refused before it is read)
# system
DEVICE = 'auto'           # auto | cpu | cuda
BATCH_SIZE = 64           # images per forward pass while indexing
THUMB = 96                # thumbnail size of the contact sheets and the page, pixels
_RANGES = dict(BITS='[1, 1024]', TOPK='[1, inf)', IVF_LISTS='[0, inf)', IVF_PROBE='[1, inf)', HNSW_M='[2, inf)',
               HNSW_EF='[1, inf)', PORT='[0, 65535]', BATCH_SIZE='[1, inf)', THUMB='[16, 1024]')


# -----------------------------------------------------------------------------
# search: Hamming distance, ties by index order (eval_hash's ranking), or faiss's approximate indexes
def approximate_index(codes, kind):
    """A faiss approximate binary index over `codes`: IVF (k-means lists, IVF_PROBE visited) or HNSW."""
    import faiss
    bits = codes.shape[1] * 8
    if kind == 'ivf':
        lists = IVF_LISTS or max(1, int(4 * np.sqrt(len(codes))))
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, min(lists, len(codes)))
        index.train(codes)
        index.nprobe = IVF_PROBE
    else:
        index = faiss.IndexBinaryHNSW(bits, HNSW_M)
        index.hnsw.efSearch = max(HNSW_EF, TOPK)
    index.add(codes)
    return index


def search(codes, queries, k, kind='exact'):
    """(distances, rows), each Q x min(k, N), of the k nearest codes to each packed query code: every
    code ranked by eval_hash's Hamming ranking (ties in index order), or an approximate index's hits."""
    if kind == 'exact':
        rows, d = eval_hash.hamming_rank_packed(np.asarray(queries, np.uint8), np.asarray(codes, np.uint8), k)
        return d.astype(np.int64), rows
    try:  # built once per set of codes and kind: the page's queries reuse it
        index = once(('index', kind, id(codes)),  # the entry holds `codes`, so its id stays theirs
                     lambda: (codes, approximate_index(np.ascontiguousarray(codes, dtype=np.uint8), kind)))[1]
    except ImportError:
        raise DataError(f"--search={kind} needs faiss: pip install faiss-cpu") from None
    d, i = index.search(np.ascontiguousarray(queries, dtype=np.uint8), min(k, len(codes)))
    for q in range(len(d)):  # the hits it found, in the exact search's order
        order = np.lexsort((i[q], d[q]))
        d[q], i[q] = d[q, order], i[q, order]
    return d.astype(np.int64), i.astype(np.int64)


# -----------------------------------------------------------------------------
# pictures: thumbnails and contact sheets
def thumbnail(entry, size, meta=None):
    """A size x size RGB thumbnail of an index entry (a file, or a dataset image), or a grey tile."""
    from PIL import Image
    try:
        img = entry_image(entry, meta or {})
        scale = size / max(img.size)  # down, or up for small images (CIFAR-10's 32 x 32)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    except Exception as e:  # noqa: BLE001 - a picture that cannot be shown is drawn grey, and said once
        why = f"{cache.shown(entry.get('path') or entry.get('name', '?'))} (" + (
            'it does not exist)' if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {str(e)[:120]})")
        once('grey', lambda: print(f"note: cannot draw {why}: drawn grey, as is any other image that cannot be read; "
                                   f"if the indexed images moved, index their new folder with --run and --images",
                                   flush=True))
        img = Image.new('RGB', (size, size), (128, 128, 128))
    tile = Image.new('RGB', (size, size), (255, 255, 255))
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


def _dataset_images(name, cache_dir):
    """The images dataset_extract.py read into `cache_dir` (checked against their fingerprint)."""
    return once(('images', name, cache_dir), lambda: dataset.extracted_images(cache_dir, name))


def contact_sheet(query, hits, meta, path):
    """The query (its picture, or its words), then each hit with its Hamming distance, in one PNG."""
    from PIL import Image, ImageDraw
    s, pad = THUMB, 18
    sheet = Image.new('RGB', ((len(hits) + 1) * (s + 4) + 4, s + pad + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if query.get('image'):
        sheet.paste(thumbnail(dict(path=query['image']), s), (4, 4))
    elif query.get('item') is not None:
        sheet.paste(thumbnail(meta['images'][query['item']], s, meta), (4, 4))
    else:
        draw.rectangle([4, 4, 4 + s, 4 + s], outline=(0, 0, 0))
        draw.multiline_text((8, 8), '\n'.join(textwrap.wrap(query['words'], max(4, s // 7))), fill=(0, 0, 0))
    draw.text((4, s + 8), 'query', fill=(0, 0, 160))
    for j, h in enumerate(hits):
        x = 4 + (j + 1) * (s + 4)
        sheet.paste(thumbnail(meta['images'][h['row']], s, meta), (x, 4))
        draw.text((x, s + 8), f"{j + 1}: d={h['distance']}", fill=(0, 0, 0))
    atomic_write(path, lambda f: sheet.save(f, format='PNG'))
    return path


# -----------------------------------------------------------------------------
# queries
def query_codes(meta, codes, device):
    """[(query description, code)] of QUERY images, ITEM entries and WORDS."""
    out = []
    if QUERY or WORDS:
        cfg, hv, he, run_sha = load_run(meta['identity']['run'], meta['bits'])
        ident = run_identity(meta['identity']['run'], meta['bits'], run_sha, cfg)
        if ident != meta['identity']:
            raise DataError(f"the run {ident['run']} changed since the index was made (its heads.pt differs): query "
                            f"codes would not match the index's; index again with --run and --images")
        if QUERY:
            q, bad, done = encode_files([os.path.expanduser(p) for p in QUERY], cfg, hv, device, BATCH_SIZE)
            if done < len(QUERY):
                raise KeyboardInterrupt
            if bad:
                raise DataError(f"cannot read the query image {bad[0][0]} ({bad[0][1]})")
            out += [(dict(image=os.path.abspath(os.path.expanduser(p))), c) for p, c in zip(QUERY, q)]
        if WORDS:
            out += [(dict(words=w), c) for w, c in zip(WORDS, word_codes(WORDS, cfg, he, device))]
    names = {e['name']: i for i, e in enumerate(meta['images'])}
    for item in ITEM:
        if item not in names:
            raise DataError(f"--item={item!r} is not in the index {INDEX} (index.json lists its {len(names)} images)")
        out.append((dict(item=names[item], name=item), codes[names[item]]))
    return out


def query_folder(root, first):
    """A new folder under `root` for one command line's queries, so no search replaces another's results:
    <root>/<NNN>_<its first query, in safe letters>, NNN one more than the folders there before."""
    os.makedirs(root, exist_ok=True)
    slug = re.sub(r'[^A-Za-z0-9._-]+', '-', first).strip('-.')[:40] or 'query'
    taken = [int(d.split('_', 1)[0]) for d in os.listdir(root) if d.split('_', 1)[0].isdigit()]
    n = max(taken, default=0) + 1
    while True:
        path = os.path.join(root, f'{n:03d}_{slug}')
        try:
            os.mkdir(path)  # taken at once: two searches at a time get two folders
            return path
        except FileExistsError:
            n += 1


def answer(meta, codes, queries, k, kind):
    """results: [{query, hits: [{rank, name, distance, row}]}] for [(query, code)]. A query that is an
    image of the index (--item, or a --query file at an indexed path) finds itself first: it ranks
    before the other codes at distance 0, which follow in index order."""
    if not queries:
        return []
    d, rows = search(codes, np.stack([c for _, c in queries]), k, kind)
    by_path = {e.get('path'): i for i, e in enumerate(meta['images'])}
    out = []
    for j, (q, code) in enumerate(queries):
        hits = list(zip(d[j].tolist(), rows[j].tolist()))
        me = q['item'] if q.get('item') is not None else by_path.get(q.get('image'))
        if me is not None and not np.unpackbits(code ^ codes[me]).any():  # itself, at distance 0
            hits = [(0, me)] + [h for h in hits if h[1] != me][:len(hits) - 1]
        out.append(dict(query=q, hits=[dict(rank=r + 1, name=meta['images'][i]['name'], distance=int(dist), row=int(i))
                                       for r, (dist, i) in enumerate(hits)]))
    return out


# -----------------------------------------------------------------------------
# the search page: words, an upload (form or drag and drop) or a click on a hit; the query shown back
# with its code and the nouns that made it; the hits with distances, links, downloads (this machine only)
_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>duheg search: {run}</title><style>
body{{font-family:sans-serif;margin:1em}} h1{{font-size:1.3em;margin:.2em 0}}
#warning{{background:#fff3cd;border:1px solid #d9a400;padding:.3em .6em;max-width:60em}}
form{{display:inline-block;margin:.3em 1em .3em 0}} #drop{{color:#666;font-size:.9em}}
body.dragging{{outline:3px dashed #48c;outline-offset:-8px}}
#error{{color:#b00;font-weight:bold}} .query{{display:flex;gap:1em;align-items:flex-start;margin:.8em 0}}
.query img{{width:128px;height:128px;object-fit:contain;border:1px solid #999}}
code{{font-size:.85em;word-break:break-all}}
table.nouns td{{padding:0 .6em 0 0}} .legend,.time{{color:#444;font-size:.9em}}
#hits{{display:flex;flex-wrap:wrap;gap:8px}} .hit{{text-align:center;font-size:12px;width:{w}px}}
.hit .name{{overflow-wrap:anywhere}}
.hit img{{border:3px solid transparent}} .hit.right img{{border-color:#2a2}} .hit.wrong img{{border-color:#d22}}
.hit a{{text-decoration:none;color:inherit}} .full{{font-size:11px}}
</style></head><body><h1>Search {count} images <small>({bits}-bit codes of {run})</small></h1>{warning}
<form action="/search" method="get"><input name="words" id="words" size="30" placeholder="words" value="{words}">
{k_select}<button id="go">search</button></form>
<form action="/search" method="post" enctype="multipart/form-data" id="upload-form">
<input type="file" name="image" id="image" accept="image/*"><input type="hidden" name="k" value="{k}">
<button id="upload">search with this image</button></form>
<span id="drop">or drop an image anywhere on the page</span>
<div id="results">{results}</div>
<script>
document.addEventListener('dragover', e => {{ e.preventDefault(); document.body.classList.add('dragging'); }});
document.addEventListener('dragleave', e => document.body.classList.remove('dragging'));
document.addEventListener('drop', e => {{
  e.preventDefault(); document.body.classList.remove('dragging');
  const f = e.dataTransfer.files[0]; if (!f) return;
  const data = new FormData(); data.append('image', f, f.name); data.append('k', '{k}');
  fetch('/search', {{method: 'POST', body: data}}).then(r => r.text()).then(html => {{
    document.open(); document.write(html); document.close(); }});
}});
</script></body></html>"""
_K_CHOICES = (6, 10, 20, 50, 100)  # the page's choices of the number of hits
_LEGEND = ('d = Hamming distance: in how many of the {bits} bits a hit\'s code differs from the query\'s '
           '(0: the same code); ties in index order')


def top_nouns(x, cfg, n=5):
    """The n words of the run's vocabulary whose weights s_{i,w} (Eq. 6) in the external feature of the
    CLIP feature x (an image's or words') are the largest, with those weights."""
    t, words = run_vocabulary(cfg)
    s = external.noun_weights(np.asarray(x, np.float32)[None], t, cfg['TAU1'])[0][0].numpy()
    best = np.argsort(-s, kind='stable')[:n]
    return [(words[w], float(s[w])) for w in best]


@torch.no_grad()
def clip_image_feature(img, x, cfg, device):
    """The run's CLIP image feature of a PIL image (the space of its vocabulary): its backbone feature x
    when the backbone is that CLIP (the same view), else CLIP's own forward."""
    if (cfg['BACKBONE'], cfg['BACKBONE_PRETRAINED']) == (cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED']):
        return x
    encode, preprocess, _ = once(('backbone', cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'], device),
                                 lambda: models.load_backbone(cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'], device,
                                                              flags=None))
    return encode(preprocess(img)[None].to(device)).float().cpu().numpy()[0]


def entry_image(entry, meta):
    """The full image of an index entry (a file, or a dataset image), RGB."""
    from PIL import Image
    if 'path' in entry:
        with Image.open(entry['path']) as im:
            return dataset.to_rgb(im)
    return _dataset_images(entry['dataset'], meta.get('dataset_cache', nouns_embed.CACHE_DIR)).load(entry['row'])


def cached_thumbnail(entry, meta, index, size):
    """JPEG bytes of an entry's thumbnail, made once and kept beside the index (thumbs/, keyed by the
    entry's name, size on disk, modification time and the thumbnail size)."""
    import hashlib
    key = hashlib.sha1(json.dumps([entry.get('name'), entry.get('stat'), entry.get('row'), size]).encode())
    path = os.path.join(index, 'thumbs', key.hexdigest()[:20] + '.jpg')
    if not os.path.exists(path):
        buf = io.BytesIO()
        thumbnail(entry, size, meta).save(buf, format='JPEG', quality=85)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    with open(path, 'rb') as f:
        return f.read()


def random_weights_warning(cfg):
    """The page's warning for a run trained on random weights (a test run, as the quick start's), else ''."""
    random = [f'--{k.lower()}=random' for k in ('BACKBONE_PRETRAINED', 'CLIP_PRETRAINED')
              if k in cfg and models.pretrained_tag(cfg[k]) == 'random']
    return (f"This run was trained on random weights ({', '.join(random)}): a test run. Its codes, nouns and word "
            f"searches mean nothing about what the images show; index a run trained on real weights to search by "
            f"meaning.") if random else ''


def dataset_labels(meta):
    """Labels of an index made from a dataset (--images=dataset:<name>), to frame hits as Figure 6 does."""
    names = {e.get('dataset') for e in meta['images']}
    if len(names) != 1 or None in names:
        return None
    name = names.pop()
    path = cache.split_paths(meta.get('dataset_cache', nouns_embed.CACHE_DIR), name, '')['labels']
    return once(('labels', path), lambda: cache.load_array(path, producer='dataset_extract.py'))


class SearchPage:
    """What the page answers with: the index, the run's heads, the uploads and the recent answers."""

    def __init__(self, meta, codes, device, index):
        import tempfile
        self.meta, self.codes, self.device, self.index = meta, codes, device, index
        self.cfg, self.hv, self.he, _ = load_run(meta['identity']['run'], meta['bits'])
        self.uploads = tempfile.mkdtemp(prefix='duheg-search-')
        self.answers = {}  # id -> (results.json of the query, its query description); the last 100
        self.labels = dataset_labels(meta)  # a dataset index's labels (Figure 6's frames), else None
        self.warning = random_weights_warning(self.cfg)

    def ask(self, query, code, k, nouns, picture=None):
        """Search with one code; the answer is kept under a new id for its downloads (`picture`: the
        uploaded image's file, drawn first on the contact sheet)."""
        t0 = time.perf_counter()
        hits = answer(self.meta, self.codes, [(query, code)], k, SEARCH)[0]['hits']
        ms = (time.perf_counter() - t0) * 1e3
        qid = f'{len(self.answers) + 1}-{time.time_ns() % 10**6}'
        self.answers[qid] = dict(index=os.path.abspath(self.index), search=SEARCH, topk=k, seconds=ms / 1e3,
                                 results=[dict(query=query, code=code_text(code, self.meta['bits'])[0], nouns=nouns,
                                               hits=hits)], picture=picture)
        while len(self.answers) > 100:
            self.answers.pop(next(iter(self.answers)))
        return qid, hits, ms

    def words_query(self, words, k):
        """The results of words: their code by Eq. 2, Eq. 5-6 and He, and the nouns that made it."""
        t = text_features([words], self.cfg, self.device)
        code, nouns = text_codes(t, self.cfg, self.he)[0], top_nouns(t[0], self.cfg)
        qid, hits, ms = self.ask(dict(words=words), code, k, nouns)
        return self.results_html(qid, dict(words=words), code, hits, ms, nouns, 'the nouns that made its feature',
                                 None)

    def image_query(self, query, img, k, preview, picture=None):
        """The results of an image: its code by Hv, and its nearest nouns (none without He)."""
        x = encode_images([img], self.cfg, self.device)
        code = hash_features(x, self.hv, self.cfg)[0]
        nouns = top_nouns(clip_image_feature(img, x[0], self.cfg, self.device), self.cfg) if self.he is not None else []
        qid, hits, ms = self.ask(query, code, k, nouns, picture)
        return self.results_html(qid, query, code, hits, ms, nouns, 'its five nearest nouns (Eq. 5-6)', preview)

    def results_html(self, qid, query, code, hits, ms, nouns, nouns_what, preview):
        bits = self.meta['bits']
        hex_code, bit_code = code_text(code, bits)
        labels = self.labels
        q_row = self.meta['images'][query['item']].get('row') if query.get('item') is not None else None
        frames = labels is not None and q_row is not None
        tiles = []
        for h in hits:
            frame = ''
            if frames:  # Figure 6: a hit sharing a label with the query is framed green, else red
                e = self.meta['images'][h['row']]
                frame = ' right' if (labels[e['row']] @ labels[q_row]) > 0 else ' wrong'
            tiles.append(f'<div class="hit{frame}"><a href="/search?item={h["row"]}&k={len(hits)}" title="more like '
                         f'this"><img loading="lazy" src="/thumb/{h["row"]}" width="{THUMB}" height="{THUMB}"><br>'
                         f'<span class="name">{html.escape(cache.shown(h["name"]))}</span></a><br>d=<span '
                         f'class="distance">{h["distance"]}</span> <a class="full" href="/image/{h["row"]}" '
                         f'target="_blank">full image</a></div>')
        rows = ''.join(f'<tr><td class="noun">{html.escape(cache.shown(w).replace("_", " "))}</td>'
                       f'<td class="weight">{s:.3f}</td></tr>' for w, s in nouns)
        nouns_html = (f'<div><b>{nouns_what}</b><table class="nouns">{rows}</table></div>' if nouns else '')
        shown = (f'<img id="preview" src="{preview}" alt="the query">' if preview else '')
        framed = '; frames: green shares a label with the query, red does not (Figure 6)' if frames else ''
        return (f'<div class="query">{shown}<div><p>query: <b id="query">{html.escape(query_name(query, self.meta))}'
                f'</b></p><p>its code: <code id="code-hex">{hex_code}</code><br><code id="code-bits">{bit_code}</code>'
                f'</p><p class="time" id="time">searched {len(self.codes)} codes in {ms:.1f} ms ({SEARCH})</p>'
                f'<p><a id="json" href="/results/{qid}.json" download="results.json">results.json</a> · '
                f'<a id="sheet" href="/results/{qid}.png" download="contact_sheet.png">contact sheet</a></p></div>'
                f'{nouns_html}</div><p class="legend" id="legend">{_LEGEND.format(bits=bits)}'
                f'{framed}</p><div id="hits">' + ''.join(tiles) + '</div>')


    def item(self, text, where):
        """The index row an address names (item=<i>, /thumb/<i>, /image/<i>), checked: 0 .. count - 1."""
        n = len(self.codes)
        if not (text.isdigit() and int(text) < n):
            raise DataError(f"{where} names no image of this index: its {n} images are numbered 0 to {n - 1}; click a "
                            f"hit, or search with words or an image")
        return int(text)

    def download(self, path):
        """(bytes, content type) of a picture or download the page links to: /thumb/<row>, /image/<row>,
        /query/<upload>, /results/<id>.json or .png; None for an answer no longer kept."""
        name = os.path.basename(path)
        if path.startswith('/thumb/'):
            entry = self.meta['images'][self.item(name, path)]
            return cached_thumbnail(entry, self.meta, self.index, THUMB), 'image/jpeg'
        if path.startswith('/image/'):
            buf = io.BytesIO()
            entry_image(self.meta['images'][self.item(name, path)], self.meta).save(buf, format='PNG')
            return buf.getvalue(), 'image/png'
        if path.startswith('/query/'):
            with open(os.path.join(self.uploads, name), 'rb') as f:
                return f.read(), 'image/jpeg'
        qid, ext = os.path.splitext(name)  # /results/<id>.json or .png
        if qid not in self.answers:
            return None
        res = self.answers[qid]
        if ext == '.json':
            out = {key: v for key, v in res.items() if key != 'picture'}
            return (json.dumps(out, indent=1) + '\n').encode(), 'application/json'
        r = res['results'][0]
        drawn = dict(image=res['picture']) if res['picture'] else r['query']
        with open(contact_sheet(drawn, r['hits'], self.meta, os.path.join(self.uploads, f'{qid}.png')), 'rb') as f:
            return f.read(), 'image/png'


def form_parts(content_type, body):
    """{name: part} of a multipart/form-data POST body (the page's upload form)."""
    head = b'Content-Type: ' + (content_type or '').encode() + b'\r\n\r\n'
    msg = BytesParser(policy=policy.default).parsebytes(head + body)
    parts = msg.iter_parts() if msg.is_multipart() else []
    return {p.get_param('name', header='content-disposition'): p for p in parts}


def code_text(code, bits):
    """A packed code as hex and as bits in groups of eight."""
    b = ''.join(np.unpackbits(np.asarray(code, np.uint8))[:bits].astype(str))
    return np.asarray(code, np.uint8).tobytes().hex(), ' '.join(b[i:i + 8] for i in range(0, bits, 8))


def query_name(query, meta):
    name = query.get('words') or query.get('name') or os.path.basename(query.get('image', ''))
    return cache.shown(name or 'image')


class Handler(BaseHTTPRequestHandler):
    """The page's routes: /, /search (words, an item, an upload), /thumb/<row>, /image/<row>,
    /query/<upload>, /results/<id>.json and .png. `site` is the SearchPage it answers from."""
    site = None

    def log_message(self, *a):
        pass

    def send(self, body, kind='text/html; charset=utf-8', code=200):
        self.send_response(code)
        self.send_header('Content-Type', kind)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def show(self, results='', words='', k=None, code=200):
        site, k = self.site, k or TOPK  # (TOPK as the command line set it)
        options = ''.join(f'<option value="{n}"{" selected" if n == k else ""}>{n} hits</option>'
                          for n in sorted(set(_K_CHOICES) | {k}))
        run = os.path.basename(os.path.normpath(site.meta['identity']['run']))
        warning = f'<p id="warning">{html.escape(site.warning)}</p>' if site.warning else ''
        self.send(_PAGE.format(count=len(site.codes), bits=site.meta['bits'], run=html.escape(run), k=k, w=THUMB + 16,
                               words=html.escape(words), k_select=f'<select name="k" id="k">{options}</select>',
                               warning=warning, results=results).encode(), code=code)

    def error(self, message, k=None, code=200):  # one line, never a temporary path
        message = message.replace(self.site.uploads + os.sep, '').replace(self.site.uploads, 'the uploads')
        self.show(f'<p id="error">{html.escape(message)}</p>', k=k, code=code)

    def local(self):  # the Host header must name this machine, else a page elsewhere could reach us
        host_name = (self.headers.get('Host') or '').rsplit(':', 1)[0].strip('[]').lower()
        if host_name in ('127.0.0.1', 'localhost', '::1'):
            return True
        self.send(f"refused: this page answers requests to this machine only, not to "
                  f"{html.escape(self.headers.get('Host') or 'no host')}".encode(), 'text/plain; charset=utf-8', 403)
        return False

    def file(self, path, k):
        """The pictures and downloads the page links to."""
        got = self.site.download(path)
        return self.send(*got) if got else self.error('that result is no longer kept: search again', k, 404)

    def do_GET(self):
        if not self.local():
            return
        url = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(url.query)
        try:
            k = self.hits_wanted(q.get('k', [str(TOPK)])[0])
            if url.path.startswith(('/thumb/', '/image/', '/query/', '/results/')):
                return self.file(url.path, k)
            if url.path == '/search' and 'item' in q:  # a click on a hit: more like it
                row = self.site.item(q['item'][0].strip(), f"item={q['item'][0]}")
                entry = self.site.meta['images'][row]
                return self.show(self.site.image_query(dict(item=row, name=entry['name']),
                                                       entry_image(entry, self.site.meta), k, f'/thumb/{row}'), k=k)
            words = q.get('words', [''])[0].strip()
            if url.path == '/search' and words:
                return self.show(self.site.words_query(words, k), words, k)
            if url.path == '/search':  # an empty or blank query
                return self.error('type some words to search with first', k)
            return self.show(k=k)
        except Exception as e:  # noqa: BLE001 - one line in the page, the server goes on
            return self.failed(e)

    def do_POST(self):
        if not self.local():
            return
        size = int(self.headers.get('Content-Length') or 0)
        if size > MAX_UPLOAD_MB * 2**20:  # refused before it is read
            self.close_connection = True
            return self.error(f'the upload is {size / 2**20:.1f} MB, more than this page takes: choose a smaller '
                              f'image, or start the page with a larger search.py --max_upload_mb (now '
                              f'{MAX_UPLOAD_MB:g})', code=413)
        try:
            parts = form_parts(self.headers['Content-Type'], self.rfile.read(size))
            k = self.hits_wanted(parts['k'].get_content()) if 'k' in parts else TOPK
            part = parts.get('image')
            data = part.get_payload(decode=True) if part is not None else None
            if not data:
                return self.error('choose an image file first', k)
            name = os.path.basename(part.get_filename() or 'upload')
            from PIL import Image
            try:
                with Image.open(io.BytesIO(data)) as im:
                    img = dataset.to_rgb(im)
            except Exception:  # noqa: BLE001 - whatever PIL cannot read is not an image here
                return self.error(f'{name} is not an image this page can read: choose a JPEG, PNG, GIF, WebP, ... '
                                  f'file', k)
            saved = os.path.join(self.site.uploads, f'{time.time_ns()}.jpg')
            img.save(saved, format='JPEG', quality=90)  # the preview, and the contact sheet's first picture
            return self.show(self.site.image_query(dict(upload=name, name=name), img, k,
                                                   f'/query/{os.path.basename(saved)}', saved), k=k)
        except Exception as e:  # noqa: BLE001 - one line in the page, the server goes on
            return self.failed(e)

    def hits_wanted(self, text):
        """The number of hits k an address or the form asks for, within 1 .. the index's size."""
        if not text.strip().isdigit():
            raise DataError(f"k={text.strip()!r} is not a number of hits: give a whole number, e.g. k={TOPK}")
        return max(1, min(int(text), len(self.site.codes)))

    def failed(self, e):
        """One sentence in the page that says what to do; a trace on the console when it is ours to mend."""
        if isinstance(e, (DataError, CacheError, models.WeightsUnavailable)):  # sentences written for the user
            return self.error(str(e).split('\n')[0][:400])
        if isinstance(e, OSError) and e.filename:  # an indexed image moved or went since the index was made
            return self.error(f"cannot read {e.filename} ({e.strerror}): it moved or went since the index was made; "
                              f"index the images again (search.py --run ... --images ...) or put it back")
        traceback.print_exc()
        return self.error(f"the search failed ({type(e).__name__}: {str(e)[:120]}); the server's console shows where: "
                          f"try another query, and report it if it happens again")


def serve(meta, codes, device, host, port, index):
    """The search page on host:port until interrupted (Handler). Requests whose Host header names
    another machine are refused (DNS rebinding), uploads are bounded (MAX_UPLOAD_MB) and must be images."""
    from http.server import ThreadingHTTPServer
    site = Handler.site = SearchPage(meta, codes, device, index)
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        shutil.rmtree(site.uploads, ignore_errors=True)
        if e.errno == errno.EADDRINUSE:
            raise SystemExit(f"error: port {port} on {host} is in use (another search.py?): give another --port")
        raise
    print(f"serve http://{host}:{server.server_address[1]}/ ({len(codes)} images); Ctrl-C stops it", flush=True)

    def stop(signum, frame):  # a terminated server cleans up as an interrupted one
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        shutil.rmtree(site.uploads, ignore_errors=True)  # the uploaded images go with the server


# -----------------------------------------------------------------------------
def main():
    configure(globals())
    check_ranges(globals(), _RANGES)
    check_choice('search', SEARCH, ('exact', 'ivf', 'hnsw'))
    if HOST not in ('127.0.0.1', 'localhost', '::1'):
        raise SystemExit(f"error: --host={HOST!r}: the page serves this machine only (127.0.0.1, localhost, ::1)")
    if any(not w.strip() for w in WORDS):
        raise SystemExit("error: --words holds an empty query: give the words to search with, e.g. --words='a red car'")
    if RUN and not IMAGES:
        raise SystemExit("error: --run is read only to build an index (with --images); a search uses the run the "
                         "index was built with: leave --run out, or give --images to index with it")
    if not (IMAGES or SERVE or QUERY or ITEM or WORDS):
        raise SystemExit("error: nothing to do: give --query, --item or --words to search, --serve for the page, or "
                         "--run and --images to build an index")
    device = models.resolve_device(DEVICE)
    t0 = time.time()
    if IMAGES:
        if not RUN:
            raise SystemExit("error: --images needs --run (the train.py run whose codes index them)")
        meta, codes = update_index(INDEX, IMAGES, RUN, BITS, device, BATCH_SIZE)
    else:
        meta, codes = read_index(INDEX)
        if meta is None:
            raise SystemExit(f"error: no index in {INDEX}: build one with --run=<train.py run> --images=<folder>")
    if len(codes) == 0 and (SERVE or QUERY or ITEM or WORDS):
        raise SystemExit(f"error: the index {INDEX} holds no images ({len(meta.get('skipped', []))} unreadable were "
                         f"skipped): index a folder of readable images with --run and --images")
    if SERVE:
        return serve(meta, codes, device, HOST, PORT, INDEX)
    results = answer(meta, codes, query_codes(meta, codes, device), TOPK, SEARCH)
    if results:
        out = query_folder(OUT or os.path.join(INDEX, 'results'), query_name(results[0]['query'], meta))
        for j, r in enumerate(results):
            r['sheet'] = contact_sheet(r['query'], r['hits'], meta, os.path.join(out, f'query{j}.png'))
            for h in r['hits']:
                print(f"hit query={j} rank={h['rank']} distance={h['distance']} name={cache.shown(h['name'])}")
        save_json(os.path.join(out, 'results.json'), dict(index=os.path.abspath(INDEX), search=SEARCH, topk=TOPK,
                                                          results=results))
        print(f"wrote {out}/results.json and {len(results)} contact sheet(s) (query0.png, ...)")
    print(f"search index={INDEX} images={len(codes)} bits={meta['bits']} skipped={len(meta.get('skipped', []))} "
          f"queries={len(results)} topk={TOPK} method={SEARCH} seconds={time.time() - t0:.1f}")


if __name__ == '__main__':
    try:
        main()
    except (DataError, CacheError, models.WeightsUnavailable, OSError, ValueError) as e:
        raise SystemExit(cache.user_error(e, dict(index=INDEX, out=OUT)))
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted (Ctrl-C): run the same command again")
