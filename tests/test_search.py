"""search.py: index a folder with a trained run, query by image, item and words, update the index,
approximate search, bad input, and the search page driven in headless Chromium."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import dataset
from conftest import ROOT, run_script, write_feature_set

TINY = ['--clip_model=tiny-test', '--clip_pretrained=random']
MODEL = ['--backbone=tiny-test', '--backbone_pretrained=random', *TINY]


def search(*args, check=True):
    return run_script('search.py', *args, check=check)


def written(proc):
    """The folder a command-line search wrote its results.json and contact sheets to, as it printed."""
    return re.search(r'^wrote (.+)/results\.json and', proc.stdout, re.M).group(1)


def test_indexed_image_finds_itself_first_and_codes_equal_train_py(run, image_folder, tmp_path):
    tmp, cache, rundir = run
    index = str(tmp_path / 'index')
    proc = search(f'--run={rundir}', '--bits=64', f'--images={image_folder}', f'--index={index}',
                  f'--query={image_folder}/class03/007.png', '--item=class05/011.png', '--topk=5')
    out, folder = proc.stdout, written(proc)
    assert folder == os.path.join(index, 'results', '001_007.png')  # a folder of its own, named after the query
    res = json.load(open(os.path.join(folder, 'results.json')))['results']
    assert res[0]['hits'][0] == dict(rank=1, name='class03/007.png', distance=0, row=res[0]['hits'][0]['row'])
    assert res[1]['hits'][0]['name'] == 'class05/011.png' and res[1]['hits'][0]['distance'] == 0
    assert [h['distance'] for h in res[0]['hits']] == sorted(h['distance'] for h in res[0]['hits'])
    assert out.strip().splitlines()[-1].startswith(f'search index={index} images=400 bits=64 skipped=0 queries=2')
    png = os.path.join(folder, 'query0.png')
    from PIL import Image
    assert Image.open(png).size == (6 * (96 + 4) + 4, 96 + 26)  # the query and its five hits
    first = open(os.path.join(folder, 'results.json')).read()
    again = search(f'--index={index}', '--item=class01/002.png', '--topk=3')  # a second search keeps the first's
    assert written(again) == os.path.join(index, 'results', '002_class01-002.png')
    assert open(os.path.join(folder, 'results.json')).read() == first and os.path.exists(png)
    assert json.load(open(os.path.join(written(again), 'results.json')))['results'][0]['hits'][0]['distance'] == 0
    # the index's codes are the codes train.py saved for the same images (its retrieval set)
    z = np.load(os.path.join(rundir, '64bits', 'codes.npz'))
    names = dataset.read_lines(os.path.join(cache, 'folder', 'names.txt'))
    meta = json.load(open(os.path.join(index, 'index.json')))
    codes = np.load(os.path.join(index, 'codes.npy'))
    row = {e['name']: i for i, e in enumerate(meta['images'])}
    ours = codes[[row[names[i]] for i in z['retrieval_index']]]
    assert codes.shape == (400, 8) and np.array_equal(ours, np.packbits(z['retrieval_h'] >= 0, axis=1))
    # and indexing the retrieval set from the cached features gives them too
    idx2 = str(tmp_path / 'index2')
    search(f'--run={rundir}', '--bits=64', '--images=dataset:folder', f'--index={idx2}')
    assert np.array_equal(np.load(os.path.join(idx2, 'codes.npy')), np.packbits(z['retrieval_h'] >= 0, axis=1))


def test_adding_and_removing_images_equals_a_full_rebuild(run, image_folder, tmp_path):
    tmp, cache, rundir = run
    part = tmp_path / 'photos'
    for c in range(5):  # first half the classes, nested one level deeper
        shutil.copytree(os.path.join(image_folder, f'class{c:02d}'), part / 'a' / f'class{c:02d}')
    index = str(tmp_path / 'index')
    out = search(f'--run={rundir}', '--bits=16', f'--images={part}', f'--index={index}').stdout
    assert '200 images encoded, 0 kept from before' in out
    for c in range(5, 10):
        shutil.copytree(os.path.join(image_folder, f'class{c:02d}'), part / 'b' / f'class{c:02d}')
    os.remove(part / 'a' / 'class00' / '000.png')
    out = search(f'--run={rundir}', '--bits=16', f'--images={part}', f'--index={index}').stdout
    assert '200 images encoded, 199 kept from before, 1 dropped' in out
    full = str(tmp_path / 'full')
    search(f'--run={rundir}', '--bits=16', f'--images={part}', f'--index={full}')
    a, b = (json.load(open(os.path.join(i, 'index.json'))) for i in (index, full))
    assert [e['name'] for e in a['images']] == [e['name'] for e in b['images']] and len(a['images']) == 399
    assert np.array_equal(np.load(os.path.join(index, 'codes.npy')), np.load(os.path.join(full, 'codes.npy')))


def test_word_query_retrieves_its_class(tmp_path):
    """Nothing mocked: words go through the tiny CLIP's text tower with Eq. 2's prompts, Eq. 5-6 over
    the run's vocabulary (its training images, EXTERNAL imgk) and He. The generated images sit at
    their class names' text features (plus noise), so a class's name retrieves that class far above
    chance (1/8), and different words give different codes."""
    import cache as cache_files
    import models
    import nouns_embed
    from conftest import CLASS_NAMES, feature_settings
    cache = str(tmp_path / 'cache')
    labels, (query, retrieval, train) = write_feature_set(cache, dim=32)
    model, _, tok = models.load_clip('tiny-test', 'random')
    names = list(CLASS_NAMES[:8])
    text = nouns_embed.embed_words(names, model, tok)                         # unit rows, 32-d
    gap = min(np.linalg.norm(text[i] - text[j]) for i in range(8) for j in range(i))
    rng = np.random.default_rng(0)
    x = text[labels.argmax(1)] + 0.3 * gap * rng.normal(0, 1, (len(labels), 32)) / np.sqrt(32)
    cache_files.save_array(os.path.join(cache, 'folder', 'tiny-test-random', 'images.npy'), x.astype(np.float32),
                           feature_settings(), 'test')
    run_script('train.py', '--dataset=folder', *MODEL, '--external=imgk', '--aug=false', '--bits=32', '--epochs=30',
               '--warmup=3', '--batch_size=120', f'--cache_dir={cache}', f'--run_dir={tmp_path}/run',
               f'--results={tmp_path}/r.jsonl')
    index = str(tmp_path / 'index')
    search(f'--run={tmp_path}/run', '--bits=32', '--images=dataset:folder', f'--index={index}')
    proc = search(f'--index={index}', f'--words={",".join(names + names[:1])}', '--topk=20')
    assert 'queries=9' in proc.stdout.strip().splitlines()[-1]
    res = json.load(open(os.path.join(written(proc), 'results.json')))['results']
    y = labels[retrieval].argmax(1)
    precision = np.mean([np.mean(y[[h['row'] for h in r['hits']]] == c) for c, r in enumerate(res[:8])])
    assert precision > 0.6, precision  # chance: 0.125
    import search_index
    cfg = dict(CLIP_MODEL='tiny-test', CLIP_PRETRAINED='random', RELEASED=False)
    words = search_index.text_features(names, cfg, 'cpu')
    np.testing.assert_allclose(words, text, atol=1e-6)  # the words' own Eq. 2 features
    hits = [tuple(h['row'] for h in r['hits']) for r in res]
    assert hits[8] == hits[0]  # the same words, the same code and hits
    assert len(set(hits[:8])) == 8  # different words, different hits


def test_approximate_search_finds_the_exact_hits(run, image_folder, tmp_path):
    tmp, cache, rundir = run
    index = str(tmp_path / 'index')
    search(f'--run={rundir}', '--bits=64', f'--images={image_folder}', f'--index={index}')
    import search as s
    import search_index
    meta, codes = search_index.read_index(index)
    q = codes[::7]
    d_exact, _ = s.search(codes, q, 10, 'exact')
    for kind in ('ivf', 'hnsw'):
        d, rows = s.search(codes, q, 10, kind)
        assert np.mean(d <= d_exact[:, -1:]) >= 0.9, kind  # hits no farther than the exact 10th (tie-aware)


@pytest.mark.parametrize('bits_per_code', [16, 72])
@pytest.mark.usefixtures('kernel')
def test_exact_search_ties_by_index_against_brute_force(bits_per_code):
    """The exact search (eval_hash's ranking of the packed codes) against a brute force written here,
    on codes with hundreds of ties, one word and two words long."""
    import search as s
    rng = np.random.default_rng(0)
    codes = np.packbits(rng.random((3000, bits_per_code)) < 0.5, axis=1)
    codes[100:400] = codes[7]                                   # many ties
    q = np.concatenate([codes[[7, 5, 2999]], np.packbits(rng.random((20, bits_per_code)) < 0.5, axis=1)])
    bits = np.unpackbits(codes, axis=1).astype(int)
    for k in (1, 10, 64):
        d, rows = s.search(codes, q, k, 'exact')
        for j in range(len(q)):
            dist = np.abs(bits - np.unpackbits(q[j]).astype(int)).sum(1)
            want = np.lexsort((np.arange(len(codes)), dist))[:k]     # by distance, then by index
            assert rows[j].tolist() == want.tolist() and d[j].tolist() == dist[want].tolist()
    import faiss  # and faiss's own exact binary search finds the same distances at every rank
    flat = faiss.IndexBinaryFlat(8 * codes.shape[1])
    flat.add(codes)
    assert np.array_equal(flat.search(q, 64)[0], s.search(codes, q, 64, 'exact')[0])


def test_bad_input(run, image_folder, tmp_path):
    tmp, cache, rundir = run
    photos = tmp_path / 'photos'
    shutil.copytree(os.path.join(image_folder, 'class01'), photos / 'class01')
    (photos / 'class01' / 'broken.png').write_bytes(b'not an image')
    index = str(tmp_path / 'index')
    out = search(f'--run={rundir}', '--bits=16', f'--images={photos}', f'--index={index}').stdout
    assert '1 unreadable skipped' in out and 'broken.png' in out
    meta = json.load(open(os.path.join(index, 'index.json')))
    assert len(meta['images']) == 40 and [os.path.basename(x['path']) for x in meta['skipped']] == ['broken.png']
    proc = search(f'--run={rundir}', '--bits=64', f'--images={photos}', f'--index={index}', check=False)
    assert proc.returncode == 1 and 'holds codes of another run or code length (bits: 16 -> 64' in proc.stderr
    assert 'Traceback' not in proc.stderr
    proc = search(f'--index={index}', f'--query={photos}/class01/broken.png', check=False)
    assert proc.returncode == 1 and 'cannot read the query image' in proc.stderr
    # a baseline without He refuses words; an untrained one cannot index
    run_script('train.py', '--dataset=folder', *MODEL, '--method=ssdh', '--bits=16', '--epochs=1', '--warmup=0',
               f'--cache_dir={cache}', f'--run_dir={tmp_path}/ssdh', f'--results={tmp_path}/r.jsonl')
    search(f'--run={tmp_path}/ssdh', '--bits=16', f'--images={photos}', f'--index={tmp_path}/ssdh_index')
    proc = search(f'--index={tmp_path}/ssdh_index', '--words=cat', check=False)
    assert proc.returncode == 1 and 'has no He' in proc.stderr
    run_script('train.py', '--dataset=folder', *MODEL, '--method=lsh', '--bits=16', f'--cache_dir={cache}',
               f'--run_dir={tmp_path}/lsh', f'--results={tmp_path}/r.jsonl')
    proc = search(f'--run={tmp_path}/lsh', '--bits=16', f'--images={photos}', f'--index={tmp_path}/x', check=False)
    assert proc.returncode == 1 and 'holds no trained Hv' in proc.stderr
    proc = search(f'--index={tmp_path}/none', '--words=cat', check=False)
    assert proc.returncode == 1 and 'no index in' in proc.stderr


def test_search_refuses_what_it_cannot_answer_with_one_line(run, image_folder, tmp_path):
    import socket
    tmp, cache, rundir = run

    def error(*args):
        proc = search(*args, check=False)
        assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]
    os.makedirs(tmp_path / 'empty' / 'sub')
    index = str(tmp_path / 'index')
    assert error(f'--run={rundir}', '--bits=16', f'--images={tmp_path}/empty', f'--index={index}') == (
        f"error: --images={tmp_path}/empty: the folder holds no images ({', '.join(dataset.IMAGE_EXTS)}, any "
        f"nesting); nothing to index")
    assert not os.path.exists(index)  # nothing written
    assert error(f'--index={index}', '--words= ') == ("error: --words holds an empty query: give the words to search "
                                                       "with, e.g. --words='a red car'")
    assert error(f'--index={index}', '--words=') == ("error: nothing to do: give --query, --item or --words to "
                                                      "search, --serve for the page, or --run and --images to build "
                                                      "an index")
    assert error(f'--index={index}', f'--run={rundir}', '--words=cat') == (
        "error: --run is read only to build an index (with --images); a search uses the run the index was built "
        "with: leave --run out, or give --images to index with it")
    search(f'--run={rundir}', '--bits=16', f'--images={image_folder}/class00', f'--index={index}')
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert error(f'--index={index}', '--serve', f'--port={port}') == (
            f"error: port {port} on 127.0.0.1 is in use (another search.py?): give another --port")


# -----------------------------------------------------------------------------
# the search page in a real browser: Debian's chromium, driven through chromedriver's W3C WebDriver
# protocol (plain HTTP and JSON, so no client library is needed)
class Browser:
    """The few WebDriver commands the test uses, on a headless Chromium."""
    ELEMENT = 'element-6066-11e4-a52e-4f735466cecf'

    def __init__(self):
        import socket
        chrome, driver = shutil.which('chromium'), shutil.which('chromedriver')
        if not chrome or not driver:
            pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([driver, f'--port={port}'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f'http://127.0.0.1:{port}'
        args = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync']
        for _ in range(100):  # chromedriver takes a moment to listen
            try:
                options = {'binary': chrome, 'args': args}
                caps = {'alwaysMatch': {'browserName': 'chrome', 'goog:chromeOptions': options}}
                self.session = self.call('POST', '/session', {'capabilities': caps})['sessionId']
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError('chromedriver did not start')

    def call(self, method, path, body=None):
        import urllib.request
        req = urllib.request.Request(self.base + path, method=method, headers={'Content-Type': 'application/json'},
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())['value']

    def s(self, path):
        return f'/session/{self.session}{path}'

    def get(self, url):
        self.call('POST', self.s('/url'), {'url': url})

    def find(self, css):
        found = self.call('POST', self.s('/elements'), {'using': 'css selector', 'value': css})
        return [e[self.ELEMENT] for e in found]

    def text(self, element):
        return self.call('GET', self.s(f'/element/{element}/text'))

    def text_or_none(self, css):
        """The text of the first element matching `css`, or None while the page is being redrawn (the element
        found is gone before its text is read: WebDriver's 404, a stale element)."""
        import urllib.error
        try:
            found = self.find(css)
            return self.text(found[0]) if found else None
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
            return None

    def type(self, element, text):  # also sets a file input's path
        self.call('POST', self.s(f'/element/{element}/value'), {'text': text})

    def clear(self, element):
        self.call('POST', self.s(f'/element/{element}/clear'), {})

    def click(self, element):
        self.call('POST', self.s(f'/element/{element}/click'), {})

    def script(self, js, *args):
        return self.call('POST', self.s('/execute/sync'), {'script': js, 'args': [{self.ELEMENT: a} for a in args]})

    def run_js(self, js, *args):  # plain values as arguments
        return self.call('POST', self.s('/execute/sync'), {'script': js, 'args': list(args)})

    def screenshot(self, path):
        import base64
        with open(path, 'wb') as f:
            f.write(base64.b64decode(self.call('GET', self.s('/screenshot'))))

    def select(self, element, value):
        self.script(f"arguments[0].value = '{value}'", element)

    def wait_for(self, css, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.find(css)
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f'no {css} on the page within {timeout} s')

    def quit(self):
        try:
            self.call('DELETE', self.s(''))
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def cli_hits(index, *args):
    """The hits search.py's command line gives for one query (results.json), six of them as the page shows."""
    proc = search(f'--index={index}', *args, '--topk=6', f'--out={os.path.join(index, "cli")}')
    return json.load(open(os.path.join(written(proc), 'results.json')))['results'][0]['hits']


def test_search_page_in_headless_chromium(run, image_folder, tmp_path):
    tmp, cache, rundir = run
    index = str(tmp_path / 'index')
    search(f'--run={rundir}', '--bits=64', f'--images={image_folder}', f'--index={index}')
    browser = Browser()
    uploads = tmp_path / 'tmp'  # the server's temporary folder, where the uploaded images go
    os.makedirs(uploads)
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, 'search.py'), f'--index={index}', '--serve',
                               '--port=0', '--topk=6'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, 'TMPDIR': str(uploads)})
    try:
        line = server.stdout.readline()  # 'serve http://127.0.0.1:<port>/ (...)'
        assert line.startswith('serve http://127.0.0.1:'), line + server.stderr.read()[-2000:]
        browser.get(line.split()[1])
        assert 'Search 400 images' in browser.text(browser.find('h1')[0])
        # send an image through the upload form
        browser.type(browser.find('#image')[0], os.path.join(image_folder, 'class04', '012.png'))
        browser.click(browser.find('#upload')[0])
        browser.wait_for('.hit')
        names = [browser.text(e) for e in browser.find('.name')]
        dists = [int(browser.text(e)) for e in browser.find('.distance')]
        assert len(names) == 6 and dists[0] == 0 and dists == sorted(dists), (names, dists)
        assert sum(n.startswith('class04/') for n in names) >= 4, names
        shutil.copy(os.path.join(image_folder, 'class04', '012.png'), tmp_path / 'upload.png')  # not an indexed path
        cli = cli_hits(index, f'--query={tmp_path / "upload.png"}')
        assert [(h['name'], h['distance']) for h in cli] == list(zip(names, dists))  # the page answers as the CLI
        assert all(browser.script('return arguments[0].naturalWidth', i) == 96 for i in browser.find('.hit img'))
        # type words: this run has no nouns (imgk), so words go through its training images' features
        browser.type(browser.find('#words')[0], 'a striped thing')
        browser.click(browser.find('#go')[0])
        browser.wait_for('#query')
        assert browser.text(browser.find('#query')[0]) == 'a striped thing'
        assert len(browser.find('.hit')) == 6 and not browser.find('#error')
        names = [browser.text(e) for e in browser.find('.name')]
        assert [h['name'] for h in cli_hits(index, '--words=a striped thing')] == names
        # a blank query: one line in the page, no hits
        browser.clear(browser.find('#words')[0])
        browser.type(browser.find('#words')[0], '   ')
        browser.click(browser.find('#go')[0])
        browser.wait_for('#error')
        assert browser.text(browser.find('#error')[0]) == 'type some words to search with first'
        assert not browser.find('.hit')
        assert len([f for f in os.listdir(uploads) if f.startswith('duheg-search-')]) == 1  # while it runs
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0  # stopped, and its uploads went with it
    assert not [f for f in os.listdir(uploads) if f.startswith('duheg-search-')]


def start_page(index, *args, env=None):
    """search.py --serve on a free port: (the process, the page's address)."""
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, 'search.py'), f'--index={index}', '--serve',
                               '--port=0', *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})})
    line = server.stdout.readline()  # 'serve http://127.0.0.1:<port>/ (...)'
    assert line.startswith('serve http://127.0.0.1:'), line + server.stderr.read()[-2000:]
    return server, line.split()[1]


def test_search_page_shows_why_and_lets_results_be_taken_away(run, image_folder, tmp_path):
    """The page on the run's retrieval set (a dataset with labels): a words query with its code, nouns,
    distances and time; the hit count; a click on a hit (framed as Figure 6); the downloads; a drop of an
    image file; a file that is not an image, an upload too large, a foreign Host header. Screenshots
    of each state are saved in the test's folder."""
    import base64
    import urllib.error
    import urllib.request
    tmp, cache, rundir = run
    index = str(tmp_path / 'index')
    search(f'--run={rundir}', '--bits=64', '--images=dataset:folder', f'--index={index}')
    browser = Browser()
    server, base = start_page(index, '--topk=6', '--max_upload_mb=0.05')
    shots = tmp_path / 'screenshots'
    os.makedirs(shots)
    try:
        browser.get(base)
        browser.type(browser.find('#words')[0], 'a striped thing')
        browser.click(browser.find('#go')[0])
        browser.wait_for('#code-hex')
        browser.screenshot(shots / '1_words.png')
        hexcode, bits = browser.text(browser.find('#code-hex')[0]), browser.text(browser.find('#code-bits')[0])
        assert re.fullmatch(r'[0-9a-f]{16}', hexcode) and bits.replace(' ', '') == bin(int(hexcode, 16))[2:].zfill(64)
        nouns = [browser.text(e) for e in browser.find('.noun')]  # imgk: the training images are its nouns
        weights = [float(browser.text(e)) for e in browser.find('.weight')]
        assert len(nouns) == 5 and weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1.0001
        assert re.fullmatch(r'searched 300 codes in [0-9.]+ ms \(exact\)', browser.text(browser.find('#time')[0]))
        assert browser.text(browser.find('#legend')[0]).startswith('d = Hamming distance: in how many of the 64 bits')
        dists = [int(browser.text(e)) for e in browser.find('.distance')]
        assert len(dists) == 6 and dists == sorted(dists)
        # the hit count
        browser.select(browser.find('#k')[0], '20')
        browser.click(browser.find('#go')[0])
        browser.wait_for('#code-hex')
        assert len(browser.find('.hit')) == 20
        # the downloads: results.json of this query, its contact sheet
        href = browser.script('return arguments[0].href', browser.find('#json')[0])
        res = json.load(urllib.request.urlopen(href))
        assert [h['distance'] for h in res['results'][0]['hits']] == [int(browser.text(e))
                                                                       for e in browser.find('.distance')]
        assert res['results'][0]['query'] == {'words': 'a striped thing'} and res['results'][0]['code'] == hexcode
        sheet = urllib.request.urlopen(browser.script('return arguments[0].href', browser.find('#sheet')[0]))
        assert sheet.headers['Content-Type'] == 'image/png' and sheet.read()[:8] == b'\x89PNG\r\n\x1a\n'
        # a click on a hit: more like it, framed green (a label shared with it) or red, as Figure 6
        first = browser.text(browser.find('.hit .name')[0])
        browser.click(browser.find('.hit a')[0])
        browser.wait_for('#preview')
        browser.screenshot(shots / '2_more_like_this.png')
        assert browser.text(browser.find('#query')[0]) == first
        assert browser.text(browser.find('.hit .name')[0]) == first
        assert browser.text(browser.find('.distance')[0]) == '0'
        frames = browser.find('.hit.right') + browser.find('.hit.wrong')
        assert len(frames) == 20 and len(browser.find('.hit.right')) >= 10  # the tiny set's classes hold together
        assert 'Figure 6' in browser.text(browser.find('#legend')[0])
        assert len(browser.find('.noun')) == 5
        full = urllib.request.urlopen(browser.script('return arguments[0].href', browser.find('.full')[0]))
        assert full.headers['Content-Type'] == 'image/png'
        # an image dropped on the page
        png = open(os.path.join(image_folder, 'class07', '020.png'), 'rb').read()
        browser.run_js("""
            const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const dt = new DataTransfer(); dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        """, base64.b64encode(png).decode())
        browser.wait_for('#preview')
        deadline = time.time() + 60
        while browser.text_or_none('#query') != 'dropped.png' and time.time() < deadline:
            time.sleep(0.2)
        browser.screenshot(shots / '3_dropped.png')
        assert browser.text(browser.find('#query')[0]) == 'dropped.png'
        assert browser.script('return arguments[0].naturalWidth', browser.find('#preview')[0]) == 32
        assert sum(browser.text(e).startswith('class07/') for e in browser.find('.hit .name')) >= 10
        # errors: one line in the page, never a traceback or a temporary path
        (tmp_path / 'notes.png').write_text('not a picture')
        browser.type(browser.find('#image')[0], str(tmp_path / 'notes.png'))
        browser.click(browser.find('#upload')[0])
        browser.wait_for('#error')
        assert browser.text(browser.find('#error')[0]) == ('notes.png is not an image this page can read: choose a '
                                                           'JPEG, PNG, GIF, WebP, ... file')
        big = tmp_path / 'big.png'
        from PIL import Image
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(big)
        browser.type(browser.find('#image')[0], str(big))
        browser.click(browser.find('#upload')[0])
        deadline = time.time() + 60
        while 'more than this page takes' not in (browser.find('#error') and browser.text(browser.find('#error')[0])
                                                  or '') and time.time() < deadline:
            time.sleep(0.2)
        browser.screenshot(shots / '4_too_large.png')
        assert browser.text(browser.find('#error')[0]) == (
            'the upload is 0.1 MB, more than this page takes: choose a smaller image, or start the page with a larger '
            'search.py --max_upload_mb (now 0.05)')
        assert browser.script('return arguments[0].value', browser.find('#k')[0]) == '6'  # the server's --topk
        assert 'Traceback' not in browser.text(browser.find('body')[0]) and '/tmp' not in browser.text(
            browser.find('body')[0])
        # a request naming another host (DNS rebinding) is refused
        req = urllib.request.Request(base, headers={'Host': 'attacker.example:80'})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 403
        assert len(os.listdir(os.path.join(index, 'thumbs'))) >= 20  # thumbnails made once, kept beside the index
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)


def test_search_page_at_1280_px_and_errors_that_say_what_to_do(run, image_folder, tmp_path):
    """Ten hits on one row of a 1280 px window, long file names inside their tiles, the run's name in the tab
    title, the warning of a run trained on random weights, and a sentence that says what to do for an address
    that names no image or no number of hits."""
    tmp, cache, rundir = run
    photos = tmp_path / 'photos'
    for c in range(3):  # twelve images with long names, as a camera names them
        os.makedirs(photos / f'class{c:02d}')
        for i in range(4):
            shutil.copy(os.path.join(image_folder, f'class{c:02d}', f'{i:03d}.png'),
                        photos / f'class{c:02d}' / f'holiday_in_the_mountains_with_the_whole_family_IMG_{i:04d}.png')
    index = str(tmp_path / 'index')
    search(f'--run={rundir}', '--bits=64', f'--images={photos}', f'--index={index}')
    browser = Browser()
    server, base = start_page(index, '--topk=10')
    try:
        browser.call('POST', browser.s('/window/rect'), {'width': 1280, 'height': 900})
        browser.get(base + 'search?words=a+striped+thing&k=10')
        browser.wait_for('.hit')
        browser.screenshot(tmp_path / 'ten_hits_1280.png')
        assert browser.run_js('return document.title') == 'duheg search: run'  # the run folder's name
        boxes = browser.run_js("return Array.from(document.querySelectorAll('.hit')).map(e => {"
                               "const r = e.getBoundingClientRect(), n = e.querySelector('.name');"
                               "return [r.left, r.right, r.top, n.scrollWidth, n.clientWidth]; })")
        assert len(boxes) == 10 and len({round(b[2]) for b in boxes}) == 1  # one row
        assert all(a[1] <= b[0] for a, b in zip(boxes, boxes[1:]))  # no tile reaches into the next
        assert all(scroll <= width for *_, scroll, width in boxes)  # each name wraps inside its tile
        warning = browser.text(browser.find('#warning')[0])
        assert warning.startswith('This run was trained on random weights (--backbone_pretrained=random, '
                                  '--clip_pretrained=random): a test run.')
        for address, said in (
                ('search?item=999', 'item=999 names no image of this index: its 12 images are numbered 0 to 11; '
                                    'click a hit, or search with words or an image'),
                ('search?words=cat&k=abc', "k='abc' is not a number of hits: give a whole number, e.g. k=10"),
                ('thumb/99', '/thumb/99 names no image of this index: its 12 images are numbered 0 to 11; click a '
                             'hit, or search with words or an image')):
            browser.get(base + address)
            assert browser.text(browser.wait_for('#error')[0]) == said
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)

