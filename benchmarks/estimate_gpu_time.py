"""How long each reproduce.py table takes on one GPU: an ESTIMATE by arithmetic, not a measurement.

No GPU was lent where this was written, so the time of a table on a GPU is put together from
  * the GPU's forward images/s of each backbone, published by timm (not measured here), and
  * the costs that stay on the CPU of a GPU machine, measured here by the other benchmarks:
    the data path of one DataLoader worker (bench_extract.py), the fixed cost of a training step
    and the evaluation at each dataset's shape (bench_train.py), the text tower and K-means
    (bench_nouns.py, bench_kmeans.py), and a train.py process's start (measured by hand).
The work itself comes from reproduce.py's own plan of each table (its rows, cells and the
train.py processes that train them), so a table's estimate counts exactly what it would run.
Table 1's competitors (HHCH, MeCoQ, CGHash) are counted with their own epochs and batches, each step
costed as DUH-EG's; their heavier steps and HHCH's K-Means of the train set every epoch (on the CPU,
as in their code) are not modelled: for them it is a lower bound (bench_competitors.py measures them).

    python benchmarks/estimate_gpu_time.py                        # every table, the README's figures
    python benchmarks/estimate_gpu_time.py --cpu_cores=32 --gpu_vit_b16=3000 --tables=1,6

Replace any input by your own measurement (e.g. bench_extract.py --device=cuda on your GPU);
where you have run reproduce.py, its REPORT.md records the time each step really took. The arithmetic
and the rates' defaults live in report.py (`reproduce.py --dry_run` estimates what is left with them);
this script counts the work of each table from empty caches.
One line per table is printed to parse: `estimate table=... hours=...`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines  # noqa: E402
import paper  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402
import train  # noqa: E402
from configurator import configure  # noqa: E402

_R = report.GPU_RATES  # the defaults of the rates below (reproduce.py --dry_run estimates with them)

# -----------------------------------------------------------------------------
# what to estimate
TABLES = ('1', '2', '3', '4', '5', '6', 'fig5', 'baselines')  # reproduce.py --table of each estimate
DATASETS = ('cifar10', 'nuswide', 'flickr25k', 'mscoco')  # the tables' columns
SEEDS = 1                   # seeds per cell (reproduce.py --seeds)
# the GPU: forward images/s, mixed precision, batch 1024, from timm's published benchmark
# results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv (PyTorch 2.4, CUDA 12.4), rows
# vit_base_patch16_clip_quickgelu_224, vit_base_patch32_clip_quickgelu_224 and vgg16 (OpenAI's
# CLIP towers use QuickGELU). Run dataset_extract.py with --precision=fp16 to get such rates.
GPU_NAME = _R['GPU_NAME']                  # the GPU the rates below are for (only printed)
GPU_VIT_B16 = _R['GPU_VIT_B16']            # images/s, CLIP ViT-B/16 image tower
GPU_VIT_B32 = _R['GPU_VIT_B32']            # images/s, CLIP ViT-B/32 image tower
GPU_VGG16 = _R['GPU_VGG16']                # images/s, VGG-16 (to fc8; fc7 is a little less)
CPU_CORES = _R['CPU_CORES']                # CPU cores of the GPU machine: dataset_extract.py runs one worker each
# measured on this project's 2-core machine (AMD EPYC, no GPU), 2026-11-25, randomly initialised weights
CPU_VIT_B16 = _R['CPU_VIT_B16']            # images/s of the ViT-B/16 image tower on these 2 cores (bench_extract.py,
                                           # bare)
WORKER_PHOTO = _R['WORKER_PHOTO']          # images/s one worker decodes and preprocesses: 500 x 375 JPEGs, plain
                                           # view (bench_extract)
WORKER_CIFAR = _R['WORKER_CIFAR']          # the same for 32 x 32 images (CIFAR-10), plain view (--image_w=32
                                           # --image_h=32)
STEP_S = _R['STEP_S']                      # a training step's fixed CPU cost: its ops on tiny tensors, 1 thread
                                           # (bench_train.py step_overhead_ms); its arithmetic (about 3 GFLOP at
                                           # batch 512) is far less on a GPU
KERNELS_PER_STEP = _R['KERNELS_PER_STEP']  # ops a step dispatches (torch.profiler: 420 calls from Python, 700 at the
                                           # bottom) ...
LAUNCH_S = _R['LAUNCH_S']                  # ... each launching a CUDA kernel at this cost (assumed; typically 2-5 us)
EVAL_S = tuple(f'{d}={v}' for d, v in _R['EVAL_S'].items())  # s a code length, mean of 16/32/64 bits: encode +
                                           # binary + continuous MAP@K at the dataset's shape on the CPU
                                           # (bench_train.py --num_query= --num_retrieval= --topk= ... of each)
PROCESS_S = _R['PROCESS_S']                # a train.py process's fixed cost: python and imports (1.8 s measured),
                                           # loading and checking the features (1.3 s measured, NUS-WIDE) and
                                           # starting CUDA (5 s, assumed)
CPU_TEXT_PROMPTS = _R['CPU_TEXT_PROMPTS']  # prompts/s of the ViT-B/16 text tower, batches cut (bench_nouns.py)
NOUNS_CPU_S = _R['NOUNS_CPU_S']            # nouns_embed.py's CPU-side work on WordNet (reading, tokenizing,
                                           # selection): the whole step with the tiny test model less its clustering
                                           # (36 s idle, 62-84 s under load)
KMEANS_CPU_S = _R['KMEANS_CPU_S']          # K-means of WordNet's 117,798 x 512 features into 800 clusters
                                           # (bench_kmeans.py)
# the usual image counts; query, retrieval and train sizes follow the paper's Section 4.1.1
IMAGES = tuple(f'{d}={v}' for d, v in _R['IMAGES'].items())  # images of each dataset
TRAIN = tuple(f'{d}={v}' for d, v in _R['TRAIN'].items())    # training images of each
AUG_VIEWS = _R['AUG_VIEWS']                # augmented views of every train image (dataset_extract.py's default:
                                           # 2 x 60 epochs; 2 with --released)
WORDNET_WORDS = _R['WORDNET_WORDS']        # words of the vocabularies nouns_embed.py reads (WordNet's noun lemmas)
IMAGENET_WORDS = report.WORDS['imagenet']  # (open_clip's ImageNet-1k class names)
PAPER_VOCABS = ('imagenet21k=21843', 'wordnet=117797', 'conceptnet=134364', 'glove=317756')  # Table 4's words


# -----------------------------------------------------------------------------
def numbers(name):
    """The setting `name` (items key=number) as a dict."""
    out = {}
    for item in globals()[name]:
        key, eq, value = item.partition('=')
        try:
            out[key] = float(value)
        except ValueError:
            raise SystemExit(f"error: --{name.lower()}: {item!r} is not name=number") from None
    return out


def rates():
    """The settings as report.py's rates."""
    return dict({k: globals()[k] for k in report.GPU_RATES}, **{k: numbers(k) for k in ('IMAGES', 'TRAIN', 'EVAL_S')})


def plan(table):
    """What reproduce.py --table=`table` runs from empty caches: feature sets {(dataset, backbone):
    augmented views}, vocabularies to embed (their words; another T1 reuses the features and K-means,
    and its selection takes seconds), train.py processes {name: (dataset, code lengths, trained?)}
    and the number of cells."""
    reproduce.DATASETS, reproduce.SEEDS = DATASETS, tuple(range(SEEDS))
    if table == '4':
        words = {('imagenet', reproduce.CLIP_MODEL): IMAGENET_WORDS, ('wordnet', reproduce.CLIP_MODEL): WORDNET_WORDS}
        return {}, words, {}, 0
    parts = ('fig5a', 'fig5b') if table == 'fig5' else (table,)
    defaults = reproduce.train_defaults()
    cells = [c for t in parts for c in reproduce.make_cells(t, defaults, {})]
    features, vocabs, groups = {}, {}, {}
    for c in cells:
        s = c.settings
        features.setdefault((s['DATASET'], s['CLIP_MODEL']), 0)  # the external feature's space
        features[s['DATASET'], s['BACKBONE']] = AUG_VIEWS  # Hv's input, with its augmented views
        if reproduce.needs_nouns(s):
            vocabs[s['VOCAB'], s['CLIP_MODEL']] = IMAGENET_WORDS if s['VOCAB'] == 'imagenet' else WORDNET_WORDS
        key = reproduce.run_name(c.cfg)  # reproduce.py trains a row, dataset and seed in one process
        groups.setdefault(key, (s['DATASET'], set(), s['METHOD'] not in baselines.UNTRAINED, c.cfg['EPOCHS'],
                                c.cfg['BATCH_SIZE']))[1].add(c.bits)
    return features, vocabs, groups, len(cells)


def estimate(features, vocabs, processes, cells):
    e = report.estimate(rates(), features, vocabs, processes, reproduce.EPOCHS, train.BATCH_SIZE)
    return dict(e, features=len(features), vocabs=len(vocabs), processes=len(processes), cells=cells)


def hm(seconds):
    return '–' if seconds == 0 else f'{seconds / 60:.0f} min' if seconds < 3600 else f'{seconds / 3600:.1f} h'


def main():
    configure(globals())
    unknown = [t for t in TABLES if t not in paper.TABLES and t not in ('4', 'fig5')]
    if unknown or SEEDS < 1 or CPU_CORES < 1:
        raise SystemExit(f"error: --tables: choose from 1, 2, 3, 4, 5, 6, fig5, fig5a, fig5b, baselines "
                         f"(got {', '.join(unknown) or '-'}); --seeds and --cpu_cores must be >= 1")
    for name in ('IMAGES', 'TRAIN', 'EVAL_S'):
        missing = [d for d in DATASETS if d not in numbers(name)]
        if missing:
            raise SystemExit(f"error: --{name.lower()} gives no number for {', '.join(missing)} (add {missing[0]}=N)")
    print(f"ESTIMATE for one {GPU_NAME} (timm's published AMP rates) and {CPU_CORES} CPU cores, from empty caches, "
          f"{len(DATASETS)} datasets, {SEEDS} seed(s), {reproduce.EPOCHS} epochs; CPU-side costs measured on a "
          f"2-core AMD EPYC")
    print('| table | train.py processes (cells) | feature sets | extraction | vocabularies | nouns | training '
          '+ evaluation | total |\n|---|---|---|---|---|---|---|---|')
    lines, all_features, all_vocabs, all_processes = [], {}, {}, {}  # every table together: shared work once
    for t in TABLES + ('all',):
        if t == 'all':  # its cells: the distinct ones (a cell two tables share is trained once)
            e = estimate(all_features, all_vocabs, all_processes, sum(len(p[1]) for p in all_processes.values()))
        else:
            features, vocabs, processes, cells = plan(t)
            e = estimate(features, vocabs, processes, cells)
            for key, views in features.items():  # a feature set with augmented views covers one without
                all_features[key] = max(all_features.get(key, 0), views)
            all_vocabs.update(vocabs)
            all_processes.update(processes)
        print(f"| {t} | {e['processes']} ({e['cells']}) | {e['features']} | {hm(e['extract_s'])} | {e['vocabs']} | "
              f"{hm(e['nouns_s'])} | {hm(e['train_s'])} | {hm(e['total_s'])} |")
        lines.append(f"estimate table={t} gpu={GPU_NAME.replace(' ', '_')} cpu_cores={CPU_CORES} seeds={SEEDS} "
                     f"processes={e['processes']} cells={e['cells']} feature_sets={e['features']} "
                     f"extract_s={e['extract_s']:.1f} nouns_s={e['nouns_s']:.1f} train_s={e['train_s']:.1f} "
                     f"hours={e['total_s'] / 3600:.3f}")
    print("\nTable 4: nouns_embed.py alone (ESTIMATE, the same machine) and the paper's seconds (hardware not named):")
    for name, words in numbers('PAPER_VOCABS').items():
        paper_s = paper.PAPER_TABLE4[name.replace('imagenet21k', 'imagenet')][1]
        print(f"  {name}: {words:,.0f} words, about {report.nouns_s(rates(), words):.0f} s (paper {paper_s} s)")
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
