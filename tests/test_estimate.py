"""benchmarks/estimate_gpu_time.py: the arithmetic by hand on a small case, and the work it
counts is the work reproduce.py would run."""
import math
import re

import pytest

from conftest import run_script

SMALL = ['--tables=6', '--datasets=cifar10', '--cpu_cores=2', '--gpu_vit_b16=100', '--gpu_vit_b32=1000',
         '--worker_cifar=40', '--images=cifar10=1000', '--train=cifar10=120',
         '--step_s=0.01', '--kernels_per_step=1000', '--launch_s=0.00001', '--process_s=3', '--eval_s=cifar10=2',
         '--cpu_vit_b16=10', '--cpu_text_prompts=824586', '--kmeans_cpu_s=1', '--nouns_cpu_s=5', '--aug_views=2']


def estimates(out):
    return {m['table']: {k: float(v) for k, v in re.findall(r'(\w+)=([\d.]+)', m.group(0)) if k != 'table'}
            | {'table': m['table']} for m in re.finditer(r'^estimate table=(?P<table>\S+) .*$', out, re.M)}


def test_table6_by_hand():
    import reproduce
    import train
    out = run_script('benchmarks/estimate_gpu_time.py', *SMALL).stdout
    e = estimates(out)['6']
    # Table 6 on CIFAR-10: ViT-B/16 and ViT-B/32 features, each 1000 plain images at min(GPU, 2 workers x 40),
    # and 120 train images decoded once at 80/s, their 2 views made and encoded on the GPU at 100 and 1000 views/s
    extract = 1000 / min(100, 80) + 120 * max(2 / 100, 1 / 80) + 1000 / min(1000, 80) + 120 * max(2 / 1000, 1 / 80)
    assert extract == 28.9 and e['extract_s'] == pytest.approx(extract, abs=0.05)
    # WordNet through each CLIP's text tower: (7 x 117,798 prompts / 824,586 per s + 1 s K-means) at a GPU
    # 100 / 10 times the CPU, plus 5 s on the CPU
    nouns = 2 * ((7 * 117798 / 824586 + 1) / (100 / 10) + 5)
    assert e['nouns_s'] == pytest.approx(nouns, abs=0.05)
    # two train.py processes: 3 s, then per code length EPOCHS x 1 step x (0.01 + 1000 x 1e-5) s and 2 s of evaluation
    steps = math.ceil(120 / train.BATCH_SIZE)
    trains = 2 * (3 + 3 * (reproduce.EPOCHS * steps * 0.02 + 2))
    assert e['train_s'] == pytest.approx(trains, abs=0.05)
    assert e['hours'] == pytest.approx((extract + nouns + trains) / 3600, abs=5e-4)
    assert (e['processes'], e['cells'], e['feature_sets']) == (2, 6, 2)
    assert 'ESTIMATE' in out and 'all' in estimates(out)


def test_counts_match_reproduce_dry_run(tmp_path):
    """Every table's train.py processes are the commands `reproduce.py --dry_run` lists."""
    out = run_script('benchmarks/estimate_gpu_time.py', '--tables=1,fig5,baselines').stdout
    e = estimates(out)
    for table in ('1', 'fig5', 'baselines'):
        dry = run_script('reproduce.py', f'--table={table}', '--dry_run', f'--out_dir={tmp_path}/out',
                         f'--cache_dir={tmp_path}/cache').stdout
        assert e[table]['processes'] == dry.count('would run: '), table
    # Table 1: 9 measured rows (4 DUH-EG, 4 ports on VGG-16, *HHCH on CLIP); baselines: 13 methods + CIBHash on VGG-16
    assert (e['1']['cells'], e['fig5']['cells'], e['baselines']['cells']) == (9 * 12, 64, 14 * 12)
    # every table together trains a cell two tables share once
    assert e['all']['processes'] < sum(e[t]['processes'] for t in ('1', 'fig5', 'baselines'))


def test_missing_dataset_number_is_an_error():
    proc = run_script('benchmarks/estimate_gpu_time.py', '--datasets=cifar10,mscoco', '--eval_s=cifar10=2',
                      check=False)
    assert proc.returncode != 0 and '--eval_s gives no number for mscoco' in proc.stderr
    proc = run_script('benchmarks/estimate_gpu_time.py', '--images=cifar10=many', check=False)
    assert proc.returncode != 0 and "--images: 'cifar10=many' is not name=number" in proc.stderr
