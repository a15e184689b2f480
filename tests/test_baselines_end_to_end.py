"""Every baseline of train.py --method trained through the command line on a generated feature
set: each ends above chance, and the supervised ones (which read labels) above the label-free."""
import re

import pytest

from conftest import run_script, write_feature_set


SUPERVISED = ('dhn', 'dch', 'dqn', 'dvsq', 'dtq')
LABEL_FREE = ('lsh', 'itq', 'ssdh', 'cibhash')


def test_baselines_above_chance_supervised_above_label_free(tmp_path):
    labels, (query, retrieval, _) = write_feature_set(str(tmp_path), views=2)
    chance = ((labels[query] @ labels[retrieval].T) > 0).mean()
    assert chance == pytest.approx(1 / 8)
    maps = {}
    for method in LABEL_FREE + SUPERVISED:
        proc = run_script('train.py', '--dataset=folder', f'--cache_dir={tmp_path}', '--backbone=tiny-test',
                          '--backbone_pretrained=random', f'--method={method}', '--bits=16', '--epochs=40',
                          '--warmup=3', '--lr_max=0.01', '--lr_min=0.001', '--batch_size=64',
                          f'--results={tmp_path}/results.jsonl', f'--run_dir={tmp_path}/{method}',
                          '--clip_model=tiny-test', '--clip_pretrained=random',  # DVSQ's word vectors
                          env=dict(OMP_NUM_THREADS='1'))
        maps[method] = float(re.search(rf'^result dataset=folder method={method} bits=16 map@1000=([\d.]+)',
                                       proc.stdout, re.M).group(1))
        assert ('supervised' in proc.stdout) == (method in SUPERVISED)
    for method, m in maps.items():
        assert m > chance + 0.1, maps
    print(' '.join(f'{m}={v:.4f}' for m, v in maps.items()))  # the figures the README quotes
    assert min(maps[m] for m in SUPERVISED) > max(maps[m] for m in LABEL_FREE) + 0.1, maps
