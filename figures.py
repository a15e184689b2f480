"""The pictures of a run (Figures 3, 4, 6 and 7 of the paper), drawn on an Agg canvas with no pyplot state:
precision-recall and precision@N curves, the top-10 retrievals of a query framed green or red, and an image's
top-5 nouns of Eq. 6 with and without the noun selection. eval_hash.py and report.py draw with them.
"""
import os

import numpy as np

import cache
import dataset
import external


def _figure(w, h, dpi=100):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=dpi)


def plot_curves(curves, path, kind='pr', title=None):
    """One line per method or code length (Figure 3: kind='pr', precision over recall;
    Figure 4: kind='pn', precision over the number N of returned images). 600 x 450 px."""
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    for label, cur in curves.items():
        x = cur['recall'] if kind == 'pr' else cur['n']
        ax.plot(x, cur['precision'], marker='.', markersize=3, label=label)
    ax.set_xlabel('Recall' if kind == 'pr' else 'Number of top returned images N')
    ax.set_ylabel('Precision')
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or ('Precision-recall' if kind == 'pr' else 'Precision@N'))
    fig.tight_layout()
    fig.savefig(path)
    return path


def _framed(img, color, width):
    """The image as H x W x 3 uint8 inside a border of `color` (RGB) `width` pixels wide."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    out = np.empty((img.shape[0] + 2 * width, img.shape[1] + 2 * width, 3), np.uint8)
    out[:] = color
    out[width:width + img.shape[0], width:width + img.shape[1]] = img[:, :, :3]
    return out


def plot_top10(query_img, retrieved_imgs, correct, path):
    """Figure 6: the query and its top-10 retrieved images, each framed green (relevant) or red."""
    fig = _figure(1.4 * (1 + len(retrieved_imgs)), 1.8)
    panels = [('query', _framed(query_img, (255, 255, 255), 0))]
    for i, (img, ok) in enumerate(zip(retrieved_imgs, correct)):
        w = max(2, round(0.06 * min(np.shape(img)[:2])))
        panels.append((f'{i + 1}', _framed(img, (0, 170, 0) if ok else (220, 0, 0), w)))
    for j, (name, img) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis('off')
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.02, top=0.85, wspace=0.06)
    fig.savefig(path)
    return path


def plot_top_nouns(img, words, weights, path, words_all=None, weights_all=None):
    """Figure 7: an image with its top-5 matched nouns and their weights s_{i,w} (Eq. 6) as bar
    charts, with the noun selection and, when given, without it (all nouns)."""
    charts = [('with noun selection', words, weights)]
    if words_all is not None:
        charts.append(('without noun selection', words_all, weights_all))
    fig = _figure(3 + 3.5 * len(charts), 3)
    ax = fig.add_subplot(1, 1 + len(charts), 1)
    ax.imshow(_framed(img, (255, 255, 255), 0))
    ax.axis('off')
    for j, (name, ws, vs) in enumerate(charts):
        ax = fig.add_subplot(1, 1 + len(charts), j + 2)
        ws, vs = list(ws)[:5], list(vs)[:5]
        ax.barh(range(len(ws))[::-1], vs, color='tab:blue' if j == 0 else 'tab:gray')
        ax.set_yticks(range(len(ws))[::-1], [str(w).replace('_', ' ') for w in ws], fontsize=8)
        ax.set_xlabel('weight')
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def draw_examples(run, bits, z, top, data_path=''):
    """Figures 6 and 7 for the first queries of a run's codes z at `bits`, `top` their top-10 retrieval rows
    (eval_hash.rank_topk): each query with its top-10 retrievals, and its top-5 nouns of Eq. 6 with and
    without the noun selection; the images from where dataset_extract.py read them, or from `data_path`
    (eval_hash.py --data_path), checked as the same."""
    cfg = cache.read_json(os.path.join(run, f'{bits}bits', 'result.json'))['config']
    name = cfg['DATASET']
    try:  # the images dataset_extract.py read, checked against their recorded fingerprint
        images = dataset.extracted_images(cfg['CACHE_DIR'], name, data_path)
    except dataset.DataError as e:
        if data_path:  # the user named other images: refused, never drawn
            raise SystemExit(f'error: --data_path={data_path}: {e}')
        print(f'no Figure 6-7 pictures: {e}')
        return []
    except Exception as e:  # noqa: BLE001 - pictures are optional: say why there are none
        print(f'no Figure 6-7 pictures: the images of {name} cannot be read ({e})')
        return []
    q_idx, r_idx = z['query_index'][:len(top)], z['retrieval_index']
    paths = []
    for j, q in enumerate(q_idx):
        ret = r_idx[top[j]]
        correct = images.labels[ret] @ images.labels[q] > 0
        paths.append(plot_top10(np.asarray(images.load(q)), [np.asarray(images.load(r)) for r in ret], correct,
                                os.path.join(run, f'top10_query{j}.png')))
    if cfg.get('METHOD', 'duheg') != 'duheg' or cfg.get('EXTERNAL', 'efc') == 'none':
        return paths
    try:  # Figure 7: the weights of Eq. 6 over t_com, and over every noun
        i_feats = cache.load_features(cfg['CACHE_DIR'], name, cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'],
                                      cfg.get('VIEW_RECIPE') or 'simclr', mmap=True)
        t_com, words_com = external.run_vocabulary(dict(cfg, EXTERNAL='efc'), words=True)
        t_all, words_all = external.run_vocabulary(dict(cfg, EXTERNAL='ek'), words=True)
    except (Exception, SystemExit) as e:  # noqa: BLE001
        print(f'no Figure 7 pictures: the nouns or CLIP features of the run cannot be read ({str(e)[:200]})')
        return paths

    def top5(i, t, words):  # the five largest weights s_{i,w} of Eq. 6
        s = external.noun_weights(i[None], t, cfg['TAU1'])[0][0].numpy()
        best = np.argsort(-s, kind='stable')[:5]
        return [words[w] for w in best], s[best]

    for j, q in enumerate(q_idx):
        i = np.asarray(i_feats[q], np.float32)
        (w1, s1), (w2, s2) = top5(i, t_com, words_com), top5(i, t_all, words_all)
        paths.append(plot_top_nouns(np.asarray(images.load(q)), w1, s1, os.path.join(run, f'nouns_query{j}.png'),
                                    w2, s2))
    return paths
